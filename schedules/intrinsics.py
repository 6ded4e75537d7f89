"""Tensor intrinsics of tvmq's integer kernels.

``tvmq_dot_16x2_i16_avx512vnni``: ``C[0:16] += A[0:2] . B[0:16, 0:2]``, one AVX-512 VNNI
``vpdpwssd`` (the same exact int16-pair dot product, fused with the accumulation, on 16
lanes). The LLVM bundled with TVM 0.27 wants its operands as ``<32 x i16>`` (older LLVMs took
``<16 x i32>``; the shipped ``vpdpbusd`` intrinsic of TVM still passes those and fails).

``tvmq_dot_8x2_i16_avx2``: ``C[0:8] += A[0:2] . B[0:8, 0:2]`` on int16 inputs and int32
accumulators, one ``vpmaddwd`` (exact: each int32 lane is the sum of two int16 x int16
products, which cannot overflow) plus one ``vpaddd``. ``vpmaddubsw`` is deliberately not
used: it saturates at int16 and is wrong for full-range int8 operands.
"""
from __future__ import annotations

from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T

DOT_8X2_AVX2 = "tvmq_dot_8x2_i16_avx2"
DOT_16X2_VNNI = "tvmq_dot_16x2_i16_avx512vnni"


def _dot_pairs(lanes: int, vector_bits: int, llvm_intrinsic: str, fused: bool):
    """(description, implementation) of ``C[0:lanes] += A[0:2] . B[0:lanes, 0:2]``: the int16
    pair of A broadcast to every lane, one pairwise multiply-add; ``fused`` when the
    instruction also accumulates (vpdpwssd), else a vector add follows (vpmaddwd)."""
    i16 = f"int16x{2 * lanes}"
    i32 = f"int32x{lanes}"
    assert 32 * lanes == vector_bits

    @T.prim_func(s_tir=True)
    def desc(A: T.Buffer((2,), "int16", offset_factor=1),
             B: T.Buffer((lanes, 2), "int16", offset_factor=1),
             C: T.Buffer((lanes,), "int32", offset_factor=1)) -> None:
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:2], B[0:lanes, 0:2])
            T.writes(C[0:lanes])
            for i in T.serial(0, lanes):
                for k in T.serial(0, 2):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, k])
                        C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[vi, vk], "int32")

    @T.prim_func(s_tir=True)
    def impl(A: T.Buffer((2,), "int16", offset_factor=1),
             B: T.Buffer((lanes, 2), "int16", offset_factor=1),
             C: T.Buffer((lanes,), "int32", offset_factor=1)) -> None:
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:2], B[0:lanes, 0:2])
            T.writes(C[0:lanes])
            a_pair = T.reinterpret(A.vload([0], "int16x2"), dtype="int32")
            a = T.reinterpret(T.broadcast(a_pair, lanes), dtype=i16)
            b = B.vload([0, 0], dtype=i16)
            if fused:
                C[T.ramp(T.int32(0), 1, lanes)] = T.call_llvm_pure_intrin(
                    T.llvm_lookup_intrinsic_id(llvm_intrinsic),
                    C[T.ramp(T.int32(0), 1, lanes)], a, b, dtype=i32)
            else:
                C[T.ramp(T.int32(0), 1, lanes)] += T.call_llvm_pure_intrin(
                    T.llvm_lookup_intrinsic_id(llvm_intrinsic), a, b, dtype=i32)

    return desc, impl


TensorIntrin.register(DOT_8X2_AVX2, *_dot_pairs(8, 256, "llvm.x86.avx2.pmadd.wd", False),
                      override=True)
TensorIntrin.register(DOT_16X2_VNNI, *_dot_pairs(16, 512, "llvm.x86.avx512.vpdpwssd.512", True),
                      override=True)
