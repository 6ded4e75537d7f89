"""int8 conv2d: int8 NCHW data x int8 OIHW weights -> int32 accumulators -> shift requantize
-> int8 NCHW.

Dense convolutions (groups == 1) run on *channel pairs*: the data is widened to int16 pairs
``[N, Hp, Wp, C/2, 2]`` (zero-padded, inside the kernel) and the weights are packed at build time
to ``[O/8, KH, KW, C/2, 8, 2]`` int16, so the innermost step is "8 output channels += 2 input
channels", which is one ``vpmaddwd`` on x86 (exact: int16 x int16 pair sums into int32) and
widening multiply-accumulates (``smlal``) on ARM NEON. Channels innermost (both operands) make
the reduction over input channels walk contiguous memory (2x faster than channel-planar on
64x56x56). The accumulator tile stays in registers
and the shift requantization is the epilogue of the same loop nest. Grouped and depthwise
convolutions use a direct NCHW loop nest.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tvm
from tvm import te, tirx

from topi_ops.requantize import requantize

OC_BLOCK = 8  # int32 lanes of one AVX2 register / two NEON registers
OC_BLOCK_AVX512 = 16  # int32 lanes of one AVX-512 register (vpdpwssd)


def oc_block(target) -> int:
    """Output channels per weight block: one accumulator vector of the target. AVX-512 VNNI
    CPUs get 16 (one ``vpdpwssd`` zmm does 16 channels x 2 input channels), others 8."""
    if target is None or target.kind.name != "llvm":
        return OC_BLOCK
    has = tvm.target.codegen.llvm_cpu_has_features
    return OC_BLOCK_AVX512 if has("avx512vnni", target) and has("avx512bw", target) else OC_BLOCK


@dataclass(frozen=True)
class Conv2dParams:
    """Scalar parameters of a tvmq integer conv2d (padding is top, left, bottom, right)."""

    strides: tuple
    padding: tuple
    dilation: tuple
    groups: int
    out_shift: int
    relu: bool
    bits: int = 8


def output_hw(hw, kernel, params: Conv2dParams) -> tuple[int, int]:
    (h, w), (kh, kw) = hw, kernel
    pt, pl, pb, pr = params.padding
    (sh, sw), (dh, dw) = params.strides, params.dilation
    return ((h + pt + pb - dh * (kh - 1) - 1) // sh + 1,
            (w + pl + pr - dw * (kw - 1) - 1) // sw + 1)


def conv_layout(target) -> tuple[int, int]:
    """(output channels per block, input channels per group) of the packed dense conv:
    (16, 4) u8 x s8 quads for AVX-512 VNNI's ``vpdpbusd``; (8, 2) int16 pairs elsewhere
    (AVX2 ``vpmaddwd``, NEON ``smlal``)."""
    block = oc_block(target)
    return (block, 4) if block == OC_BLOCK_AVX512 else (block, 2)


U8_OFFSET = 128  # u8 = int8 + 128: vpdpbusd multiplies unsigned bytes by signed bytes


def pack_conv2d(weight: np.ndarray, bias: np.ndarray, params: Conv2dParams, target=None):
    """OIHW int8 -> ``[O/B, KH, KW, C/G, B, G]`` (zero-padded; ``conv_layout``) for dense
    convs: int16 pairs (G = 2), or int8 quads (G = 4) whose data side is offset to u8, the
    offset's contribution ``128 * sum(w)`` taken out of the bias here, exactly. Grouped
    convs keep OIHW. The bias is int32 at the accumulator's exponent."""
    if params.groups != 1:
        return [weight.astype(np.int8), bias.astype(np.int32)]
    o, c, kh, kw = weight.shape
    block, group = conv_layout(target)
    if group == 4 and 255 * 128 * c * kh * kw >= 2**31:  # u8 sums could overflow int32
        block, group = OC_BLOCK_AVX512, 2
    ob, cg = -(-o // block), -(-c // group)
    w = np.zeros((ob * block, cg * group, kh, kw), np.int16 if group == 2 else np.int8)
    w[:o, :c] = weight
    w = w.reshape(ob, block, cg, group, kh, kw).transpose(0, 4, 5, 2, 1, 3)
    bias = bias.astype(np.int64)
    if group == 4:
        bias = bias - U8_OFFSET * weight.astype(np.int64).sum(axis=(1, 2, 3))
    return [np.ascontiguousarray(w), bias.astype(np.int32)]


def qconv2d(data: te.Tensor, weight: te.Tensor, bias: te.Tensor, weight_shape, params:
            Conv2dParams, target=None) -> te.Tensor:
    """data [N, C, H, W] int8, packed weight (see :func:`pack_conv2d`), bias [O] int32
    -> [N, O, OH, OW] int8."""
    if params.groups != 1:
        return _qconv2d_grouped(data, weight, bias, weight_shape, params)
    n, c, h, w = (int(v) for v in data.shape)
    o, _, kh, kw = weight_shape
    ob, cg, block, group = (int(weight.shape[i]) for i in (0, 3, 4, 5))
    pt, pl, pb, pr = params.padding
    (sh, sw), (dh, dw) = params.strides, params.dilation
    oh, ow = output_hw((h, w), (kh, kw), params)
    # int16 pairs, or u8 quads (x + 128; padding is x = 0, i.e. 128, as the bias assumes)
    dtype, zero = ("int16", 0) if group == 2 else ("uint8", U8_OFFSET)

    def pack(b, y, x, cc, j):
        ch = cc * group + j
        inside = tirx.all(ch < c, y >= pt, y < pt + h, x >= pl, x < pl + w)
        value = data[b, tirx.min(ch, c - 1), y - pt, x - pl].astype("int16")
        if group == 4:
            value = value + U8_OFFSET
        # padded channels have zero weights: any value works; keep them like padding
        return tirx.if_then_else(inside, value.astype(dtype), tirx.const(zero, dtype))

    packed = te.compute((n, h + pt + pb, w + pl + pr, cg, group), pack,
                        name="tvmq_conv_data_pack")
    rc, ry, rx, rj = (te.reduce_axis((0, cg), "rc"), te.reduce_axis((0, kh), "ry"),
                      te.reduce_axis((0, kw), "rx"), te.reduce_axis((0, group), "rj"))
    acc = te.compute(
        (n, ob, oh, ow, block),
        lambda b, o_b, y, x, oi: te.sum(
            packed[b, y * sh + ry * dh, x * sw + rx * dw, rc, rj].astype("int32")
            * weight[o_b, ry, rx, rc, oi, rj].astype("int32"), axis=[ry, rx, rc, rj]),
        name="tvmq_conv_acc", attrs={"schedule_rule": "tvmq_qconv2d_pairs"})
    blocked = te.compute(
        acc.shape,
        lambda b, o_b, y, x, oi: requantize(
            acc[b, o_b, y, x, oi] + bias[tirx.min(o_b * block + oi, o - 1)],
            params.out_shift, "int8", params.relu, params.bits),
        name="tvmq_conv_requant")
    return te.compute((n, o, oh, ow),
                      lambda b, oc, y, x: blocked[b, oc // block, y, x, oc % block],
                      name="tvmq_conv_unpack")


def _qconv2d_grouped(data, weight, bias, weight_shape, params):
    n, c, h, w = (int(v) for v in data.shape)
    o, cg, kh, kw = weight_shape
    og = o // params.groups
    pt, pl, pb, pr = params.padding
    (sh, sw), (dh, dw) = params.strides, params.dilation
    oh, ow = output_hw((h, w), (kh, kw), params)
    padded = te.compute(
        (n, c, h + pt + pb, w + pl + pr),
        lambda b, ch, y, x: tirx.if_then_else(
            tirx.all(y >= pt, y < pt + h, x >= pl, x < pl + w),
            data[b, ch, y - pt, x - pl], tirx.const(0, "int8")),
        name="tvmq_conv_pad")
    rc, ry, rx = te.reduce_axis((0, cg), "rc"), te.reduce_axis((0, kh), "ry"), te.reduce_axis((0, kw), "rx")
    acc = te.compute(
        (n, o, oh, ow),
        lambda b, oc, y, x: te.sum(
            padded[b, (oc // og) * cg + rc, y * sh + ry * dh, x * sw + rx * dw].astype("int32")
            * weight[oc, rc, ry, rx].astype("int32"), axis=[rc, ry, rx]),
        name="tvmq_conv_grouped_acc")
    return te.compute(acc.shape, lambda b, oc, y, x: requantize(
        acc[b, oc, y, x] + bias[oc], params.out_shift, "int8", params.relu, params.bits),
        name="tvmq_conv_grouped_requant")
