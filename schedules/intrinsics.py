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


@T.prim_func(s_tir=True)
def _dot_8x2_desc(
    A: T.Buffer((2,), "int16", offset_factor=1),
    B: T.Buffer((8, 2), "int16", offset_factor=1),
    C: T.Buffer((8,), "int32", offset_factor=1),
) -> None:
    with T.sblock("root"):
        T.reads(C[0:8], A[0:2], B[0:8, 0:2])
        T.writes(C[0:8])
        for i in T.serial(0, 8):
            for k in T.serial(0, 2):
                with T.sblock("update"):
                    vi, vk = T.axis.remap("SR", [i, k])
                    C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[vi, vk], "int32")


@T.prim_func(s_tir=True)
def _dot_8x2_avx2(
    A: T.Buffer((2,), "int16", offset_factor=1),
    B: T.Buffer((8, 2), "int16", offset_factor=1),
    C: T.Buffer((8,), "int32", offset_factor=1),
) -> None:
    with T.sblock("root"):
        T.reads(C[0:8], A[0:2], B[0:8, 0:2])
        T.writes(C[0:8])
        a_pair = T.reinterpret(A.vload([0], "int16x2"), dtype="int32")
        a = T.reinterpret(T.broadcast(a_pair, 8), dtype="int16x16")
        b = B.vload([0, 0], dtype="int16x16")
        C[T.ramp(T.int32(0), 1, 8)] += T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"), a, b, dtype="int32x8")


TensorIntrin.register(DOT_8X2_AVX2, _dot_8x2_desc, _dot_8x2_avx2, override=True)


@T.prim_func(s_tir=True)
def _dot_16x2_desc(
    A: T.Buffer((2,), "int16", offset_factor=1),
    B: T.Buffer((16, 2), "int16", offset_factor=1),
    C: T.Buffer((16,), "int32", offset_factor=1),
) -> None:
    with T.sblock("root"):
        T.reads(C[0:16], A[0:2], B[0:16, 0:2])
        T.writes(C[0:16])
        for i in T.serial(0, 16):
            for k in T.serial(0, 2):
                with T.sblock("update"):
                    vi, vk = T.axis.remap("SR", [i, k])
                    C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[vi, vk], "int32")


@T.prim_func(s_tir=True)
def _dot_16x2_vnni(
    A: T.Buffer((2,), "int16", offset_factor=1),
    B: T.Buffer((16, 2), "int16", offset_factor=1),
    C: T.Buffer((16,), "int32", offset_factor=1),
) -> None:
    with T.sblock("root"):
        T.reads(C[0:16], A[0:2], B[0:16, 0:2])
        T.writes(C[0:16])
        a_pair = T.reinterpret(A.vload([0], "int16x2"), dtype="int32")
        a = T.reinterpret(T.broadcast(a_pair, 16), dtype="int16x32")
        b = B.vload([0, 0], dtype="int16x32")
        C[T.ramp(T.int32(0), 1, 16)] = T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpwssd.512"),
            C[T.ramp(T.int32(0), 1, 16)], a, b, dtype="int32x16")


TensorIntrin.register(DOT_16X2_VNNI, _dot_16x2_desc, _dot_16x2_vnni, override=True)
