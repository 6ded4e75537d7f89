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


def schedule_input_transform(sch: s_tir.Schedule, pack, target: tvm.target.Target,
                             at=None) -> None:
    """``[N*16, TY, TX, C/2, 2]``: the 16 positions unrolled inside each tile, the channels
    vectorized; (image, tile row) shared out over the cores, or computed under the loop
    ``at`` (a row of tiles of the products)."""
    if at is not None:
        sch.compute_at(pack, at)
        bp, tx, cc, j = sch.get_loops(pack)[-4:]
        b, pos = sch.split(bp, [None, POSITIONS])
        sch.reorder(b, tx, pos, cc, j)
    else:
        bp, ty, tx, cc, j = sch.get_loops(pack)
        b, pos = sch.split(bp, [None, POSITIONS])
        sch.reorder(b, ty, tx, pos, cc, j)
        share_over_cores(sch, sch.fuse(b, ty), _work(sch, pack), target)
    sch.unroll(pos)
    sch.vectorize(sch.fuse(cc, j))


def schedule_output_transform(sch: s_tir.Schedule, out, target: tvm.target.Target,
                              at=None) -> None:
    """``[N, OH, OW, O]`` (with any epilogue inlined): the tile's 2 x 2 outputs unrolled,
    the output channels vectorized; (image, tile row) shared out, or computed under the
    loop ``at`` (a row of tiles of the products)."""
    if at is not None:
        sch.reverse_compute_at(out, at)
        i, x, oc = sch.get_loops(out)[-3:]
        tx, j = sch.split(x, [None, 2])
        sch.reorder(tx, i, j, oc)
    else:
        b, y, x, oc = sch.get_loops(out)
        ty, i = sch.split(y, [None, 2])
        tx, j = sch.split(x, [None, 2])
        sch.reorder(b, ty, tx, i, j, oc)
        share_over_cores(sch, sch.fuse(b, ty), _work(sch, out), target)
    sch.unroll(i)
    sch.unroll(j)
    sch.vectorize(oc)


def _work(sch: s_tir.Schedule, block) -> int:
    work = 1
    for loop in sch.get_loops(block):
        work *= int(sch.get(loop).extent)
    return work
