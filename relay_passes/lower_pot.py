"""Lowerings of ``tvmq.pot_conv2d`` (power-of-two weights, APTQ/APQ, seed 001).

- ``int8-fold``: the sign + exponent codes decoded at build time into int8 weights
  ``±2^k`` (k in 0..6) and run on the int8 conv kernel with a shift per channel
  (``lower_composites.int8_conv``): the powers of two are just int8 numbers to it.
- ``shift-add``: ``topi_ops.shiftadd``: the codes packed at build time as a shift amount, a
  sign mask and a zero mask per weight; each product is ``((x << k) ^ sign) & nonzero``,
  accumulated in int32 (the ``−1`` that ``^`` leaves per negative weight is added back through
  the bias), requantized by the per-channel shift in the same loop nest (``schedules.shiftadd``).

Pattern in: ``tvmq_pot_conv2d_N(x, codes, bias, shift)`` (composite; scalars ``stride,
padding, dilation, groups, lo, hi``). Result out: ``call_tir`` of the chosen kernel.
"""
from __future__ import annotations

from functools import partial

import numpy as np
from tvm import relax

from relay_passes.lower_composites import (LOWERINGS, OP_PATTERN_OPAQUE, OUTPUT_RANGES,
                                           LoweringError, _constant, channels_last, int8_conv)
from topi_ops import conv2d as conv_ops
from topi_ops import shiftadd

POWERS = 7  # codes in [-7, 7]: 0 = zero weight, ±(k + 1) = ±2^k


def decode_codes(codes: np.ndarray, node: str = "?") -> np.ndarray:
    """Sign + exponent codes -> int8 weights ``sign·2^(|c| − 1)`` (exact)."""
    codes = codes.astype(np.int32)
    if codes.size and np.abs(codes).max() > POWERS:
        raise LoweringError(f"node {node!r}: power-of-two codes must lie in [-{POWERS}, {POWERS}]"
                            f" (weights ±2^0..±2^6), got {int(np.abs(codes).max())}")
    mag = np.where(codes != 0, 1 << np.maximum(np.abs(codes) - 1, 0), 0)
    return (np.sign(codes) * mag).astype(np.int8)


def _params(attrs):
    stride, padding, dilation, groups, lo, hi = attrs
    return conv_ops.Conv2dParams(tuple(stride), tuple(padding), tuple(dilation), groups,
                                 None, lo=lo, hi=hi)


@channels_last
def _lower_int8_fold(bb, args, attrs, target, node, input_range):
    x, codes, bias, shift = args
    weight = decode_codes(_constant(codes, "the power-of-two codes", node), node)
    return int8_conv(bb, x, weight, _constant(bias, "the bias", node),
                     _constant(shift, "the shifts", node), _params(attrs), target, input_range)


LOWERINGS["tvmq.pot_conv2d"] = {"int8-fold": _lower_int8_fold}
OUTPUT_RANGES["tvmq.pot_conv2d"] = lambda s, _: (s[-2], s[-1])  # ..., lo, hi


def _lower_shift_add(bb, args, attrs, target, node):
    x, codes, bias, shift = args
    codes_np = _constant(codes, "the power-of-two codes", node)
    decode_codes(codes_np, node)  # range check, named
    stride, padding, dilation, groups, lo, hi = attrs
    block, wide = shiftadd.shiftadd_layout(target)
    params = shiftadd.ShiftAddParams(tuple(stride), tuple(padding), tuple(dilation), groups,
                                     lo, hi, block, wide)
    try:
        packed = shiftadd.pack_shiftadd(codes_np, _constant(bias, "the bias", node), params)
    except ValueError as err:
        raise LoweringError(f"node {node!r}: {err}") from None
    consts = [relax.const(p) for p in packed]
    consts.append(relax.const(_constant(shift, "the shifts", node).astype(np.int32)))
    kernel = partial(shiftadd.shiftadd_conv2d, weight_shape=codes_np.shape, params=params)
    call = bb.call_te(kernel, x, *consts, primfunc_name_hint="tvmq_shiftadd")
    # keep the kernel whole through FuseOps: its schedule sees exactly its own blocks
    gv = call.args[0]
    bb.update_func(gv, bb.get()[gv].with_attr("op_pattern", OP_PATTERN_OPAQUE))
    return call


LOWERINGS["tvmq.pot_conv2d"]["shift-add"] = _lower_shift_add
