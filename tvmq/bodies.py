"""The integer reference of every deploy op written in plain Relax ops: the body of each
``tvmq.<op>`` composite function (``tvmq.frontend``). A module of such composites compiles and
runs as it is, a slow but exact fallback, until ``relay_passes`` swaps each for its kernel.

``register_body("op")`` adds one; a scheme's own op registers its body from its module.
"""
from __future__ import annotations

from typing import Callable

import torch
from tvm import relax

from topi_ops.pool import avg_pool_multiplier
from tvmq.quantizers import qrange

R = relax.op
BODIES: dict[str, Callable] = {}


def register_body(op: str):
    """Decorator: ``fn(bb, *tensors, *scalars)`` is the Relax body of ``tvmq::<op>``."""
    def wrap(fn):
        BODIES[op] = fn
        return fn
    return wrap


def _const(value, dtype):
    return relax.const(value, dtype)


def _round_shift(bb, x, shift):
    if shift > 0:
        x = bb.emit(R.add(x, _const(1 << (shift - 1), "int32")))
        return bb.emit(R.right_shift(x, _const(shift, "int32")))
    if shift < 0:
        return bb.emit(R.left_shift(x, _const(-shift, "int32")))
    return x


def _saturate(bb, x, bits, relu=False):
    lo, hi = qrange(bits)
    x = bb.emit(R.clip(x, 0 if relu else lo, hi))
    return bb.emit(R.astype(x, "int8"))


def _body_quantize(bb, x, exponent, bits):
    scaled = bb.emit(R.multiply(x, _const(2.0 ** -exponent, "float32")))
    rounded = bb.emit(R.floor(R.add(scaled, _const(0.5, "float32"))))
    rounded = bb.emit(R.where(R.isnan(x), _const(0.0, "float32"), rounded))  # NaN -> 0
    lo, hi = qrange(bits)
    return bb.emit(R.astype(R.clip(rounded, lo, hi), "int8"))


def _body_dequantize(bb, x, exponent):
    return bb.emit(R.multiply(R.astype(x, "float32"), _const(2.0 ** exponent, "float32")))


def _add_bias(bb, acc, bias, bias_shift, shape):
    b = bb.emit(R.left_shift(bias, _const(bias_shift, "int32")))
    return bb.emit(R.add(acc, R.reshape(b, shape)))


def _body_qconv2d(bb, x, w, b, stride, padding, dilation, groups, bias_shift, out_shift, relu,
                  bits):
    acc = bb.emit(R.nn.conv2d(x, w, strides=stride, padding=padding, dilation=dilation,
                              groups=groups, out_dtype="int32"))
    acc = _add_bias(bb, acc, b, bias_shift, (1, -1, 1, 1))
    return _saturate(bb, _round_shift(bb, acc, out_shift), bits, relu)


def _body_qlinear(bb, x, w, b, bias_shift, out_shift, relu, bits):
    acc = bb.emit(R.matmul(x, R.permute_dims(w), out_dtype="int32"))
    acc = _add_bias(bb, acc, b, bias_shift, (1, -1))
    return _saturate(bb, _round_shift(bb, acc, out_shift), bits, relu)


def _body_qadd(bb, a, b, a_shift, b_shift, relu, bits):
    a = _round_shift(bb, bb.emit(R.astype(a, "int32")), a_shift)
    b = _round_shift(bb, bb.emit(R.astype(b, "int32")), b_shift)
    return _saturate(bb, bb.emit(R.add(a, b)), bits, relu)


def _body_qrelu(bb, x):
    return bb.emit(R.maximum(x, _const(0, "int8")))


def _body_qmax_pool2d(bb, x, kernel, stride, padding):
    return bb.emit(R.nn.max_pool2d(x, kernel, stride, padding))


def _body_qavg_pool2d(bb, x, kernel, stride, bits):
    # window sum as a depthwise conv with an all-ones kernel: exact, integer only
    channels = int(x.ty.shape[1])
    ones = relax.const(torch.ones((channels, 1, *kernel), dtype=torch.int8).numpy())
    total = bb.emit(R.nn.conv2d(x, ones, strides=stride, groups=channels, out_dtype="int32"))
    mult, shift = avg_pool_multiplier(kernel[0] * kernel[1])
    total = bb.emit(R.multiply(total, _const(mult, "int32")))
    return _saturate(bb, _round_shift(bb, total, shift), bits)


def _round_shift_per_channel(bb, x, shift, view):
    s = bb.emit(R.reshape(shift, view))
    zero = _const(0, "int32")
    right = bb.emit(R.maximum(s, zero))
    half = bb.emit(R.right_shift(R.left_shift(_const(1, "int32"), right), _const(1, "int32")))
    down = bb.emit(R.right_shift(R.add(x, half), right))
    up = bb.emit(R.left_shift(x, R.maximum(R.negative(s), zero)))
    return bb.emit(R.where(R.greater_equal(s, zero), down, up))


def _clamp(bb, x, lo, hi):
    return bb.emit(R.astype(R.clip(x, lo, hi), "int8"))


def body_qconv2d_pc(bb, x, w, b, shift, stride, padding, dilation, groups, lo, hi):
    acc = bb.emit(R.nn.conv2d(x, w, strides=stride, padding=padding, dilation=dilation,
                              groups=groups, out_dtype="int32"))
    acc = bb.emit(R.add(acc, R.reshape(b, (1, -1, 1, 1))))
    return _clamp(bb, _round_shift_per_channel(bb, acc, shift, (1, -1, 1, 1)), lo, hi)


def _body_qlinear_pc(bb, x, w, b, shift, lo, hi):
    acc = bb.emit(R.matmul(x, R.permute_dims(w), out_dtype="int32"))
    acc = bb.emit(R.add(acc, R.reshape(b, (1, -1))))
    return _clamp(bb, _round_shift_per_channel(bb, acc, shift, (1, -1)), lo, hi)


# op name -> Relax body builder; its positional parameters after ``bb`` are the op's schema
BODIES.update({
    "quantize": _body_quantize, "dequantize": _body_dequantize, "qconv2d": _body_qconv2d,
    "qlinear": _body_qlinear, "qadd": _body_qadd, "qrelu": _body_qrelu,
    "qmax_pool2d": _body_qmax_pool2d, "qavg_pool2d": _body_qavg_pool2d,
    "qconv2d_pc": body_qconv2d_pc, "qlinear_pc": _body_qlinear_pc,
})
