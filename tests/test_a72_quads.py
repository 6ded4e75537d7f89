"""The Pi 4's 8-bit conv (Cortex-A72, no dotprod): where two products always fit an int16
lane, s8 quads run as 8-bit ``smull`` + ``smlal`` + ``sadalp`` into int32: a conv whose input
is known to be >= 0 (at most 2 * 127 * 128 in magnitude), or whose weights avoid -128 (a
signed input, at most 2 * 128 * 127); elsewhere the int16 pairs stay. Bit-exact against the
``tvmq.ops`` reference on the emulated Pi (qemu, cortex-a72), with the worst-case int16 lane;
the assembly shows which path each conv took."""
from __future__ import annotations

import gc
import re
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import tvm
from tvm import te

from schedules.default import apply_default_schedules
from schedules.targets import resolve
from tests.conftest import OpModule, assert_bit_exact, int8, run_on_board
from tests.test_asm import conv_body
from topi_ops.conv2d import (NEON_QUADS, PAIRS, SDOT_QUADS, Conv2dParams, conv_layout,
                             data_layout, pack_conv2d, qconv2d)
from tvmq.compile import CROSS_CXX, compile_relax
from tvmq.frontend import import_exported_program

ops = torch.ops.tvmq
pytestmark = pytest.mark.timeout(600)
ARM = resolve("arm")

# (N, C, H, W, O, k, stride, padding(t,l,b,r)); odd channels pad C and O inside the kernel
CASES = [
    (1, 16, 8, 8, 16, 3, 1, (1, 1, 1, 1)),     # 3x3 padded
    (1, 7, 9, 11, 5, 3, 1, (1, 1, 1, 1)),      # odd channels (C padded to 8, O to 8)
    (1, 24, 10, 10, 32, 1, 2, (0, 0, 0, 0)),   # 1x1 strided (packs every 2nd pixel)
    (2, 12, 7, 7, 8, 3, 2, (1, 0, 2, 1)),      # batch 2, stride 2, asymmetric padding
    (1, 3, 12, 13, 8, 7, 2, (3, 3, 3, 3)),     # RGB 7x7 stem: taps folded into quads
]
IDS = ["3x3pad", "odd", "1x1s2", "n2s2asym", "rgb7x7s2"]


def edge_inputs(case, kind, gen):
    """(x, w): x >= 0 everywhere (the kernel is chosen for inputs after a ReLU)."""
    n, c, h, w, o, k, *_ = case
    if kind == "random":
        return int8(n, c, h, w, gen=gen, lo=0), int8(o, c, k, k, gen=gen)
    ch, y, xx = torch.meshgrid(torch.arange(c), torch.arange(h), torch.arange(w), indexing="ij")
    x = torch.where((ch + y + 2 * xx) % 3 == 0, 0, 127).to(torch.int8).expand(n, c, h, w).clone()
    if kind == "max":  # every product at its extreme: int16 lanes of channel 0 at -32512
        x.fill_(127)
    wt = torch.where(torch.rand(o, c, k, k, generator=gen) < 0.5, -128, 127).to(torch.int8)
    wt[0] = -128  # channel 0: every int16 lane reaches 2 * 127 * (-128) = -32512
    wt[1] = 127
    return x, wt


def relu_conv(case, shift):
    _n, _c, _h, _w, _o, _k, stride, padding = case
    return lambda x, w, b: ops.qconv2d(ops.qrelu(x), w, b, [stride] * 2, list(padding), [1, 1],
                                       1, 0, shift, False, 8)


def test_layout_choice():
    assert conv_layout(ARM) == PAIRS and conv_layout(ARM, nonneg=True) == NEON_QUADS
    assert conv_layout(ARM, weight_min=-127) == NEON_QUADS
    assert conv_layout(resolve("rpi5"), nonneg=True) == SDOT_QUADS
    assert data_layout((1, 3, 3, 2, 8, 4), ARM).data == "int8"
    w = np.full((8, 4, 3, 3), -127, np.int8)
    signed = Conv2dParams((1, 1), (1, 1, 1, 1), (1, 1), 1, 0)
    nonneg = Conv2dParams((1, 1), (1, 1, 1, 1), (1, 1), 1, 0, nonneg=True)
    for params in (signed, nonneg):  # no weight of -128: quads on any input
        packed = pack_conv2d(w, np.zeros(8), params, ARM)[0]
        assert packed.shape == (1, 3, 3, 1, 8, 4) and packed.dtype == np.int8
    w[3, 2, 1, 0] = -128  # one -128 weight: two products may reach 2 * 128 * 128
    assert pack_conv2d(w, np.zeros(8), signed, ARM)[0].shape == (1, 3, 3, 2, 8, 2)
    assert pack_conv2d(w, np.zeros(8), nonneg, ARM)[0].shape == (1, 3, 3, 1, 8, 4)


@pytest.mark.parametrize("kind", ["edge", "max", "random"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_relu_conv_on_pi(emulated_pi, case, kind, gen):
    """The deployed form (NHWC between kernels): qrelu -> qconv2d, so the conv sees x >= 0."""
    x, wt = edge_inputs(case, kind, gen)
    if kind == "random":
        x = int8(*x.shape, gen=gen)  # the qrelu makes it >= 0
    b = torch.randint(-3000, 3000, (case[4],), generator=gen, dtype=torch.int32)
    m = OpModule(relu_conv(case, 6 if kind == "random" else 9), wt, b)
    want = m(x)
    assert (want == 127).any() and (want == -128).any()  # saturates both ways
    assert_bit_exact(run_on_board(emulated_pi.address, m, x), want)


@pytest.mark.parametrize("kind", ["edge", "random"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_signed_conv_without_min_weight_on_pi(emulated_pi, case, kind, gen):
    """A signed input (no ReLU before the conv, e.g. an RGB stem) with weights in [-127, 127]
    takes the 8-bit quads too; "edge": inputs -128 and 127, channel 0's weights all -127, so
    its int16 lanes reach 2 * (-128) * (-127) = 32512, channel 1's -32512."""
    n, c, h, w, o, k, stride, padding = case
    if kind == "random":
        x, wt = int8(n, c, h, w, gen=gen), int8(o, c, k, k, gen=gen, lo=-127)
    else:
        x = torch.where(torch.rand(n, c, h, w, generator=gen) < 0.5, -128, 127).to(torch.int8)
        wt = torch.where(torch.rand(o, c, k, k, generator=gen) < 0.5, -127, 127).to(torch.int8)
        x[:, :, ::2] = -128  # whole rows of -128: some windows hold nothing else
        wt[0], wt[1] = -127, 127
    assert pack_conv2d(wt.numpy(), np.zeros(o), Conv2dParams((stride,) * 2, padding, (1, 1),
                                                              1, 0), ARM)[0].shape[5] == 4
    b = torch.randint(-3000, 3000, (o,), generator=gen, dtype=torch.int32)
    m = OpModule(lambda x, w, b: ops.qconv2d(x, w, b, [stride] * 2, list(padding), [1, 1], 1, 0,
                                             6 if kind == "random" else 9, False, 8), wt, b)
    want = m(x)
    assert (want == 127).any() and (want == -128).any()  # saturates both ways
    assert_bit_exact(run_on_board(emulated_pi.address, m, x), want)


def test_two_convs_on_pi(emulated_pi, gen):
    """conv (ReLU) -> conv: the second one's input is known >= 0 from the first's epilogue;
    the first (signed input, a -128 weight) keeps int16 pairs. Both exact in one module."""
    x = int8(1, 8, 9, 9, gen=gen)
    w1, w2 = int8(16, 8, 3, 3, gen=gen), int8(8, 16, 3, 3, gen=gen)
    w1[0, 0, 0, 0] = -128
    w2[0] = -128
    b1, b2 = (torch.randint(-2000, 2000, (o,), generator=gen, dtype=torch.int32) for o in (16, 8))

    def f(x, w1, b1, w2, b2):
        y = ops.qconv2d(x, w1, b1, [1, 1], [1, 1, 1, 1], [1, 1], 1, 0, 6, True, 8)
        return ops.qconv2d(y, w2, b2, [1, 1], [1, 1, 1, 1], [1, 1], 1, 0, 8, False, 8)

    m = OpModule(f, w1, b1, w2, b2)
    assert_bit_exact(run_on_board(emulated_pi.address, m, x), m(x))


# ----------------------------------------------------------------------------- TE kernel
def kernel_module(case, layout: str, params: Conv2dParams, w: np.ndarray, target=ARM):
    """``topi_ops.conv2d.qconv2d`` alone in ``layout``, default-scheduled; its packed arrays."""
    n, c, h, wd, o, *_ = case
    wp, bp = pack_conv2d(w, np.arange(o, dtype=np.int32) * 37 - 400, params, target)
    shape = (n, h, wd, c) if layout == "NHWC" else (n, c, h, wd)
    data = te.placeholder(shape, "int8", "data")
    wt, bt = te.placeholder(wp.shape, str(wp.dtype), "w"), te.placeholder(bp.shape, "int32", "b")
    out = qconv2d(data, wt, bt, weight_shape=w.shape, params=params, target=target,
                  layout=layout)
    func = te.create_prim_func([data, wt, bt, out]).with_attr("global_symbol", "main")
    mod = apply_default_schedules(tvm.IRModule({"main": func}), target)
    return mod, wp, bp, [int(v) for v in out.shape]


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("case", [CASES[0], CASES[2]], ids=[IDS[0], IDS[2]])
def test_te_kernel_on_pi(emulated_pi, case, layout, gen):
    """qconv2d(layout=...) with ``nonneg`` built alone and run on the emulated Pi, edge values."""
    from deploy import remote

    n, c, h, wd, o, k, stride, padding = case
    x, wt = edge_inputs(case, "edge", gen)
    params = Conv2dParams((stride,) * 2, padding, (1, 1), 1, 9, nonneg=True)
    mod, wp, bp, out_shape = kernel_module(case, layout, params, wt.numpy())
    want = ops.qconv2d(x, wt, torch.from_numpy(bp), [stride] * 2, list(padding), [1, 1], 1, 0,
                       9, False, 8)
    xin = x.numpy() if layout == "NCHW" else np.ascontiguousarray(x.numpy().transpose(0, 2, 3, 1))
    lib = tvm.compile(mod, target=ARM)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.so"
        lib.export_library(str(path), fcompile=tvm.support.cc.cross_compiler(CROSS_CXX))
        gc.collect()  # the board serves one session: earlier tests' sessions end when collected
        board = remote.connect(emulated_pi.address)
        board.session.upload(str(path))
        dev = board.session.cpu()
        f = board.session.load_module("kernel.so")["main"]
        args = [tvm.runtime.tensor(a, dev) for a in (xin, wp, bp)]
        out = tvm.runtime.tensor(np.zeros(out_shape, np.int8), dev)
        f(*args, out)
        got = torch.from_numpy(out.numpy())
        del f, args, out
        board.close()
    if layout == "NHWC":
        got = got.permute(0, 3, 1, 2).contiguous()
    assert (want == 127).any() and (want == -128).any()
    assert_bit_exact(got, want)


# ----------------------------------------------------------------------------- assembly
def relu_conv_assembly(relu_input: bool, weight_min: int = -128) -> str:
    gen = torch.Generator().manual_seed(0)
    x, w = int8(1, 16, 8, 8, gen=gen), int8(16, 16, 3, 3, gen=gen, lo=weight_min)
    w[0, 0, 0, 0] = weight_min
    b = torch.zeros(16, dtype=torch.int32)
    pre = ops.qrelu if relu_input else (lambda v: v)
    m = OpModule(lambda x, w, b: ops.qconv2d(pre(x), w, b, [1, 1], [1, 1, 1, 1], [1, 1], 1, 2,
                                             7, False, 8), w, b)
    ex = compile_relax(import_exported_program(torch.export.export(m, (x,))), ARM)
    (lib,) = [lib for lib in ex.mod.imports if lib.kind == "llvm"] or ex.mod.imports[:1]
    return lib.inspect_source("s")


def hot_loop(body: str, mnemonic: str) -> str:
    """The innermost loop (label .. backward branch) holding the most ``mnemonic``."""
    from schedules.estimate import asm_loops

    lines, loops = asm_loops(body)
    innermost = [lp for lp in loops if not any(o != lp and lp[0] <= o[0] and o[1] <= lp[1]
                                               for o in loops)]
    best = max(innermost, key=lambda lp: sum(bool(re.match(rf"\s+{mnemonic}\s", ln))
                                             for ln in lines[lp[0]:lp[1] + 1]))
    return "\n".join(lines[best[0]:best[1] + 1])


@pytest.mark.parametrize("relu_input,weight_min", [(True, -128), (False, -127)],
                         ids=["nonneg-input", "signed-input-no-min-weight"])
def test_conv_hot_loop_is_8bit_smull_smlal_sadalp(relu_input, weight_min):
    loop = hot_loop(conv_body(relu_conv_assembly(relu_input, weight_min)), "sadalp")
    assert re.search(r"\bsmull2?\s+v\d+\.8h, v\d+\.(8|16)b", loop), "no 8-bit smull"
    assert re.search(r"\bsmlal2?\s+v\d+\.8h, v\d+\.(8|16)b", loop), "no 8-bit smlal"
    assert re.search(r"\bsadalp\s+v\d+\.4s, v\d+\.8h", loop), "no sadalp into int32"
    assert not re.search(r"\bsmlal2?\s+v\d+\.4s", loop)  # no 16-bit multiply-accumulate
    assert "sdot" not in loop


def test_signed_conv_with_a_min_weight_keeps_int16_pairs():
    loop = hot_loop(conv_body(relu_conv_assembly(False)), "smlal2?")
    assert re.search(r"\bsmlal2?\s+v\d+\.4s, v\d+\.(4h|8h)", loop), "no 16-bit smlal"
    assert not re.search(r"\b(sadalp|smull2?\s+v\d+\.8h)", loop)


# ----------------------------------------------------------------------------- estimate
def test_share_of_peak_estimate():
    """llvm-mca's A72 peak (8 int8 MACs/cycle: the one multiply pipe, 8 products per 8-bit
    smull/smlal) and the 8-bit kernel's share of it, above the int16 pairs' (estimates)."""
    from schedules.estimate import a72_peak_macs_per_cycle, a72_share_of_peak

    peaks = a72_peak_macs_per_cycle()
    assert 7 <= peaks["peak"] <= 8.01 and 3.5 <= peaks["int16 smlal"] <= 4.01
    (row,) = a72_share_of_peak([(64, 14)])
    assert row["pairs_share"] < 0.5 + 1e-9 < row["quads8_share"] <= 1.0
    assert row["speedup"] > 1.5


# ----------------------------------------------------------------------------- a model
def test_resnet20_int_se_on_pi(emulated_pi):
    """A whole ResNet-20 (INT-SE, calibrated) for the Pi 4: every conv takes the 8-bit quads,
    those after a ReLU and the stem (signed input, but none of its weights is -128); no int16
    pairs are left. Bit-exact on the emulated board."""
    import tvmq
    from deploy import remote
    from tvm import relax
    from tvmq import zoo
    from tvmq.compile import export_library

    torch.manual_seed(0)
    qat = tvmq.prepare(zoo.resnet20(), "int-se")
    tvmq.calibrate(qat, [torch.randn(4, 3, 32, 32) for _ in range(2)])
    deploy = tvmq.convert(qat).eval()
    assert int(deploy.tvmq_conv_1.weight.min()) > -128  # the stem's
    x = torch.randn(2, 3, 32, 32)
    ex = compile_relax(import_exported_program(torch.export.export(deploy, (x,))), ARM)
    (lib,) = [lib for lib in ex.mod.imports if lib.kind == "llvm"] or ex.mod.imports[:1]
    asm = lib.inspect_source("s")
    assert re.search(r"\bsadalp\s+v\d+\.4s, v\d+\.8h", asm)  # 8-bit quads
    assert not re.search(r"\bsmlal2?\s+v\d+\.4s, v\d+\.(4h|8h)", asm)  # no int16 pairs
    with tempfile.TemporaryDirectory() as tmp:
        export_library(ex, ARM, str(Path(tmp) / "r20.so"))
        gc.collect()
        board = remote.connect(emulated_pi.address)
        board.session.upload(str(Path(tmp) / "r20.so"))
        dev = board.session.cpu()
        vm = relax.VirtualMachine(board.session.load_module("r20.so"), dev)
        vm.set_input("main", tvm.runtime.tensor(x.numpy(), dev))
        vm.invoke_stateful("main")
        got = torch.from_numpy(vm.get_outputs("main").numpy())
        del vm
        board.close()
    want = deploy(x)
    assert want.std() > 0  # not a constant output
    assert_bit_exact(got, want)
