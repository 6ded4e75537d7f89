"""Integer pooling on NCHW int8: max pool (exact) and average pool (int32 sum, then the
``avg_pool_multiplier`` rule: a shift for power-of-two windows, else ``* round(2^16/n) >> 16``).
"""
from __future__ import annotations

from tvm import te, tirx, topi

from topi_ops.requantize import round_shift, saturate


def avg_pool_multiplier(count: int) -> tuple[int, int]:
    """(multiplier, shift) that divides an int32 sum by ``count``: a pure shift when ``count``
    is a power of two, else ``round(2^16 / count)`` then a 16-bit shift (ALGORITHMS.md)."""
    if count & (count - 1) == 0:
        return 1, count.bit_length() - 1
    return round((1 << 16) / count), 16


def qmax_pool2d(data: te.Tensor, kernel, stride, padding) -> te.Tensor:
    """data [N, C, H, W] int8; padding (top, left, bottom, right) never wins the max."""
    n, c, h, w = (int(v) for v in data.shape)
    top, left, bottom, right = padding
    oh = (h + top + bottom - kernel[0]) // stride[0] + 1
    ow = (w + left + right - kernel[1]) // stride[1] + 1
    padded = topi.nn.pad(data, (0, 0, top, left), (0, 0, bottom, right),
                         pad_value=tirx.min_value(data.dtype), name="tvmq_pool_pad")
    ry, rx = te.reduce_axis((0, kernel[0]), "ry"), te.reduce_axis((0, kernel[1]), "rx")
    return te.compute(
        (n, c, oh, ow),
        lambda b, ch, y, x: te.max(padded[b, ch, y * stride[0] + ry, x * stride[1] + rx],
                                   axis=[ry, rx]),
        name="tvmq_qmax_pool2d", tag="tvmq_pool")


def window_sum(data: te.Tensor, kernel, stride, zero_point: int = 0) -> te.Tensor:
    """int32 sum of ``data - zero_point`` over each pooling window (no padding)."""
    n, c, h, w = (int(v) for v in data.shape)
    oh, ow = (h - kernel[0]) // stride[0] + 1, (w - kernel[1]) // stride[1] + 1
    ry, rx = te.reduce_axis((0, kernel[0]), "ry"), te.reduce_axis((0, kernel[1]), "rx")

    def element(b, ch, y, x):
        v = data[b, ch, y * stride[0] + ry, x * stride[1] + rx].astype("int32")
        return v - tirx.const(zero_point, "int32") if zero_point else v

    return te.compute((n, c, oh, ow), lambda b, ch, y, x: te.sum(element(b, ch, y, x), axis=[ry, rx]),
                      name="tvmq_avg_pool_sum", tag="tvmq_pool")


def qavg_pool2d(data: te.Tensor, kernel, stride, bits: int) -> te.Tensor:
    """data [N, C, H, W] int8, no padding; output at the input's exponent."""
    mult, shift = avg_pool_multiplier(kernel[0] * kernel[1])
    total = window_sum(data, kernel, stride)
    return te.compute(
        total.shape,
        lambda *i: saturate(round_shift(total(*i) * tirx.const(mult, "int32"), shift),
                            "int8", False, bits),
        name="tvmq_qavg_pool2d", tag="elemwise")
