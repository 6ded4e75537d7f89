"""Schedule of grouped and depthwise int8 convs (``topi_ops.conv2d`` ``tvmq_conv_grouped_acc``):
a direct loop nest on NHWC whose output channels are the vector lanes.

Each step multiplies a vector of input channels (one per output channel of the group, one
load, contiguous in NHWC) by a vector of weights (``[KH, KW, C/groups, O]``, one load) in
int16 (exact: |int8 x int8| <= 2^14) and widens into int32 accumulators: ``cols`` output
columns x ``lanes`` channels stay in registers over the taps and the group's channels, the
requantization runs on that tile, rows are shared out over the cores.
"""
from __future__ import annotations

from dataclasses import dataclass

from tvm import s_tir

from schedules.elementwise import inline_epilogue, schedule_loop_nest, stack_allocate

LANE_CHOICES = (32, 16, 8)


@dataclass(frozen=True)
class GroupedSchedule:
    """``lanes`` output channels per vector, ``cols`` output columns per register tile."""

    lanes: int
    cols: int


def grouped_schedules(channels: int, width: int) -> list[GroupedSchedule]:
    """The tuning space: lanes dividing the channels (or all of them when few) x columns."""
    lanes = [v for v in LANE_CHOICES if channels % v == 0] or [channels]
    return [GroupedSchedule(v, c) for v in lanes for c in range(1, 9) if width % c == 0
            and v * c <= 128]


def default_grouped(channels: int, width: int, target) -> GroupedSchedule:
    """16 int32 lanes (one zmm, two ymm) and up to 4 columns: 64 accumulator lanes."""
    lanes = next((v for v in (16, 8, 32) if channels % v == 0), channels)
    return GroupedSchedule(lanes, max(c for c in range(1, 5) if width % c == 0))


def grouped_extents(sch: s_tir.Schedule, conv) -> tuple[int, int]:
    """(output channels, output width) of the grouped conv block."""
    _n, _y, x, oc, *_ = sch.get_loops(conv)
    return int(sch.get(oc).extent), int(sch.get(x).extent)


def schedule_conv_grouped(sch: s_tir.Schedule, conv, target,
                          choice: GroupedSchedule | None = None) -> None:
    requant = sch.get_sblock("tvmq_conv_grouped_requant")
    names = {sch.get(b).name_hint: b for b in sch.get_child_blocks(sch.get_sblock("root"))}
    inline_epilogue(sch, names.get("tvmq_conv_to_nchw", requant))
    n, y, x, oc, ry, rx, rc = sch.get_loops(conv)
    choice = choice or default_grouped(*grouped_extents(sch, conv), target)
    oco, oci = sch.split(oc, [None, choice.lanes])
    xo, xi = sch.split(x, [None, choice.cols])
    sch.reorder(n, y, xo, oco, ry, rx, rc, xi, oci)
    sch.parallel(sch.fuse(n, y))
    sch.reverse_compute_at(requant, oco)
    sch.vectorize(sch.get_loops(requant)[-1])
    sch.vectorize(oci)  # before decompose_reduction: vectorize needs the complete block
    init = sch.decompose_reduction(conv, ry)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.unroll(xi)
    for name in ("tvmq_conv_pad", "tvmq_conv_to_nhwc", "tvmq_conv_to_nchw"):
        if name in names:
            schedule_loop_nest(sch, names[name], target)
    stack_allocate(sch, init)
