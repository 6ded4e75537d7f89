"""Default schedules of the shift-add power-of-two conv (``topi_ops/shiftadd.py``), x86 and
aarch64 alike.

Dense (``tvmq_shiftadd``): a register tile of ``cols`` output columns x one block of output
channels (8 lanes; 16 int32 lanes with AVX-512); for each reduction step the block's three
constant vectors (shift, sign mask, nonzero mask) are loaded once and every column
broadcasts one input value: ``vpsllvd``/``sshl``, xor, and, add per column. The outer
(image, channel block, row) loop runs in parallel over the cores; the requantize epilogue
runs on the tile right after it, vectorized. Grouped/depthwise (``tvmq_shiftadd_grouped``):
a vector of output columns per (channel, row), one shift for the vector.

The rules register themselves in ``schedules.default.RULES`` (imported by
``relay_passes.lower_pot``) and as MetaSchedule custom rules (one design space: this one).
"""
from __future__ import annotations

import tvm
from tvm import s_tir

from schedules.default import RULES
from schedules.elementwise import schedule_loop_nest, stack_allocate

MAX_COLS = 8  # accumulator vectors of a tile (+ 3 constant vectors + temporaries <= 16)
VECTOR = 16  # output columns per vector in the grouped kernel (at most)


def _cols(width: int, limit: int) -> int:
    return max(t for t in range(1, limit + 1) if width % t == 0)


def schedule_shiftadd(sch: s_tir.Schedule, acc, target: tvm.target.Target,
                      cols: int | None = None) -> None:
    requant = sch.get_sblock("tvmq_shiftadd_requant")
    n, ob, y, x, oi, ry, rx, rc = sch.get_loops(acc)
    block = int(sch.get(oi).extent)
    limit = MAX_COLS if block * 4 <= 32 else 4  # 16 int32 lanes: zmm on AVX-512 (32 regs)
    cols = cols or _cols(int(sch.get(x).extent), limit)
    xo, xi = sch.split(x, [None, cols])
    sch.reorder(n, ob, y, xo, ry, rx, rc, xi, oi)
    sch.parallel(sch.fuse(n, ob, y))
    sch.reverse_compute_at(requant, xo)
    sch.vectorize(sch.get_loops(requant)[-1])
    sch.vectorize(oi)  # before decompose_reduction: vectorize needs the complete block
    sch.unroll(xi)
    init = sch.decompose_reduction(acc, ry)
    sch.vectorize(sch.get_loops(init)[-1])
    for name in ("tvmq_shiftadd_pad", "tvmq_shiftadd_unpack"):
        schedule_loop_nest(sch, sch.get_sblock(name), target)
    stack_allocate(sch, init)


def schedule_shiftadd_grouped(sch: s_tir.Schedule, acc, target: tvm.target.Target) -> None:
    requant = sch.get_sblock("tvmq_shiftadd_grouped_requant")
    n, oc, y, x, rc, ry, rx = sch.get_loops(acc)
    xo, xi = sch.split(x, [None, _cols(int(sch.get(x).extent), VECTOR)])
    sch.reorder(n, oc, y, xo, rc, ry, rx, xi)
    sch.parallel(sch.fuse(n, oc, y))
    sch.reverse_compute_at(requant, xo)
    sch.vectorize(sch.get_loops(requant)[-1])
    sch.vectorize(xi)
    init = sch.decompose_reduction(acc, rc)
    sch.vectorize(sch.get_loops(init)[-1])
    schedule_loop_nest(sch, sch.get_sblock("tvmq_shiftadd_pad"), target)
    stack_allocate(sch, init)


RULES.update({"tvmq_shiftadd": schedule_shiftadd,
              "tvmq_shiftadd_grouped": schedule_shiftadd_grouped})


def _space(rule):
    def space(sch: s_tir.Schedule, block) -> list[s_tir.Schedule]:
        from schedules.targets import host_target

        target = tvm.target.Target.current(allow_none=True) or host_target()
        sch = sch.copy()
        rule(sch, block, target)
        return [sch]
    return space


for _key in ("cpu", "arm_cpu"):
    for _name, _rule in (("tvmq_shiftadd", schedule_shiftadd),
                         ("tvmq_shiftadd_grouped", schedule_shiftadd_grouped)):
        tvm.register_global_func(f"s_tir.meta_schedule.{_key}.{_name}", _space(_rule),
                                 override=True)
