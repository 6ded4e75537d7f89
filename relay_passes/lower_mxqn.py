"""Lowering of ``tvmq.mx_qconv2d`` / ``tvmq.mx_qlinear`` (MXQN, seed 004).

The op: optional *decode* of log-coded int8 input (``sign(c) · table[min(|c|, L)]``, an exact
int32 table), the int32 conv/dense with int8 weights, bias ``<< bias_shift``,
``round_shift(acc, out_shift)``, then either a clamp to ``[lo, hi]`` (fixed-point output) or
an *encode* to log codes (``#{m: r ≥ T_m} − #{m: r ≤ −T_m}``, clamped to ``[lo, hi]``).

The kernel is these integer Relax ops (take, where, conv2d/matmul with int32 output,
shifts, comparisons, sum), legalized to TOPI's generic integer kernels: the decoded input
spans up to 2^15, too wide for the int8 (VNNI/sdot) kernels. The same builder is the
composite's body (``tvmq.schemes.mxqn``), so body and kernel are one definition.
"""
from __future__ import annotations

from tvm import relax

from relay_passes.lower_composites import LOWERINGS

R = relax.op


def _i32(v):
    return relax.const(v, "int32")


def _decode(bb, x, table):
    """int8 codes -> int32 values ``sign(c) · table[min(|c|, L)]``."""
    levels = int(table.ty.shape[0]) - 1
    xi = bb.emit(R.astype(x, "int32"))
    mag = bb.emit(R.clip(R.abs(xi), 0, levels))
    v = bb.emit(R.take(table, mag, axis=0, mode="clip"))  # in bounds: |c| clipped to L
    return bb.emit(R.where(R.less(xi, _i32(0)), R.negative(v), v))


def _round_shift(bb, x, shift):
    if shift > 0:
        return bb.emit(R.right_shift(R.add(x, _i32(1 << (shift - 1))), _i32(shift)))
    if shift < 0:
        return bb.emit(R.left_shift(x, _i32(-shift)))
    return x


def _finish(bb, acc, thresholds, out_shift, out_log, lo, hi):
    r = _round_shift(bb, acc, out_shift)
    if out_log:
        e = bb.emit(R.expand_dims(r, -1))
        pos = bb.emit(R.sum(R.astype(R.greater_equal(e, thresholds), "int32"), axis=[-1]))
        neg = bb.emit(R.sum(R.astype(R.less_equal(e, R.negative(thresholds)), "int32"),
                            axis=[-1]))
        r = bb.emit(R.subtract(pos, neg))
    return bb.emit(R.astype(R.clip(r, lo, hi), "int8"))


def emit_mx_qconv2d(bb, x, w, b, table, thresholds, stride, padding, dilation, groups,
                    bias_shift, out_shift, in_log, out_log, lo, hi):
    xi = _decode(bb, x, table) if in_log else bb.emit(R.astype(x, "int32"))
    acc = bb.emit(R.nn.conv2d(xi, R.astype(w, "int32"), strides=stride, padding=padding,
                              dilation=dilation, groups=groups, out_dtype="int32"))
    bias = bb.emit(R.left_shift(b, _i32(bias_shift)))
    acc = bb.emit(R.add(acc, R.reshape(bias, (1, -1, 1, 1))))
    return _finish(bb, acc, thresholds, out_shift, out_log, lo, hi)


def emit_mx_qlinear(bb, x, w, b, table, thresholds, bias_shift, out_shift, in_log, out_log,
                    lo, hi):
    xi = _decode(bb, x, table) if in_log else bb.emit(R.astype(x, "int32"))
    acc = bb.emit(R.matmul(xi, R.permute_dims(R.astype(w, "int32")), out_dtype="int32"))
    bias = bb.emit(R.left_shift(b, _i32(bias_shift)))
    acc = bb.emit(R.add(acc, R.reshape(bias, (1, -1))))
    return _finish(bb, acc, thresholds, out_shift, out_log, lo, hi)


def _lower(emit):
    def lower(bb, args, attrs, target, node):
        return emit(bb, *args, *attrs)
    return lower


LOWERINGS["tvmq.mx_qconv2d"] = {"int32-log": _lower(emit_mx_qconv2d)}
LOWERINGS["tvmq.mx_qlinear"] = {"int32-log": _lower(emit_mx_qlinear)}
