"""Integer Winograd F(2x2, 3x3) for 3x3 stride-1 convs on AVX2 without VNNI.

There an int8 multiply-add costs what an int16 one does: ``vpmaddubsw`` + ``vpmaddwd`` by ones
is two multiplier ops per 32 products, ``vpmaddwd`` one per 16. F(2, 3) takes 16 products
per 2x2 outputs and input channel instead of 36, in int16: 2.25x fewer multiplier ops.

Exact, in integers: the kernel transform is scaled by 2 per dimension (``G2 = 2 G``), so all
three transforms have integer entries and ``A^T [(G2 g G2^T) * (B^T d B)] A = 4 * conv(d, g)``
exactly; the kernel divides by 4 with a shift (exact: the sum is a multiple of 4). The
transformed input ``V`` lies within 4 * max|d| (<= 512, int16), the transformed weights ``U``
within 9 * 128 (int16); ``vpmaddwd`` pairs stay within int32. Whether every int32 sum of the
output transform stays within int32 depends on the weights: :func:`fits_int32` bounds it
at build time from the actual weights, and a conv that could overflow keeps the direct
kernel (``relay_passes.lower_composites.int8_conv``).

Layout: ``V`` is the int16-pair data pack ``[N*16, TY, TX, C/2, 2]`` (one row of tiles per
Winograd position), ``U`` the conv's packed weight with the 16 positions as kernel rows
(``[O/8, 16, 1, C/2, 8, 2]``, ``pack_conv2d`` with ``pairs_layout``), so the batched
product is the conv kernel's own accumulator block (its schedule and ``vpmaddwd``
intrinsic); the output transform, bias and requantization are its epilogue.
"""
from __future__ import annotations

import numpy as np
import tvm
from tvm import te, tirx

from topi_ops.conv2d import PAIRS, Conv2dParams, _requantize, conv_layout, output_hw

BT = np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]])  # input
G2 = np.array([[2, 0, 0], [1, 1, 1], [1, -1, 1], [0, 0, 2]])  # kernel, scaled by 2
AT = np.array([[1, 1, 1, 0], [0, 1, -1, -1]])  # output
SCALE_SHIFT = 2  # the result is 4 x the conv: (2 x 2) from G2
POSITIONS = 16  # 4 x 4 transformed values per tile
WINOGRAD = "tvmq_winograd"  # on the accumulator block: the schedule's cue
# The transformed weights are 16 int16 per 9 int8 taps (3.6x the conv's), and each row of
# tiles streams all of them: beyond one core's L2 (512 KB on Zen 3) they come from L3 or
# memory for every row, and the saved multiplies are lost. ResNet-18 on an AVX2 Zen 3,
# in-model interleaved A/B against the direct kernel: Winograd on every 3x3 layer 1.09x
# (its 512-channel layers stream 8 MB each), up to 2 MB 0.98x, up to 512 KB 0.96x.
WEIGHT_BYTES = 512 << 10


def applies(target, weight_shape, params: Conv2dParams, pad: int = 0) -> bool:
    """A dense 3x3 stride-1 conv on an x86 target with AVX2 but no VNNI (its int8 kernel:
    int16 pairs or u8 quads, the same multiplier ops per product), padding standing for 0,
    whose transformed weights fit ``WEIGHT_BYTES``."""
    if target is None or target.kind.name != "llvm":
        return False
    o, c, kh, kw = weight_shape
    return (tvm.target.codegen.llvm_cpu_has_features("avx2", target)
            and conv_layout(target) == PAIRS  # no VNNI, no AMX
            and (kh, kw) == (3, 3) and params.groups == 1 and tuple(params.strides) == (1, 1)
            and tuple(params.dilation) == (1, 1) and pad == 0 and c >= 8
            and POSITIONS * 2 * o * c <= WEIGHT_BYTES)


def transform_weights(weight: np.ndarray) -> np.ndarray:
    """OIHW int8 ``[O, C, 3, 3]`` -> ``U = G2 g G2^T`` as ``[O, C, 16, 1]`` int16 (position
    ``4 * e + n`` of the 4 x 4 transform in the kernel-row axis, for ``pack_conv2d``)."""
    u = np.einsum("ek,ockl,nl->ocen", G2, weight.astype(np.int64), G2)
    return u.reshape(*weight.shape[:2], POSITIONS, 1).astype(np.int16)


def fits_int32(weight: np.ndarray, input_range: tuple[int, int]) -> bool:
    """Whether every int32 value the kernel forms stays within int32 for any input in
    ``input_range``: the products' sums per position (``|V| <= 4 max|d|``), and the output
    transform's partial and final sums (from the weights actually given)."""
    vmax = 4 * max(abs(input_range[0]), abs(input_range[1]))
    u = transform_weights(weight).astype(np.int64).reshape(*weight.shape[:2], 4, 4)
    m = vmax * np.abs(u).sum(axis=1)  # [O, 4, 4]: |M| per position
    cols = np.einsum("oen,jn->oej", m, np.abs(AT))  # M A, summed first as the kernel does
    out = np.einsum("ie,oej->oij", np.abs(AT), cols)  # A^T (M A)
    return max(m.max(initial=0), cols.max(initial=0), out.max(initial=0)) < 2**31


def _select(index, values):
    """``values[index]`` for a loop variable ``index`` (folded to one value once the loop is
    unrolled, as the schedule does)."""
    expr = values[-1]
    for i in range(len(values) - 2, -1, -1):
        expr = tirx.Select(index == i, values[i], expr)
    return expr


def _combine(coefficients, terms):
    """``sum(c * t)`` over the non-zero coefficients (all are +-1): adds and subtracts."""
    expr = None
    for c, t in zip(coefficients, terms):
        if c == 0:
            continue
        expr = (t if c > 0 else -t) if expr is None else (expr + t if c > 0 else expr - t)
    return expr


def qconv2d_winograd(data: te.Tensor, weight: te.Tensor, bias: te.Tensor,
                     shift: te.Tensor | None = None, *, weight_shape, params: Conv2dParams,
                     target=None, epilogue=None) -> te.Tensor:
    """NHWC int8 ``[N, H, W, C]``, ``U`` packed (``pack_conv2d(transform_weights(w), ...,
    layout=PAIRS)``), bias [O] int32 (shift [O]) -> NHWC int8 ``[N, OH, OW, O]``, equal to
    ``topi_ops.conv2d.qconv2d`` of the same conv."""
    if epilogue is None:
        def epilogue(value, channel):
            return _requantize(value, channel, params, shift)
    n, h, w, c = (int(v) for v in data.shape)
    o = weight_shape[0]
    ob, cg, block, group = (int(weight.shape[i]) for i in (0, 3, 4, 5))
    pt, pl, _pb, _pr = params.padding
    oh, ow = output_hw((h, w), (3, 3), params)
    ty, tx = -(-oh // 2), -(-ow // 2)

    def element(b, y, x, ch):  # the padded input (0 outside, and past the last tile)
        inside = tirx.all(ch < c, y >= 0, y < h, x >= 0, x < w)
        value = data[b, tirx.min(tirx.max(y, 0), h - 1), tirx.min(tirx.max(x, 0), w - 1),
                     tirx.min(ch, c - 1)].astype("int16")
        return tirx.if_then_else(inside, value, tirx.const(0, "int16"))

    def transform_input(bp, t_y, t_x, cc, j):
        b, pos = bp // POSITIONS, bp % POSITIONS
        y0, x0, ch = t_y * 2 - pt, t_x * 2 - pl, cc * group + j
        d = [[element(b, y0 + r, x0 + s, ch) for s in range(4)] for r in range(4)]
        rows = [[_combine(BT[e], [d[r][s] for r in range(4)]) for s in range(4)]
                for e in range(4)]  # B^T d
        values = [_combine(BT[nu], rows[e]) for e in range(4) for nu in range(4)]  # (B^T d) B
        return _select(pos, values)

    packed = te.compute((n * POSITIONS, ty, tx, cg, group), transform_input,
                        name="tvmq_conv_data_pack", attrs={WINOGRAD: True})
    rc, rj = te.reduce_axis((0, cg), "rc"), te.reduce_axis((0, group), "rj")
    ry, rx = te.reduce_axis((0, 1), "ry"), te.reduce_axis((0, 1), "rx")
    acc = te.compute(
        (n * POSITIONS, ty, tx, ob * block),
        lambda bp, y, x, oc: te.sum(
            packed[bp + ry, y, x + rx, rc, rj].astype("int32")
            * weight[oc // block, bp % POSITIONS + ry, rx, rc, oc % block, rj].astype("int32"),
            axis=[ry, rx, rc, rj]),
        name="tvmq_conv_acc", attrs={"schedule_rule": "tvmq_qconv2d_pairs",
                                     "tvmq_block": block, WINOGRAD: True})

    def transform_output(b, y, x, oc):
        i, j, t_y, t_x = y % 2, x % 2, y // 2, x // 2
        m = [[acc[b * POSITIONS + 4 * e + nu, t_y, t_x, oc] for nu in range(4)]
             for e in range(4)]
        cols = [_select(j, [_combine(AT[jj], m[e]) for jj in range(2)]) for e in range(4)]
        value = _select(i, [_combine(AT[ii], cols) for ii in range(2)])  # A^T M A = 4 conv
        channel = tirx.min(oc, o - 1)
        return epilogue((value >> SCALE_SHIFT) + bias[channel], channel)

    return te.compute((n, oh, ow, o), transform_output, name="tvmq_conv_requant",
                      attrs={WINOGRAD: True})
