"""A conv whose one consumer is a residual add computes the add in its requantize epilogue
(``relay_passes.fuse_epilogues``): one kernel instead of two, the conv's int8 output never
stored; the integers are the reference's, dense and depthwise, either operand order, with
the saturating edge values. A conv output that something else also reads is left alone."""
from __future__ import annotations

import pytest
import torch
import tvm
from tvm import tirx

from schedules.default import apply_default_schedules
from schedules.targets import resolve
from tests.conftest import OpModule, assert_bit_exact, int8, run_tvm
from tvmq.compile import graph_passes
from tvmq.frontend import import_exported_program

ops = torch.ops.tvmq
HOST = resolve("x86")


def kernels(module, *inputs, target=HOST):
    """{PrimFunc name: PrimFunc} of the module as phase 3 schedules it."""
    mod = import_exported_program(torch.export.export(module, inputs))
    with target:
        mod = apply_default_schedules(tvm.transform.Sequential(graph_passes(target))(mod), target)
    return {gv.name_hint: f for gv, f in mod.functions_items() if isinstance(f, tirx.PrimFunc)}


def _block(gen, groups: int, add_first: bool, reuse: bool):
    """conv(x) + x (ReLU), or x + conv(x); ``reuse``: the conv's output is read again."""
    c = 16
    w = int8(c, c // groups, 3, 3, gen=gen)
    w[0] = -128  # the largest products: the requantize saturates
    b = torch.randint(-4000, 4000, (c,), generator=gen, dtype=torch.int32)

    def fn(x, w, b):
        y = ops.qconv2d(x, w, b, [1, 1], [1, 1, 1, 1], [1, 1], groups, 0, 6, False, 8)
        z = ops.qadd(x, y, 0, 1, True, 8) if add_first else ops.qadd(y, x, 1, 0, True, 8)
        return ops.qadd(z, y, 0, 0, False, 8) if reuse else z

    return OpModule(fn, w, b)


@pytest.mark.parametrize("groups", [1, 16], ids=["dense", "depthwise"])
@pytest.mark.parametrize("add_first", [False, True], ids=["conv+x", "x+conv"])
def test_residual_add_runs_in_the_conv_epilogue_exactly(gen, groups, add_first):
    m = _block(gen, groups, add_first, reuse=False)
    x = int8(1, 16, 9, 8, gen=gen)
    x[0, :, 0] = 127
    x[0, :, 1] = -128
    funcs = kernels(m, x)
    fused = [n for n in funcs if n.startswith("tvmq_qconv2d") and "qadd" in n]
    assert fused and not [n for n in funcs if n.startswith("tvmq_qadd")], list(funcs)
    # the add is inlined into the requantize epilogue: no buffer holds the conv's int8 output
    assert "requant_intermediate" not in funcs[fused[0]].script(), "conv output still stored"
    assert_bit_exact(run_tvm(m, x), m(x))


def test_residual_add_in_the_epilogue_of_an_amx_conv(gen, monkeypatch):
    """The AMX row kernel takes the add too (tiles emulated by TIR loops on hosts without
    AMX, ``schedules.amx.EMULATE``; 64 channels fill a tile row)."""
    import schedules.amx

    monkeypatch.setattr(schedules.amx, "EMULATE", True)
    target = {"kind": "llvm", "mcpu": str(HOST.attrs["mcpu"]), "num-cores": 2,
              "mattr": ["+amx-tile", "+amx-int8"]}
    w = int8(64, 64, 3, 3, gen=gen)
    w[0] = 127
    b = torch.randint(-4000, 4000, (64,), generator=gen, dtype=torch.int32)
    m = OpModule(lambda x, w, b: ops.qadd(
        ops.qconv2d(x, w, b, [1, 1], [1, 1, 1, 1], [1, 1], 1, 0, 8, False, 8), x, 1, 0, True, 8),
        w, b)
    x = int8(1, 64, 5, 20, gen=gen)
    x[0, :, 0] = -128
    funcs = kernels(m, x, target=resolve(target))
    (fused,) = [f for n, f in funcs.items() if n.startswith("tvmq_qconv2d") and "qadd" in n]
    script = fused.script()
    # the AMX kernel: its accumulator row padded to whole 16-pixel tiles (20 -> 32)
    assert '(T.int64(1), T.int64(5), T.int64(32), T.int64(64)), "int32"' in script
    assert "requant_intermediate" not in script
    assert_bit_exact(run_tvm(m, x, target=target), m(x))


def test_conv_output_read_twice_is_not_fused(gen):
    m = _block(gen, 1, False, reuse=True)
    x = int8(1, 16, 8, 8, gen=gen)
    funcs = kernels(m, x)
    assert not [n for n in funcs if "qconv2d" in n and "qadd" in n], list(funcs)
    assert_bit_exact(run_tvm(m, x), m(x))


def test_resnet20_fuses_every_residual_add():
    """ResNet-20's nine residual adds each run inside the conv that feeds them."""
    from tvmq.build import zoo_program

    mod = import_exported_program(zoo_program("resnet20", "int-se", None))
    with HOST:
        mod = tvm.transform.Sequential(graph_passes(HOST))(mod)
    names = [gv.name_hint for gv, f in mod.functions_items() if isinstance(f, tirx.PrimFunc)]
    assert len([n for n in names if n.startswith("tvmq_qconv2d") and "qadd" in n]) == 6  # distinct
    assert not [n for n in names if n.startswith("tvmq_qadd")], names
