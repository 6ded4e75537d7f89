"""Shift-add conv2d for power-of-two weights (APTQ/APQ): no multiplication anywhere.

Each weight is ``±2^k`` (k in 0..6) or 0, given as a sign + exponent code (0 = zero weight,
``±(k + 1)``). At build time (numpy, :func:`pack_shiftadd`) the codes become three constants
per weight in the kernel's wide dtype: the shift amount ``k``, the sign mask ``m`` (−1 for a
negative weight, else 0) and the nonzero mask ``z`` (−1 for a nonzero weight, else 0). The
product ``x·w`` is then

    ((x << k) ^ m) & z        =  x·2^k,  −x·2^k − 1,  or 0

with ``x`` widened (int32 on x86: AVX2/AVX-512 ``vpsllvd``; int16 on aarch64: NEON ``sshl``
on 8 lanes, the product |x·2^k| ≤ 8192 fits), accumulated in int32. ``^ m`` is one's
complement, so every negative weight leaves a −1 in the sum whatever ``x`` is (padding too):
their count per filter is added to the bias at build time, exactly. The requantization
(``round_shift`` by the channel's shift, clamp to ``[lo, hi]``) is the epilogue of the same
loop nest.

Dense convs (groups = 1) are blocked by ``block`` output channels, one vector of lanes with
a different shift per lane (``[O/B, KH, KW, C, B]`` constants), the data broadcast;
grouped/depthwise convs keep ``[O, C/g, KH, KW]`` and vector over output columns (one shift
for the whole vector). The schedules are in ``schedules/shiftadd.py``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tvm import te, tirx

from topi_ops.requantize import clamp, round_shift

POWERS = 7  # codes in [-7, 7]
RULE = "tvmq_shiftadd"
GROUPED_RULE = "tvmq_shiftadd_grouped"


@dataclass(frozen=True)
class ShiftAddParams:
    """Scalars of a shift-add conv (padding is top, left, bottom, right); ``block`` output
    channels per vector and the ``wide`` dtype the data is shifted in (:func:`shiftadd_layout`)."""

    strides: tuple
    padding: tuple
    dilation: tuple
    groups: int
    lo: int = -128
    hi: int = 127
    block: int = 8
    wide: str = "int32"


def shiftadd_layout(target) -> tuple[int, str]:
    """(block, wide dtype) for ``target``: NEON shifts int16x8 per lane (``sshl``); x86 has
    per-lane variable shifts for int32 only on AVX2 (``vpsllvd``, 8 lanes; 16 with AVX-512)."""
    import tvm

    if target is None or target.kind.name != "llvm":
        return 8, "int32"
    if str(target.attrs.get("mtriple", "")).startswith("aarch64"):
        return 8, "int16"
    if tvm.target.codegen.llvm_cpu_has_features("avx512f", target):
        return 16, "int32"
    return 8, "int32"


def decode(codes: np.ndarray) -> np.ndarray:
    """Codes -> the int weights they stand for (int64)."""
    c = codes.astype(np.int64)
    return np.sign(c) * np.where(c != 0, 1 << np.maximum(np.abs(c) - 1, 0), 0)


def pack_shiftadd(codes: np.ndarray, bias: np.ndarray, params: ShiftAddParams):
    """Codes [O, C/g, KH, KW] int8 -> ``[shift, sign mask, nonzero mask, bias']``.

    Dense: ``[O/B, KH, KW, C, B]`` (output channels padded with zero weights); grouped:
    ``[O, C/g, KH, KW]``. ``bias' = bias + (negative weights of the filter)`` (int32)."""
    codes = codes.astype(np.int64)
    if codes.size and np.abs(codes).max() > POWERS:
        raise ValueError(f"power-of-two codes must lie in [-{POWERS}, {POWERS}]")
    negatives = (codes < 0).reshape(codes.shape[0], -1).sum(1)
    bias = bias.astype(np.int64) + negatives
    if np.abs(bias).max(initial=0) >= 2**31:
        raise ValueError("the bias plus the count of negative weights does not fit int32")
    shift = np.maximum(np.abs(codes) - 1, 0)
    sign = np.where(codes < 0, -1, 0)
    nonzero = np.where(codes != 0, -1, 0)
    arrays = [shift, sign, nonzero]
    if params.groups == 1:
        o, c, kh, kw = codes.shape
        b = params.block
        ob = -(-o // b)
        out = []
        for a in arrays:
            padded = np.zeros((ob * b, c, kh, kw), np.int64)
            padded[:o] = a
            out.append(padded.reshape(ob, b, c, kh, kw).transpose(0, 3, 4, 2, 1))
        arrays = out
    return [np.ascontiguousarray(a.astype(params.wide)) for a in arrays] + [bias.astype(np.int32)]


def _output_hw(h, w, kh, kw, params):
    pt, pl, pb, pr = params.padding
    (sh, sw), (dh, dw) = params.strides, params.dilation
    return (h + pt + pb - dh * (kh - 1) - 1) // sh + 1, (w + pl + pr - dw * (kw - 1) - 1) // sw + 1


def _term(x, k, m, z):
    """``x·w`` for ``w = ±2^k`` or 0 as shifts and masks: ``((x << k) ^ m) & z``."""
    return tirx.bitwise_and(tirx.bitwise_xor(tirx.shift_left(x, k), m), z)


def shiftadd_conv2d(data: te.Tensor, shift_k: te.Tensor, sign: te.Tensor, nonzero: te.Tensor,
                    bias: te.Tensor, out_shift: te.Tensor, *, weight_shape,
                    params: ShiftAddParams) -> te.Tensor:
    """data [N, C, H, W] int8, packed constants (:func:`pack_shiftadd`), bias' [O] int32,
    out_shift [O] int32 -> [N, O, OH, OW] int8, bit-exact with ``tvmq::pot_conv2d``."""
    n, c, h, w = (int(v) for v in data.shape)
    o, cg, kh, kw = (int(v) for v in weight_shape)
    pt, pl, pb, pr = params.padding
    (sh, sw), (dh, dw) = params.strides, params.dilation
    oh, ow = _output_hw(h, w, kh, kw, params)
    wide = params.wide
    padded = te.compute(
        (n, c, h + pt + pb, w + pl + pr),
        lambda b, ch, y, x: tirx.if_then_else(
            tirx.all(y >= pt, y < pt + h, x >= pl, x < pl + w),
            data[b, ch, y - pt, x - pl].astype(wide), tirx.const(0, wide)),
        name="tvmq_shiftadd_pad")
    ry, rx = te.reduce_axis((0, kh), "ry"), te.reduce_axis((0, kw), "rx")

    def requant(value, oc):
        return clamp(round_shift(value + bias[oc], out_shift[oc]), params.lo, params.hi, "int8")

    if params.groups != 1:
        og = o // params.groups
        rc = te.reduce_axis((0, cg), "rc")
        acc = te.compute(
            (n, o, oh, ow),
            lambda b, oc, y, x: te.sum(_term(
                padded[b, (oc // og) * cg + rc, y * sh + ry * dh, x * sw + rx * dw],
                shift_k[oc, rc, ry, rx], sign[oc, rc, ry, rx], nonzero[oc, rc, ry, rx]
            ).astype("int32"), axis=[rc, ry, rx]),
            name="tvmq_shiftadd_grouped_acc", attrs={"schedule_rule": GROUPED_RULE})
        return te.compute(acc.shape, lambda b, oc, y, x: requant(acc[b, oc, y, x], oc),
                          name="tvmq_shiftadd_grouped_requant")

    ob, block = int(shift_k.shape[0]), int(shift_k.shape[4])
    rc = te.reduce_axis((0, c), "rc")
    acc = te.compute(
        (n, ob, oh, ow, block),
        lambda b, o_b, y, x, oi: te.sum(_term(
            padded[b, rc, y * sh + ry * dh, x * sw + rx * dw],
            shift_k[o_b, ry, rx, rc, oi], sign[o_b, ry, rx, rc, oi], nonzero[o_b, ry, rx, rc, oi]
        ).astype("int32"), axis=[ry, rx, rc]),
        name="tvmq_shiftadd_acc", attrs={"schedule_rule": RULE})
    blocked = te.compute(
        acc.shape,
        lambda b, o_b, y, x, oi: requant(acc[b, o_b, y, x, oi],
                                         tirx.min(o_b * block + oi, o - 1)),
        name="tvmq_shiftadd_requant")
    return te.compute((n, o, oh, ow),
                      lambda b, oc, y, x: blocked[b, oc // block, y, x, oc % block],
                      name="tvmq_shiftadd_unpack")
