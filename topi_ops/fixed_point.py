"""Fixed-point (multiplier + shift) requantization with zero points, in TE: the kernels of the
affine int8 ops that standard PT2E models import as (``tvmq.ops_affine`` is the reference).

``fixed_point(v, m, s) = (v * m + 2^(s-1)) >> s`` in int64 (``|v| < 2^31``, ``m < 2^31``,
``1 <= s <= 62``: no overflow); where every multiplier is 1 (``--shift-only``) and the
accumulator provably fits, the epilogue is the int32 ``round_shift`` of ``requantize.py``.

The conv kernel is ``topi_ops.conv2d``'s packed dense loop nest (same block names and
``schedule_rule``, so the same default schedule and tuning apply) with two differences: the
input is padded with its zero point (the real value 0.0) instead of 0, and the epilogue adds
the output zero point after the fixed-point multiply. The activation zero point's share
``x_zp * Σw`` is folded into the bias at build time (``relay_passes.lower_pt2e``).
"""
from __future__ import annotations

from dataclasses import dataclass

from tvm import te, tirx

from topi_ops.conv2d import qconv2d
from topi_ops.pool import window_sum
from topi_ops.requantize import clamp, round_shift, select_not_nan


def fixed_point(value: tirx.PrimExpr, mult, shift) -> tirx.PrimExpr:
    """``(value * mult + 2^(shift-1)) >> shift`` in int64; ``mult``/``shift`` ints or int32
    expressions (e.g. read per output channel)."""
    v = value.astype("int64")
    m = tirx.const(mult, "int64") if isinstance(mult, int) else mult.astype("int64")
    s = tirx.const(shift, "int64") if isinstance(shift, int) else shift.astype("int64")
    one = tirx.const(1, "int64")
    return tirx.shift_right(v * m + tirx.shift_left(one, s - one), s)


@dataclass(frozen=True)
class AffineConvParams:
    """Scalar parameters of an affine int8 conv (padding is top, left, bottom, right).
    ``int32_shift``: every multiplier is 1 and the accumulator fits: a pure shift epilogue."""

    strides: tuple
    padding: tuple
    dilation: tuple
    groups: int
    x_zp: int
    out_zp: int
    lo: int
    hi: int
    int32_shift: bool = False
    nonneg: bool = False  # as Conv2dParams: pack_conv2d's bias correction and the kernel agree


def _epilogue(acc, channel, mult, shift, p: AffineConvParams):
    if p.int32_shift:
        v = round_shift(acc, shift[channel])
    else:
        v = fixed_point(acc, mult[channel], shift[channel])
    v = v + tirx.const(p.out_zp, str(v.ty.dtype))
    return clamp(v, p.lo, p.hi, "int8")


def qconv2d_affine(data: te.Tensor, weight: te.Tensor, bias: te.Tensor, mult: te.Tensor,
                   shift: te.Tensor, *, weight_shape, params: AffineConvParams,
                   target=None, layout: str = "NCHW") -> te.Tensor:
    """data [N, C, H, W] int8; weight packed by ``topi_ops.conv2d.pack_conv2d`` ([KH, KW, C/g, O] for
    grouped convs); bias [O] int32 with ``x_zp * Σw`` already taken out; mult, shift [O]
    int32 -> [N, O, OH, OW] int8. tvmq's int8 conv (same blocks, same schedule and tuning)
    with the padding at the input's zero point and the fixed-point epilogue."""
    return qconv2d(data, weight, bias, weight_shape=weight_shape, params=params, target=target,
                   epilogue=lambda value, ch: _epilogue(value, ch, mult, shift, params),
                   pad=params.x_zp, layout=layout)


def qdense_affine(data: te.Tensor, weight: te.Tensor, bias: te.Tensor, mult: te.Tensor,
                  shift: te.Tensor, *, weight_shape, params: AffineConvParams,
                  target=None) -> te.Tensor:
    """data [N, K] int8 -> [N, O] int8: a 1x1 conv on a 1x1 image (shares its schedule)."""
    n, k = (int(v) for v in data.shape)
    image = te.compute((n, 1, 1, k), lambda b, y, x, c: data[b, c], name="tvmq_dense_as_image")
    out = qconv2d_affine(image, weight, bias, mult, shift, weight_shape=(*weight_shape, 1, 1),
                         params=params, target=target, layout="NHWC")
    return te.compute((n, int(weight_shape[0])), lambda b, o: out[b, 0, 0, o],
                      name="tvmq_dense_out")


# ----------------------------------------------------------------------------- elementwise
def _finish(v, out_zp, lo, hi):
    return clamp(v + tirx.const(out_zp, str(v.ty.dtype)), lo, hi, "int8")


def quantize_affine(data: te.Tensor, inv_scale: float, zero_point: int, lo: int,
                    hi: int) -> te.Tensor:
    """float32 -> int8 ``clamp(nearbyint(x * inv_scale) + z)`` (half to even, as PyTorch's
    ``round``); NaN -> z, ±inf saturate."""
    def f(*i):
        x = data(*i)
        v = tirx.nearbyint(x * tirx.const(inv_scale, "float32"))
        v = tirx.max(tirx.min(v, tirx.const(1e9, "float32")), tirx.const(-1e9, "float32"))
        v = select_not_nan(x, v, 0.0)
        return _finish(v.astype("int32"), zero_point, lo, hi)

    return te.compute(data.shape, f, name="tvmq_quantize_affine", tag="elemwise")


def dequantize_affine(data: te.Tensor, scale: float, zero_point: int) -> te.Tensor:
    """int8 -> float32 ``(x - z) * scale``."""
    return te.compute(data.shape, lambda *i: (data(*i).astype("float32")
                                              - tirx.const(float(zero_point), "float32"))
                      * tirx.const(scale, "float32"),
                      name="tvmq_dequantize_affine", tag="elemwise")


def qadd_affine(a: te.Tensor, b: te.Tensor, a_zp: int, b_zp: int, a_mult: int, b_mult: int,
                shift: int, out_zp: int, lo: int, hi: int) -> te.Tensor:
    """``(((a - za) * ma + (b - zb) * mb + 2^(s-1)) >> s) + z_out``, clamped (int64)."""
    def f(*i):
        va = (a(*i).astype("int64") - tirx.const(a_zp, "int64")) * tirx.const(a_mult, "int64")
        vb = (b(*i).astype("int64") - tirx.const(b_zp, "int64")) * tirx.const(b_mult, "int64")
        v = tirx.shift_right(va + vb + tirx.const(1 << (shift - 1), "int64"),
                             tirx.const(shift, "int64"))
        return _finish(v, out_zp, lo, hi)

    return te.compute(a.shape, f, name="tvmq_qadd_affine", tag="elemwise")


def requantize_affine(data: te.Tensor, x_zp: int, mult: int, shift: int, out_zp: int, lo: int,
                      hi: int) -> te.Tensor:
    return te.compute(data.shape, lambda *i: _finish(fixed_point(
        data(*i).astype("int32") - tirx.const(x_zp, "int32"), mult, shift), out_zp, lo, hi),
        name="tvmq_requantize_affine", tag="elemwise")


def qavg_pool2d_affine(data: te.Tensor, kernel, stride, x_zp: int, mult: int, shift: int,
                       out_zp: int, lo: int, hi: int) -> te.Tensor:
    total = window_sum(data, kernel, stride, x_zp)
    return te.compute(total.shape, lambda *i: _finish(fixed_point(total(*i), mult, shift),
                                                      out_zp, lo, hi),
                      name="tvmq_qavg_pool2d_affine", tag="elemwise")
