"""Bit-serial ternary conv2d (ALGORITHMS.md §1, combined ternary weights x N-bit unsigned
activations): AND + popcount on bit planes, exact integer arithmetic.

Semantics (``qconv2d_bitserial_python`` is the reference):

    acc[n, o, y, x] = sum_i (conv(x, terms[i])[n, o, y, x] << term_shift[i, o]) + bias[o]
    out = clamp(round_shift(acc, out_shift[o]), lo, hi)          (int8)

Lowering (``layout`` decides per target). The input channels of one group are packed into
machine words, bit ``j`` of word ``w`` = channel ``B w + j``: bytes (B = 8) on aarch64, where
NEON counts bits per byte (``cnt``), 64-bit words on x86 (``popcnt``, AVX-512 ``vpopcntq``,
AVX2's nibble lookup). ``L`` words (``lanes``: up to 16 bytes on NEON, 8 uint64 on AVX-512,
4 on AVX2) make one vector word of ``B L`` channels; channel counts that are not a multiple
of ``B L`` are zero-padded (zero masks: padded channels add nothing, whatever the data holds
there). Activations (per inference, the first TE stage): ``abits`` bit planes of the
zero-padded image, ``[N, Hp, Wp, groups, words, abits, L]`` uint8/uint64.

Weights (at build time, :func:`pack_ternary`): each ternary term is a (+1 mask ``p``, -1
mask ``m``) plane pair, disjoint. Per activation plane ``a``,

    popcount(a & p) - popcount(a & m) = popcount((a & (p | m)) ^ m) - popcount(m)

(a set bit of ``a`` selects ``p``, a clear one ``m``), so the kernel stores the pair as
(``p | m``, ``m``), ``[O, KH, KW, words, K, 2, L]`` uint8/uint64, spends one ``and`` + one ``eor`` +
one ``popcount`` per plane and term instead of two of each plus a subtraction, and the
constant ``(2^abits - 1) * sum popcount(m) << term_shift`` is taken out of the bias at build
time (exact: zero-padded pixels give ``popcount(m) - popcount(m) = 0`` as well).

The main stage keeps one partial sum per term and lane (``[N, O, OH, OW, K, L/pairs]``):

    lanes[.., i, j] += sum_{l in (j, j + L/2)} sum_b popcount((a_b & s_i) ^ m_i) << b

On aarch64 a lane sums two byte lanes (``pairs`` = 2, what NEON ``uadalp`` does), the byte
value is at most ``8 (2^abits - 1)`` (uint8 for abits <= 5) and the lanes accumulate in
uint16 when the layer's reduction cannot overflow it (decided from the shapes), else int32;
on x86 a lane is one uint64 word accumulated in uint64. The lane axis is spatial, so it
vectorizes (NEON ``and``/``eor``/``cnt`` + ``uadalp``, tensorized; x86 ``vpand``/``vpxor``/
``vpopcntq``/``vpaddq``); the epilogue sums each term's lanes in int32 (NEON ``uaddlv``),
applies the per-term shifts, adds the bias and requantizes (``round_shift`` per output
channel, clamp), on the register tile. Data values are taken modulo ``2^abits`` (the caller guarantees
``0 <= x < 2^abits``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import tvm
from tvm import te, tirx

from topi_ops.conv2d import output_hw  # the same geometry fields: one output-size rule
from topi_ops.requantize import clamp, round_shift

@dataclass(frozen=True)
class BitserialParams:
    """Scalar parameters of the bit-serial ternary conv (padding: top, left, bottom, right;
    ``lo``/``hi``: the output clamp, e.g. 0..3 for 2-bit unsigned)."""

    strides: tuple = (1, 1)
    padding: tuple = (0, 0, 0, 0)
    dilation: tuple = (1, 1)
    groups: int = 1
    abits: int = 2
    lo: int = -128
    hi: int = 127


class Layout(NamedTuple):
    """How one group's channels become machine words (decided per target, used by the
    build-time packing, the kernel and its schedule alike)."""

    word_bits: int  # channels per word: 8 (bytes: NEON cnt) or 64 (x86 popcnt / vpopcntq)
    words: int  # vector words per group (a vector word = ``lanes`` words)
    lanes: int  # words per vector word (a power of two)
    pairs: int  # words summed into one accumulator lane (2: NEON uadalp's byte pairs)
    inner: str  # dtype of one word's ``sum_b popcount(..) << b``
    acc: str  # accumulator lane dtype

    @property
    def word(self) -> str:
        return f"uint{self.word_bits}"


def _is_aarch64(target) -> bool:
    return target is not None and str(target.attrs.get("mtriple", "") or "").startswith("aarch64")


def vector_bytes(target) -> int:
    """A NEON q register (16), an AVX2 ymm (32), an AVX-512 zmm (64); SSE 16."""
    if target is None or target.kind.name != "llvm" or _is_aarch64(target):
        return 16
    has = tvm.target.codegen.llvm_cpu_has_features
    if has("avx512bw", target):
        return 64
    return 32 if has("avx2", target) else 16


def layout(channels_per_group: int, kh: int, kw: int, abits: int, target) -> Layout:
    """Bytes with 16 per vector (2 per uint16 accumulator lane) on aarch64: NEON counts bits
    per byte (``cnt``) and widens pairs (``uadalp``). 64-bit words on x86: one ``popcnt`` or
    ``vpopcntq`` lane per 64 channels, accumulated in uint64 lanes (no widening at all)."""
    x86 = target is not None and target.kind.name == "llvm" and not _is_aarch64(target)
    word_bits = 64 if x86 else 8
    nwords = -(-channels_per_group // word_bits)
    lanes = 1
    while lanes < nwords and lanes < vector_bytes(target) * 8 // word_bits:
        lanes *= 2
    words = -(-nwords // lanes)
    top = word_bits * ((1 << abits) - 1)  # one word's sum_b popcount << b, at most
    if x86:
        return Layout(64, words, lanes, 1, "uint64", "uint64")
    pairs = 2 if lanes >= 2 else 1
    inner = "uint8" if top <= 255 else "uint16"
    acc = "uint16" if kh * kw * words * pairs * top < 2**16 else "int32"
    return Layout(8, words, lanes, pairs, inner, acc)


def plane_sum(load_a, load_mask, abits: int, dtype: str):
    """``sum_b popcount((a_b & s) ^ m) << b`` for one byte lane: ``load_a(b)`` is activation
    plane ``b``'s byte, ``load_mask(0)`` the term's support ``s = p | m``, ``load_mask(1)``
    its -1 mask ``m``. Shared by the compute and the NEON intrinsic's description."""
    value = None
    for p in range(abits):
        ones = tirx.Cast(dtype, tirx.popcount((load_a(p) & load_mask(0)) ^ load_mask(1)))
        term = ones if p == 0 else ones << tirx.const(p, dtype)
        value = term if value is None else value + term
    return value


def _check_terms(terms: np.ndarray, term_shift: np.ndarray, bias, out_shift) -> None:
    if terms.ndim != 5:
        raise ValueError(f"ternary terms must be [K, O, C/groups, KH, KW], got shape {terms.shape}")
    k, o = terms.shape[:2]
    if not np.isin(terms, (-1, 0, 1)).all():
        raise ValueError("ternary terms must hold only -1, 0, +1")
    if term_shift.shape != (k, o) or (term_shift < 0).any():
        raise ValueError(f"term_shift must be [K, O] = {(k, o)} with values >= 0, got "
                         f"shape {term_shift.shape}, min {term_shift.min()}")
    if bias.shape != (o,) or out_shift.shape != (o,):
        raise ValueError(f"bias and out_shift must be [O] = [{o}], got {bias.shape} and {out_shift.shape}")


def pack_ternary(terms: np.ndarray, term_shift: np.ndarray, bias: np.ndarray,
                 out_shift: np.ndarray, params: BitserialParams, target=None) -> list[np.ndarray]:
    """Build-time packing. ``terms`` int8 [K, O, C/groups, KH, KW] in {-1, 0, +1},
    ``term_shift`` int32 [K, O] (>= 0), ``bias`` int32 [O] (at the accumulator's exponent),
    ``out_shift`` int32 [O]. Returns ``[masks, term_shift, bias, out_shift]``:
    masks uint8/uint64 (``layout``) [O, KH, KW, words, K, 2, lanes] (every term's support ``p | m`` and -1
    mask ``m``), term_shift int32 [O, K], bias int32 [O] (less the constant of the select
    form, see the module docstring), out_shift int32 [O]."""
    terms = np.asarray(terms)
    term_shift, bias, out_shift = (np.asarray(a, np.int64) for a in (term_shift, bias, out_shift))
    _check_terms(terms, term_shift, bias, out_shift)
    k, o, cg, kh, kw = terms.shape
    lay = layout(cg, kh, kw, params.abits, target)
    words, lanes, wb = lay.words, lay.lanes, lay.word_bits
    cpad = words * lanes * wb
    t = np.zeros((k, o, cpad, kh, kw), np.int8)
    t[:, :, :cg] = terms
    planes = np.stack([t != 0, t == -1], axis=2)          # [K, O, 2, Cpad, KH, KW]
    planes = planes.reshape(k, o, 2, words, lanes, wb, kh, kw).astype(np.uint64)
    weights = (np.uint64(1) << np.arange(wb, dtype=np.uint64)).reshape(1, 1, 1, 1, 1, wb, 1, 1)
    masks = (planes * weights).sum(axis=5, dtype=np.uint64).astype(lay.word)
    # masks: [K, O, 2, words, lanes, KH, KW]
    masks = masks.transpose(1, 5, 6, 3, 0, 2, 4)             # [O, KH, KW, words, K, 2, lanes]
    minus = (terms == -1).reshape(k, o, -1).sum(axis=2).astype(np.int64)  # [K, O]
    bias = bias - (((1 << params.abits) - 1) * (minus << term_shift)).sum(axis=0)
    if np.abs(bias).max(initial=0) >= 2**31:
        raise ValueError("bitserial conv: the bias with the -1 mask counts taken out does not "
                         "fit int32")
    return [np.ascontiguousarray(masks), np.ascontiguousarray(term_shift.T.astype(np.int32)),
            bias.astype(np.int32), out_shift.astype(np.int32)]


def qconv2d_bitserial(data: te.Tensor, masks: te.Tensor, term_shift: te.Tensor, bias: te.Tensor,
                      out_shift: te.Tensor, weight_shape, params: BitserialParams,
                      target=None) -> te.Tensor:
    """data int8 [N, C, H, W] (values in [0, 2^abits)), the four arrays of
    :func:`pack_ternary` as tensors, ``weight_shape`` = (O, C/groups, KH, KW)
    -> int8 [N, O, OH, OW]."""
    n, c, h, w = (int(v) for v in data.shape)
    o, cg, kh, kw = (int(v) for v in weight_shape)
    _o, _kh, _kw, words, k, _two, lanes = (int(v) for v in masks.shape)
    groups, abits = params.groups, params.abits
    if c != cg * groups or o % groups or (_o, _kh, _kw) != (o, kh, kw):
        raise ValueError(f"bitserial conv: data {data.shape}, weight {weight_shape}, groups "
                         f"{groups} and packed masks {masks.shape} do not agree")
    if not 1 <= abits <= 7:
        raise ValueError(f"bitserial conv: abits must be 1..7 (int8 data), got {abits}")
    lay = layout(cg, kh, kw, abits, target)
    if (lay.words, lay.lanes, lay.word) != (words, lanes, str(masks.dtype)):
        raise ValueError(f"bitserial conv: masks {masks.shape} {masks.dtype} were packed for "
                         f"another target than {target} ({lay})")
    wb = lay.word_bits
    og = o // groups
    pt, pl, pb, pr = params.padding
    (sh, sw), (dh, dw) = params.strides, params.dilation
    oh, ow = output_hw((h, w), (kh, kw), params)

    wt = lay.word

    def pack(b, y, x, g, wd, p, l):
        word = tirx.const(0, wt)
        inside = tirx.all(y >= pt, y < pt + h, x >= pl, x < pl + w)
        for j in range(wb):
            ch = (wd * lanes + l) * wb + j
            v = data[b, g * cg + tirx.min(ch, cg - 1), tirx.min(tirx.max(y - pt, 0), h - 1),
                     tirx.min(tirx.max(x - pl, 0), w - 1)].astype("uint8")
            bit = tirx.if_then_else(tirx.all(inside, ch < cg),
                                    (v >> p.astype("uint8")) & tirx.const(1, "uint8"),
                                    tirx.const(0, "uint8"))
            word = word | (bit.astype(wt) << tirx.const(j, wt))
        return word

    packed = te.compute((n, h + pt + pb, w + pl + pr, groups, words, abits, lanes), pack,
                        name="tvmq_bitserial_data_pack")
    pairs = lay.pairs
    half = lanes // pairs
    idt, ldt = lay.inner, lay.acc
    ry, rx, rw, rq = (te.reduce_axis((0, kh), "ry"), te.reduce_axis((0, kw), "rx"),
                      te.reduce_axis((0, words), "rw"), te.reduce_axis((0, pairs), "rq"))

    def lane_sum(b, oc, y, x, i, j):
        yy, xx, g, l = y * sh + ry * dh, x * sw + rx * dw, oc // og, rq * half + j
        value = plane_sum(lambda p: packed[b, yy, xx, g, rw, p, l],
                          lambda s: masks[oc, ry, rx, rw, i, s, l], abits, idt)
        return te.sum(tirx.Cast(ldt, value), axis=[ry, rx, rw, rq])

    # one accumulator lane per pair of byte lanes (j, j + L/2) and term
    lanes_acc = te.compute((n, o, oh, ow, k, half), lane_sum, name="tvmq_bitserial_lanes",
                           attrs={"schedule_rule": "tvmq_bitserial_conv2d",
                                  "tvmq_bitserial_layout": "/".join(map(str, lay))})
    rl = te.reduce_axis((0, half), "rl")
    term_sum = te.compute(  # one horizontal sum per term (NEON: one uaddlv)
        (n, o, oh, ow, k),
        lambda b, oc, y, x, i: te.sum(lanes_acc[b, oc, y, x, i, rl].astype("int32"), axis=rl),
        name="tvmq_bitserial_sum")

    ri = te.reduce_axis((0, k), "ri")
    acc = te.compute(
        (n, o, oh, ow),
        lambda b, oc, y, x: te.sum(term_sum[b, oc, y, x, ri] << term_shift[oc, ri], axis=ri),
        name="tvmq_bitserial_terms")
    return te.compute(
        (n, o, oh, ow),
        lambda b, oc, y, x: clamp(round_shift(acc[b, oc, y, x] + bias[oc], out_shift[oc]),
                                  params.lo, params.hi, "int8"),
        name="tvmq_bitserial_out")


def qconv2d_bitserial_python(data: np.ndarray, terms: np.ndarray, term_shift: np.ndarray,
                             bias: np.ndarray, out_shift: np.ndarray,
                             params: BitserialParams) -> np.ndarray:
    """The reference (torch, float64 conv: exact below 2^53; int64 elsewhere) -> int8."""
    import torch

    terms = np.asarray(terms, np.int64)
    k, o = terms.shape[:2]
    x = torch.from_numpy(np.asarray(data, np.float64))
    pt, pl, pb, pr = params.padding
    x = torch.nn.functional.pad(x, (pl, pr, pt, pb))
    wt = (terms * (1 << np.asarray(term_shift, np.int64))[:, :, None, None, None]).sum(0)
    acc = torch.nn.functional.conv2d(x, torch.from_numpy(wt.astype(np.float64)),
                                     stride=tuple(params.strides),
                                     dilation=tuple(params.dilation), groups=params.groups)
    acc = acc.numpy().astype(np.int64) + np.asarray(bias, np.int64)[None, :, None, None]
    s = np.asarray(out_shift, np.int64)[None, :, None, None]
    right = np.maximum(s, 0)
    half = np.where(right > 0, np.left_shift(1, np.maximum(right - 1, 0)), 0)
    shifted = np.where(s > 0, (acc + half) >> right, acc << np.maximum(-s, 0))
    return np.clip(shifted, params.lo, params.hi).astype(np.int8)
