"""The per-layer benchmark's pieces run and agree on structure (no timing thresholds: the
numbers belong in the benchmark, not in a test)."""
from __future__ import annotations

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
