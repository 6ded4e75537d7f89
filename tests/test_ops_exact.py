"""Every deploy op: the TVM kernel equals the PyTorch integer reference bit for bit, on random
shapes and edge values (saturation both ways, negative values that round, odd channels)."""
from __future__ import annotations

import pytest
import torch

from schedules.targets import has_feature, resolve
from tests.conftest import OpModule, assert_bit_exact, int8, run_tvm

ops = torch.ops.tvmq

CONV_CASES = [
    # (N, C, H, W, O, k, stride, padding(t,l,b,r), dilation, groups)
    (1, 3, 9, 11, 5, 3, 1, (1, 1, 1, 1), 1, 1),       # odd channels, odd spatial
    (2, 8, 8, 8, 16, 1, 1, (0, 0, 0, 0), 1, 1),        # 1x1
    (1, 7, 13, 12, 9, 5, 2, (2, 2, 2, 2), 1, 1),       # 5x5 stride 2
    (1, 16, 10, 10, 16, 3, 1, (1, 1, 1, 1), 1, 16),    # depthwise
    (1, 12, 9, 9, 18, 3, 2, (0, 1, 2, 1), 1, 3),       # grouped, asymmetric padding, stride 2
    (1, 32, 14, 14, 64, 3, 2, (1, 1, 1, 1), 1, 1),     # ResNet-like downsampling conv
    (1, 6, 12, 12, 8, 3, 1, (2, 2, 2, 2), 2, 1),       # dilation 2
    (1, 20, 9, 9, 24, 1, 2, (0, 0, 0, 0), 1, 1),       # strided 1x1: packs every 2nd pixel
    (1, 3, 20, 21, 16, 7, 2, (3, 3, 3, 3), 1, 1),      # RGB 7x7 stem: taps folded into quads
    (1, 1, 9, 10, 8, 3, 1, (1, 0, 1, 2), 1, 1),        # grayscale 3x3: taps folded
]


@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: "x".join(map(str, c[:6])) + f"-s{c[6]}-g{c[9]}")
@pytest.mark.parametrize("out_shift,relu", [(7, False), (3, True), (0, False), (-1, False)])
def test_qconv2d(case, out_shift, relu, gen):
    n, c, h, w, o, k, stride, padding, dil, groups = case
    x = int8(n, c, h, w, gen=gen)
    wt = int8(o, c // groups, k, k, gen=gen)
    b = torch.randint(-3000, 3000, (o,), generator=gen, dtype=torch.int32)
    m = OpModule(lambda x, w, b: ops.qconv2d(x, w, b, [stride] * 2, list(padding), [dil] * 2,
                                             groups, 2, out_shift, relu, 8), wt, b)
    want = m(x)
    if out_shift <= 0:  # the case really saturates on both sides
        assert (want == 127).any() and (want == -128).any()
    assert_bit_exact(run_tvm(m, x), want)


@pytest.mark.parametrize("n,k,o", [(1, 64, 10), (3, 27, 5), (2, 512, 1000)])
@pytest.mark.parametrize("out_shift,relu", [(6, False), (9, True), (-2, False)])
def test_qlinear(n, k, o, out_shift, relu, gen):
    x, wt = int8(n, k, gen=gen), int8(o, k, gen=gen)
    b = torch.randint(-1000, 1000, (o,), generator=gen, dtype=torch.int32)
    m = OpModule(lambda x, w, b: ops.qlinear(x, w, b, 1, out_shift, relu, 8), wt, b)
    assert_bit_exact(run_tvm(m, x), m(x))


@pytest.mark.parametrize("a_shift,b_shift", [(0, 0), (1, 0), (2, 3), (-1, 1), (0, -2)])
@pytest.mark.parametrize("relu", [False, True])
def test_qadd(a_shift, b_shift, relu, gen):
    a, b = int8(2, 5, 7, 3, gen=gen), int8(2, 5, 7, 3, gen=gen)
    m = OpModule(lambda a, b: ops.qadd(a, b, a_shift, b_shift, relu, 8))
    want = m(a, b)
    assert_bit_exact(run_tvm(m, a, b), want)


def test_qadd_saturates_and_rounds_negatives():
    a = torch.tensor([[127, -128, -3, -5, 3, 5, -1, 1]], dtype=torch.int8)
    b = torch.tensor([[127, -128, 0, 0, 0, 0, -1, 0]], dtype=torch.int8)
    m = OpModule(lambda a, b: ops.qadd(a, b, 1, 0, False, 8))
    want = m(a, b)
    # round half up: -3/2 = -1.5 -> -1, -5/2 = -2.5 -> -2, 3/2 -> 2; saturation both ways
    assert want.tolist() == [[127, -128, -1, -2, 2, 3, -1, 1]]
    assert_bit_exact(run_tvm(m, a, b), want)


@pytest.mark.parametrize("kernel,stride,padding", [([3, 3], [2, 2], [1, 1, 1, 1]), ([2, 2], [2, 2], [0, 0, 0, 0]), ([3, 2], [1, 2], [0, 1, 2, 0])])
def test_qmax_pool2d(kernel, stride, padding, gen):
    x = int8(1, 5, 11, 9, gen=gen)
    m = OpModule(lambda x: ops.qmax_pool2d(x, kernel, stride, padding))
    assert_bit_exact(run_tvm(m, x), m(x))


@pytest.mark.parametrize("shape,kernel,stride", [((1, 8, 7, 7), [7, 7], [1, 1]), ((2, 5, 4, 4), [4, 4], [1, 1]), ((1, 3, 9, 9), [3, 3], [3, 3]), ((1, 4, 6, 6), [2, 2], [2, 2])])
def test_qavg_pool2d(shape, kernel, stride, gen):
    x = int8(*shape, gen=gen)
    m = OpModule(lambda x: ops.qavg_pool2d(x, kernel, stride, 8))
    assert_bit_exact(run_tvm(m, x), m(x))


def test_qrelu(gen):
    x = int8(3, 17, gen=gen)
    m = OpModule(lambda x: ops.qrelu(x))
    assert_bit_exact(run_tvm(m, x), m(x))


@pytest.mark.parametrize("exponent,bits", [(-5, 8), (0, 8), (-3, 6)])
def test_quantize_dequantize(exponent, bits, gen):
    x = torch.randn(4, 33, generator=gen) * 8
    # exact halves, both signs, and values far out of range
    x[0, :6] = torch.tensor([0.5, -0.5, 1.5, -1.5, 1e6, -1e6]) * 2.0 ** exponent
    m = OpModule(lambda x: ops.dequantize(ops.quantize(x, exponent, bits), exponent))
    assert_bit_exact(run_tvm(m, x), m(x))


@pytest.mark.parametrize("bits", [6, 4])
def test_narrow_bits_saturate(bits, gen):
    x, wt = int8(1, 4, 6, 6, gen=gen), int8(8, 4, 3, 3, gen=gen)
    b = torch.zeros(8, dtype=torch.int32)
    m = OpModule(lambda x, w, b: ops.qconv2d(x, w, b, [1, 1], [1, 1, 1, 1], [1, 1], 1, 0, 6,
                                             False, bits), wt, b)
    want = m(x)
    assert int(want.max()) == (1 << (bits - 1)) - 1 and int(want.min()) == -(1 << (bits - 1))
    assert_bit_exact(run_tvm(m, x), want)


GENERIC_X86 = {"kind": "llvm", "mcpu": "x86-64", "num-cores": 2}  # SSE2 only: no vpmaddwd


@pytest.mark.parametrize("case", CONV_CASES[:3] + CONV_CASES[5:6], ids=lambda c: "x".join(map(str, c[:6])))
def test_qconv2d_vector_schedule_without_avx2(case, gen):
    """The schedule the ARM targets get (vectorized int16 pairs, no x86 intrinsic) is exact
    too: run it on this host through a target without AVX2."""
    n, c, h, w, o, k, stride, padding, dil, groups = case
    x, wt = int8(n, c, h, w, gen=gen), int8(o, c // groups, k, k, gen=gen)
    b = torch.randint(-3000, 3000, (o,), generator=gen, dtype=torch.int32)
    m = OpModule(lambda x, w, b: ops.qconv2d(x, w, b, [stride] * 2, list(padding), [dil] * 2,
                                             groups, 0, 6, True, 8), wt, b)
    assert_bit_exact(run_tvm(m, x, target=GENERIC_X86), m(x))


HOST = resolve("x86")
X86_PATHS = {  # each x86 kernel path, run where this host can execute it
    "avx2": ({"kind": "llvm", "mcpu": "haswell", "num-cores": 2}, "avx2"),
    "avx512-vnni": (HOST, "avx512vnni"),
}


@pytest.mark.parametrize("path", sorted(X86_PATHS))
@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: "x".join(map(str, c[:6])) + f"-g{c[9]}")
def test_qconv2d_each_x86_path(path, case, gen):
    """The AVX2 (vpmaddwd, 8 lanes) and AVX-512 VNNI (vpdpwssd, 16 lanes) kernels are both
    exact, with saturation both ways; whichever this host runs by default, the other is
    tested too where the CPU can run it."""
    target, feature = X86_PATHS[path]
    if not has_feature(HOST, feature):
        pytest.skip(f"this host has no {feature}: its kernels cannot run here")
    n, c, h, w, o, k, stride, padding, dil, groups = case
    x, wt = int8(n, c, h, w, gen=gen), int8(o, c // groups, k, k, gen=gen)
    b = torch.randint(-3000, 3000, (o,), generator=gen, dtype=torch.int32)
    m = OpModule(lambda x, w, b: ops.qconv2d(x, w, b, [stride] * 2, list(padding), [dil] * 2,
                                             groups, 2, 0, False, 8), wt, b)
    assert_bit_exact(run_tvm(m, x, target=target), m(x))


def test_qconv2d_long_reduction_falls_back_to_int16_pairs(gen):
    """C x KH x KW = 65880: on AVX-512 VNNI hosts the u8 layout could overflow int32, so the
    kernel takes int16 pairs (vpdpwssd); exact either way."""
    x, wt = int8(1, 7320, 3, 3, gen=gen), int8(16, 7320, 3, 3, gen=gen)
    x[0, :, 1, 1], wt[3] = -128, -128  # the largest products
    b = torch.randint(-3000, 3000, (16,), generator=gen, dtype=torch.int32)
    m = OpModule(lambda x, w, b: ops.qconv2d(x, w, b, [1, 1], [1, 1, 1, 1], [1, 1], 1, 0, 20,
                                             False, 8), wt, b)
    assert_bit_exact(run_tvm(m, x), m(x))
