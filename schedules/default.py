"""Default (untuned) schedules of tvmq's compute-bound kernels, per target.

A kernel's main block carries ``schedule_rule`` (set in its TE compute); this module maps the
rule to a schedule function. Every function it schedules is marked ``tir.is_scheduled`` so
the memory-bound fallback (``schedules.elementwise``) leaves it alone.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tvm
from tvm import s_tir, tirx

from schedules.amx import schedule_conv_amx
from schedules.bitserial import schedule_bitserial_conv2d
from schedules.grouped import schedule_conv_grouped
from schedules.elementwise import (SCHEDULED, inline_epilogue, is_scheduled, schedule_loop_nest,
                                   share_over_cores, stack_allocate)
from schedules.intrinsics import (DOT_8X2_AVX2, DOT_8X4_AVX2, DOT_8X4_AVXVNNI, DOT_8X4_NEON_S8,
                                  DOT_8X4_SDOT, DOT_16X2_VNNI, DOT_16X4_VNNI)
from schedules.targets import cores_of, has_feature, is_aarch64
from schedules.winograd import schedule_input_transform, schedule_output_transform
from topi_ops.conv2d import AMX_ATTR, FLAT_CHUNK, GATHERED, PROLOGUE
from topi_ops.winograd import WINOGRAD

def register_tile(out_blocks: int, width: int, target=None) -> tuple[int, int]:
    """(output-channel blocks, output columns) of the int32 accumulator tile kept in vector
    registers. Each reduction step loads one broadcast per column and one weight vector per
    block: 2 blocks x 4..6 columns does 8..12 multiply-adds per 6..8 loads (15 of 16 AVX2 or
    NEON registers at most). Narrow rows (7, 14) take 2 blocks x 7 where AVX-512's 32 zmm hold
    them (the tile tuning picked there: ResNet-18's 7x7 layers 7-24 % faster than 1 x 7; on
    wider rows 2 x 8 was no faster than 2 x 4, on ResNet-20's 16-pixel rows slower), else
    1 block x up to 8 columns."""
    count, size = vector_registers(target)
    for most in (6, 8) if (count, size) == (32, 64) else (6,):
        cols = max(t for t in range(1, most + 1) if width % t == 0)
        if cols >= 4 and out_blocks % 2 == 0:
            return 2, cols
    return 1, max(t for t in range(1, 9) if width % t == 0)


def vector_registers(target) -> tuple[int, int]:
    """(vector registers, their bytes) of the target: 32 x 64 B zmm with AVX-512, 32 x 16 B
    on aarch64 NEON, else 16 x 32 B ymm."""
    if is_aarch64(target):
        return 32, 16
    if target is not None and has_feature(target, "avx512bw"):
        return 32, 64
    return 16, 32


def register_tiles(out_blocks: int, width: int, target=None, lanes: int = 8) -> list[tuple[int, int]]:
    """Every register tile that fits the target's vector registers (``lanes`` int32 per
    output-channel block): accumulators + one weight vector per block + one broadcast. The
    candidates tuning measures (the default tile is one of them)."""
    count, size = vector_registers(target)
    per_block = max(1, lanes * 4 // size)
    return [(b, c) for b in (1, 2, 4) if out_blocks % b == 0
            for c in range(1, 17) if width % c == 0
            and per_block * b * (c + 1) + 1 <= count] or [(1, 1)]


@dataclass(frozen=True)
class ConvSchedule:
    """The free choices of the int8 conv schedule, what tuning searches over.

    ``tile``: (output-channel blocks, output columns) of accumulators kept in registers.
    ``reduce_order``: ``"taps"`` walks ry, rx, then input channels (the default); ``"channels"``
    walks input channels outermost. ``parallel``: ``"channels"`` shares out (channel tile,
    row) pairs, a thread's weights stay hot across rows; ``"rows"`` shares out rows, a thread
    does every channel tile of its row, its input rows stay hot; ``"bands"``: one band of
    consecutive rows per core; ``"none"``: rows on one core; ``"tiles"`` (Winograd only):
    rows of tiles shared out, each transformed, multiplied and transformed back while it is
    in the core's cache (else the positions are the outer loop). ``pack_per_row`` (rows, bands,
    none): each row task (band) packs the input rows it reads instead of a packing pass
    ahead (per row, the rows a 3x3 window overlaps are packed 3 times; per band, only the
    rows at a band's edge twice)."""

    tile: tuple[int, int]
    reduce_order: str = "taps"
    parallel: str = "channels"
    pack_per_row: bool = True  # with rows shared out: each task packs the rows it reads

    def __post_init__(self):
        if self.reduce_order not in ("taps", "channels") or self.parallel not in (
                "channels", "rows", "bands", "none", "tiles"):
            raise ValueError(f"unknown conv schedule choice {self}")


# on one core, below this many MACs per output row a row task packs its own input rows
# (shared out row by row: ResNet-20's layers (0.07-0.3 M) 8 % faster end to end than packed
# ahead, ResNet-18's (2-16 M) 2 % slower; interleaved A/B, AVX-512 VNNI host)
ROW_PACK_MACS = 1 << 20
# below this many MACs a conv runs on one core: waking the pool and waiting at its barrier
# costs more than the second core saves (ResNet-20's stem and strided 1x1s, 0.1-0.4 M: the
# model 1-2 % faster in interleaved A/Bs; all of its convs under 3 M on one core: 30 % slower)
SERIAL_MACS = 1 << 19
# ... unless it streams more weights than this: they come from L3 or memory every inference,
# and two cores fetch them faster than one (ResNet-18's dense, 0.5 M MACs of 512 KB weights:
# in the model 13-22 us on one core against 6 us warm; both cores: the model 0.2-0.3 %
# faster, interleaved A/B, AVX-512 VNNI host)
SERIAL_WEIGHTS = 1 << 18


# a conv with few rows (< 4 per core) shares them out only if its weights are at most this
# big: each core then streams all of them per row, from its L2 (1 MB here). ResNet-18's
# 7x7-pixel 1x1 downsample (128 KB) 44 -> 77 % of the peak with rows; its 3x3s (1.2-2.4 MB)
# 85 % with rows, 91-94 % with (channel tile, row) pairs, each core keeping half the weights.
# x86 only: on the A72, llvm-mca puts the row order's hot loop of a 64-channel 3x3 at 63
# cycles a step against 48 with channel tiles (LLVM's code for it is worse there)
SHARED_WEIGHTS = 1 << 20


def weight_bytes(sch: s_tir.Schedule, conv) -> int:
    """Bytes of the conv block's packed weights (its second operand)."""
    weight = sch.get(conv).reads[1].source
    size = int(np.prod([int(d) for d in weight.shape]))
    return size * tvm.DataType(str(weight.dtype)).bits // 8


def conv_macs(sch: s_tir.Schedule, conv) -> int:
    """Multiply-adds of the conv block (padded channels included)."""
    return int(np.prod([int(sch.get(lp).extent) for lp in sch.get_loops(conv)]))


def default_conv_schedule(sch: s_tir.Schedule, conv, target, extents) -> ConvSchedule:
    """``register_tile``, taps first; where every core gets >= 4 rows, one band of
    consecutive rows per core, each band packing the input rows it reads: a thread does
    every channel tile of its rows while they are hot, with no packing pass and no barrier
    of its own, and only a band's edge rows are packed twice. Against rows shared out one
    by one (packed ahead for big rows, per row for small ones): 1-4 % faster on ResNet-18's
    convs, 7-18 % on ResNet-20's, models 2 % and 14-21 % faster (AVX-512 VNNI host,
    interleaved A/Bs). Rows that do not split evenly over the cores are shared out one by
    one; fewer rows too where the weights fit a core's cache (``SHARED_WEIGHTS``), else
    (channel tile, row) pairs, so that every core has work and keeps its share; convs under
    ``SERIAL_MACS`` run on one core unless their weights are big (``SERIAL_WEIGHTS``), small
    rows packing their own input (``ROW_PACK_MACS``) unless the pack gathers channels
    (``GATHERED``)."""
    if WINOGRAD in sch.get(conv).annotations:
        # a row of tiles at a time, in cache: ResNet-18's 3x3 layers 0.74-0.84x the direct
        # conv, against 0.76-1.36x with the positions outermost (AVX2 Zen 3, interleaved A/B)
        return ConvSchedule(register_tile(*extents, target), parallel="tiles")
    _n, y, *per_row = (int(sch.get(lp).extent) for lp in sch.get_loops(conv))
    row_macs = int(np.prod(per_row))
    # a gathered pack (channels padded to the group, e.g. RGB) repeated per row costs more
    # than the pass it saves: ResNet-20's stem 6.3 us packed ahead vs 9.6 per row
    gathered = any(sch.get(b).name_hint == "tvmq_conv_data_pack" and GATHERED in
                   sch.get(b).annotations for b in sch.get_child_blocks(sch.get_sblock("root")))
    cores = cores_of(target)
    if conv_macs(sch, conv) < SERIAL_MACS and weight_bytes(sch, conv) <= SERIAL_WEIGHTS:
        parallel = "none"
    elif y >= 4 * cores:
        parallel = "bands" if y % cores == 0 else "rows"
    elif y >= 2 * cores and weight_bytes(sch, conv) <= SHARED_WEIGHTS and not is_aarch64(target):
        parallel = "rows"  # few rows, but every core holds all the weights it streams
    else:
        parallel = "channels"
    return ConvSchedule(register_tile(*extents, target), parallel=parallel,
                        pack_per_row=parallel == "bands"
                        or (row_macs < ROW_PACK_MACS and not gathered))


def conv_schedules(out_blocks: int, width: int, target=None, lanes: int = 8,
                   macs: int | None = None, rows: int | None = None,
                   winograd: bool = False) -> list[ConvSchedule]:
    """The tuning space of one conv: every register tile with enough accumulators to cover
    the multiply-add's latency (>= 4, where the row allows) x reduction order x parallel loop
    (channel tiles x rows; rows, packed ahead or by each row task; bands of ``rows``, each
    packing its own, where they split evenly over the cores; one core too for convs of
    under 4 x ``SERIAL_MACS``). A Winograd product (``winograd``) has no taps to order and
    its transforms are passes of their own: tile x (channel tiles, rows, bands, rows of
    tiles)."""
    tiles = register_tiles(out_blocks, width, target, lanes)
    enough = min(4, max(b * c for b, c in tiles))
    bands = rows is not None and rows % cores_of(target) == 0
    if winograd:
        loops = [("channels", False), ("rows", False), ("tiles", False)] + (
            [("bands", False)] if bands else [])
    else:
        loops = [("channels", False), ("rows", False), ("rows", True)] + (
            [("bands", True)] if bands else [])
        if macs is not None and macs < 4 * SERIAL_MACS:
            loops += [("none", False), ("none", True)]
    return [ConvSchedule(tile, order, par, per_row)
            for tile in tiles if tile[0] * tile[1] >= enough
            for order in (("taps",) if winograd else ("taps", "channels"))
            for par, per_row in loops]


def split_channels(sch: s_tir.Schedule, conv) -> list:
    """The conv block's loops with its output channels split into (blocks, lanes): ``n, y,
    x, ob, oi, ry, rx, rc, rj`` (the accumulator is [N, OH, OW, O'], ``tvmq_block`` lanes)."""
    n, y, x, oc, *reduce = sch.get_loops(conv)
    block = int(sch.get(conv).annotations["tvmq_block"])
    ob, oi = sch.split(oc, [None, block])
    return [n, y, x, ob, oi, *reduce]


def conv_rows(sch: s_tir.Schedule, conv) -> int:
    """Output rows of the conv block."""
    return int(sch.get(sch.get_loops(conv)[1]).extent)


def conv_loop_extents(sch: s_tir.Schedule, conv) -> tuple[int, int]:
    """(output-channel blocks, output width) of the conv block."""
    _n, _y, x, oc, *_ = sch.get_loops(conv)
    block = int(sch.get(conv).annotations["tvmq_block"])
    return int(sch.get(oc).extent) // block, int(sch.get(x).extent)


def schedule_conv_pairs(sch: s_tir.Schedule, conv, target: tvm.target.Target,
                        choice: ConvSchedule | None = None) -> None:
    """Register-tiled, parallel, tensorized schedule of ``tvmq_conv_acc`` (channel pairs),
    with its requantize epilogue on the register tile and parallel data (un)packing.
    ``choice`` overrides the default (``register_tile``, taps first, channel tiles shared
    out): tuning."""
    for block in sch.get_child_blocks(sch.get_sblock("root")):
        if PROLOGUE in sch.get(block).annotations:  # e.g. a decode: computed as it is packed
            sch.compute_inline(block)
    blocks = {sch.get(b).name_hint: b for b in sch.get_child_blocks(sch.get_sblock("root"))}
    if "tvmq_dense_as_image" in blocks:  # dense = 1x1 conv: its reshapes are free
        sch.compute_inline(blocks["tvmq_dense_as_image"])
        sch.reverse_compute_inline(blocks["tvmq_dense_out"])
    requant = sch.get_sblock("tvmq_conv_requant")
    inline_epilogue(sch, blocks.get("tvmq_conv_unpack", requant))
    winograd = WINOGRAD in sch.get(conv).annotations  # topi_ops.winograd: transforms apart
    if AMX_ATTR in sch.get(conv).annotations:  # topi_ops.conv2d chose AMX tiles for it
        return schedule_conv_amx(sch, conv, target)
    extents = conv_loop_extents(sch, conv)
    n, y, x, ob, oi, ry, rx, rc, rj = split_channels(sch, conv)
    choice = choice or default_conv_schedule(sch, conv, target, extents)
    ob_tile, x_tile = choice.tile
    obo, obi = sch.split(ob, [None, ob_tile])
    xo, xi = sch.split(x, [None, x_tile])
    reduce = (ry, rx, rc) if choice.reduce_order == "taps" else (rc, ry, rx)
    if choice.parallel == "channels":
        sch.reorder(n, obo, y, xo, *reduce, obi, xi, oi, rj)
        outer = sch.fuse(n, obo, y)
    elif choice.parallel == "tiles":  # Winograd: a row of tiles at a time, every position
        sch.reorder(y, n, obo, xo, *reduce, obi, xi, oi, rj)
        outer = y
    else:
        sch.reorder(n, y, obo, xo, *reduce, obi, xi, oi, rj)
        if choice.parallel == "bands":  # one band of consecutive rows per core
            cores, rows = cores_of(target), int(sch.get(y).extent)
            if rows % cores:  # the split's predicate would defeat tensorize
                raise ValueError(f"{choice}: {rows} rows do not split evenly over {cores} cores")
            y, _ = sch.split(y, [cores, None])
        outer = sch.fuse(n, y)
    if choice.parallel != "none":
        sch.parallel(outer)
    if winograd:  # the output transform reads all 16 positions of a tile
        schedule_output_transform(sch, requant, target,
                                  at=outer if choice.parallel == "tiles" else None)
    else:  # the accumulator tile [ob_tile, x_tile, 8] lives in registers; requantize after it
        sch.reverse_compute_at(requant, xo)
        sch.vectorize(sch.get_loops(requant)[-1])
    # the instruction of the layout topi_ops.conv2d.conv_layout chose
    lanes, group = int(sch.get(oi).extent), int(sch.get(rj).extent)
    # (8, 4): u8 data on AVX-VNNI (vpdpbusd ymm) or AVX2 (vpmaddubsw, input >= 0), s8 data
    # on aarch64 dotprod (sdot)
    u8 = any(str(r.source.dtype) == "uint8" for r in sch.get(conv).reads)
    quads8 = DOT_8X4_SDOT if not u8 else (
        DOT_8X4_AVXVNNI if has_feature(target, "avxvnni") else DOT_8X4_AVX2)
    intrin = {(16, 4): DOT_16X4_VNNI, (16, 2): DOT_16X2_VNNI, (8, 4): quads8}.get(
        (lanes, group), DOT_8X2_AVX2 if has_feature(target, "avx2") else None)
    if intrin == DOT_8X4_SDOT and not has_feature(target, "dotprod"):  # A72 (conv_layout)
        intrin = DOT_8X4_NEON_S8  # s8 quads without sdot: 8-bit smull + smlal + sadalp
    if intrin is None:  # NEON pairs and others: 8 int32 lanes, widening multiply-accumulate
        sch.reorder(rj, oi)
        sch.unroll(rj)
        sch.vectorize(oi)  # before decompose_reduction: vectorize needs the complete block
    init = sch.decompose_reduction(conv, reduce[0])
    sch.vectorize(sch.get_loops(init)[-1])
    if intrin is not None:
        sch.tensorize(oi, intrin)
    sch.unroll(xi)
    sch.unroll(obi)
    sch.set_scope(init, 0, "local")  # after tensorize: the intrinsic matches global buffers
    per_row = choice.parallel != "channels" and choice.pack_per_row and not winograd
    if per_row and "tvmq_conv_data_pack" in blocks:
        # each row task packs the input rows it reads, just before it reads them: no pass
        # (and no barrier) of its own, the rows hot in L1 (rows overlap: 3x3 packs each 3x)
        pack = sch.get_sblock("tvmq_conv_data_pack")
        sch.compute_at(pack, outer)
        # the pack's own loops under the row loop (compute_at drops those of extent 1)
        loops = sch.get_loops(pack)
        own = loops[[sch.get(lp).same_as(sch.get(outer)) for lp in loops].index(True) + 1:]
        if FLAT_CHUNK in sch.get(pack).annotations:  # flat rows of folded taps
            schedule_flat_rows(sch, pack, target, per_row=True)
        elif own:  # [.., C/G, G]: a pixel's channels
            sch.vectorize(sch.fuse(*own[-2:]) if len(own) > 1 else own[-1])
    if winograd:
        schedule_input_transform(sch, sch.get_sblock("tvmq_conv_data_pack"), target,
                                 at=outer if choice.parallel == "tiles" else None)
    for name in ("tvmq_conv_data_pack", "tvmq_conv_unpack"):
        if name in blocks and (name != "tvmq_conv_data_pack" or not (per_row or winograd)):
            block = sch.get_sblock(name)
            flat = FLAT_CHUNK in sch.get(block).annotations
            (schedule_flat_rows if flat else schedule_loop_nest)(sch, block, target)
    stack_allocate(sch, init)


def schedule_flat_rows(sch: s_tir.Schedule, pack, target, per_row: bool = False) -> None:
    """A folded conv's flat padded rows (``topi_ops.conv2d``): one vector per ``FLAT_CHUNK``
    bytes, whose padding test is the same for the whole chunk (a test per byte kept this
    loop scalar: ResNet-18's stem pack 29 -> 3 us). Packed ahead, the rows are shared out
    over the cores; ``per_row``: computed in each row task, under its loop."""
    loops = sch.get_loops(pack)
    chunk = int(sch.get(pack).annotations[FLAT_CHUNK])
    if not per_row:
        rows = sch.fuse(*loops[:-1])
        share_over_cores(sch, rows, int(sch.get(rows).extent) * int(sch.get(loops[-1]).extent),
                         target)
    if chunk > 1:
        sch.vectorize(sch.split(loops[-1], [None, chunk])[1])


RULES = {"tvmq_qconv2d_pairs": schedule_conv_pairs, "tvmq_qconv2d_grouped": schedule_conv_grouped,
         "tvmq_bitserial_conv2d": schedule_bitserial_conv2d}


def ruled_blocks(sch: s_tir.Schedule) -> list:
    """(block, rule) of every top-level block whose ``schedule_rule`` tvmq knows."""
    ruled = [(b, str(sch.get(b).annotations.get("schedule_rule", "")))
             for b in sch.get_child_blocks(sch.get_sblock("root"))]
    return [(b, r) for b, r in ruled if r in RULES]


def apply_default_schedules(mod: tvm.IRModule, target) -> tvm.IRModule:
    """Schedule every PrimFunc of ``mod`` whose block carries a known ``schedule_rule``."""
    for gv, func in list(mod.functions_items()):
        if not isinstance(func, tirx.PrimFunc) or is_scheduled(func):
            continue
        sch = s_tir.Schedule(func)
        ruled = ruled_blocks(sch)
        if not ruled:
            continue
        for block, rule in ruled:
            RULES[rule](sch, block, target)
        mod[gv] = sch.mod["main"].with_attr(SCHEDULED, True)
    return mod
