"""Shift requantization in TE: the one rounding rule of the integer graph.

``round_shift(a, P) = (a + (1 << (P - 1))) >> P`` for ``P > 0`` (round half up, arithmetic
shift, so negative values round towards +inf at .5), ``a << -P`` for ``P <= 0``; the result
is then saturated to the output's integer range. The PyTorch reference (``tvmq.reference``)
defines the same thing; ``tvmq.convert`` proves the int32 intermediate cannot overflow.
"""
from __future__ import annotations

from tvm import te, tirx


def round_shift(value: tirx.PrimExpr, shift: int) -> tirx.PrimExpr:
    """Round-half-up arithmetic shift right by a compile-time ``shift`` (left shift if <= 0)."""
    dtype = str(value.ty.dtype)
    if shift > 0:
        half = tirx.const(1 << (shift - 1), dtype)
        return tirx.shift_right(value + half, tirx.const(shift, dtype))
    if shift < 0:
        return tirx.shift_left(value, tirx.const(-shift, dtype))
    return value


def saturate(value: tirx.PrimExpr, out_dtype: str, relu: bool = False,
             bits: int | None = None) -> tirx.PrimExpr:
    """Clamp to the signed ``bits`` range (default: all of ``out_dtype``; lower bound 0 with
    ``relu``) and cast to ``out_dtype``."""
    vtype = str(value.ty.dtype)
    if bits is None:
        lo, hi = tirx.min_value(out_dtype).astype(vtype), tirx.max_value(out_dtype).astype(vtype)
    else:
        lo, hi = (tirx.const(-(1 << (bits - 1)), vtype), tirx.const((1 << (bits - 1)) - 1, vtype))
    if relu:
        lo = tirx.const(0, vtype)
    return tirx.max(tirx.min(value, hi), lo).astype(out_dtype)


def requantize(value: tirx.PrimExpr, shift: int, out_dtype: str = "int8", relu: bool = False,
               bits: int | None = None):
    """``saturate(round_shift(value, shift))``: the epilogue of every integer kernel."""
    return saturate(round_shift(value, shift), out_dtype, relu, bits)


def requantize_tensor(acc: te.Tensor, shift: int, out_dtype: str = "int8", relu: bool = False,
                      name: str = "tvmq_requantize") -> te.Tensor:
    """Elementwise :func:`requantize` over a whole int32 tensor."""
    return te.compute(acc.shape, lambda *i: requantize(acc(*i), shift, out_dtype, relu),
                      name=name, tag="elemwise")
