"""MXQN's log codes on tvmq's int8 conv/dense kernels (seed 004; ``tvmq.schemes.mxqn``).

A log-coded tensor is int8 codes ``c``; its value is ``sign(c) · table[min(|c|, L)]``, at most
181 << 7 = 23168 in magnitude: an int16. So an MXQN conv runs on the conv kernel of
``topi_ops.conv2d`` as it is, with

- *decode* where the kernel packs its input (a ``PROLOGUE`` block the schedule inlines into
  the pack): the int16 values go to the target's int16-pair kernel (``pairs_layout``:
  ``vpdpwssd``, ``vpmaddwd``, NEON ``smlal``); a fixed-point input stays int8 (quads);
- *encode* in the epilogue on the register tile: ``r = round_shift(acc + bias, shift)``, then
  ``#{m : r >= T_m} - #{m : r <= -T_m}`` clamped to ``[lo, hi]`` (a fixed-point output: the
  clamp alone).

The table and thresholds are build-time constants, unrolled into compares and selects that
vectorize. The same integers as ``tvmq::mx_qconv2d`` (the PyTorch reference), exactly.
"""
from __future__ import annotations

from collections.abc import Sequence

from tvm import te, tirx

from topi_ops.conv2d import PROLOGUE, qconv2d
from topi_ops.dense import qdense
from topi_ops.requantize import clamp, round_shift


def check_codes(table: Sequence[int] | None, thresholds: Sequence[int] | None) -> None:
    """What these kernels assume (ValueError otherwise): the table starts at 0 and fits int16
    (the int16-pair kernel takes the decoded values); the thresholds are positive (the
    encode counts ``|r| >= T_m``)."""
    if table is not None and (int(table[0]) != 0 or max(abs(int(v)) for v in table) > 32767):
        raise ValueError(f"a log table starts at 0 and fits int16 (the int16-pair kernel takes"
                         f" the decoded values), got {list(table)}")
    if thresholds is not None and min(thresholds, default=1) <= 0:
        raise ValueError(f"log thresholds must be positive, got {list(thresholds)}")


def decode(codes: te.Tensor, table: Sequence[int]) -> te.Tensor:
    """int8 codes -> int16 values ``sign(c) · table[min(|c|, L)]`` (``check_codes``)."""
    levels = len(table) - 1

    def value(*index):
        c = codes[index].astype("int32")  # |c| of -128 needs more than int8
        mag = tirx.min(tirx.max(c, -c), tirx.const(levels, "int32"))
        v = tirx.const(0, "int32")
        for m in range(1, levels + 1):
            v = tirx.Select(mag == m, tirx.const(int(table[m]), "int32"), v)
        return tirx.Select(c < 0, -v, v).astype("int16")

    return te.compute(codes.shape, value, name="tvmq_log_decode", attrs={PROLOGUE: True})


def requantize_codes(shift: int, thresholds: Sequence[int] | None, lo: int, hi: int):
    """The epilogue ``(acc + bias, channel) -> int8``: round-shift, then encode to log codes
    (``thresholds``, ``check_codes``) or not (None), clamped to ``[lo, hi]``."""

    def epilogue(value, _channel):
        r = round_shift(value, shift)
        if thresholds is not None:
            # thresholds > 0: r >= 0 counts only r >= T_m, r < 0 only r <= -T_m, so the
            # code is sign(r) * #{m : |r| >= T_m}: one compare per level, not two. |r| is
            # taken of r clamped to -INT32_MAX (the count is the same, -r cannot overflow)
            one, zero = tirx.const(1, "int32"), tirx.const(0, "int32")
            a = tirx.max(r, tirx.const(-(2**31 - 1), "int32"))
            a = tirx.max(a, -a)
            level = zero
            for t in (int(t) for t in thresholds):
                level = level + tirx.Select(a >= tirx.const(t, "int32"), one, zero)
            r = tirx.Select(r < zero, -level, level)
        return clamp(r, lo, hi, "int8")
    return epilogue


def mx_qconv2d(data: te.Tensor, weight: te.Tensor, bias: te.Tensor, *, weight_shape, params,
               table: Sequence[int] | None, thresholds: Sequence[int] | None, shift: int,
               target=None) -> te.Tensor:
    """NHWC int8 (codes where ``table`` is given) -> NHWC int8 (codes where ``thresholds`` are
    given); ``weight``/``bias`` from ``pack_conv2d`` (``pairs_layout`` for a decoded input)."""
    check_codes(table, thresholds)
    data = decode(data, table) if table is not None else data
    return qconv2d(data, weight, bias, weight_shape=weight_shape, params=params, target=target,
                   layout="NHWC", epilogue=requantize_codes(shift, thresholds, params.lo,
                                                            params.hi))


def mx_qdense(data: te.Tensor, weight: te.Tensor, bias: te.Tensor, *, weight_shape, params,
              table: Sequence[int] | None, thresholds: Sequence[int] | None, shift: int,
              target=None) -> te.Tensor:
    """[N, K] -> [N, O], as :func:`mx_qconv2d`."""
    check_codes(table, thresholds)
    data = decode(data, table) if table is not None else data
    return qdense(data, weight, bias, weight_shape=weight_shape, params=params, target=target,
                  epilogue=requantize_codes(shift, thresholds, params.lo, params.hi))
