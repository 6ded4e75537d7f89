"""Default schedule of the bit-serial ternary conv (``topi_ops.bitserial``), x86 and aarch64.

The lane-sum block ``tvmq_bitserial_lanes`` [N, O, OH, OW, K, L/pairs] is tiled by output
channels x output columns; its reduction (taps, words) runs outside the tile, so each step
loads the tile's activation words and mask pairs once and reuses them across the tile; the
lane axis (one vector word) is vectorized (aarch64: tensorized with the NEON step
``and``/``eor``/``cnt``/``uadalp``), the tile unrolled, and the tile's accumulators are local
(registers). The lane sums (NEON ``uaddlv``), term shifts and requantization run right after
each tile.
The outer loop (batch x channel tiles x rows) is parallel; the bit-plane packing of the
activations is a parallel loop nest of its own.
"""
from __future__ import annotations

import tvm
from tvm import s_tir
from tvm.s_tir import TensorIntrin

from schedules.elementwise import schedule_loop_nest, stack_allocate
from topi_ops.bitserial import Layout, plane_sum, vector_bytes

REGISTERS = 28  # of the 32 NEON / AVX-512 vector registers, leave a few for temporaries
# (AVX2 has 16: 14 of them)


def bitserial_tile(out_channels: int, width: int, terms: int, lanes: int, abits: int,
                   acc_bytes: int, vector_bytes: int = 16, operand_bytes: int | None = None,
                   registers: int = REGISTERS) -> tuple[int, int]:
    """(output channels, output columns) of the register tile: the most outputs whose
    accumulators (``terms`` x lanes each) plus the operands of one step (``abits`` words per
    column, 2 ``terms`` masks per channel, each ``operand_bytes``) fit the vector registers."""
    def regs(nbytes):
        return -(-nbytes // vector_bytes)

    best, best_key = (1, 1), (0, 0)
    for ot in (1, 2, 3, 4, 6, 8):
        if out_channels % ot:
            continue
        for xt in range(1, 9):
            if width % xt:
                continue
            word = regs(operand_bytes or lanes)
            need = (ot * xt * terms * regs(lanes * acc_bytes) + xt * abits * word
                    + ot * 2 * terms * word + 2)
            # more outputs per step first, then the one reusing more loads
            key = (ot * xt, min(ot * 2 * terms, xt * abits))
            if need <= registers and key > best_key:
                best, best_key = (ot, xt), key
    return best


def _registers(target, operand_bytes: int) -> int:
    """Registers the tile may fill: 28 of 32 (NEON, AVX-512), 14 of 16 ymm (AVX2), and 12
    general-purpose registers when a word is one scalar (64 channels, x86 ``popcnt``): there
    the measured best is a 1 x 1 tile."""
    if _is_aarch64(target):
        return REGISTERS
    if operand_bytes <= 8:
        return 7  # measured on znver4: one output per step beat every larger tile
    return REGISTERS if vector_bytes(target) == 64 else 14


def neon_step_intrin(abits: int, lanes: int = 16) -> str:
    """The NEON step ``C[0:L/2] (uint16) += pairwise(sum_b cnt((a_b & s) ^ m) << b)`` over
    one word of ``L`` = 16 bytes (128 channels, q registers) or 8 bytes (64 channels, d
    registers): ``and``/``eor``/``cnt`` per plane, ``shl``/``add`` to combine the planes, then
    one ``uadalp`` (pairwise add-accumulate into L/2 uint16 lanes). Registered on first use,
    one per (``abits``, L); abits at most 5 (the byte value must fit uint8).

    The description pairs byte lanes ``j`` and ``j + L/2`` (what the compute says), ``uadalp``
    pairs ``2j`` and ``2j + 1``: the lanes hold other partial sums, but the only reader of
    the lanes is the epilogue, which adds all of them, so the result is exactly the same."""
    name = f"tvmq_bitserial_step_neon_a{abits}_l{lanes}"
    half = lanes // 2
    if name in _REGISTERED:
        return name
    from tvm.script import tirx as T

    def inner(A, M, lane):
        return plane_sum(lambda p: A[p, lane], lambda s: M[s, lane], abits, "uint8")

    @T.prim_func(s_tir=True)
    def desc(A: T.Buffer((abits, lanes), "uint8", offset_factor=1),
             M: T.Buffer((2, lanes), "uint8", offset_factor=1),
             C: T.Buffer((half,), "uint16", offset_factor=1)) -> None:
        with T.sblock("root"):
            T.reads(C[0:half], A[0:abits, 0:lanes], M[0:2, 0:lanes])
            T.writes(C[0:half])
            for j in T.serial(0, half):
                for q in T.serial(0, 2):
                    with T.sblock("update"):
                        vj, vq = T.axis.remap("SR", [j, q])
                        C[vj] = C[vj] + T.Cast("uint16", inner(A, M, vq * half + vj))

    u8 = f"uint8x{lanes}"

    def vec_inner(A, M):
        support, minus = M.vload([0, 0], u8), M.vload([1, 0], u8)
        value = None
        for p in range(abits):
            d = T.popcount((A.vload([p, 0], u8) & support) ^ minus)
            if p:
                d = d << T.broadcast(T.uint8(p), lanes)
            value = d if value is None else value + d
        return value

    uaddlp = f"llvm.aarch64.neon.uaddlp.v{half}i16.v{lanes}i8"

    @T.prim_func(s_tir=True)
    def impl(A: T.Buffer((abits, lanes), "uint8", offset_factor=1),
             M: T.Buffer((2, lanes), "uint8", offset_factor=1),
             C: T.Buffer((half,), "uint16", offset_factor=1)) -> None:
        with T.sblock("root"):
            T.reads(C[0:half], A[0:abits, 0:lanes], M[0:2, 0:lanes])
            T.writes(C[0:half])
            C[T.ramp(T.int32(0), 1, half)] = C[T.ramp(T.int32(0), 1, half)] + \
                T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id(uaddlp), vec_inner(A, M),
                                        dtype=f"uint16x{half}")

    TensorIntrin.register(name, desc, impl, override=True)
    _REGISTERED.add(name)
    return name


_REGISTERED: set = set()


def neon_hsum_intrin(half: int) -> str:
    """``C[0] (int32) += sum_l A[0:half] (uint16)``: one NEON ``uaddlv`` (add across the
    lanes, widening), the epilogue's horizontal sum of a term's accumulator."""
    name = f"tvmq_bitserial_hsum_neon_u16x{half}"
    if name in _REGISTERED:
        return name
    from tvm.script import tirx as T

    @T.prim_func(s_tir=True)
    def desc(A: T.Buffer((half,), "uint16", offset_factor=1),
             C: T.Buffer((1,), "int32", offset_factor=1)) -> None:
        with T.sblock("root"):
            T.reads(C[0:1], A[0:half])
            T.writes(C[0:1])
            for l in T.serial(0, half):
                with T.sblock("update"):
                    vl = T.axis.remap("R", [l])
                    C[0] = C[0] + T.Cast("int32", A[vl])

    intrin = f"llvm.aarch64.neon.uaddlv.i32.v{half}i16"

    @T.prim_func(s_tir=True)
    def impl(A: T.Buffer((half,), "uint16", offset_factor=1),
             C: T.Buffer((1,), "int32", offset_factor=1)) -> None:
        with T.sblock("root"):
            T.reads(C[0:1], A[0:half])
            T.writes(C[0:1])
            C[0] = C[0] + T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id(intrin),
                                                  A.vload([0], f"uint16x{half}"), dtype="int32")

    TensorIntrin.register(name, desc, impl, override=True)
    _REGISTERED.add(name)
    return name


def _is_aarch64(target) -> bool:
    return target is not None and str(target.attrs.get("mtriple", "") or "").startswith("aarch64")


def schedule_bitserial_conv2d(sch: s_tir.Schedule, lanes_block, target: tvm.target.Target,
                              tile: tuple[int, int] | None = None) -> None:
    """Schedule ``tvmq_bitserial_lanes`` and its epilogue (see the module docstring)."""
    summed = sch.get_sblock("tvmq_bitserial_sum")
    out = sch.get_sblock("tvmq_bitserial_out")
    n, o, y, x, i, j, ry, rx, rw, rq = sch.get_loops(lanes_block)
    ext = {name: int(sch.get(v).extent)
           for name, v in zip("oxijhwcq", (o, x, i, j, ry, rx, rw, rq))}
    pack_iters = sch.get(sch.get_sblock("tvmq_bitserial_data_pack")).iter_vars
    abits = int(pack_iters[5].dom.extent)
    fields = str(sch.get(lanes_block).annotations["tvmq_bitserial_layout"]).split("/")
    lay = Layout(*(int(f) for f in fields[:4]), *fields[4:])
    lanes, word_bytes = lay.lanes, lay.word_bits // 8
    neon = (_is_aarch64(target) and lay.word_bits == 8 and lanes in (8, 16) and lay.pairs == 2
            and lay.acc == "uint16" and lay.inner == "uint8")
    acc_bytes = tvm.runtime.DataType(lay.acc).bits // 8
    ot, xt = tile or bitserial_tile(ext["o"], ext["x"], ext["i"], lanes // lay.pairs, abits,
                                    acc_bytes, vector_bytes(target),
                                    operand_bytes=lanes * word_bytes,
                                    registers=_registers(target, lanes * word_bytes))
    oo, oi = sch.split(o, [None, ot])
    xo, xi = sch.split(x, [None, xt])
    if neon:
        sch.reorder(n, oo, y, xo, ry, rx, rw, oi, xi, i, j, rq)
    else:
        sch.reorder(n, oo, y, xo, ry, rx, rw, rq, oi, xi, i, j)
    outer = sch.fuse(n, oo, y)
    sch.parallel(outer)
    sch.reverse_compute_at(summed, xo)
    sch.reverse_compute_at(sch.get_sblock("tvmq_bitserial_terms"), xo)
    sch.reverse_compute_at(out, xo)
    if not neon and ext["j"] > 1:
        sch.vectorize(j)  # before decompose_reduction: vectorize needs the complete block
    init = sch.decompose_reduction(lanes_block, ry)
    if ext["j"] > 1:
        sch.vectorize(sch.get_loops(init)[-1])
    if neon:
        sch.tensorize(j, neon_step_intrin(abits, lanes))
        sum_init = sch.decompose_reduction(summed, sch.get_loops(summed)[-1])
        sch.tensorize(sch.get_loops(summed)[-1], neon_hsum_intrin(lanes // 2))
        sch.unroll(sch.get_loops(sum_init)[-1])
    else:
        sch.unroll(rq)
    sch.unroll(i)
    sch.unroll(xi)
    sch.unroll(oi)
    schedule_loop_nest(sch, sch.get_sblock("tvmq_bitserial_data_pack"), target)
    stack_allocate(sch, init)


def scheduled_module(data_shape, packed, weight_shape, params, target,
                     tile: tuple[int, int] | None = None) -> tvm.IRModule:
    """The standalone kernel as a scheduled IRModule (``main``): arguments are the int8 data
    ``data_shape``, the arrays of ``topi_ops.bitserial.pack_ternary`` (``packed``, numpy)
    and the int8 output; ``tile`` overrides the register tile. For tests, estimates and
    benchmarks."""
    from tvm import te

    from schedules.elementwise import SCHEDULED
    from topi_ops.bitserial import qconv2d_bitserial

    data = te.placeholder(tuple(data_shape), "int8", "data")
    consts = [te.placeholder(a.shape, str(a.dtype), f"packed{i}") for i, a in enumerate(packed)]
    out = qconv2d_bitserial(data, *consts, weight_shape, params, target)
    sch = s_tir.Schedule(te.create_prim_func([data, *consts, out]))
    schedule_bitserial_conv2d(sch, sch.get_sblock("tvmq_bitserial_lanes"), target, tile)
    return tvm.IRModule({"main": sch.mod["main"].with_attr(SCHEDULED, True)})
