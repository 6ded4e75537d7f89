"""Default schedule for tvmq's memory-bound kernels (quantize, add, ReLU, pools, reshapes):
inline injective producers, parallelize the fused outer spatial loops over the cores,
vectorize the innermost. Untouched, TE emits one serial scalar loop nest per op."""
from __future__ import annotations

import numpy as np
import tvm
from tvm import s_tir, tirx

from schedules.targets import cores_of

SCHEDULED = "tir.is_scheduled"
TUNED = "tirx.is_scheduled"  # what MetaSchedule marks a function it scheduled from a database


def is_scheduled(func) -> bool:
    """Scheduled already: by a default schedule or from a tuning database."""
    attrs = func.attrs or {}
    return bool(attrs.get(SCHEDULED, False) or attrs.get(TUNED, False))


VECTOR = 16  # int8/int32 lanes per chunk: a multiple of the NEON and AVX2 widths
# below this many loop iterations (a few microseconds of vector work) a kernel runs on one
# core: waking the pool and waiting at its barrier costs more than it saves
PARALLEL_MIN_WORK = 1 << 15
REDUCE_VECTOR = 8  # output columns computed together by a pooling window loop (at least)
VECTOR_BYTES = 64  # widest vector register (AVX-512); narrower targets split it


def inline_epilogue(sch: s_tir.Schedule, block) -> None:
    """Run the elementwise kernels fused after a conv (``relay_passes.fuse_epilogues``: a
    residual add) inside ``block``, its requantize epilogue: the add then reads the conv's
    int8 value from the register tile, not from memory."""
    while consumers := sch.get_consumers(block):
        for consumer in consumers:
            sch.reverse_compute_inline(consumer)


def stack_allocate(sch: s_tir.Schedule, block, index: int = 0) -> None:
    """Give the accumulator tile ``block`` writes (its ``index``-th buffer) "global" scope,
    the last step of a schedule (the conv-pairs schedule's ``compute_at`` of its pack wants
    the tile "local" until then; the other schedules never need "local"). TVM 0.27's
    LowerTVMBuiltin keeps a constant allocation under 1 KB on the stack only in "global"
    scope; a "local" one becomes a heap workspace (TVMBackendAllocWorkspace) in every
    parallel task, and LLVM keeps every store to it: the tile is zeroed in memory and
    written back there before each epilogue reads it. Allocated where the tile's loops meet,
    inside the parallel task, the buffer stays one per thread. ResNet-18's stem 2 %, its
    64-channel 3x3 convs 1 % faster (AMD EPYC znver4, interleaved)."""
    sch.set_scope(block, index, "global")


def schedule_loop_nest(sch: s_tir.Schedule, block, target: tvm.target.Target) -> None:
    """Fuse the leading spatial loops of ``block``, vectorize their tail when the block is
    purely elementwise, and parallelize the rest over the target's cores."""
    loops = sch.get_loops(block)
    kinds = [iv.iter_type for iv in sch.get(block).iter_vars]
    if len(loops) != len(kinds) or not loops:
        return  # not a plain loop nest: leave it as TE wrote it
    n_spatial = next((i for i, k in enumerate(kinds) if k != tirx.IterVar.DataPar), len(kinds))
    if n_spatial == 0:
        return
    work = int(np.prod([int(sch.get(lp).extent) for lp in loops]))

    def share(loop) -> None:
        share_over_cores(sch, loop, work, target)

    if n_spatial == len(kinds) >= 2 and (gather := _transposed_read(sch, block, loops)):
        # a layout change whose output rows are shorter than a vector (NCHW RGB -> NHWC):
        # the short output loop unrolled inside the loop along the input's rows, which is
        # left to LLVM's loop vectorizer: it loads each input row as whole vectors and
        # interleaves them into whole-vector stores (vpermt2b, NEON st3). TVM's vectorize
        # of either loop scatters or gathers single bytes (ResNet-18's input quantize:
        # 47 us vectorized along the rows, 17.5 us so)
        rest = [lp for lp in loops[:-1] if lp != gather]
        sch.reorder(*rest, gather, loops[-1])
        sch.unroll(loops[-1])
        if rest:
            share(sch.fuse(*rest) if len(rest) > 1 else rest[0])
        return
    width = int(sch.get(loops[n_spatial - 1]).extent)
    if n_spatial == len(kinds) >= 2:
        # elementwise: vectorize the shortest run of innermost loops that fills a vector and
        # parallelize the rest; fusing the whole nest would make every index a div/mod chain
        inner_n, inner = 1, int(sch.get(loops[-1]).extent)
        while inner % REDUCE_VECTOR and inner_n < len(loops) - 1:
            inner_n += 1
            inner *= int(sch.get(loops[-inner_n]).extent)
        if inner % REDUCE_VECTOR == 0:
            tail = sch.fuse(*loops[-inner_n:]) if inner_n > 1 else loops[-1]
            outer = sch.fuse(*loops[:-inner_n]) if len(loops) - inner_n > 1 else loops[0]
            lanes = VECTOR if inner % VECTOR == 0 else REDUCE_VECTOR
            sch.vectorize(sch.split(tail, [None, lanes])[1])
            share(outer)
            return
    if n_spatial < len(kinds) and n_spatial >= 2 and width % REDUCE_VECTOR == 0:
        # a window reduction (pooling): the window loops go outside a vector of columns
        outer = sch.fuse(*loops[:n_spatial - 1]) if n_spatial > 2 else loops[0]
        # one vector register of output columns (NHWC channels): 64 int8 on AVX-512
        lanes = max(v for v in (REDUCE_VECTOR, 16, 32, 64) if width % v == 0
                    and v * _bytes(sch, block) <= VECTOR_BYTES)
        xo, xi = sch.split(loops[n_spatial - 1], [None, lanes])
        sch.reorder(xo, *loops[n_spatial:], xi)
        sch.vectorize(xi)
        share(outer)
        return
    fused = sch.fuse(*loops[:n_spatial]) if n_spatial > 1 else loops[0]
    extent = int(sch.get(fused).extent)
    if n_spatial == len(kinds) and extent >= 4 * VECTOR and extent % VECTOR == 0:
        fused, inner = sch.split(fused, [None, VECTOR])
        sch.vectorize(inner)
    share(fused)


def share_over_cores(sch: s_tir.Schedule, loop, work: int, target) -> None:
    """Parallelize ``loop`` over the target's cores when there is enough work for each (at
    least ``PARALLEL_MIN_WORK`` iterations in all, two iterations of ``loop`` per core)."""
    cores = cores_of(target)
    if work >= PARALLEL_MIN_WORK and int(sch.get(loop).extent) >= 2 * cores:
        sch.parallel(loop)


def _bytes(sch: s_tir.Schedule, block) -> int:
    return tvm.DataType(str(sch.get(block).writes[0].source.dtype)).bits // 8


def _transposed_read(sch: s_tir.Schedule, block, loops):
    """The loop that indexes the innermost axis of the block's (only) input, when that is
    not the output's innermost loop and the output's innermost extent is under a vector."""
    stmt = sch.get(block)
    if len(stmt.reads) != 1 or int(sch.get(loops[-1]).extent) >= REDUCE_VECTOR:
        return None
    inner = stmt.reads[0].region[-1].min
    for var, loop in zip(stmt.iter_vars, loops):
        if inner.same_as(var.var) and loop != loops[-1]:
            return loop if int(sch.get(loop).extent) % REDUCE_VECTOR == 0 else None
    return None


def schedule_memory_bound(func: tirx.PrimFunc, target: tvm.target.Target) -> tirx.PrimFunc:
    sch = s_tir.Schedule(func)
    for block in sch.get_child_blocks(sch.get_sblock("root"))[:-1]:
        try:
            sch.compute_inline(block)
        except s_tir.ScheduleError:  # a reduction producer (pool sum) keeps its loop nest
            pass
    for block in sch.get_child_blocks(sch.get_sblock("root")):
        schedule_loop_nest(sch, block, target)
    return sch.mod["main"].with_attr(SCHEDULED, True)


def apply_memory_bound_schedules(mod: tvm.IRModule, target) -> tvm.IRModule:
    """Schedule every PrimFunc of ``mod`` not scheduled yet with :func:`schedule_memory_bound`."""
    for gv, func in list(mod.functions_items()):
        if isinstance(func, tirx.PrimFunc) and not is_scheduled(func):
            mod[gv] = schedule_memory_bound(func, target)
    return mod
