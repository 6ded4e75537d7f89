"""AVX2 u8 quads (``vpmaddubsw`` + ``vpmaddwd`` by ones): the conv layout AVX2 hosts without
VNNI take where the conv's input is known to be >= 0 (after a ReLU). Built for an AVX2-only
target (``znver3``) and run on this host (any AVX2 CPU runs it): bit-exact against the
PyTorch integer reference on edge values (inputs 0 / 127, weights -128 / 127: the extreme
int16 pair sums 2*127*(-128) and 2*127*127), NCHW and NHWC, padded 3x3 and strided 1x1; the
hot loop's assembly holds ``vpmaddubsw`` only when the input is non-negative; ResNet-20
(INT-SE) whole, bit-exact."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import tvm
from tvm import relax, s_tir, te

from schedules.default import schedule_conv_pairs
from schedules.elementwise import SCHEDULED
from schedules.targets import has_feature, resolve
from tests.conftest import OpModule, assert_bit_exact, int8, run_tvm
from tests.test_asm import conv_body
from topi_ops.conv2d import (AVX2_QUADS, PAIRS, SDOT_QUADS, VNNI_QUADS, Conv2dParams,
                             conv_layout, data_layout, pack_conv2d, qconv2d)
from tvmq.compile import compile_relax
from tvmq.frontend import import_exported_program
from tvmq.ops import _conv_i32

ops = torch.ops.tvmq

ZNVER3 = {"kind": "llvm", "mcpu": "znver3", "num-cores": 2}  # AVX2, no AVX-512 / VNNI
TARGET = tvm.target.Target(ZNVER3)
needs_avx2 = pytest.mark.skipif(not has_feature(resolve("x86"), "avx2"),
                                reason="this host cannot run AVX2 code")


# ----------------------------------------------------------------------------- layout choice
def test_layout_choice():
    assert conv_layout(TARGET) == PAIRS  # input may be negative: int16 pairs
    assert conv_layout(TARGET, nonneg=True) == AVX2_QUADS
    vnni = tvm.target.Target({"kind": "llvm", "mcpu": "icelake-server"})
    assert conv_layout(vnni) == conv_layout(vnni, nonneg=True) == VNNI_QUADS
    rpi5 = resolve("rpi5")
    assert conv_layout(rpi5, nonneg=True) == SDOT_QUADS
    # (8, 4) packed weights: u8 data on x86 AVX2, s8 data on aarch64
    assert data_layout((2, 3, 3, 4, 8, 4), TARGET) == AVX2_QUADS
    assert data_layout((2, 3, 3, 4, 8, 4), rpi5) == SDOT_QUADS


def test_pack_quads_only_for_nonneg_input_and_short_reductions():
    w, b = np.ones((16, 20, 3, 3), np.int8), np.arange(16, dtype=np.int32)
    signed = Conv2dParams((1, 1), (1, 1, 1, 1), (1, 1), 1, 7)
    nonneg = Conv2dParams((1, 1), (1, 1, 1, 1), (1, 1), 1, 7, nonneg=True)
    wp, bp = pack_conv2d(w, b, signed, TARGET)
    assert wp.shape == (2, 3, 3, 10, 8, 2) and wp.dtype == np.int16
    wp, bp = pack_conv2d(w, b, nonneg, TARGET)
    assert wp.shape == (2, 3, 3, 5, 8, 4) and wp.dtype == np.int8
    assert (bp == b).all()  # no u8 offset: the input already is valid u8
    # 7320 x 3 x 3: u8 x s8 sums could pass 2^31: int16 pairs (8 lanes: no VNNI here)
    wp, _ = pack_conv2d(np.ones((8, 7320, 3, 3), np.int8), b[:8], nonneg, TARGET)
    assert wp.shape[4:] == (8, 2) and wp.dtype == np.int16


def test_quads_refuse_a_possibly_negative_input():
    w = np.ones((8, 4, 3, 3), np.int8)
    params = Conv2dParams((1, 1), (1, 1, 1, 1), (1, 1), 1, 7, nonneg=True)
    wp, bp = pack_conv2d(w, np.zeros(8, np.int32), params, TARGET)
    data = te.placeholder((1, 4, 6, 6), "int8")
    with pytest.raises(ValueError, match="0, 127"):
        qconv2d(data, te.placeholder(wp.shape, "int8"), te.placeholder(bp.shape, "int32"),
                weight_shape=w.shape, params=Conv2dParams((1, 1), (1, 1, 1, 1), (1, 1), 1, 7),
                target=TARGET)


# ----------------------------------------------------------------------------- the kernel
def run_kernel(x: np.ndarray, w: np.ndarray, b: np.ndarray, params: Conv2dParams,
               layout: str, accumulator: bool) -> np.ndarray:
    """tvmq's conv kernel (pack, TE compute, default schedule) built for znver3 and run here;
    ``accumulator``: the int32 ``conv + bias`` instead of the requantized int8 (NCHW in/out)."""
    wp, bp = pack_conv2d(w, b, params, TARGET)
    assert wp.shape[4:] == (8, 4) and wp.dtype == np.int8, "not the AVX2 u8-quad layout"
    xl = x if layout == "NCHW" else np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    data = te.placeholder(xl.shape, "int8", "data")
    wt, bt = te.placeholder(wp.shape, "int8", "w"), te.placeholder(bp.shape, "int32", "b")
    out = qconv2d(data, wt, bt, weight_shape=w.shape, params=params, target=TARGET,
                  layout=layout, epilogue=(lambda v, ch: v) if accumulator else None)
    sch = s_tir.Schedule(te.create_prim_func([data, wt, bt, out]))
    schedule_conv_pairs(sch, sch.get_sblock("tvmq_conv_acc"), TARGET)
    lib = tvm.compile(tvm.IRModule({"main": sch.mod["main"].with_attr(SCHEDULED, True)}),
                      target=TARGET)
    assert "vpmaddubsw" in lib.mod.inspect_source("s")
    dev = tvm.cpu()
    res = tvm.runtime.tensor(np.zeros([int(v) for v in out.shape], str(out.dtype)), dev)
    lib["main"](*[tvm.runtime.tensor(a, dev) for a in (xl, wp, bp)], res)
    res = res.numpy()
    return res if layout == "NCHW" else res.transpose(0, 3, 1, 2)


KERNEL_CASES = {  # (N, C, H, W, O, k, stride, padding (t, l, b, r))
    "3x3-padded": (1, 16, 9, 11, 24, 3, 1, (1, 1, 1, 1)),
    "3x3-odd-channels-s2": (2, 13, 10, 9, 20, 3, 2, (0, 1, 2, 1)),
    "1x1-strided": (1, 20, 10, 10, 16, 1, 2, (0, 0, 0, 0)),
}


def edge_values(kind: str, n, c, h, w, o, k, rng):
    if kind == "x127-wmin":  # every pair sum 2*127*(-128) = -32512
        return np.full((n, c, h, w), 127, np.int8), np.full((o, c, k, k), -128, np.int8)
    if kind == "x127-wmax":  # every pair sum 2*127*127 = 32258
        return np.full((n, c, h, w), 127, np.int8), np.full((o, c, k, k), 127, np.int8)
    if kind == "x0":
        return np.zeros((n, c, h, w), np.int8), rng.integers(-128, 128, (o, c, k, k), dtype=np.int8)
    if kind == "extremes":  # inputs 0 / 127, weights -128 / 127, mixed
        return (rng.choice(np.array([0, 127], np.int8), (n, c, h, w)),
                rng.choice(np.array([-128, 127], np.int8), (o, c, k, k)))
    return (rng.integers(0, 128, (n, c, h, w), dtype=np.int8),
            rng.integers(-128, 128, (o, c, k, k), dtype=np.int8))


@needs_avx2
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("case", sorted(KERNEL_CASES))
@pytest.mark.parametrize("values", ["x127-wmin", "x127-wmax", "x0", "extremes", "random"])
def test_kernel_bit_exact(layout, case, values):
    n, c, h, w, o, k, stride, padding = KERNEL_CASES[case]
    rng = np.random.default_rng(abs(hash((case, values))) % 2**32)
    x, wt = edge_values(values, n, c, h, w, o, k, rng)
    b = rng.integers(-3000, 3000, o).astype(np.int32)
    tx, tw, tb = torch.from_numpy(x), torch.from_numpy(wt), torch.from_numpy(b)
    # the whole int32 accumulator: every pair sum and every partial sum shows
    params = Conv2dParams((stride,) * 2, padding, (1, 1), 1, 0, nonneg=True)
    top, left, bottom, right = padding
    padded = torch.nn.functional.pad(tx.int(), (left, right, top, bottom))
    want_acc = _conv_i32(padded, tw, [stride] * 2, 0, [1, 1], 1) + tb.view(1, -1, 1, 1)
    got_acc = run_kernel(x, wt, b, params, layout, accumulator=True)
    assert_bit_exact(torch.from_numpy(got_acc), want_acc)
    # the requantized int8 output against the tvmq.ops reference (rounding, saturation)
    shift = int(np.ceil(np.log2(128 * c * k * k)))  # the extreme sums land inside int8
    for out_shift in (shift, 3):
        params = Conv2dParams((stride,) * 2, padding, (1, 1), 1, out_shift, nonneg=True)
        want = ops.qconv2d(tx, tw, tb, [stride] * 2, list(padding), [1, 1], 1, 0, out_shift,
                           False, 8)
        assert_bit_exact(torch.from_numpy(run_kernel(x, wt, b, params, layout, False)), want)


# ----------------------------------------------------------------------------- the graph
def relu_conv(wt, b, stride, padding, out_shift=6, relu=False):
    """qrelu -> qconv2d: the lowering knows the conv's input is >= 0."""
    return OpModule(lambda x, w, b: ops.qconv2d(ops.qrelu(x), w, b, [stride] * 2, list(padding),
                                                [1, 1], 1, 2, out_shift, relu, 8), wt, b)


@needs_avx2
@pytest.mark.parametrize("case", sorted(KERNEL_CASES))
def test_graph_after_relu_bit_exact(case, gen):
    """Through the whole pipeline (frontend, ranges, lowering, schedule) for znver3."""
    n, c, h, w, o, k, stride, padding = KERNEL_CASES[case]
    x, wt = int8(n, c, h, w, gen=gen), int8(o, c, k, k, gen=gen)
    x[0, :, 0, :], wt[0] = 127, -128  # the extreme pair sums
    b = torch.randint(-3000, 3000, (o,), generator=gen, dtype=torch.int32)
    m = relu_conv(wt, b, stride, padding)
    assert_bit_exact(run_tvm(m, x, target=ZNVER3), m(x))


@needs_avx2
def test_dense_after_relu_bit_exact(gen):
    x, wt = int8(3, 200, gen=gen), int8(37, 200, gen=gen)
    x[0], wt[1] = 127, -128
    b = torch.randint(-1000, 1000, (37,), generator=gen, dtype=torch.int32)
    m = OpModule(lambda x, w, b: ops.qlinear(ops.qrelu(x), w, b, 1, 9, False, 8), wt, b)
    assert_bit_exact(run_tvm(m, x, target=ZNVER3), m(x))


def conv_asm(module: torch.nn.Module, x: torch.Tensor) -> str:
    ex = compile_relax(import_exported_program(torch.export.export(module, (x,))), TARGET)
    (lib,) = [lib for lib in ex.mod.imports if lib.kind == "llvm"] or ex.mod.imports[:1]
    return conv_body(lib.inspect_source("s"))


def test_asm_vpmaddubsw_only_for_nonneg_input():
    """Code only (nothing runs): after a ReLU the conv's hot loop multiplies u8 x s8 with
    vpmaddubsw; on a possibly negative input it stays on int16 pairs (vpmaddwd alone)."""
    from tvmq.peak import innermost_loop

    gen = torch.Generator().manual_seed(0)
    x, wt = int8(1, 32, 8, 8, gen=gen), int8(16, 32, 3, 3, gen=gen)
    b = torch.zeros(16, dtype=torch.int32)
    # stride 2: a 3x3 stride-1 conv takes integer Winograd on this target (test_winograd)
    signed = OpModule(lambda x, w, b: ops.qconv2d(x, w, b, [2, 2], [1, 1, 1, 1], [1, 1], 1, 2,
                                                  7, False, 8), wt, b)
    body = conv_asm(relu_conv(wt, b, 2, (1, 1, 1, 1)), x)
    _, hot = innermost_loop(body, "vpmaddubsw")
    mnemonics = [i.split()[0] for i in hot]
    assert mnemonics.count("vpmaddubsw") >= 2 and "zmm" not in body
    # each u8 quad step: vpmaddubsw, vpmaddwd by ones, vpaddd
    assert mnemonics.count("vpmaddwd") == mnemonics.count("vpmaddubsw")
    assert mnemonics.count("vpaddd") >= mnemonics.count("vpmaddubsw")
    body = conv_asm(signed, x)
    _, hot = innermost_loop(body, "vpmaddwd")
    assert "vpmaddwd" in [i.split()[0] for i in hot] and "vpmaddubsw" not in body


# ----------------------------------------------------------------------------- a whole model
def kernel_instructions(asm: str) -> dict[str, str]:
    """The assembly of each conv/dense kernel's compute function (a fused residual add in its
    name: ``_tvmq_qaddN``), by its global label."""
    starts = [(m.start(), m.group(1)) for m in re.finditer(r"^([A-Za-z_][\w.$]*):", asm, re.M)]
    return {name: asm[a:b] for (a, name), (b, _) in zip(starts, starts[1:] + [(len(asm), "")])
            if re.match(r"tvmq_q(conv2d|dense)\d*(_tvmq_qadd\d+)?_compute_", name)}


@needs_avx2
@pytest.mark.timeout(900)
def test_resnet20_znver3_bit_exact():
    """ResNet-20 (INT-SE, random weights, calibrated on noise) built for znver3: the strided
    convs, 1x1s and the dense after a ReLU take u8 quads, the stem (signed input) int16
    pairs, the 3x3 stride-1 convs integer Winograd (int16 pairs, ``test_winograd``);
    bit-exact against the PyTorch integer reference."""
    from tvmq.build import zoo_program

    ep = zoo_program("resnet20", "int-se", None)
    ex = compile_relax(import_exported_program(ep), TARGET)
    (lib,) = [lib for lib in ex.mod.imports if lib.kind == "llvm"] or ex.mod.imports[:1]
    kernels = kernel_instructions(lib.inspect_source("s"))
    quads = [k for k, body in kernels.items() if "vpmaddubsw" in body]
    pairs = [k for k, body in kernels.items() if "vpmaddwd" in body and k not in quads]
    assert "tvmq_qconv2d1_compute_" in pairs  # the stem reads the signed quantized image
    assert len(quads) >= 4 and len(pairs) >= 10
    assert not any("zmm" in body for body in kernels.values())
    vm = relax.VirtualMachine(ex, tvm.cpu())
    reference = ep.module()
    example = ep.example_inputs[0][0]
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _ in range(4):
            x = torch.randn(example.shape, generator=gen) * 2
            got = torch.from_numpy(vm["main"](tvm.runtime.tensor(x.numpy())).numpy())
            assert_bit_exact(got, reference(x))
