"""Tensor intrinsics of tvmq's integer kernels.

``tvmq_dot_16x2_i16_avx512vnni``: ``C[0:16] += A[0:2] . B[0:16, 0:2]``, one AVX-512 VNNI
``vpdpwssd`` (the same exact int16-pair dot product, fused with the accumulation, on 16
lanes). ``tvmq_dot_16x4_u8i8_avx512vnni``: ``C[0:16] += A[0:4] . B[0:16, 0:4]`` with u8 A
and s8 B, one ``vpdpbusd`` (exact: four u8 x s8 products summed in int32). The LLVM bundled
with TVM 0.27 wants their operands as ``<32 x i16>`` / ``<64 x i8>`` (older LLVMs took
``<16 x i32>``; TVM's own shipped ``vpdpbusd`` intrinsic still passes those and fails).
``tvmq_dot_8x4_u8i8_avxvnni``: the same on 8 lanes, one 256-bit ``vpdpbusd`` (AVX-VNNI).
``tvmq_dot_8x4_i8_sdot``: ``C[0:8] += A[0:4] . B[0:8, 0:4]`` on s8, two ARMv8.2 ``sdot``
(each: 4 int32 lanes += a 4-byte dot product), for the Pi 5's Cortex-A76.

``tvmq_dot_8x2_i16_avx2``: ``C[0:8] += A[0:2] . B[0:8, 0:2]`` on int16 inputs and int32
accumulators, one ``vpmaddwd`` (exact: each int32 lane is the sum of two int16 x int16
products, which cannot overflow) plus one ``vpaddd``.

``tvmq_dot_8x4_u8i8_avx2``: ``C[0:8] += A[0:4] . B[0:8, 0:4]`` with u8 A and s8 B, for AVX2
hosts without VNNI: ``vpmaddubsw`` (u8 x s8, adjacent products summed into int16 with
saturation), ``vpmaddwd`` by ones (int16 pairs -> int32) and ``vpaddd``; twice the products
of ``vpmaddwd`` per instruction. Exact ONLY when A <= 127 (an int8 input known to be >= 0,
``Conv2dParams.nonneg``): a pair sum then lies in [2*127*(-128), 2*127*127] = [-32512,
32258], inside int16. It is wrong for full-range u8 (or int8 + 128) operands, where it
saturates.

``tvmq_dot_8x4_i8_smull_sadalp``: the same step on s8 for the Pi 4's Cortex-A72 (no dot
product): per half block, 8-bit ``smull`` + ``smlal`` (two products per int16 lane) then
``sadalp`` into 4 int32 lanes; exact only where two products fit an int16 lane: A in
[0, 127] (|lane| <= 2*127*128) or no B of -128 (2*128*127; ``topi_ops.conv2d.conv_layout``).

AMX-INT8 (``tdpbusd`` on tile registers) is no per-vector intrinsic: a whole conv row is one,
made per conv geometry, in ``schedules.amx``.
"""
from __future__ import annotations

from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T

DOT_8X2_AVX2 = "tvmq_dot_8x2_i16_avx2"
DOT_16X2_VNNI = "tvmq_dot_16x2_i16_avx512vnni"
DOT_16X4_VNNI = "tvmq_dot_16x4_u8i8_avx512vnni"
DOT_8X4_AVXVNNI = "tvmq_dot_8x4_u8i8_avxvnni"
DOT_8X4_SDOT = "tvmq_dot_8x4_i8_sdot"
DOT_8X4_AVX2 = "tvmq_dot_8x4_u8i8_avx2"


def _dot_desc(lanes: int, group: int, a_dtype: str, b_dtype: str):
    """What every intrinsic here computes: ``C[0:lanes] += A[0:group] . B[0:lanes, 0:group]``."""

    @T.prim_func(s_tir=True)
    def desc(A: T.Buffer((group,), a_dtype, offset_factor=1),
             B: T.Buffer((lanes, group), b_dtype, offset_factor=1),
             C: T.Buffer((lanes,), "int32", offset_factor=1)) -> None:
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:group], B[0:lanes, 0:group])
            T.writes(C[0:lanes])
            for i in T.serial(0, lanes):
                for k in T.serial(0, group):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, k])
                        C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[vi, vk], "int32")

    return desc


def _broadcast(part, word: str, lanes: int, dtype: str):
    """``part`` of A (e.g. its four bytes) as one ``word`` broadcast to ``lanes``, seen as
    ``dtype``. The intrinsics are written as single expressions, no named temporaries: TVM
    0.27 makes every binding in a tensor intrinsic an ``alloc_local``, a heap workspace
    allocated and freed in every parallel task (ResNet-18 1 % faster without them)."""
    return T.reinterpret(T.broadcast(T.reinterpret(part, dtype=word), lanes), dtype=dtype)


def _dot(lanes: int, group: int, a_dtype: str, b_dtype: str, llvm_intrinsic: str,
         fused: bool):
    """(description, implementation): A's group broadcast to every lane (as one 32-bit word),
    one x86 multiply-add instruction; ``fused`` when it also accumulates (vpdpwssd,
    vpdpbusd), else a vector add follows (vpmaddwd)."""
    ab = f"{b_dtype}x{group * lanes}"  # LLVM's operand type (bytes are i8 either way)

    def a_word(A):  # A's group broadcast to every lane
        return _broadcast(A.vload([0], f"{a_dtype}x{group}"), "int32", lanes, ab)

    def b_row(B):
        return B.vload([0, 0], dtype=ab)

    @T.prim_func(s_tir=True)
    def impl(A: T.Buffer((group,), a_dtype, offset_factor=1),
             B: T.Buffer((lanes, group), b_dtype, offset_factor=1),
             C: T.Buffer((lanes,), "int32", offset_factor=1)) -> None:
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:group], B[0:lanes, 0:group])
            T.writes(C[0:lanes])
            if fused:
                C[T.ramp(T.int32(0), 1, lanes)] = T.call_llvm_pure_intrin(
                    T.llvm_lookup_intrinsic_id(llvm_intrinsic), C[T.ramp(T.int32(0), 1, lanes)],
                    a_word(A), b_row(B), dtype=f"int32x{lanes}")
            else:
                C[T.ramp(T.int32(0), 1, lanes)] += T.call_llvm_pure_intrin(
                    T.llvm_lookup_intrinsic_id(llvm_intrinsic), a_word(A), b_row(B),
                    dtype=f"int32x{lanes}")

    return _dot_desc(lanes, group, a_dtype, b_dtype), impl


TensorIntrin.register(DOT_8X2_AVX2, *_dot(8, 2, "int16", "int16", "llvm.x86.avx2.pmadd.wd",
                                         False), override=True)
TensorIntrin.register(DOT_16X2_VNNI, *_dot(16, 2, "int16", "int16",
                                           "llvm.x86.avx512.vpdpwssd.512", True), override=True)
TensorIntrin.register(DOT_16X4_VNNI, *_dot(16, 4, "uint8", "int8",
                                           "llvm.x86.avx512.vpdpbusd.512", True), override=True)
# AVX-VNNI (VEX, 256-bit) shares LLVM's 256-bit vpdpbusd intrinsic with AVX-512 VNNI + VL
TensorIntrin.register(DOT_8X4_AVXVNNI, *_dot(8, 4, "uint8", "int8",
                                             "llvm.x86.avx512.vpdpbusd.256", True), override=True)


@T.prim_func(s_tir=True)
def _dot_8x4_avx2(A: T.Buffer((4,), "uint8", offset_factor=1),
                  B: T.Buffer((8, 4), "int8", offset_factor=1),
                  C: T.Buffer((8,), "int32", offset_factor=1)) -> None:
    with T.sblock("root"):
        T.reads(C[0:8], A[0:4], B[0:8, 0:4])
        T.writes(C[0:8])
        C[T.ramp(T.int32(0), 1, 8)] += T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"),
            T.call_llvm_pure_intrin(  # u8 x s8 pair sums, int16: exact for A <= 127
                T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.ub.sw"),
                _broadcast(A.vload([0], "uint8x4"), "int32", 8, "uint8x32"),
                B.vload([0, 0], dtype="int8x32"), dtype="int16x16"),
            T.broadcast(T.int16(1), 16), dtype="int32x8")


TensorIntrin.register(DOT_8X4_AVX2, _dot_desc(8, 4, "uint8", "int8"), _dot_8x4_avx2,
                      override=True)


@T.prim_func(s_tir=True)
def _dot_8x4_sdot(A: T.Buffer((4,), "int8", offset_factor=1),
                  B: T.Buffer((8, 4), "int8", offset_factor=1),
                  C: T.Buffer((8,), "int32", offset_factor=1)) -> None:
    with T.sblock("root"):
        T.reads(C[0:8], A[0:4], B[0:8, 0:4])
        T.writes(C[0:8])
        for half in T.unroll(2):
            C[T.ramp(half * 4, 1, 4)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.aarch64.neon.sdot.v4i32.v16i8"),
                C[T.ramp(half * 4, 1, 4)], B.vload([half * 4, 0], dtype="int8x16"),
                _broadcast(A.vload([0], "int8x4"), "int32", 4, "int8x16"), dtype="int32x4")


TensorIntrin.register(DOT_8X4_SDOT, _dot_desc(8, 4, "int8", "int8"), _dot_8x4_sdot,
                      override=True)


# ------------------------------------------------------------ Cortex-A72: 8-bit smull/smlal
DOT_8X4_NEON_S8 = "tvmq_dot_8x4_i8_smull_sadalp"

_SMULL = "llvm.aarch64.neon.smull.v8i16"
_SADDLP = "llvm.aarch64.neon.saddlp.v4i32.v8i16"


def _byte_pairs(B, pair: int):
    """Byte pair ``pair`` (k0 k1, or k2 k3) of each of B's 8 rows, as 16 bytes."""
    w = T.reinterpret(B.vload([0, 0], dtype="int8x32"), dtype="int16x16")
    return T.reinterpret(T.Shuffle([w], list(range(pair, 16, 2))), dtype="int8x16")


def _a_pair(A, first: int):
    """A's byte pair (a[first], a[first + 1]) broadcast to 8 int16 lanes, as 16 bytes."""
    return _broadcast(A.vload([first], "int8x2"), "int16", 8, "int8x16")


def _half(v, lo: int):
    """Bytes lo..lo+7 of a 16-byte vector (smull's low or high half)."""
    return T.Shuffle([v], list(range(lo, lo + 8)))


@T.macro
def _smull_smlal_sadalp(C, c0, A, B, lo):
    # int16 lane 2i+j = w[c0+i, j] a[j] + w[c0+i, j+2] a[j+2] (smull + smlal), within
    # 2 * 128 * 127 because a >= 0 or no w is -128 (conv_layout); sadalp: int32 lane i +=
    # int16 lanes 2i, 2i+1
    C[T.ramp(c0, 1, 4)] = C[T.ramp(c0, 1, 4)] + T.call_llvm_pure_intrin(
        T.llvm_lookup_intrinsic_id(_SADDLP),
        T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id(_SMULL), _half(_byte_pairs(B, 0), lo),
                                _half(_a_pair(A, 0), lo), dtype="int16x8")
        + T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id(_SMULL), _half(_byte_pairs(B, 1), lo),
                                  _half(_a_pair(A, 2), lo), dtype="int16x8"),
        dtype="int32x4")


@T.prim_func(s_tir=True)
def _dot_8x4_smull(A: T.Buffer((4,), "int8", offset_factor=1),
                   B: T.Buffer((8, 4), "int8", offset_factor=1),
                   C: T.Buffer((8,), "int32", offset_factor=1)) -> None:
    with T.sblock("root"):
        T.reads(C[0:8], A[0:4], B[0:8, 0:4])
        T.writes(C[0:8])
        # A's byte pairs (a0 a1), (a2 a3), each broadcast to 8 int16 lanes; B's rows
        # (i, k0..k3) deinterleaved by byte pair (one ld2 .8h): (i, k0 k1) and (i, k2 k3)
        # for i = 0..7 (LLVM computes each operand once: they are pure expressions)
        _smull_smlal_sadalp(C, 0, A, B, 0)  # smull + smlal, lanes 0..3
        _smull_smlal_sadalp(C, 4, A, B, 8)  # smull2 + smlal2, lanes 4..7


TensorIntrin.register(DOT_8X4_NEON_S8, _dot_desc(8, 4, "int8", "int8"), _dot_8x4_smull,
                      override=True)
