"""Lowerings of the affine int8 composites that standard PT2E models import as
(``tvmq.pt2e``, reference ``tvmq.ops_affine``).

Pattern in: ``tvmq_qconv2d_affine_N(x, w, b, mult, shift)`` (composite ``tvmq.qconv2d_affine``,
scalars ``stride, padding, dilation, groups, x_zp, out_zp, lo, hi``). Result out: ``call_tir``
of ``topi_ops.fixed_point.qconv2d_affine`` with the weights packed for the target
(``topi_ops.conv2d.pack_conv2d``) and the activation zero point folded into the bias here,
exactly: ``Σ (x - zx) w + b = Σ x w + (b - zx Σ w)`` (the kernel pads with ``zx``).
"""
from __future__ import annotations

from functools import partial

import numpy as np
from tvm import relax

from relay_passes.lower_composites import LOWERINGS, LoweringError, _constant, _lower_simple
from topi_ops import conv2d as conv_ops
from topi_ops import fixed_point as fp

INT32_MAX = (1 << 31) - 1


def fold_zero_point(weight: np.ndarray, bias: np.ndarray, x_zp: int, node: str) -> np.ndarray:
    """``b - x_zp * Σw`` per output channel (int32, checked), and the accumulator bound."""
    wsum = weight.astype(np.int64).reshape(weight.shape[0], -1)
    folded = bias.astype(np.int64) - x_zp * wsum.sum(1)
    worst = 128 * np.abs(wsum).sum(1) + np.abs(folded) + 1
    if worst.max(initial=0) > INT32_MAX:
        channel = int(worst.argmax())
        raise LoweringError(f"node {node!r}: output channel {channel} can reach |{int(worst.max())}|"
                            " in its int32 accumulator (> 2^31 - 1)")
    return folded.astype(np.int32), worst


def _conv(bb, x, weight, bias, mult, shift, params, node, target, dense=False):
    folded, worst = fold_zero_point(weight, bias, params.x_zp, node)
    int32_shift = bool((mult == 1).all()) and bool(
        (worst + (1 << (shift.astype(np.int64) - 1).clip(0)) <= INT32_MAX).all())
    params = fp.AffineConvParams(**{**params.__dict__, "int32_shift": int32_shift})
    w4 = weight[:, :, None, None] if dense else weight
    cparams = conv_ops.Conv2dParams(params.strides, params.padding, params.dilation,
                                    params.groups, None)
    packed = conv_ops.pack_conv2d(w4, folded, cparams, target)
    consts = [relax.const(p) for p in packed] + [relax.const(mult.astype(np.int32)),
                                                 relax.const(shift.astype(np.int32))]
    if dense:
        kernel = partial(fp.qdense_affine, weight_shape=weight.shape, params=params,
                         target=target)
        return bb.call_te(kernel, x, *consts, primfunc_name_hint="tvmq_qdense")
    kernel = partial(fp.qconv2d_affine, weight_shape=weight.shape, params=params, target=target)
    return bb.call_te(kernel, x, *consts, primfunc_name_hint="tvmq_qconv2d")


def _lower_qconv2d_affine(bb, args, attrs, target, node):
    stride, padding, dilation, groups, x_zp, out_zp, lo, hi = attrs
    x, w, b, mult, shift = args
    params = fp.AffineConvParams(tuple(stride), tuple(padding), tuple(dilation), groups, x_zp,
                                 out_zp, lo, hi)
    return _conv(bb, x, _constant(w, "the weight", node), _constant(b, "the bias", node),
                 _constant(mult, "the multipliers", node), _constant(shift, "the shifts", node),
                 params, node, target)


def _lower_qlinear_affine(bb, args, attrs, target, node):
    x_zp, out_zp, lo, hi = attrs
    x, w, b, mult, shift = args
    params = fp.AffineConvParams((1, 1), (0, 0, 0, 0), (1, 1), 1, x_zp, out_zp, lo, hi)
    return _conv(bb, x, _constant(w, "the weight", node), _constant(b, "the bias", node),
                 _constant(mult, "the multipliers", node), _constant(shift, "the shifts", node),
                 params, node, target, dense=True)


LOWERINGS.update({
    "tvmq.qconv2d_affine": _lower_qconv2d_affine,
    "tvmq.qlinear_affine": _lower_qlinear_affine,
    "tvmq.quantize_affine": _lower_simple(fp.quantize_affine, "tvmq_quantize_affine"),
    "tvmq.dequantize_affine": _lower_simple(fp.dequantize_affine, "tvmq_dequantize_affine"),
    "tvmq.qadd_affine": _lower_simple(fp.qadd_affine, "tvmq_qadd_affine"),
    "tvmq.requantize_affine": _lower_simple(fp.requantize_affine, "tvmq_requantize_affine"),
    "tvmq.qavg_pool2d_affine": _lower_simple(fp.qavg_pool2d_affine, "tvmq_qavg_pool2d_affine"),
})
