"""The aarch64 kernels, run on the emulated Raspberry Pi 4 (a real aarch64 TVM runtime under
qemu), equal the PyTorch integer reference bit for bit: every deploy op, with edge values; and
the Pi 5's sdot convolutions on an emulated Cortex-A76."""
from __future__ import annotations

import pytest
import torch

from tests.conftest import OpModule, assert_bit_exact, int8, run_on_board
from tests.test_ops_exact import CONV_CASES

ops = torch.ops.tvmq
pytestmark = pytest.mark.timeout(600)


@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: "x".join(map(str, c[:6])) + f"-s{c[6]}-g{c[9]}")
def test_qconv2d_on_pi(emulated_pi, case, gen):
    n, c, h, w, o, k, stride, padding, dil, groups = case
    x = int8(n, c, h, w, gen=gen)
    wt = int8(o, c // groups, k, k, gen=gen)
    b = torch.randint(-3000, 3000, (o,), generator=gen, dtype=torch.int32)
    m = OpModule(lambda x, w, b: ops.qconv2d(x, w, b, [stride] * 2, list(padding), [dil] * 2,
                                             groups, 2, 0, False, 8), wt, b)
    want = m(x)
    assert (want == 127).any() and (want == -128).any()  # saturates both ways
    assert_bit_exact(run_on_board(emulated_pi.address, m, x), want)


@pytest.mark.parametrize("out_shift,relu", [(9, True), (-2, False)])
def test_qlinear_on_pi(emulated_pi, out_shift, relu, gen):
    x, wt = int8(3, 27, gen=gen), int8(5, 27, gen=gen)
    b = torch.randint(-1000, 1000, (5,), generator=gen, dtype=torch.int32)
    m = OpModule(lambda x, w, b: ops.qlinear(x, w, b, 1, out_shift, relu, 8), wt, b)
    assert_bit_exact(run_on_board(emulated_pi.address, m, x), m(x))


def test_qadd_rounds_negatives_on_pi(emulated_pi):
    a = torch.tensor([[127, -128, -3, -5, 3, 5, -1, 1]], dtype=torch.int8)
    b = torch.tensor([[127, -128, 0, 0, 0, 0, -1, 0]], dtype=torch.int8)
    m = OpModule(lambda a, b: ops.qadd(a, b, 1, 0, False, 8))
    assert_bit_exact(run_on_board(emulated_pi.address, m, a, b), m(a, b))


def test_pools_relu_and_quantize_on_pi(emulated_pi, gen):
    x = int8(1, 5, 11, 9, gen=gen)
    m = OpModule(lambda x: ops.qavg_pool2d(ops.qrelu(ops.qmax_pool2d(x, [3, 2], [1, 2],
                                                                      [0, 1, 2, 0])), [3, 3], [3, 3], 8))
    assert_bit_exact(run_on_board(emulated_pi.address, m, x), m(x))
    f = torch.randn(4, 33, generator=gen) * 8
    f[0, :6] = torch.tensor([0.5, -0.5, 1.5, -1.5, 1e6, -1e6]) * 2.0 ** -5
    q = OpModule(lambda f: ops.dequantize(ops.quantize(f, -5, 8), -5))
    assert_bit_exact(run_on_board(emulated_pi.address, q, f), q(f))


@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: "x".join(map(str, c[:6])) + f"-s{c[6]}-g{c[9]}")
def test_qconv2d_sdot_on_pi5(emulated_pi5, case, gen):
    n, c, h, w, o, k, stride, padding, dil, groups = case
    x, wt = int8(n, c, h, w, gen=gen), int8(o, c // groups, k, k, gen=gen)
    x[0, 0, 0, :2], wt[0, 0, 0, :2] = -128, -128  # the largest product
    b = torch.randint(-3000, 3000, (o,), generator=gen, dtype=torch.int32)
    m = OpModule(lambda x, w, b: ops.qconv2d(x, w, b, [stride] * 2, list(padding), [dil] * 2,
                                             groups, 2, 3, True, 8), wt, b)
    assert_bit_exact(run_on_board(emulated_pi5.address, m, x, target="rpi5"), m(x))
