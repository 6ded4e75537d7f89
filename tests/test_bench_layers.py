"""The per-layer benchmark's pieces run and agree on structure (no timing thresholds: the
numbers belong in the benchmark, not in a test)."""
from __future__ import annotations

import os

from tvmq import bench_layers


def test_conv_layers_of_resnet20():
    layers = bench_layers.conv_layers("resnet20")
    assert sum(layer["count"] for layer in layers) == 21  # 19 3x3 convs + 2 1x1 shortcuts
    stem = next(layer for layer in layers if layer["input"][1] == 3)
    assert stem["macs"] == 32 * 32 * 16 * 3 * 3 * 3


def test_sides_and_peak_measure_something():
    layers = bench_layers.conv_layers("resnet20")[:2]
    tvmq_ms = bench_layers._tvmq_side(layers, repeats=3, db=None)
    torch_ms = bench_layers._torch_side(layers, repeats=3)
    peak = bench_layers.peak_gmacs(threads=1)
    assert len(tvmq_ms) == len(torch_ms) == 2 and min(tvmq_ms + torch_ms) > 0
    assert peak["gmacs"] > 0 and peak["instruction"]
    for layer, a, b in zip(layers, tvmq_ms, torch_ms):
        layer.update(tvmq_ms=a, torch_int8_ms=b, ratio=a / b, tvmq_peak_fraction=0.5,
                     torch_peak_fraction=0.5)
    table = bench_layers.table({"peak": peak, "layers": layers}, "resnet20")
    assert table.row_count == 2


# ----------------------------------------------------------------------------- the peak
import pytest  # noqa: E402
import tvm  # noqa: E402

from tvmq import peak as peak_mod  # noqa: E402

HOST = tvm.target.codegen.llvm_get_system_cpu()
AVX2_ONLY = {"kind": "llvm", "mcpu": "znver3"}  # AVX2, no AVX-512: runs on any AVX2 host
TARGETS = [pytest.param(None, id=f"host-{HOST}"), pytest.param(AVX2_ONLY, id="avx2-znver3")]


def _asm(target, accumulators=None, threads=1):
    target = peak_mod.resolve_target(target)
    ins = peak_mod.mac_instruction(target)
    n = accumulators or peak_mod.default_accumulators(ins)
    lib = tvm.compile(peak_mod.peak_func(target, threads, n, 1000), target=target)
    return ins, n, lib.mod.inspect_source("s")


@pytest.mark.parametrize("target", TARGETS)
def test_peak_hot_loop_holds_the_multiply_adds(target):
    """The loop timed is the multiply-add loop: accumulators x unroll instructions per pass
    on registers (hot_loop raises on spills, hoisting or anything but loop control)."""
    ins, n, asm = _asm(target)
    loop = peak_mod.hot_loop(asm, ins)
    assert loop["unroll"] is not None and loop["unroll"] >= 1
    assert loop["mac_instructions"] == n * loop["unroll"]
    mnemonics = [b.split()[0] for b in loop["instructions"]]
    assert mnemonics.count(ins.mnemonic) == n * loop["unroll"]
    assert mnemonics.count("vpaddd") == (n * loop["unroll"] if ins.add else 0)
    register = "%zmm" if ins.lanes == 16 else "%ymm"
    assert all(register in b for b in loop["instructions"] if b.startswith(ins.mnemonic))


def test_avx2_target_uses_vpmaddwd_and_host_the_widest():
    assert peak_mod.mac_instruction(peak_mod.resolve_target(AVX2_ONLY)).macs == 16
    host = peak_mod.mac_instruction(peak_mod.resolve_target(None))
    vnni = bool(tvm.target.codegen.llvm_cpu_has_features("avx512vnni",
                                                         peak_mod.resolve_target(None)))
    assert (host.mnemonic, host.macs) == (("vpdpbusd", 64) if vnni else ("vpmaddwd", 16))


def test_hot_loop_rejects_a_hoisted_multiply():
    """The old AVX2 loop (loop-invariant operands): LLVM left only vpaddd in the loop."""
    hoisted = ("\tvpmaddwd\t%ymm1, %ymm0, %ymm12\n.LBB0_7:\n"
               + "".join(f"\tvpaddd\t%ymm{i}, %ymm12, %ymm{i}\n" for i in range(12))
               + "\taddl\t$-1, %ecx\n\tjne\t.LBB0_7\n")
    with pytest.raises(peak_mod.PeakError):
        peak_mod.hot_loop(hoisted, peak_mod.VPMADDWD_YMM)


@pytest.mark.parametrize("target", TARGETS)
def test_peak_result_is_consistent_and_physically_possible(target, monkeypatch):
    threads = 2
    monkeypatch.delenv("TVM_NUM_THREADS", raising=False)
    r = peak_mod.peak_gmacs(threads, target, iters=200_000, repeat=3)
    # it ran in this (test) process: it must leave its environment alone, or every later
    # TVM pool in the process is sized by it
    assert "TVM_NUM_THREADS" not in os.environ
    ins = peak_mod.mac_instruction(peak_mod.resolve_target(target))
    assert r["threads"] == threads and r["instruction"] == ins.name
    assert r["macs_per_instruction"] == ins.macs
    assert r["gmacs"] >= r["measured_gmacs"] >= r["measured_all_threads_gmacs"] > 0
    if r["mca_model"] == r["mcpu"]:
        assert r["gmacs"] == max(r["measured_gmacs"], r["estimated_gmacs"])
    assert r["estimated_gmacs"] == pytest.approx(
        threads * r["clock_ghz"] * r["ipc"] * ins.macs)
    assert 0.5 < r["clock_ghz"] < 7 and 0 < r["ipc"] <= 4
    # at most 4 multiply-adds a cycle per thread: a hoisted loop "measured" far above it
    per_thread_per_ghz = r["measured_gmacs"] / threads / r["clock_ghz"]
    assert per_thread_per_ghz <= 4 * ins.macs
    assert r["hot_loop"]["mac_instructions"] == r["accumulators"] * r["hot_loop"]["unroll"]
    assert r["method"]


def test_peak_caption_says_how():
    from tvmq import bench_layers

    base = {"gmacs": 470.0, "threads": 2, "instruction": "vpdpbusd zmm", "measured_gmacs": 470.0,
            "estimated_gmacs": 940.0, "clock_ghz": 3.67, "ipc": 2.0, "mcpu": "znver4",
            "mca_model": "icelake-server"}
    assert "not used" in bench_layers.peak_caption(base)
    own = bench_layers.peak_caption({**base, "mcpu": "znver3", "mca_model": "znver3",
                                     "instruction": "vpmaddwd ymm + vpaddd"})
    assert own.startswith("peak: 470 GMAC/s") and "max(measured 470" in own


def test_winograd_layers_count_the_products_they_execute():
    """The % of peak divides what the kernel multiplies: a 3x3 stride-1 layer on an AVX2
    target without VNNI (Winograd) 16 int16 products per 2x2 outputs instead of 36; on a
    VNNI target, and for strided convs, the direct conv's MACs."""
    import tvm

    layers = bench_layers.conv_layers("resnet20")
    znver3 = tvm.target.Target({"kind": "llvm", "mcpu": "znver3"})
    vnni = tvm.target.Target({"kind": "llvm", "mcpu": "icelake-server"})
    s1 = next(r for r in layers if r["weight"][2:] == [3, 3] and r["stride"] == [1, 1]
              and r["input"][1] == 16)  # 16 -> 16 channels, 32 x 32
    assert bench_layers.kernel_products(s1, znver3) == (16 * 16 * 16 * 16 * 16, "Winograd")
    assert bench_layers.kernel_products(s1, vnni) == (s1["macs"], "direct")
    s2 = next(r for r in layers if r["stride"] == [2, 2])
    assert bench_layers.kernel_products(s2, znver3) == (s2["macs"], "direct")
