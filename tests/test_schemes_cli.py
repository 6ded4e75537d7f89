"""Every registered seed-000 scheme through ``python -m tvmq.build`` for x86 and arm: a zoo
model (random weights calibrated on noise) and the default model (trained, cached)."""
from __future__ import annotations

import json

import pytest

from tests.test_build_cli import cli

pytestmark = pytest.mark.timeout(1200)


@pytest.mark.parametrize("target", ["x86", "arm"])
@pytest.mark.parametrize("scheme", ["ternary", "combined-ternary:2"])
def test_zoo_model_builds_with_scheme(scheme, target, tmp_path):
    out = tmp_path / "r20"
    proc = cli("resnet20", "--scheme", scheme, "--target", target, "--out", str(out),
               "--parity", "8", "--no-db")
    assert proc.returncode == 0, proc.stderr + proc.stdout
    m = json.loads((out / "manifest.json").read_text())
    assert m["parity"]["mismatches"] == 0 and m["recipe"]["spec"] == scheme
    layers = m["layers"]
    assert len(layers) == 22  # 21 convs + the classifier
    kept = [row["layer"] for row in layers if row["weights"] == "int-se"]
    assert kept == ["stem.0", "fc"]  # first and last keep 8 bits (the recipe's keep_8bit)
    ternary = [row for row in layers if row["weights"] == scheme]
    assert ternary and all(row["lowering"] in ("int8-fold", "bitserial") and row["reason"]
                           for row in ternary)
    assert "layers not" in proc.stdout and "kernels" in proc.stdout


def test_default_model_combined_ternary_arm(tmp_path):
    out = tmp_path / "digits-arm"
    proc = cli("--scheme", "combined-ternary:2", "--target", "arm", "--out", str(out), "--quiet")
    assert proc.returncode == 0, proc.stderr + proc.stdout
    m = json.loads((out / "manifest.json").read_text())
    assert m["parity"]["mismatches"] == 0
    acc = m["accuracy"]
    assert acc["deploy_tvm"] == acc["deploy_torch"]  # the same integer arithmetic
    assert acc["deploy_tvm"] > 80
