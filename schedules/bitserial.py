"""Default schedule of the bit-serial ternary conv (``topi_ops.bitserial``), x86 and aarch64.

The lane-sum block ``tvmq_bitserial_lanes`` [N, O, OH, OW, K, L] is tiled by output channels
x output columns; its reduction (taps, words) runs outside the tile, so each step loads the
tile's activation words and mask pairs once and reuses them across the tile; the lane axis
(L bytes = one vector word) is vectorized, the tile unrolled, and the tile's accumulators are
local (registers). The lane sum, term shifts and requantization run right after each tile.
The outer loop (batch x channel tiles x rows) is parallel; the bit-plane packing of the
activations is a parallel loop nest of its own.
"""
from __future__ import annotations

import tvm
from tvm import s_tir

from schedules.elementwise import schedule_loop_nest
from topi_ops.bitserial import lane_dtype

VECTOR_BYTES = {"aarch64": 16}
REGISTERS = 28  # of the 32 NEON / AVX-512 vector registers, leave a few for temporaries


def _vector_bytes(target) -> int:
    triple = str(target.attrs.get("mtriple", "") or "") if target is not None else ""
    if triple.startswith("aarch64"):
        return 16
    has = tvm.target.codegen.llvm_cpu_has_features
    if target is not None and has("avx512bw", target):
        return 64
    return 32


def bitserial_tile(out_channels: int, width: int, terms: int, lanes: int, abits: int,
                   acc_bytes: int, vector_bytes: int = 16) -> tuple[int, int]:
    """(output channels, output columns) of the register tile: the most outputs whose
    accumulators (``terms`` x lanes each) plus the operands of one step (``abits`` words per
    column, 2 ``terms`` masks per channel) fit the vector registers."""
    def regs(nbytes):
        return -(-nbytes // vector_bytes)

    best, best_key = (1, 1), (0, 0)
    for ot in (1, 2, 3, 4, 6, 8):
        if out_channels % ot:
            continue
        for xt in range(1, 9):
            if width % xt:
                continue
            need = (ot * xt * terms * regs(lanes * acc_bytes) + xt * abits * regs(lanes)
                    + ot * 2 * terms * regs(lanes) + 2)
            # more outputs per step first, then the one reusing more loads
            key = (ot * xt, min(ot * 2 * terms, xt * abits))
            if need <= REGISTERS and key > best_key:
                best, best_key = (ot, xt), key
    return best


def schedule_bitserial_conv2d(sch: s_tir.Schedule, lanes_block, target: tvm.target.Target,
                              tile: tuple[int, int] | None = None) -> None:
    """Schedule ``tvmq_bitserial_lanes`` and its epilogue (see the module docstring)."""
    summed = sch.get_sblock("tvmq_bitserial_sum")
    out = sch.get_sblock("tvmq_bitserial_out")
    n, o, y, x, i, l, ry, rx, rw = sch.get_loops(lanes_block)
    ext = {name: int(sch.get(v).extent) for name, v in zip("oxilhwc", (o, x, i, l, ry, rx, rw))}
    pack_iters = sch.get(sch.get_sblock("tvmq_bitserial_data_pack")).iter_vars
    abits = int(pack_iters[5].dom.extent)
    acc_bytes = 2 if lane_dtype(ext["h"], ext["w"], ext["c"], abits) == "int16" else 4
    ot, xt = tile or bitserial_tile(ext["o"], ext["x"], ext["i"], ext["l"], abits, acc_bytes,
                                    _vector_bytes(target))
    oo, oi = sch.split(o, [None, ot])
    xo, xi = sch.split(x, [None, xt])
    sch.reorder(n, oo, y, xo, ry, rx, rw, oi, xi, i, l)
    outer = sch.fuse(n, oo, y)
    sch.parallel(outer)
    sch.reverse_compute_at(summed, xo)
    sch.reverse_compute_at(out, xo)
    if ext["l"] > 1:
        sch.vectorize(l)  # before decompose_reduction: vectorize needs the complete block
    init = sch.decompose_reduction(lanes_block, ry)
    if ext["l"] > 1:
        sch.vectorize(sch.get_loops(init)[-1])
    sch.unroll(i)
    sch.unroll(xi)
    sch.unroll(oi)
    sch.set_scope(init, 0, "local")
    schedule_loop_nest(sch, sch.get_sblock("tvmq_bitserial_data_pack"), target)


def scheduled_module(data_shape, packed, weight_shape, params, target) -> tvm.IRModule:
    """The standalone kernel as a scheduled IRModule (``main``): arguments are the int8 data
    ``data_shape``, the arrays of ``topi_ops.bitserial.pack_ternary`` (``packed``, numpy)
    and the int8 output. For tests, estimates and benchmarks."""
    from tvm import te

    from schedules.elementwise import SCHEDULED
    from topi_ops.bitserial import qconv2d_bitserial

    data = te.placeholder(tuple(data_shape), "int8", "data")
    consts = [te.placeholder(a.shape, str(a.dtype), f"packed{i}") for i, a in enumerate(packed)]
    out = qconv2d_bitserial(data, *consts, weight_shape, params, target)
    sch = s_tir.Schedule(te.create_prim_func([data, *consts, out]))
    schedule_bitserial_conv2d(sch, sch.get_sblock("tvmq_bitserial_lanes"), target)
    return tvm.IRModule({"main": sch.mod["main"].with_attr(SCHEDULED, True)})
