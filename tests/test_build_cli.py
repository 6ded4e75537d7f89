"""``python -m tvmq.build`` end to end (default model, x86 and arm) and its clear errors."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import tvmq
from tvmq.artifact import Artifact
from tvmq.build import main

ROOT = Path(__file__).resolve().parents[1]


def cli(*args, cwd=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "tvmq.build", *args], capture_output=True,
                          text=True, cwd=cwd, env=env, timeout=900)


@pytest.fixture(scope="module")
def x86_artifact(tmp_path_factory):
    out = tmp_path_factory.mktemp("b") / "digits-x86"
    proc = cli("--target", "x86", "--out", str(out))
    assert proc.returncode == 0, proc.stderr + proc.stdout
    return out, proc.stdout


def test_default_build_x86(x86_artifact):
    out, stdout = x86_artifact
    m = json.loads((out / "manifest.json").read_text())
    assert m["parity"]["inputs"] >= 64 and m["parity"]["mismatches"] == 0
    assert m["parity"]["elements"] == 10 * m["parity"]["inputs"]
    assert m["scheme"] == "int-se" and m["target"]["name"] == "x86"
    acc = m["accuracy"]
    assert abs(acc["deploy_tvm"] - acc["fake_quant"]) <= 0.5
    assert acc["float"] - acc["deploy_tvm"] <= 2.0
    assert acc["deploy_tvm"] > 90
    assert "bit-exact" in stdout and "digits" in stdout
    assert (out / "model.so").read_bytes()[:4] == b"\x7fELF"
    # the artifact runs locally and equals the PyTorch integer reference
    art = Artifact.open(out)
    import numpy as np
    parity = np.load(out / "parity.npz")
    y = art.run(torch.from_numpy(parity["inputs"][0]))
    assert torch.equal(y, torch.from_numpy(parity["outputs"][0]))


def test_default_build_arm_is_aarch64_elf(tmp_path):
    out = tmp_path / "digits-arm"
    proc = cli("--target", "arm", "--out", str(out))
    assert proc.returncode == 0, proc.stderr + proc.stdout
    lib = (out / "model.so").read_bytes()
    assert lib[:4] == b"\x7fELF" and lib[4] == 2  # 64-bit
    assert int.from_bytes(lib[18:20], "little") == 183  # e_machine EM_AARCH64
    m = json.loads((out / "manifest.json").read_text())
    assert m["target"]["tvm"]["mtriple"] == "aarch64-linux-gnu"
    assert m["target"]["tvm"]["mcpu"] == "cortex-a72"
    assert m["parity"]["mismatches"] == 0


def _no_output(out: Path):
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]


def test_unknown_target(tmp_path):
    proc = cli("--target", "sparc", "--out", str(tmp_path / "o"))
    assert proc.returncode == 2
    assert "unknown target 'sparc'" in proc.stderr and "Traceback" not in proc.stderr
    _no_output(tmp_path / "o")


def test_missing_model_file(tmp_path):
    proc = cli(str(tmp_path / "nope.pt2"), "--out", str(tmp_path / "o"))
    assert proc.returncode == 2 and "does not exist" in proc.stderr
    _no_output(tmp_path / "o")


def test_corrupt_model_file(tmp_path):
    bad = tmp_path / "bad.pt2"
    bad.write_bytes(b"PK\x03\x04 this is not a real archive")
    proc = cli(str(bad), "--out", str(tmp_path / "o"))
    assert proc.returncode == 2 and "bad.pt2" in proc.stderr and "not a readable" in proc.stderr
    assert "Traceback" not in proc.stderr
    _no_output(tmp_path / "o")


class WithSigmoid(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)

    def forward(self, x):
        return torch.sigmoid(self.conv(x))


def test_unsupported_op_named_at_prepare():
    with pytest.raises(tvmq.qat.UnsupportedOpError, match="'sigmoid'"):
        tvmq.prepare(WithSigmoid(), "int-se")


class UnknownOpInDeploy(nn.Module):
    """A deploy graph with an op tvmq has no integer kernel for, between tvmq ops."""

    def forward(self, x):
        q = torch.ops.tvmq.quantize(x, -4, 8)
        return torch.ops.tvmq.dequantize(torch.bitwise_not(q), -4)


def test_unloweable_op_names_node(tmp_path):
    out = tmp_path / "o"
    with pytest.raises(tvmq.qat.UnsupportedOpError, match="node 'bitwise_not'"):
        tvmq.build(UnknownOpInDeploy(), torch.randn(1, 8), target="x86", out=out)
    _no_output(out)


def test_verifier_names_float_op():
    from tvm import relax
    from tvm.script import relax as R, ir as I
    from relay_passes import FloatOpError, verify_integer_only

    @I.ir_module
    class Mod:
        @R.function
        def main(x: R.Tensor((4,), "int8")):
            with R.dataflow():
                f = R.astype(x, "float32")
                g = R.sigmoid(f)
                y = R.astype(g, "int8")
                R.output(y)
            return y

    with pytest.raises(FloatOpError, match="'f'.*relax.astype"):
        verify_integer_only(Mod)


def test_accumulator_overflow_named(tmp_path):
    # 8192 inputs x 5x5 taps x 127 x 128 > 2^31: a possible int32 overflow
    conv = nn.Sequential(nn.Conv2d(8192, 4, 5, padding=2), nn.ReLU())
    qat = tvmq.prepare(conv, "int-se")
    with torch.no_grad():  # identical large weights: every one quantizes to the int8 maximum
        qat.tvmq_conv_1.weight.fill_(127 / 64)
    tvmq.calibrate(qat, [torch.rand(1, 8192, 4, 4)])
    with pytest.raises(tvmq.conversion.AccumulatorOverflowError, match="layer 'tvmq_conv_1'"):
        tvmq.convert(qat)


def test_build_replaces_old_artifact_atomically(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))
    qat = tvmq.prepare(model, "int-se")
    tvmq.calibrate(qat, [torch.randn(2, 3, 8, 8)])
    deploy = tvmq.convert(qat)
    out = tmp_path / "art"
    out.mkdir()  # an empty directory is taken; a previous artifact is replaced whole
    tvmq.build(deploy, torch.randn(1, 3, 8, 8), target="x86", out=out, parity=4)
    (out / "deploy.json").write_text("{}")  # stale: from the previous artifact
    art = tvmq.build(deploy, torch.randn(1, 3, 8, 8), target="x86", out=out, parity=8)
    assert not (out / "deploy.json").exists() and (out / "manifest.json").exists()
    assert art.manifest["parity"]["inputs"] == 8
    x = torch.randn(1, 3, 8, 8)
    assert torch.equal(art.run(x), deploy(x))
    assert [p.name for p in tmp_path.iterdir()] == ["art"]


def test_main_in_process_unknown_scheme(tmp_path, capsys):
    assert main(["--scheme", "int-ze", "--out", str(tmp_path / "o"), "resnet20"]) == 2
    assert "unknown scheme 'int-ze'" in capsys.readouterr().err


def test_zero_parity_inputs_refused_before_work(tmp_path, capsys):
    """A build always checks itself against the PyTorch reference (deploy compares the board
    with those outputs): --parity 0 is refused by the parser, the API says so up front."""
    with pytest.raises(SystemExit) as exit_:
        main(["--parity", "0", "--out", str(tmp_path / "o")])
    assert exit_.value.code == 2 and "--parity: 0: at least 1" in capsys.readouterr().err
    with pytest.raises(ValueError, match="at least 1 parity input"):
        tvmq.build(nn.Linear(2, 2), torch.zeros(1, 2), out=tmp_path / "o", parity=0)
    _no_output(tmp_path / "o")


def test_cli_builds_exported_pt2(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8 * 4 * 4, 4))
    qat = tvmq.prepare(model, "int-se")
    tvmq.calibrate(qat, [torch.randn(4, 3, 16, 16)])
    deploy = tvmq.convert(qat)
    pt2 = tmp_path / "small.pt2"
    tvmq.export(deploy, torch.randn(1, 3, 16, 16), pt2, name="small")
    out = tmp_path / "small-x86"
    proc = cli(str(pt2), "--target", "x86", "--out", str(out), "--parity", "64")
    assert proc.returncode == 0, proc.stderr
    m = json.loads((out / "manifest.json").read_text())
    assert m["model"] == "small" and m["parity"]["mismatches"] == 0
    assert m["inputs"][0]["shape"] == [1, 3, 16, 16] and m["outputs"][0]["shape"] == [1, 4]
