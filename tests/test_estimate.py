"""The Cortex-A72 estimator (schedules.estimate): llvm-mca on the hot loop of a scheduled
kernel's aarch64 assembly. No timing thresholds: only that it answers, and that it scales
with the work."""
from __future__ import annotations

import pytest

from schedules import estimate
from schedules.targets import resolve

ARM = resolve("arm")


def test_llvm_mca_is_installed():
    assert estimate.find_llvm_mca()


def test_small_bitserial_kernel_has_positive_estimate():
    mod, _ = estimate.bitserial_conv_module(64, 8, 1, ARM)
    res = estimate.estimate_cycles(mod, ARM)
    assert res["cycles"] > 0 and res["hot_loop_cycles_per_iter"] > 0 and res["trips"] > 0
    assert res["method"] == "llvm-mca cortex-a72 (estimate)"
    # counting the NEON step instruction (one uadalp per step) gives a positive estimate too
    sig = estimate.estimate_cycles(mod, ARM, estimate.bitserial_signature(64, 8, 1, ARM))
    assert sig["cycles"] > 0 and sig["trips"] > 0


def test_int8_estimate_scales_with_layer_size():
    small = estimate.estimate_cycles(estimate.int8_conv_module(32, 8, ARM), ARM)
    wide = estimate.estimate_cycles(estimate.int8_conv_module(32, 16, ARM), ARM)
    deep = estimate.estimate_cycles(estimate.int8_conv_module(64, 8, ARM), ARM)
    assert 0 < small["cycles"] < wide["cycles"] and small["cycles"] < deep["cycles"]
    assert 3 < wide["cycles"] / small["cycles"] < 5  # 4x the pixels
    assert 3 < deep["cycles"] / small["cycles"] < 5  # 4x the MACs


def test_cycles_per_iteration_of_a_known_loop():
    # two loads, and+cnt on two q registers: bound by the loads (notes/arm-estimates.md)
    loop = ["ldp q0, q1, [x0], #32", "ldp q2, q3, [x1], #32", "and v0.16b, v0.16b, v2.16b",
            "and v1.16b, v1.16b, v3.16b", "cnt v0.16b, v0.16b", "cnt v1.16b, v1.16b",
            "subs x2, x2, #1"]
    assert 1 < estimate.mca_cycles_per_iteration(loop) < 20


def test_missing_llvm_mca_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(estimate.shutil, "which", lambda name: None)
    with pytest.raises(estimate.EstimateError, match="llvm-mca not found.*llvm"):
        estimate.estimate_cycles(estimate.int8_conv_module(32, 8, ARM), ARM)
