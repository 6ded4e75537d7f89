"""Lowerings of ``tvmq.mx_qconv2d`` / ``tvmq.mx_qlinear`` (MXQN, seed 004).

The op: optional *decode* of log-coded int8 input (``sign(c) · table[min(|c|, L)]``, an exact
int32 table), the int32 conv/dense with int8 weights, bias ``<< bias_shift``,
``round_shift(acc, out_shift)``, then either a clamp to ``[lo, hi]`` (fixed-point output) or
an *encode* to log codes (``#{m: r ≥ T_m} − #{m: r ≤ −T_m}``, clamped to ``[lo, hi]``).

- ``int8-kernel`` (dense convs and linears): tvmq's conv kernel (``topi_ops.log_codes``),
  the decode in its data pack (decoded values fit int16: the int16-pair kernels), the
  encode in its epilogue; channels-last like every int8 conv.
- ``int32-log`` (grouped convs): these integer Relax ops (take, where, conv2d/matmul with
  int32 output, shifts, comparisons, sum), legalized to TOPI's generic integer kernels. The
  same builder is the composite's body (``tvmq.schemes.mxqn``), so body and kernel are one
  definition. On ResNet-20 at 4 bits it ran 84x slower than the int8 kernels.
"""
from __future__ import annotations

from functools import partial

from tvm import relax

from relay_passes.lower_composites import (INT8, LOWERINGS, OUTPUT_RANGES, LoweringError,
                                           _aligned_bias, _constant, channels_last, int8_conv,
                                           int8_dense)
from topi_ops import conv2d as conv_ops
from topi_ops import dense as dense_ops
from topi_ops import log_codes

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


def _operands(args, attrs, target, node, input_range):
    """What the conv and dense kernels share: the int8 weight, the bias at the accumulator's
    exponent, the input's range and packing (a decoded input: int16 pairs, its range that of
    int8 since codes are not values; else the target's int8 packing), and the kernel with
    its log constants (table, thresholds, shift)."""
    _x, w, b, table, thresholds = args
    *_, bias_shift, out_shift, in_log, out_log, _lo, _hi = attrs
    codes = dict(table=_constant(table, "the log table", node).tolist() if in_log else None,
                 thresholds=_constant(thresholds, "the log thresholds", node).tolist()
                 if out_log else None, shift=out_shift)
    try:  # the kernel's own check, refused here with the node named
        log_codes.check_codes(codes["table"], codes["thresholds"])
    except ValueError as err:
        raise LoweringError(f"node {node!r}: {err}") from None
    return dict(weight=_constant(w, "the weight", node), bias=_aligned_bias(b, bias_shift, node),
                shift=None, input_range=INT8 if in_log else input_range,
                layout=conv_ops.pairs_layout(target) if in_log else None, codes=codes)


@channels_last
def _conv_kernel(bb, args, attrs, target, node, input_range):
    stride, padding, dilation, groups, *_, lo, hi = attrs
    params = conv_ops.Conv2dParams(tuple(stride), tuple(padding), tuple(dilation), groups,
                                   None, lo=lo, hi=hi)
    ops = _operands(args, attrs, target, node, input_range)
    return int8_conv(bb, args[0], params=params, target=target,
                     kernel=partial(log_codes.mx_qconv2d, **ops.pop("codes")), **ops)


_conv_kernel.applies = lambda attrs: attrs[3] == 1  # groups: grouped convs stay int32-log


@channels_last
def _dense_kernel(bb, args, attrs, target, node, input_range):
    *_, lo, hi = attrs
    ops = _operands(args, attrs, target, node, input_range)
    return int8_dense(bb, args[0], params=dense_ops.DenseParams(None, lo=lo, hi=hi),
                      target=target, kernel=partial(log_codes.mx_qdense, **ops.pop("codes")),
                      **ops)


_int32_conv = _lower(emit_mx_qconv2d)
_int32_conv.applies = lambda attrs: attrs[3] != 1
LOWERINGS["tvmq.mx_qconv2d"] = {"int8-kernel": _conv_kernel, "int32-log": _int32_conv}
LOWERINGS["tvmq.mx_qlinear"] = {"int8-kernel": _dense_kernel}
# the output lies in [lo, hi] (codes or fixed point): a consumer conv knows when it is >= 0
OUTPUT_RANGES["tvmq.mx_qconv2d"] = lambda s, _: (s[-2], s[-1])
OUTPUT_RANGES["tvmq.mx_qlinear"] = lambda s, _: (s[-2], s[-1])
