"""Affine (scale + zero point) int8 deploy ops: the integer form of standard PT2E int8 models.

``tvmq.pt2e`` rewrites a PT2E graph (``quantized_decomposed.quantize/dequantize_*`` around
aten conv2d/linear/add/relu/pooling) into these ops; this module *defines* their integer
semantics (the PyTorch reference every TVM kernel matches bit for bit) and registers their
Relax bodies (``tvmq.bodies``).

Every activation is int8 with a zero point ``z`` (uint8 PT2E tensors are carried as
``q - 128`` with zero point ``z - 128``: the same real values). A float scale ratio ``M`` is
applied as a fixed-point multiplier, the exact int64 form

    fixed_point(v, m, s) = (v * m + 2^(s-1)) >> s        (s >= 1; round half up)

with ``M ~= m * 2^-s``: ``m`` in [2^30, 2^31) (``multiplier(M)``), or with ``shift_only``
``m`` a power of two (a pure rounding shift). ``|v| < 2^31``, ``m < 2^31`` and ``s <= 62``,
so nothing overflows int64.

>>> fixed_point(torch.tensor([5, -5, 6, -6]), torch.tensor(1), torch.tensor(2)).tolist()
[1, -1, 2, -1]
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.ao.quantization.fx._decomposed  # noqa: F401  PT2E's ops: .pt2 files load
import torch.nn.functional as F
from tvm import relax

from tvmq import ops
from tvmq.bodies import register_body

I32, I64 = torch.int32, torch.int64
MAX_SHIFT = 62


# ----------------------------------------------------------------------------- multipliers
def multiplier(m: float, shift_only: bool = False) -> tuple[int, int]:
    """``(mult, shift)`` with ``m ~= mult * 2^-shift``, ``shift`` in [1, 62].

    Default: ``mult`` in [2^30, 2^31) (31 significant bits, the gemmlowp/TFLite form).
    ``shift_only``: ``m`` rounded to the nearest power of two (in log2), ``mult`` = 2^k."""
    if not (m > 0 and math.isfinite(m)):
        raise ValueError(f"requantization multiplier {m!r} must be positive and finite")
    if shift_only:
        e = round(math.log2(m))  # m ~= 2^e
        shift = min(max(-e, 1), MAX_SHIFT)  # 2^e = 2^(shift + e) * 2^-shift
        return 1 << (shift + e) if shift + e >= 0 else 0, shift
    mant, exp = math.frexp(m)  # m = mant * 2^exp, mant in [0.5, 1)
    mult, shift = round(mant * (1 << 31)), 31 - exp
    if mult == 1 << 31:
        mult, shift = 1 << 30, shift - 1
    if shift < 1:
        raise ValueError(f"requantization multiplier {m!r} is too large (>= 2^30)")
    if shift > MAX_SHIFT:  # tiny multipliers: fewer significant bits, same formula
        mult, shift = round(m * 2.0 ** MAX_SHIFT), MAX_SHIFT
    return int(mult), int(shift)


def multipliers(ms, shift_only: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    pairs = [multiplier(float(m), shift_only) for m in ms]
    return (torch.tensor([p[0] for p in pairs], dtype=I32),
            torch.tensor([p[1] for p in pairs], dtype=I32))


def fixed_point(v: torch.Tensor, mult: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``(v * mult + 2^(shift-1)) >> shift`` in int64 (int32 result where it fits)."""
    v, mult, shift = v.to(I64), mult.to(I64), shift.to(I64)
    return (v * mult + (torch.ones_like(shift) << (shift - 1))) >> shift


def f32(value: float) -> float:
    """``value`` rounded to float32 (the precision PyTorch multiplies float32 tensors at)."""
    return float(np.float32(value))


def _channel(t: torch.Tensor, dim: int, axis: int = 1) -> torch.Tensor:
    view = [1] * dim
    view[axis] = -1
    return t.view(view)


def _clamp(v: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    if not -128 <= lo <= hi <= 127:
        raise ValueError(f"output range [{lo}, {hi}] does not fit int8")
    return v.clamp(lo, hi).to(torch.int8)


# ----------------------------------------------------------------------------- boundary
@torch.library.custom_op("tvmq::quantize_affine", mutates_args=())
def quantize_affine(x: torch.Tensor, inv_scale: float, zero_point: int, lo: int,
                    hi: int) -> torch.Tensor:
    """float32 -> int8 ``clamp(round_half_even(x * inv_scale) + z, lo, hi)``, the product in
    float32 (as PT2E's ``quantize_per_tensor``); NaN -> ``z`` (0.0), ±inf saturate."""
    scaled = torch.round(x.float() * torch.tensor(inv_scale, dtype=torch.float32))
    scaled = torch.nan_to_num(scaled, nan=0.0, posinf=1e9, neginf=-1e9)
    return _clamp(scaled.clamp(-1e9, 1e9) + zero_point, lo, hi)


@quantize_affine.register_fake
def _(x, inv_scale, zero_point, lo, hi):
    return torch.empty_like(x, dtype=torch.int8)


@torch.library.custom_op("tvmq::dequantize_affine", mutates_args=())
def dequantize_affine(x: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
    """int8 -> float32 ``(x - z) * scale`` (float32, as PT2E's ``dequantize_per_tensor``)."""
    return (x.to(torch.float32) - zero_point) * torch.tensor(scale, dtype=torch.float32)


@dequantize_affine.register_fake
def _(x, scale, zero_point):
    return torch.empty_like(x, dtype=torch.float32)


# ----------------------------------------------------------------------------- conv / linear
def _conv_acc(x, w, x_zp, stride, padding, dilation, groups):
    top, left, bottom, right = padding
    xi = F.pad(x.to(I32) - x_zp, (left, right, top, bottom))  # padding = the zero point
    acc = F.conv2d(xi.double(), w.double(), None, stride, 0, dilation, groups)
    return acc.round().to(I64)  # exact: |acc| < 2^31 (checked at import)


@torch.library.custom_op("tvmq::qconv2d_affine", mutates_args=())
def qconv2d_affine(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                   mult: torch.Tensor, shift: torch.Tensor, stride: list[int],
                   padding: list[int], dilation: list[int], groups: int, x_zp: int,
                   out_zp: int, lo: int, hi: int) -> torch.Tensor:
    """int8 conv with zero points and a fixed-point multiplier per output channel:
    ``clamp(fixed_point(conv(x - x_zp, w) + bias, mult[o], shift[o]) + out_zp, lo, hi)``.
    The input is padded with ``x_zp`` (real 0.0); ``bias`` int32 at scale ``s_x * s_w[o]``."""
    acc = _conv_acc(x, weight, x_zp, stride, padding, dilation, groups)
    acc = acc + _channel(bias.to(I64), 4)
    out = fixed_point(acc, _channel(mult, 4), _channel(shift, 4)) + out_zp
    return _clamp(out, lo, hi)


@qconv2d_affine.register_fake
def _(x, weight, bias, mult, shift, stride, padding, dilation, groups, x_zp, out_zp, lo, hi):
    return ops.conv_output(x, weight.shape[0], weight.shape[-2:], stride, padding, dilation)


@torch.library.custom_op("tvmq::qlinear_affine", mutates_args=())
def qlinear_affine(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                   mult: torch.Tensor, shift: torch.Tensor, x_zp: int, out_zp: int, lo: int,
                   hi: int) -> torch.Tensor:
    """int8 dense ``[N, K] x [O, K]`` with zero points (see :func:`qconv2d_affine`)."""
    acc = ((x.to(I32) - x_zp).double() @ weight.double().T).round().to(I64) + bias.to(I64)
    return _clamp(fixed_point(acc, mult.view(1, -1), shift.view(1, -1)) + out_zp, lo, hi)


@qlinear_affine.register_fake
def _(x, weight, bias, mult, shift, x_zp, out_zp, lo, hi):
    return x.new_empty((x.shape[0], weight.shape[0]), dtype=torch.int8)


# ----------------------------------------------------------------------------- elementwise
@torch.library.custom_op("tvmq::qadd_affine", mutates_args=())
def qadd_affine(a: torch.Tensor, b: torch.Tensor, a_zp: int, b_zp: int, a_mult: int,
                b_mult: int, shift: int, out_zp: int, lo: int, hi: int) -> torch.Tensor:
    """``clamp((((a - a_zp) * a_mult + (b - b_zp) * b_mult + 2^(shift-1)) >> shift)
    + out_zp, lo, hi)`` in int64: one rounding for the sum (``a_mult / 2^shift`` =
    ``s_a / s_out``). A fused ReLU is ``lo = max(lo, out_zp)``."""
    acc = (a.to(I64) - a_zp) * a_mult + (b.to(I64) - b_zp) * b_mult + (1 << (shift - 1))
    return _clamp((acc >> shift) + out_zp, lo, hi)


@qadd_affine.register_fake
def _(a, b, a_zp, b_zp, a_mult, b_mult, shift, out_zp, lo, hi):
    return torch.empty_like(a, dtype=torch.int8)


@torch.library.custom_op("tvmq::requantize_affine", mutates_args=())
def requantize_affine(x: torch.Tensor, x_zp: int, mult: int, shift: int, out_zp: int, lo: int,
                      hi: int) -> torch.Tensor:
    """Change of (scale, zero point): ``clamp(fixed_point(x - x_zp, mult, shift) + out_zp)``."""
    v = x.to(I64) - x_zp
    return _clamp(((v * mult + (1 << (shift - 1))) >> shift) + out_zp, lo, hi)


@requantize_affine.register_fake
def _(x, x_zp, mult, shift, out_zp, lo, hi):
    return torch.empty_like(x, dtype=torch.int8)


@torch.library.custom_op("tvmq::qavg_pool2d_affine", mutates_args=())
def qavg_pool2d_affine(x: torch.Tensor, kernel: list[int], stride: list[int], x_zp: int,
                       mult: int, shift: int, out_zp: int, lo: int, hi: int) -> torch.Tensor:
    """Average pool, no padding: ``clamp(fixed_point(Σ_window (x - x_zp), mult, shift) +
    out_zp)`` with ``mult / 2^shift ~= s_x / (kh * kw * s_out)``."""
    total = F.avg_pool2d((x.to(I32) - x_zp).double(), kernel, stride, divisor_override=1)
    v = total.round().to(I64)
    return _clamp(((v * mult + (1 << (shift - 1))) >> shift) + out_zp, lo, hi)


@qavg_pool2d_affine.register_fake
def _(x, kernel, stride, x_zp, mult, shift, out_zp, lo, hi):
    n, c, h, w = x.shape
    return x.new_empty((n, c, (h - kernel[0]) // stride[0] + 1, (w - kernel[1]) // stride[1] + 1))


# ----------------------------------------------------------------------------- Relax bodies
R = relax.op


def _c(value, dtype):
    return relax.const(value, dtype)


def _fixed_point_relax(bb, v64, mult, shift, view=None):
    """int64 ``(v * mult + 2^(shift-1)) >> shift``; mult/shift Relax int32 tensors (reshaped
    to ``view``) or Python ints."""
    if isinstance(mult, int):
        m, s = _c(mult, "int64"), _c(shift, "int64")
    else:
        m = bb.emit(R.astype(bb.emit(R.reshape(mult, view)), "int64"))
        s = bb.emit(R.astype(bb.emit(R.reshape(shift, view)), "int64"))
    half = bb.emit(R.left_shift(_c(1, "int64"), bb.emit(R.subtract(s, _c(1, "int64")))))
    prod = bb.emit(R.multiply(v64, m))
    return bb.emit(R.right_shift(bb.emit(R.add(prod, half)), s))


def _finish(bb, v64, out_zp, lo, hi):
    v = bb.emit(R.add(v64, _c(out_zp, "int64")))
    return bb.emit(R.astype(bb.emit(R.clip(v, lo, hi)), "int8"))


def _minus_zp(bb, x, zp, dtype="int32"):
    return bb.emit(R.subtract(bb.emit(R.astype(x, dtype)), _c(zp, dtype)))


def _bias64(bb, b, view):
    return bb.emit(R.reshape(bb.emit(R.astype(b, "int64")), view))


@register_body("quantize_affine")
def _body_quantize_affine(bb, x, inv_scale, zero_point, lo, hi):
    scaled = bb.emit(R.round(bb.emit(R.multiply(x, _c(inv_scale, "float32")))))  # half even
    scaled = bb.emit(R.where(bb.emit(R.isnan(x)), _c(0.0, "float32"), scaled))
    scaled = bb.emit(R.clip(scaled, -1e9, 1e9))
    v = bb.emit(R.add(bb.emit(R.astype(scaled, "int32")), _c(zero_point, "int32")))
    return bb.emit(R.astype(bb.emit(R.clip(v, lo, hi)), "int8"))


@register_body("dequantize_affine")
def _body_dequantize_affine(bb, x, scale, zero_point):
    v = bb.emit(R.subtract(bb.emit(R.astype(x, "float32")), _c(float(zero_point), "float32")))
    return bb.emit(R.multiply(v, _c(scale, "float32")))


@register_body("qconv2d_affine")
def _body_qconv2d_affine(bb, x, w, b, mult, shift, stride, padding, dilation, groups, x_zp,
                         out_zp, lo, hi):
    top, left, bottom, right = padding
    xi = _minus_zp(bb, x, x_zp)
    xi = bb.emit(R.nn.pad(xi, [0, 0, 0, 0, top, bottom, left, right]))
    acc = bb.emit(R.nn.conv2d(xi, bb.emit(R.astype(w, "int32")), strides=stride, padding=0,
                              dilation=dilation, groups=groups, out_dtype="int32"))
    acc = bb.emit(R.add(bb.emit(R.astype(acc, "int64")), _bias64(bb, b, (1, -1, 1, 1))))
    return _finish(bb, _fixed_point_relax(bb, acc, mult, shift, (1, -1, 1, 1)), out_zp, lo, hi)


@register_body("qlinear_affine")
def _body_qlinear_affine(bb, x, w, b, mult, shift, x_zp, out_zp, lo, hi):
    xi = _minus_zp(bb, x, x_zp)
    wt = bb.emit(R.permute_dims(bb.emit(R.astype(w, "int32"))))
    acc = bb.emit(R.matmul(xi, wt, out_dtype="int32"))
    acc = bb.emit(R.add(bb.emit(R.astype(acc, "int64")), _bias64(bb, b, (1, -1))))
    return _finish(bb, _fixed_point_relax(bb, acc, mult, shift, (1, -1)), out_zp, lo, hi)


@register_body("qadd_affine")
def _body_qadd_affine(bb, a, b, a_zp, b_zp, a_mult, b_mult, shift, out_zp, lo, hi):
    va = bb.emit(R.multiply(_minus_zp(bb, a, a_zp, "int64"), _c(a_mult, "int64")))
    vb = bb.emit(R.multiply(_minus_zp(bb, b, b_zp, "int64"), _c(b_mult, "int64")))
    acc = bb.emit(R.add(bb.emit(R.add(va, vb)), _c(1 << (shift - 1), "int64")))
    return _finish(bb, bb.emit(R.right_shift(acc, _c(shift, "int64"))), out_zp, lo, hi)


@register_body("requantize_affine")
def _body_requantize_affine(bb, x, x_zp, mult, shift, out_zp, lo, hi):
    v = _minus_zp(bb, x, x_zp, "int64")
    return _finish(bb, _fixed_point_relax(bb, v, mult, shift), out_zp, lo, hi)


@register_body("qavg_pool2d_affine")
def _body_qavg_pool2d_affine(bb, x, kernel, stride, x_zp, mult, shift, out_zp, lo, hi):
    channels = int(x.ty.shape[1])
    ones = relax.const(np.ones((channels, 1, *kernel), dtype=np.int32))
    xi = _minus_zp(bb, x, x_zp)
    total = bb.emit(R.nn.conv2d(xi, ones, strides=stride, groups=channels, out_dtype="int32"))
    v = bb.emit(R.astype(total, "int64"))
    return _finish(bb, _fixed_point_relax(bb, v, mult, shift), out_zp, lo, hi)
