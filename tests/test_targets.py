"""Target presets and cross-compilation for the Raspberry Pi cores."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import tvmq
from schedules.targets import UnknownTargetError, has_feature, is_host, resolve


def test_presets():
    arm, rpi5, x86 = resolve("arm"), resolve("rpi5"), resolve("x86")
    assert str(arm.attrs["mtriple"]) == "aarch64-linux-gnu" and str(arm.attrs["mcpu"]) == "cortex-a72"
    assert "arm_cpu" in arm.keys and not has_feature(arm, "dotprod")
    assert str(rpi5.attrs["mcpu"]) == "cortex-a76" and has_feature(rpi5, "dotprod")
    assert is_host(x86) and not is_host(arm) and not is_host(rpi5)
    assert resolve({"kind": "llvm", "mcpu": "x86-64"}).kind.name == "llvm"


def test_unknown_target_lists_choices():
    with pytest.raises(UnknownTargetError, match="choose one of x86, arm, rpi5"):
        resolve("sparc")


@pytest.fixture(scope="module")
def small_deploy():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 16, 3, groups=16, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))
    qat = tvmq.prepare(model, "int-se")
    tvmq.calibrate(qat, [torch.randn(4, 3, 10, 10)])
    return tvmq.convert(qat)


@pytest.mark.parametrize("target,cpu", [("rpi5", "cortex-a76"), ({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a53", "mattr": ["+neon"]}, "cortex-a53")])
def test_cross_compiles_aarch64(small_deploy, target, cpu, tmp_path):
    art = tvmq.build(small_deploy, torch.randn(1, 3, 10, 10), target=target, out=tmp_path / "a",
                     parity=8)
    lib = art.library.read_bytes()
    assert lib[:4] == b"\x7fELF" and int.from_bytes(lib[18:20], "little") == 183  # EM_AARCH64
    assert art.manifest["target"]["tvm"]["mcpu"] == cpu and art.manifest["parity"]["mismatches"] == 0
    with pytest.raises(tvmq.errors.ArtifactError, match="not this machine"):
        art.run(torch.randn(1, 3, 10, 10))
