"""The loop nests of the Winograd conv's transforms (``topi_ops.winograd``); its batched
product is the conv accumulator, scheduled by ``schedules.default.schedule_conv_pairs``.

Each transform unrolls the loop over the tile's positions, so that the kernel's per-position
selects fold to the few adds of that position, and vectorizes over the channels; rows of
tiles are shared out over the cores."""
from __future__ import annotations

import tvm
from tvm import s_tir

from schedules.elementwise import share_over_cores
from topi_ops.winograd import POSITIONS


def schedule_input_transform(sch: s_tir.Schedule, pack, target: tvm.target.Target) -> None:
    """``[N*16, TY, TX, C/2, 2]``: (image, tile row) shared out, the 16 positions unrolled
    inside each tile, the channels vectorized."""
    bp, ty, tx, cc, j = sch.get_loops(pack)
    b, pos = sch.split(bp, [None, POSITIONS])
    sch.reorder(b, ty, tx, pos, cc, j)
    rows = sch.fuse(b, ty)
    share_over_cores(sch, rows, _work(sch, pack), target)
    sch.unroll(pos)
    sch.vectorize(sch.fuse(cc, j))


def schedule_output_transform(sch: s_tir.Schedule, out, target: tvm.target.Target) -> None:
    """``[N, OH, OW, O]`` (with any epilogue inlined): (image, tile row) shared out, the
    tile's 2 x 2 outputs unrolled, the output channels vectorized."""
    b, y, x, oc = sch.get_loops(out)
    ty, i = sch.split(y, [None, 2])
    tx, j = sch.split(x, [None, 2])
    sch.reorder(b, ty, tx, i, j, oc)
    rows = sch.fuse(b, ty)
    share_over_cores(sch, rows, _work(sch, out), target)
    sch.unroll(i)
    sch.unroll(j)
    sch.vectorize(oc)


def _work(sch: s_tir.Schedule, block) -> int:
    work = 1
    for loop in sch.get_loops(block):
        work *= int(sch.get(loop).extent)
    return work
