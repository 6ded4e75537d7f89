"""Integer pooling on int8 NCHW or NHWC tensors: max pool (exact) and average pool (int32 sum, then the
``avg_pool_multiplier`` rule: a shift for power-of-two windows, else ``* round(2^16/n) >> 16``).
"""
from __future__ import annotations

from tvm import te, tirx

from topi_ops.requantize import round_shift, saturate


def avg_pool_multiplier(count: int) -> tuple[int, int]:
    """(multiplier, shift) that divides an int32 sum by ``count``: a pure shift when ``count``
    is a power of two, else ``round(2^16 / count)`` then a 16-bit shift (ALGORITHMS.md)."""
    if count & (count - 1) == 0:
        return 1, count.bit_length() - 1
    return round((1 << 16) / count), 16


def _spatial(data: te.Tensor, layout: str):
    """(n, c, h, w) of a 4-D tensor and ``at(b, ch, y, x)``, the index of one element in it."""
    if layout == "NHWC":
        n, h, w, c = (int(v) for v in data.shape)
        return (n, c, h, w), lambda b, ch, y, x: (b, y, x, ch)
    n, c, h, w = (int(v) for v in data.shape)
    return (n, c, h, w), lambda b, ch, y, x: (b, ch, y, x)


def _pooled(shape, layout, fn, name, tag):
    """A pool's output compute over (b, ch, y, x), stored in ``layout``."""
    n, c, oh, ow = shape
    if layout == "NHWC":
        return te.compute((n, oh, ow, c), lambda b, y, x, ch: fn(b, ch, y, x), name=name, tag=tag)
    return te.compute((n, c, oh, ow), fn, name=name, tag=tag)


def qmax_pool2d(data: te.Tensor, kernel, stride, padding, layout: str = "NCHW") -> te.Tensor:
    """data [N, C, H, W] int8 (or NHWC); padding (top, left, bottom, right) never wins."""
    (n, c, h, w), at = _spatial(data, layout)
    top, left, bottom, right = padding
    oh = (h + top + bottom - kernel[0]) // stride[0] + 1
    ow = (w + left + right - kernel[1]) // stride[1] + 1
    ry, rx = te.reduce_axis((0, kernel[0]), "ry"), te.reduce_axis((0, kernel[1]), "rx")
    low = tirx.min_value(data.dtype)

    def window_max(b, ch, y, x):
        yy, xx = y * stride[0] + ry - top, x * stride[1] + rx - left
        inside = tirx.all(yy >= 0, yy < h, xx >= 0, xx < w)
        value = data[at(b, ch, tirx.max(tirx.min(yy, h - 1), 0), tirx.max(tirx.min(xx, w - 1), 0))]
        return te.max(tirx.if_then_else(inside, value, low), axis=[ry, rx])

    return _pooled((n, c, oh, ow), layout, window_max, "tvmq_qmax_pool2d", "tvmq_pool")


def window_sum(data: te.Tensor, kernel, stride, zero_point: int = 0,
               layout: str = "NCHW") -> te.Tensor:
    """int32 sum of ``data - zero_point`` over each pooling window (no padding)."""
    (n, c, h, w), at = _spatial(data, layout)
    oh, ow = (h - kernel[0]) // stride[0] + 1, (w - kernel[1]) // stride[1] + 1
    ry, rx = te.reduce_axis((0, kernel[0]), "ry"), te.reduce_axis((0, kernel[1]), "rx")

    def element(b, ch, y, x):
        v = data[at(b, ch, y * stride[0] + ry, x * stride[1] + rx)].astype("int32")
        return v - tirx.const(zero_point, "int32") if zero_point else v

    return _pooled((n, c, oh, ow), layout,
                   lambda b, ch, y, x: te.sum(element(b, ch, y, x), axis=[ry, rx]),
                   "tvmq_avg_pool_sum", "tvmq_pool")


def qavg_pool2d(data: te.Tensor, kernel, stride, bits: int, layout: str = "NCHW") -> te.Tensor:
    """data [N, C, H, W] int8 (or NHWC), no padding; output at the input's exponent."""
    mult, shift = avg_pool_multiplier(kernel[0] * kernel[1])
    total = window_sum(data, kernel, stride, layout=layout)
    return te.compute(
        total.shape,
        lambda *i: saturate(round_shift(total(*i) * tirx.const(mult, "int32"), shift),
                            "int8", False, bits),
        name="tvmq_qavg_pool2d", tag="elemwise")
