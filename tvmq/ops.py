"""The PyTorch integer reference of every deploy op, registered as ``tvmq::<op>`` custom ops.

This module *defines* tvmq's integer semantics: every TVM kernel on every target must match
these functions bit for bit. Each op is a ``torch.library.custom_op`` whose body is the
reference and which has a fake kernel, so ``torch.export`` keeps it as one node that the
frontend (``tvmq.frontend``) converts by name.

All arithmetic is int32 (``convert`` proves no intermediate overflows). Rounding is
round-half-up by add-and-shift (ALGORITHMS.md, "What all of them share"):

>>> round_shift(torch.tensor([5, -5, 6, -6], dtype=torch.int32), 2).tolist()
[1, -1, 2, -1]
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from topi_ops.pool import avg_pool_multiplier
from tvmq.quantizers import qrange

I32 = torch.int32


# ----------------------------------------------------------------------------- primitives
def round_shift(x: torch.Tensor, shift: int) -> torch.Tensor:
    """``(x + 2^(shift-1)) >> shift`` for ``shift > 0``, ``x << -shift`` otherwise (int32)."""
    if shift > 0:
        return (x + (1 << (shift - 1))) >> shift
    if shift < 0:
        return x << (-shift)
    return x


def saturate(x: torch.Tensor, bits: int, relu: bool = False) -> torch.Tensor:
    """Clamp an int32 tensor to the signed ``bits`` range (from 0 with ``relu``), as int8."""
    lo, hi = qrange(bits)
    return x.clamp(0 if relu else lo, hi).to(torch.int8)


def requantize(acc: torch.Tensor, shift: int, bits: int = 8, relu: bool = False) -> torch.Tensor:
    """``saturate(round_shift(acc, shift))``: the epilogue of every integer kernel."""
    return saturate(round_shift(acc, shift), bits, relu)


def round_shift_per_channel(acc: torch.Tensor, shift: torch.Tensor, axis: int = 1) -> torch.Tensor:
    """:func:`round_shift` with one shift per channel along ``axis`` (int32 in and out)."""
    view = [1] * acc.dim()
    view[axis] = -1
    s = shift.to(I32).view(view)
    right = s.clamp_min(0)
    half = (torch.ones_like(s) << right) >> 1  # 2^(s-1), 0 for s = 0
    return torch.where(s >= 0, (acc + half) >> right, acc << (-s).clamp_min(0))


def clamp_range(x: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Clamp an int32 tensor to ``[lo, hi]`` (a signed or unsigned N-bit range) as int8."""
    if not -128 <= lo <= hi <= 127:
        raise ValueError(f"output range [{lo}, {hi}] does not fit int8")
    return x.clamp(lo, hi).to(torch.int8)


def _conv_i32(x: torch.Tensor, w: torch.Tensor, stride, padding, dilation, groups) -> torch.Tensor:
    """Exact int8 x int8 -> int32 convolution.

    Computed in float64, which is exact: every product is < 2^14 and every sum of them
    < 2^53 (``convert`` bounds the accumulator by 2^31), and torch has no integer conv on CPU.
    """
    acc = F.conv2d(x.double(), w.double(), None, stride, padding, dilation, groups)
    return acc.round().to(I32)


def conv_output(x: torch.Tensor, out_channels: int, kernel, stride, padding, dilation
                ) -> torch.Tensor:
    """The int8 NCHW output a conv op's fake kernel returns (``padding`` top, left, bottom,
    right): one shape rule for every scheme's conv op."""
    n, _, h, w = x.shape
    (kh, kw) = kernel
    oh = (h + padding[0] + padding[2] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (w + padding[1] + padding[3] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return x.new_empty((n, out_channels, oh, ow), dtype=torch.int8)


# ----------------------------------------------------------------------------- boundary
@torch.library.custom_op("tvmq::quantize", mutates_args=())
def quantize(x: torch.Tensor, exponent: int, bits: int) -> torch.Tensor:
    """Float input -> int8 mantissa at ``exponent``: ``saturate(floor(x * 2^-e + 0.5))``.

    Defined for every float: ±inf saturate, NaN becomes 0 (the kernels do the same)."""
    scaled = torch.floor(x.float() * (2.0 ** -exponent) + 0.5)
    lo, hi = qrange(bits)
    return torch.nan_to_num(scaled, nan=0.0).clamp(lo, hi).to(torch.int8)


@quantize.register_fake
def _(x, exponent, bits):
    return torch.empty_like(x, dtype=torch.int8)


@torch.library.custom_op("tvmq::dequantize", mutates_args=())
def dequantize(x: torch.Tensor, exponent: int) -> torch.Tensor:
    """Integer output -> float ``x * 2^e`` (exact for int8 mantissas)."""
    return x.float() * (2.0 ** exponent)


@dequantize.register_fake
def _(x, exponent):
    return torch.empty_like(x, dtype=torch.float32)


# ----------------------------------------------------------------------------- conv / linear
@torch.library.custom_op("tvmq::qconv2d", mutates_args=())
def qconv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, stride: list[int],
            padding: list[int], dilation: list[int], groups: int, bias_shift: int,
            out_shift: int, relu: bool, bits: int) -> torch.Tensor:
    """int8 NCHW conv: ``requantize(conv(x, w) + (bias << bias_shift), out_shift)``.

    ``padding`` is (top, left, bottom, right), zero padding of the integer input.
    """
    top, left, bottom, right = padding
    x = F.pad(x.to(I32), (left, right, top, bottom))
    acc = _conv_i32(x, weight, stride, 0, dilation, groups)
    acc = acc + (bias.to(I32) << bias_shift).view(1, -1, 1, 1)
    return requantize(acc, out_shift, bits, relu)


@qconv2d.register_fake
def _(x, weight, bias, stride, padding, dilation, groups, bias_shift, out_shift, relu, bits):
    return conv_output(x, weight.shape[0], weight.shape[-2:], stride, padding, dilation)


@torch.library.custom_op("tvmq::qlinear", mutates_args=())
def qlinear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, bias_shift: int,
            out_shift: int, relu: bool, bits: int) -> torch.Tensor:
    """int8 dense ``[N, K] x [O, K]``: ``requantize(x @ w.T + (bias << bias_shift))``."""
    acc = (x.double() @ weight.double().T).round().to(I32)
    acc = acc + (bias.to(I32) << bias_shift)
    return requantize(acc, out_shift, bits, relu)


@qlinear.register_fake
def _(x, weight, bias, bias_shift, out_shift, relu, bits):
    return x.new_empty((x.shape[0], weight.shape[0]), dtype=torch.int8)


# ----------------------------------------------------------------------------- per channel
@torch.library.custom_op("tvmq::qconv2d_pc", mutates_args=())
def qconv2d_pc(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, shift: torch.Tensor,
               stride: list[int], padding: list[int], dilation: list[int], groups: int,
               lo: int, hi: int) -> torch.Tensor:
    """int8 NCHW conv with a shift per output channel:
    ``clamp(round_shift(conv(x, w) + bias, shift[o]), lo, hi)``.

    ``bias`` [O] int32 is at each channel's accumulator exponent; ``shift`` [O] int32 (any
    sign); ``[lo, hi]`` the output range (e.g. 0..3 for an unsigned 2-bit activation)."""
    top, left, bottom, right = padding
    x = F.pad(x.to(I32), (left, right, top, bottom))
    acc = _conv_i32(x, weight, stride, 0, dilation, groups) + bias.to(I32).view(1, -1, 1, 1)
    return clamp_range(round_shift_per_channel(acc, shift), lo, hi)


@qconv2d_pc.register_fake
def _(x, weight, bias, shift, stride, padding, dilation, groups, lo, hi):
    return conv_output(x, weight.shape[0], weight.shape[-2:], stride, padding, dilation)


@torch.library.custom_op("tvmq::qlinear_pc", mutates_args=())
def qlinear_pc(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, shift: torch.Tensor,
               lo: int, hi: int) -> torch.Tensor:
    """int8 dense with a shift per output channel (see :func:`qconv2d_pc`)."""
    acc = (x.double() @ weight.double().T).round().to(I32) + bias.to(I32)
    return clamp_range(round_shift_per_channel(acc, shift), lo, hi)


@qlinear_pc.register_fake
def _(x, weight, bias, shift, lo, hi):
    return x.new_empty((x.shape[0], weight.shape[0]), dtype=torch.int8)


# ----------------------------------------------------------------------------- elementwise
@torch.library.custom_op("tvmq::qadd", mutates_args=())
def qadd(a: torch.Tensor, b: torch.Tensor, a_shift: int, b_shift: int, relu: bool,
         bits: int) -> torch.Tensor:
    """Residual add: each input brought to the output exponent by ``round_shift``, summed in
    int32, saturated (``a_shift = s_out - s_a``)."""
    acc = round_shift(a.to(I32), a_shift) + round_shift(b.to(I32), b_shift)
    return saturate(acc, bits, relu)


@qadd.register_fake
def _(a, b, a_shift, b_shift, relu, bits):
    return torch.empty_like(a, dtype=torch.int8)


@torch.library.custom_op("tvmq::qrelu", mutates_args=())
def qrelu(x: torch.Tensor) -> torch.Tensor:
    """Integer ReLU: ``max(x, 0)``, exponent unchanged."""
    return x.clamp_min(0)


@qrelu.register_fake
def _(x):
    return torch.empty_like(x)


# ----------------------------------------------------------------------------- pooling
@torch.library.custom_op("tvmq::qmax_pool2d", mutates_args=())
def qmax_pool2d(x: torch.Tensor, kernel: list[int], stride: list[int],
                padding: list[int]) -> torch.Tensor:
    """Max pool on integers (exact). Padding is the type's minimum (-128): it never wins
    against a real value, and a window made only of padding gives -128, as in the kernel."""
    top, left, bottom, right = padding
    xi = F.pad(x.to(I32), (left, right, top, bottom), value=-128)
    return F.max_pool2d(xi.double(), kernel, stride).to(torch.int8)


@qmax_pool2d.register_fake
def _(x, kernel, stride, padding):
    n, c, h, w = x.shape
    oh = (h + padding[0] + padding[2] - kernel[0]) // stride[0] + 1
    ow = (w + padding[1] + padding[3] - kernel[1]) // stride[1] + 1
    return x.new_empty((n, c, oh, ow))


@torch.library.custom_op("tvmq::qavg_pool2d", mutates_args=())
def qavg_pool2d(x: torch.Tensor, kernel: list[int], stride: list[int], bits: int) -> torch.Tensor:
    """Average pool (no padding) at the input's exponent: int32 window sum, then
    ``round_shift(sum * m, k)`` with ``(m, k) = avg_pool_multiplier(kh * kw)``."""
    total = F.avg_pool2d(x.double(), kernel, stride, divisor_override=1).round().to(I32)
    mult, shift = avg_pool_multiplier(kernel[0] * kernel[1])
    return saturate(round_shift(total * mult, shift), bits)


@qavg_pool2d.register_fake
def _(x, kernel, stride, bits):
    n, c, h, w = x.shape
    return x.new_empty((n, c, (h - kernel[0]) // stride[0] + 1, (w - kernel[1]) // stride[1] + 1))
