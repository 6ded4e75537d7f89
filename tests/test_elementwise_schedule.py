"""Memory-bound kernels (quantize, pools, adds left unfused) are vectorized, and shared over
the cores only when there is enough work: waking the pool and waiting at its barrier costs a
few microseconds, more than a small kernel's whole run (ResNet-20's input quantize and
classifier)."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import tvm
from tvm import te

import tvmq.ops  # noqa: F401  the tvmq:: reference ops
from schedules.elementwise import PARALLEL_MIN_WORK, schedule_memory_bound
from schedules.targets import resolve
from topi_ops import elementwise, pool


@pytest.mark.parametrize("hw,shared", [(16, False), (224, True)])
def test_small_kernels_stay_on_one_core(hw, shared):
    x = te.placeholder((1, 3, hw, hw), "float32", name="x")
    func = te.create_prim_func([x, elementwise.quantize(x, -5, 8, layout="NHWC")])
    script = schedule_memory_bound(func, resolve({"kind": "llvm", "num-cores": 2})).script()
    assert (3 * hw * hw >= PARALLEL_MIN_WORK) == shared
    assert ("T.parallel" in script) == shared, script


def _run(func, target, *arrays) -> np.ndarray:
    """Compile ``func`` for ``target``, run it on ``arrays`` (the last one its output)."""
    lib = tvm.compile(tvm.IRModule({"main": func}), target=target)
    tensors = [tvm.runtime.tensor(a) for a in arrays]
    lib["main"](*tensors)
    return tensors[-1].numpy()


@pytest.mark.parametrize("channels,lanes", [(64, 64), (24, 8), (5, None)])
def test_max_pool_vectorizes_a_register_of_channels(channels, lanes, gen):
    """NHWC max pool: the window loops run around one vector register of channels (64 int8
    on AVX-512); the padding never wins, -128 and 127 pass through."""
    x = torch.randint(-128, 128, (1, channels, 13, 12), generator=gen, dtype=torch.int8)
    x[0, :, 0, :] = -128
    x[0, :, 5, 7] = 127
    data = te.placeholder((1, 13, 12, channels), "int8", name="data")
    out = pool.qmax_pool2d(data, (3, 3), (2, 2), (1, 1, 1, 1), layout="NHWC")
    host = resolve("x86")
    func = schedule_memory_bound(te.create_prim_func([data, out]), host)
    if lanes:
        assert re.search(rf"T\.vectorized\((T\.int64\()?{lanes}\)", func.script())
    got = _run(func, host, x.permute(0, 2, 3, 1).contiguous().numpy(),
               np.zeros([int(d) for d in out.shape], np.int8))
    want = torch.ops.tvmq.qmax_pool2d(x, [3, 3], [2, 2], [1, 1, 1, 1])
    np.testing.assert_array_equal(got, want.permute(0, 2, 3, 1).numpy())


@pytest.mark.parametrize("target,interleave", [
    ({"kind": "llvm", "mcpu": "haswell", "num-cores": 2}, "vpshufb"),
    ({"kind": "llvm", "mcpu": "znver4", "num-cores": 2}, "vpermt2b"), ("arm", "st3")])
def test_quantize_into_nhwc_interleaves_whole_vectors(target, interleave):
    """The input quantize of an RGB image (NCHW float -> NHWC int8, 3 channels): each input
    row is loaded as whole vectors and the three channels interleaved by shuffles into
    whole-vector stores (cross-compiled: x86 with and without AVX-512, the Pi's A72), not
    stored or loaded byte by byte."""
    data = te.placeholder((1, 3, 224, 224), "float32", name="x")
    func = schedule_memory_bound(te.create_prim_func(
        [data, elementwise.quantize(data, -5, 8, layout="NHWC")]), resolve(target))
    inner = func.script().split("for ")[-1]
    assert inner.startswith("ch in T.unroll(3)"), func.script()
    asm = tvm.compile(tvm.IRModule({"main": func}), target=resolve(target)).mod.inspect_source("asm")
    assert re.search(rf"\b{interleave}\b", asm)
    assert not re.search(r"\bv?pextrb\b", asm)  # one byte at a time (TVM's own vectorize)


def test_quantize_into_nhwc_is_exact(gen):
    """The interleaving quantize is exact on halves, NaN and saturation, odd row lengths too."""
    for width in (32, 29):
        x = torch.randn(1, 3, 6, width, generator=gen) * 4
        x[0, 0, 0, :8] = torch.tensor([0.5, -0.5, 1.5, -1.5, 1e6, -1e6, float("nan"), 0.0]) / 32
        x[0, 2, 5, -3:] = torch.tensor([float("inf"), -float("inf"), 127.5 / 32])
        data = te.placeholder((1, 3, 6, width), "float32", name="x")
        func = schedule_memory_bound(te.create_prim_func(
            [data, elementwise.quantize(data, -5, 8, layout="NHWC")]), resolve("x86"))
        got = _run(func, resolve("x86"), x.numpy(), np.zeros((1, 6, width, 3), np.int8))
        want = torch.ops.tvmq.quantize(x, -5, 8).permute(0, 2, 3, 1).numpy()
        np.testing.assert_array_equal(got, want)
