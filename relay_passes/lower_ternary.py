"""Lowerings of ``tvmq.ternary_conv2d`` (combined-ternary weights, seed 000).

- ``int8-fold``: ``Σ_i terms[i] << term_shift[i]`` folded at build time into int8 weights
  (|w| ≤ 96 by construction) and run on the int8 conv kernel with a shift per channel.
- ``bitserial``: activations as bit planes, each term as a (+1, -1) mask pair, AND +
  popcount (``topi_ops.bitserial``), for inputs known to be unsigned with few bits.

Pattern in: ``tvmq_ternary_conv2d_N(x, terms, term_shift, bias, shift)`` (composite, scalar
attributes ``stride, padding, dilation, groups, lo, hi, in_bits``). Result out: ``call_tir``
of the chosen kernel.
"""
from __future__ import annotations

from functools import partial

import numpy as np
from tvm import relax

from relay_passes.lower_composites import (LOWERINGS, OUTPUT_RANGES, _constant, channels_last,
                                           int8_conv)
from topi_ops import bitserial
from topi_ops import conv2d as conv_ops


def fold_terms(terms: np.ndarray, term_shift: np.ndarray) -> np.ndarray:
    """``Σ_i terms[i] << term_shift[i]`` per filter as int8 (exact: |w| ≤ K·2^5)."""
    view = (terms.shape[0], -1) + (1,) * (terms.ndim - 2)
    folded = (terms.astype(np.int32) << term_shift.reshape(view)).sum(0)
    assert np.abs(folded).max(initial=0) <= 127, "ternary fold exceeds int8"
    return folded.astype(np.int8)


@channels_last
def _lower_int8_fold(bb, args, attrs, target, node, input_range):
    stride, padding, dilation, groups, lo, hi, in_bits = attrs
    if 1 <= in_bits <= 7:  # the op's input is unsigned in_bits (the bit-serial premise)
        input_range = (max(input_range[0], 0), min(input_range[1], (1 << in_bits) - 1))
    x, terms, term_shift, bias, shift = args
    weight = fold_terms(_constant(terms, "the terms", node),
                        _constant(term_shift, "the term shifts", node))
    params = conv_ops.Conv2dParams(tuple(stride), tuple(padding), tuple(dilation), groups,
                                   None, lo=lo, hi=hi)
    return int8_conv(bb, x, weight, _constant(bias, "the bias", node),
                     _constant(shift, "the shifts", node), params, target, input_range)


def _lower_bitserial(bb, args, attrs, target, node):
    stride, padding, dilation, groups, lo, hi, in_bits = attrs
    x, terms, term_shift, bias, shift = args
    terms = _constant(terms, "the terms", node)
    params = bitserial.BitserialParams(tuple(stride), tuple(padding), tuple(dilation), groups,
                                       in_bits, lo, hi)
    packed = bitserial.pack_ternary(terms, _constant(term_shift, "the term shifts", node),
                                    _constant(bias, "the bias", node),
                                    _constant(shift, "the shifts", node), params, target)
    kernel = partial(bitserial.qconv2d_bitserial, weight_shape=terms.shape[1:], params=params,
                     target=target)
    return bb.call_te(kernel, x, *[relax.const(p) for p in packed],
                      primfunc_name_hint="tvmq_bitserial_conv2d")


# bit planes only pay for inputs known to be unsigned with few bits (in_bits, last attribute)
_lower_bitserial.applies = lambda attrs: 1 <= attrs[-1] <= 7

LOWERINGS["tvmq.ternary_conv2d"] = {"int8-fold": _lower_int8_fold,
                                    "bitserial": _lower_bitserial}
OUTPUT_RANGES["tvmq.ternary_conv2d"] = lambda s, _: (s[-3], s[-2])  # ..., lo, hi, in_bits
