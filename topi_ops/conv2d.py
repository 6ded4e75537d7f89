"""int8 conv2d: int8 activations x int8 OIHW weights -> int32 accumulators -> shift
requantize -> int8, NCHW or NHWC (the layout the lowered graph keeps between layers).

Dense convolutions (groups == 1) run on small groups of input channels, innermost in both
operands: the data is packed inside the kernel to ``[N, Hp, Wp, C/G, G]`` (padded; from NHWC
a contiguous copy) and the weights at build time to ``[O/B, KH, KW, C/G, B, G]``, so the
innermost step is "B output channels += G input channels", one instruction sequence of the
target (``conv_layout``):

- AVX-512 VNNI: u8 x s8 quads (G = 4, B = 16), ``vpdpbusd``; a signed input is offset by
  +128 and ``128 * sum(w)`` taken out of the bias at build time, an input known to be >= 0
  (``Conv2dParams.nonneg``: after a ReLU its int8 bytes are valid u8) needs no offset;
- AMX-INT8 (Sapphire Rapids and later): the same u8 quads and packing as AVX-512 VNNI, but
  a conv row is a matrix product on tile registers (``tdpbusd``: a 16 x 16 int32 tile +=
  16 pixels x 64 u8 input channels times 64 x 16 s8 weights, each int32 the sum of u8 x s8
  products, exactly like ``vpdpbusd``; ``schedules.amx``). The packed weights
  ``[O/16, KH, KW, C/4, 16, 4]`` are B tiles as they lie (16 quads x 64 bytes), a data row
  ``[Wp, C/4, 4]`` gives A tiles (16 pixels x 64 bytes, stride ``sw * C``). Used where it
  fits (``amx_fits``: C rounded up to quads a multiple of 64, rows >= 4 pixels); the accumulator
  row is then padded to whole tiles of 16 pixels, the pad columns computed and never read;
  other convs on such a CPU take the VNNI kernel;
- AVX-VNNI without AVX-512 (Alder Lake and later): the same u8 quads on 8 lanes (``vpdpbusd``
  ymm);
- AVX2: u8 x s8 quads (G = 4, B = 8), ``vpmaddubsw`` + ``vpmaddwd`` by ones, for inputs known
  to be >= 0 (u8 <= 127 keeps the saturating int16 pair sums exact); int16 pairs (G = 2,
  B = 8), ``vpmaddwd``, where the input can be negative;
- Cortex-A72 (Pi 4): s8 quads, 8-bit ``smull`` + ``smlal`` + ``sadalp`` wherever two products
  always fit an int16 lane: inputs known to be >= 0 (2 x 127 x 128), or weights none of which
  is -128 (2 x 128 x 127: a signed input, e.g. an RGB stem; the packer sees the weights); NEON
  int16 pairs (``smlal``) otherwise;
- Cortex-A76 (Pi 5): s8 quads (G = 4, B = 8), two ``sdot`` per block.

A conv whose input channels do not fill whole groups (an RGB stem) folds its horizontal taps
into the channels where that takes fewer steps (``folds_taps``): the ``KW x C`` inputs of a
pixel lie consecutively in an NHWC row, so the data is each padded row flat and the weights
``[O/B, KH, 1, KW*C/G, B, G]`` (ResNet-18's 7x7 stem: 42 quad steps instead of 49, 17 %
faster). All are exact integer arithmetic. The accumulator ``[N, OH, OW, O']`` keeps its tile in
registers, and the shift requantization is the epilogue of the same loop nest, stored
straight into an NHWC output. A 1x1 conv without padding packs
only the pixels it reads (every s-th for stride s). Grouped and depthwise convolutions use a
direct NHWC loop nest whose output channels are the vector lanes (``schedules.grouped``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import tvm
from tvm import te, tirx

from topi_ops.requantize import clamp, requantize, round_shift


class ConvLayout(NamedTuple):
    """How a dense conv is packed: ``block`` output channels (one accumulator vector) by
    ``group`` input channels (one multiply-add step), the dtype the data is packed to, and
    the instruction sequence (layouts that pack alike differ by it)."""

    block: int
    group: int
    data: str
    instruction: str


PAIRS = ConvLayout(8, 2, "int16", "vpmaddwd/smlal")  # AVX2, NEON: int16 pairs, 8 int32 lanes
VNNI_PAIRS = ConvLayout(16, 2, "int16", "vpdpwssd")  # AVX-512 VNNI
VNNI_QUADS = ConvLayout(16, 4, "uint8", "vpdpbusd")  # AVX-512 VNNI: u8 (x + 128) x s8
AMX_QUADS = ConvLayout(16, 4, "uint8", "tdpbusd")  # AMX-INT8: VNNI_QUADS' packing, tiles
AVXVNNI_QUADS = ConvLayout(8, 4, "uint8", "vpdpbusd-ymm")  # AVX-VNNI (no AVX-512): the same, 8 lanes
SDOT_QUADS = ConvLayout(8, 4, "int8", "sdot")  # ARMv8.2 dotprod: s8 x s8, two sdot per block
AVX2_QUADS = ConvLayout(8, 4, "uint8", "vpmaddubsw")  # AVX2 vpmaddubsw + vpmaddwd: u8 (x >= 0) x s8
# Cortex-A72 (no dotprod), input known >= 0 or no weight -128: 8-bit smull + smlal (two
# products per int16 lane, within 2 * 128 * 127) + sadalp; the same packing as SDOT_QUADS
NEON_QUADS = ConvLayout(8, 4, "int8", "smull-sadalp")


def conv_layout(target, nonneg: bool = False, weight_min: int = -128) -> ConvLayout:
    """The packing the target's integer dot-product instruction wants; ``nonneg``: the input
    is known to lie in [0, 127] (then AVX2 without VNNI takes u8 quads, ``vpmaddubsw``, exact
    only on such inputs); ``weight_min``: the conv's smallest weight. The A72's s8 quads
    (8-bit ``smull``/``smlal``/``sadalp``) need two products to fit an int16 lane: an input
    >= 0 (|a*w| <= 127*128) or no weight of -128 (|a*w| <= 128*127)."""
    if target is None or target.kind.name != "llvm":
        return PAIRS
    has = tvm.target.codegen.llvm_cpu_has_features
    if str(target.attrs.get("mtriple", "")).startswith("aarch64"):
        if has("dotprod", target):
            return SDOT_QUADS
        return NEON_QUADS if nonneg or weight_min > -128 else PAIRS
    if has("amx-int8", target) and has("amx-tile", target):
        return AMX_QUADS
    if has("avx512vnni", target) and has("avx512bw", target):
        return VNNI_QUADS
    if has("avxvnni", target):
        return AVXVNNI_QUADS
    return AVX2_QUADS if nonneg and has("avx2", target) else PAIRS


def pairs_layout(target) -> ConvLayout:
    """The target's int16-pair packing, for inputs wider than int8 (decoded log codes) or
    sums u8 quads could overflow: ``vpdpwssd`` where the int8 kernel has 16 lanes (AVX-512
    VNNI, AMX hosts), else ``vpmaddwd`` (AVX2) or ``smlal`` (NEON)."""
    return VNNI_PAIRS if conv_layout(target).block == 16 else PAIRS


def data_layout(weight_shape, target) -> ConvLayout:
    """The layout of a packed weight ``[O/B, KH, KW, C/G, B, G]`` (with the data dtype; the
    target tells (8, 4) apart: AVX2 u8 quads on x86, sdot s8 quads on aarch64)."""
    block, group = int(weight_shape[4]), int(weight_shape[5])
    for layout in (conv_layout(target), conv_layout(target, nonneg=True), PAIRS, VNNI_PAIRS):
        if (layout.block, layout.group) == (block, group):
            return layout
    raise ValueError(f"no conv layout packs weights as {tuple(weight_shape)}")


AMX_ROWS = 16  # pixels per A/C tile (a tile has 16 rows of 64 bytes)
AMX_DEPTH = 64  # input channels per A tile row (64 u8 bytes: 16 quads)
AMX_ATTR = "tvmq_amx"  # on an accumulator the AMX schedule takes: [stride x, dilation y, x]


def amx_fits(channels: int, out_width: int) -> bool:
    """Whether an AMX_QUADS conv runs on tiles: its input channels (rounded up to quads, as
    packed) fill whole 64-byte tile rows (one tile configuration for every tile), and an
    output row of >= 4 pixels fills at least a quarter of a 16-row tile (a dense layer, 1
    pixel, stays on VNNI vectors). Output channels are padded to 16 by the packing anyway."""
    return channels % AMX_DEPTH == 0 and out_width >= 4


GATHERED = "tvmq_gathered"  # on a data pack whose channels do not fill whole groups
PROLOGUE = "tvmq_prologue"  # on an elementwise block feeding the data pack: inlined into it
FLAT_CHUNK = "tvmq_flat_chunk"  # on a folded conv's flat-row pack: its padding's granule


def flat_chunk(row_bytes: int) -> int:
    """The granule of a flat padded row: the largest power of two up to a 64-byte vector
    that divides the image row's bytes (ResNet-18's stem: 224 x 3 = 672 -> 32)."""
    return max(v for v in (1, 2, 4, 8, 16, 32, 64) if row_bytes % v == 0)


def folds_taps(channels: int, kernel_w: int, group: int, params: "Conv2dParams") -> bool:
    """Whether a dense conv's horizontal taps fold into its input channels: in an NHWC row
    the ``KW x C`` inputs of one output pixel are ``KW * C`` consecutive values, so they can
    be grouped in fours (pairs) as they lie, instead of padding each pixel's ``C`` to a
    group. Done where that takes fewer multiply-add steps: an RGB 7x7 stem, 6 quads per
    kernel row instead of 7 (C = 3 padded to 4), a grayscale 3x3 1 instead of 3."""
    return (params.groups == 1 and kernel_w > 1 and params.dilation[1] == 1
            and -(-kernel_w * channels // group) < kernel_w * -(-channels // group))


U8_OFFSET = 128  # u8 = int8 + 128: vpdpbusd multiplies unsigned bytes by signed bytes


@dataclass(frozen=True)
class Conv2dParams:
    """Scalar parameters of a tvmq integer conv2d (padding is top, left, bottom, right).

    One shift for the layer: ``out_shift`` with the signed ``bits`` range (from 0 with
    ``relu``). A shift per output channel: ``out_shift=None``, the shifts come as a tensor
    and the output range is ``[lo, hi]``."""

    strides: tuple
    padding: tuple
    dilation: tuple
    groups: int
    out_shift: int | None
    relu: bool = False
    bits: int = 8
    lo: int = -128
    hi: int = 127
    nonneg: bool = False  # the input is known to lie in [0, 127]: u8 operands need no offset


def _requantize(value, channel, params, shift):
    """The kernels' epilogue: one shift for the layer, or ``shift[channel]``."""
    if shift is None:
        return requantize(value, params.out_shift, "int8", params.relu, params.bits)
    return clamp(round_shift(value, shift[channel]), params.lo, params.hi, "int8")


def output_hw(hw, kernel, params: Conv2dParams) -> tuple[int, int]:
    (h, w), (kh, kw) = hw, kernel
    pt, pl, pb, pr = params.padding
    (sh, sw), (dh, dw) = params.strides, params.dilation
    return ((h + pt + pb - dh * (kh - 1) - 1) // sh + 1,
            (w + pl + pr - dw * (kw - 1) - 1) // sw + 1)


def pack_conv2d(weight: np.ndarray, bias: np.ndarray, params: Conv2dParams, target=None,
                layout: ConvLayout | None = None):
    """OIHW int8 -> ``[O/B, KH, KW, C/G, B, G]`` (zero-padded; ``conv_layout``, or
    ``layout``: e.g. ``pairs_layout`` for an int16 input) for dense convs: int16 pairs
    (G = 2), or int8 quads (G = 4) whose data side is offset to u8, the offset's contribution
    ``128 * sum(w)`` taken out of the bias here, exactly. Grouped convs take
    ``[KH, KW, C/groups, O]``: a vector of output channels is one load. The bias is int32 at
    the accumulator's exponent."""
    if params.groups != 1:
        return [np.ascontiguousarray(weight.transpose(2, 3, 1, 0)).astype(np.int8),
                bias.astype(np.int32)]
    o, c, kh, kw = weight.shape
    layout = layout or conv_layout(target, params.nonneg, int(weight.min(initial=0)))
    if layout.data == "uint8" and 255 * 128 * c * kh * kw >= 2**31:  # u8 sums could overflow
        layout = pairs_layout(target)
    block, group = layout.block, layout.group
    dtype = np.int16 if group == 2 else np.int8
    if folds_taps(c, kw, group, params):  # [O/B, KH, 1, KW*C/G, B, G], k = rx * C + c
        ob, cg = -(-o // block), -(-kw * c // group)
        w = np.zeros((ob * block, kh, cg * group), dtype)
        w[:o, :, :kw * c] = weight.transpose(0, 2, 3, 1).reshape(o, kh, kw * c)
        w = w.reshape(ob, block, kh, 1, cg, group).transpose(0, 2, 3, 4, 1, 5)
    else:
        ob, cg = -(-o // block), -(-c // group)
        w = np.zeros((ob * block, cg * group, kh, kw), dtype)
        w[:o, :c] = weight
        w = w.reshape(ob, block, cg, group, kh, kw).transpose(0, 4, 5, 2, 1, 3)
    bias = bias.astype(np.int64)
    if layout.data == "uint8" and not params.nonneg:
        bias = bias - U8_OFFSET * weight.astype(np.int64).sum(axis=(1, 2, 3))
    return [np.ascontiguousarray(w), bias.astype(np.int32)]


LAYOUTS = ("NCHW", "NHWC")  # activations between layers: NHWC keeps the conv's channel-innermost order


def qconv2d(data: te.Tensor, weight: te.Tensor, bias: te.Tensor, shift: te.Tensor | None = None,
            *, weight_shape, params: Conv2dParams, target=None, epilogue=None,
            pad: int = 0, layout: str = "NCHW") -> te.Tensor:
    """data [N, C, H, W] int8 (``layout="NHWC"``: [N, H, W, C]), packed weight (see
    :func:`pack_conv2d`), bias [O] int32, shift [O] int32 when ``params.out_shift`` is None
    -> [N, O, OH, OW] int8 (NHWC: [N, OH, OW, O]).

    ``epilogue(acc + bias, channel)``: another requantization of the int32 accumulator (e.g.
    a fixed-point multiplier, ``topi_ops.fixed_point``); ``pad``: the integer the spatial
    padding stands for (an affine input's zero point; 0 for tvmq's own tensors).

    The accumulator is [N, OH, OW, O'] (O' = O rounded up to the block): in NHWC the
    requantized tile is stored straight into the output, in NCHW it is unpacked after."""
    if layout not in LAYOUTS:
        raise ValueError(f"conv layout {layout!r}: one of {', '.join(LAYOUTS)}")
    if epilogue is None:
        def epilogue(value, channel):
            return _requantize(value, channel, params, shift)
    if params.groups != 1:
        return _qconv2d_grouped(data, weight, bias, weight_shape, params, epilogue, pad, layout)
    nhwc = layout == "NHWC"
    n, c, h, w = (int(data.shape[i]) for i in ((0, 3, 1, 2) if nhwc else (0, 1, 2, 3)))
    o, _, kh, kw = weight_shape
    ob, cg, block, group = (int(weight.shape[i]) for i in (0, 3, 4, 5))
    pt, pl, pb, pr = params.padding
    (sh, sw), (dh, dw) = params.strides, params.dilation
    oh, ow = output_hw((h, w), (kh, kw), params)
    # int16 pairs, s8 quads, or u8 quads (x + 128, unless x is known to be >= 0; padding is
    # x = 0, i.e. the offset, as the bias correction of pack_conv2d assumes)
    packing = data_layout(weight.shape, target)
    dtype = packing.data
    offset = U8_OFFSET if dtype == "uint8" and not params.nonneg else 0
    if packing == AVX2_QUADS and not (params.nonneg and 0 <= pad <= 127):
        # vpmaddubsw's int16 pair sums are exact only for u8 operands <= 127
        raise ValueError("AVX2 u8 quads need an input (and padding) known to lie in [0, 127]")

    # AMX tiles take 16 pixels of a row: the accumulator row is padded to whole tiles (the
    # pad columns read padding, or the last pixel, and are never requantized)
    folded = int(weight.shape[2]) == 1 and kw > 1  # pack_conv2d folded the taps (folds_taps)
    amx = packing == AMX_QUADS and amx_fits(cg * group, ow) and not folded
    acc_w = -(-ow // AMX_ROWS) * AMX_ROWS if amx else ow

    def element(b, ch, y, x):
        return data[b, y, x, ch] if nhwc else data[b, ch, y, x]

    # a 1x1 conv without padding packs only the pixels it reads (a strided one every s-th)
    subsample = (kh, kw) == (1, 1) and not any(params.padding)
    if folded:
        # each padded row flat, [N, Hp, row] (a plain copy from NHWC): the KW x C inputs of
        # output pixel x start at x * sw * C (+ the row's start), in the order the folded
        # weights take them. The image row starts and ends on a FLAT_CHUNK boundary (the
        # padding before it is right-aligned to one), so whether a byte is padding is the
        # same for a whole chunk: the pack copies vectors without a test per byte
        chunk = flat_chunk(w * c)
        start = -(-pl * c // chunk) * chunk  # where the image row begins
        flat = -(-max(start + (w + pr) * c, start - pl * c + (acc_w - 1) * sw * c
                      + cg * group) // 64) * 64

        def pack(b, y, xb):
            k = xb // chunk
            inside = tirx.all(y >= pt, y < pt + h, k >= start // chunk,
                              k < (start + w * c) // chunk)
            i = xb - start
            value = element(b, i % c, y - pt, i // c).astype("int16") + offset
            return tirx.if_then_else(inside, value.astype(dtype), tirx.const(offset + pad, dtype))

        packed = te.compute((n, h + pt + pb, flat), pack, name="tvmq_conv_data_pack",
                            attrs={FLAT_CHUNK: chunk})

        def taps(b, y, x, ry, rx, rc, rj):  # rx has extent 1: the taps are in rc
            return packed[b, y * sh + ry * dh, start - pl * c + x * sw * c + rc * group + rj]
    elif subsample:
        def pack(b, y, x, cc, j):
            ch = cc * group + j
            value = element(b, tirx.min(ch, c - 1), y * sh, tirx.min(x, ow - 1) * sw)
            value = value.astype("int16") + offset
            return tirx.if_then_else(ch < c, value.astype(dtype), tirx.const(offset, dtype))

        packed = te.compute((n, oh, acc_w, cg, group), pack, name="tvmq_conv_data_pack")
        (sh, sw) = (1, 1)
    else:
        def pack(b, y, x, cc, j):
            ch = cc * group + j
            inside = tirx.all(ch < c, y >= pt, y < pt + h, x >= pl, x < pl + w)
            value = element(b, tirx.min(ch, c - 1), y - pt, x - pl).astype("int16") + offset
            # padded channels have zero weights: any value works; keep them like padding
            return tirx.if_then_else(inside, value.astype(dtype), tirx.const(offset + pad, dtype))

        width = max(w + pl + pr, (acc_w - 1) * sw + (kw - 1) * dw + 1)
        # input channels that do not fill whole groups (an RGB stem) are gathered pixel by
        # pixel, not copied: schedules pack such data once, ahead, not per output row
        packed = te.compute((n, h + pt + pb, width, cg, group), pack,
                            name="tvmq_conv_data_pack",
                            attrs={GATHERED: True} if c % group else None)
    if not folded:
        def taps(b, y, x, ry, rx, rc, rj):  # (pixel, tap, channel group) -> packed input
            return packed[b, y * sh + ry * dh, x * sw + rx * dw, rc, rj]
    rc, ry, rx, rj = (te.reduce_axis((0, cg), "rc"), te.reduce_axis((0, kh), "ry"),
                      te.reduce_axis((0, int(weight.shape[2])), "rx"),
                      te.reduce_axis((0, group), "rj"))
    # an AMX conv carries its strides and dilation for schedules.amx (its tile addresses)
    amx_attrs = {AMX_ATTR: [sw, dh, dw]} if amx else {}
    acc = te.compute(
        (n, oh, acc_w, ob * block),
        lambda b, y, x, oc: te.sum(
            taps(b, y, x, ry, rx, rc, rj).astype("int32")
            * weight[oc // block, ry, rx, rc, oc % block, rj].astype("int32"),
            axis=[ry, rx, rc, rj]),
        name="tvmq_conv_acc", attrs={"schedule_rule": "tvmq_qconv2d_pairs",
                                     "tvmq_block": block, **amx_attrs})

    def requant(b, y, x, oc):
        channel = tirx.min(oc, o - 1)
        return epilogue(acc[b, y, x, oc] + bias[channel], channel)

    if nhwc:
        return te.compute((n, oh, ow, o), requant, name="tvmq_conv_requant")
    blocked = te.compute((n, oh, ow, ob * block), requant, name="tvmq_conv_requant")
    return te.compute((n, o, oh, ow), lambda b, oc, y, x: blocked[b, y, x, oc],
                      name="tvmq_conv_unpack")


def _qconv2d_grouped(data, weight, bias, weight_shape, params, epilogue, pad, layout):
    """Grouped and depthwise convs: a direct loop nest on NHWC, output channels innermost
    (``schedules.grouped``), weights ``[KH, KW, C/groups, O]`` (``pack_conv2d``). NCHW data
    is transposed in and out."""
    if layout == "NCHW":
        n, c, h, w = (int(v) for v in data.shape)
        nhwc = te.compute((n, h, w, c), lambda b, y, x, ch: data[b, ch, y, x],
                          name="tvmq_conv_to_nhwc")
        out = _qconv2d_grouped(nhwc, weight, bias, weight_shape, params, epilogue, pad, "NHWC")
        n, oh, ow, o = (int(v) for v in out.shape)
        return te.compute((n, o, oh, ow), lambda b, oc, y, x: out[b, y, x, oc],
                          name="tvmq_conv_to_nchw")
    n, h, w, c = (int(v) for v in data.shape)
    o, cg, kh, kw = weight_shape
    og = o // params.groups
    pt, pl, pb, pr = params.padding
    (sh, sw), (dh, dw) = params.strides, params.dilation
    oh, ow = output_hw((h, w), (kh, kw), params)
    padded = te.compute(
        (n, h + pt + pb, w + pl + pr, c),
        lambda b, y, x, ch: tirx.if_then_else(
            tirx.all(y >= pt, y < pt + h, x >= pl, x < pl + w),
            data[b, y - pt, x - pl, ch], tirx.const(pad, "int8")),
        name="tvmq_conv_pad")
    ry, rx, rc = te.reduce_axis((0, kh), "ry"), te.reduce_axis((0, kw), "rx"), te.reduce_axis((0, cg), "rc")
    acc = te.compute(
        (n, oh, ow, o),
        lambda b, y, x, oc: te.sum(
            (padded[b, y * sh + ry * dh, x * sw + rx * dw, (oc // og) * cg + rc].astype("int16")
             * weight[ry, rx, rc, oc].astype("int16")).astype("int32"), axis=[ry, rx, rc]),
        name="tvmq_conv_grouped_acc", attrs={"schedule_rule": "tvmq_qconv2d_grouped"})
    return te.compute(acc.shape, lambda b, y, x, oc: epilogue(acc[b, y, x, oc] + bias[oc], oc),
                      name="tvmq_conv_grouped_requant")
