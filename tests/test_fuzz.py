"""A few cases of the CNN fuzzer (scripts/fuzz_cnn.py) in CI: random small CNNs through
the public API end bit-exact or in a clear refusal naming a layer/node."""
from __future__ import annotations

import importlib.util
import random
import sys
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parent.parent / "scripts" / "fuzz_cnn.py"
_spec = importlib.util.spec_from_file_location("fuzz_cnn", _PATH)
fuzz = importlib.util.module_from_spec(_spec)
sys.modules["fuzz_cnn"] = fuzz  # dataclasses look their module up there
_spec.loader.exec_module(fuzz)


def _check(outcome):
    assert outcome.status in ("exact", "refused"), (
        f"case {outcome.index}: {outcome.status}: {fuzz.describe(outcome.spec)}\n"
        f"{outcome.detail}")


@pytest.mark.parametrize("index", range(5))
def test_random_cnn_is_exact_or_refused_clearly(index, tmp_path):
    _check(fuzz.run_case(index, seed=0, out=tmp_path, size=12))


def test_low_bits_extreme_weights(tmp_path):
    """int-se:3 with weights scaled by 10^[-3, 2] and BN variances down to 1e-4."""
    _check(fuzz.run_case(3, seed=4, out=tmp_path, size=12, scheme="int-se:3", extreme=True))


def test_every_feature_in_one_model(tmp_path):
    """Grouped, dilated, strided convs, BN, residual add with ReLU, max/avg(3x3: the
    non-power-of-two multiplier)/global pools and two linears, in one model."""
    conv = dict(op="conv", bias=True)
    spec = {"input": [1, 3, 12, 12], "ops": [
        dict(conv, cin=3, cout=8, k=3, stride=1, pad=1, dil=1, groups=1), {"op": "bn", "c": 8},
        {"op": "relu"},
        {"op": "res", "relu": True, "body": [
            dict(conv, cin=8, cout=8, k=3, stride=1, pad=2, dil=2, groups=4),
            {"op": "bn", "c": 8}, {"op": "relu"},
            dict(conv, cin=8, cout=8, k=3, stride=1, pad=1, dil=1, groups=8),
            {"op": "bn", "c": 8}]},
        {"op": "maxpool", "k": 3, "stride": 2, "pad": 1},
        dict(conv, cin=8, cout=12, k=3, stride=2, pad=1, dil=1, groups=2, bias=False),
        {"op": "avgpool", "k": 3, "stride": 1},
        {"op": "gap"}, {"op": "flatten"},
        {"op": "linear", "cin": 12, "cout": 6, "bias": True}, {"op": "relu"},
        {"op": "linear", "cin": 6, "cout": 4, "bias": False}]}
    outcome = fuzz.run_case(100, seed=0, out=tmp_path, spec=spec)
    assert outcome.status == "exact", outcome.detail


def test_generator_is_seeded():
    a = fuzz.random_spec(random.Random(fuzz.case_seed(7, 3)))
    b = fuzz.random_spec(random.Random(fuzz.case_seed(7, 3)))
    assert a == b
    specs = [fuzz.random_spec(random.Random(fuzz.case_seed(0, i))) for i in range(30)]
    kinds = {op["op"] for s in specs for op in s["ops"]}
    assert {"conv", "bn", "relu", "res", "maxpool", "avgpool", "gap", "linear"} <= kinds
    convs = [op for s in specs for op in s["ops"] if op["op"] == "conv"]
    assert any(op["groups"] > 1 for op in convs) and any(op["dil"] > 1 for op in convs)
    assert any(op["stride"] > 1 for op in convs)


def test_unsupported_op_is_refused_naming_the_node(tmp_path):
    spec = {"input": [1, 3, 8, 8], "ops": [
        {"op": "conv", "cin": 3, "cout": 4, "k": 3, "stride": 1, "pad": 1, "dil": 1,
         "groups": 1, "bias": True},
        {"op": "adaptive2"}, {"op": "flatten"},
        {"op": "linear", "cin": 16, "cout": 3, "bias": True}]}
    outcome = fuzz.run_case(101, seed=0, out=tmp_path, spec=spec)
    assert outcome.status == "refused", outcome.detail
    assert "UnsupportedOpError: node 'layers_1': adaptive average pool to 2" in outcome.detail
    assert not list(tmp_path.iterdir())  # nothing half-written
