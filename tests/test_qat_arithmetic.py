"""QAT trains the arithmetic it deploys, and data that would make a model silently wrong is
refused (issue: silent wrong models)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import tvmq
from tests.conftest import OpModule, assert_bit_exact, run_tvm
from tvmq.quantizers import NonFiniteError


class Net(nn.Module):
    """conv-BN-ReLU, a residual add that rounds each input, max pool with padding, a 3x3
    average pool (n = 9: the round(2^16/9) multiplier), a linear with bias."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.c2 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8))
        self.pool = nn.MaxPool2d(3, 2, 1)
        self.avg = nn.AvgPool2d(3)
        self.fc = nn.Linear(32, 5)

    def forward(self, x):
        y = self.c1(x)
        y = torch.relu(self.c2(y) + y)
        y = self.avg(self.pool(y))
        return self.fc(y.flatten(1))


@pytest.mark.parametrize("spec", ["int-se", "int-se:6", "combined-ternary:2", "ternary"])
def test_fake_quant_equals_deploy_everywhere(spec):
    torch.manual_seed(0)
    qat = tvmq.prepare(Net(), spec)
    tvmq.train(qat, [(torch.randn(8, 3, 12, 12), torch.randint(0, 5, (8,))) for _ in range(4)],
               epochs=2, quiet=True)
    deploy = tvmq.convert(qat)
    x = torch.randn(16, 3, 12, 12)
    assert torch.equal(qat(x), deploy(x))  # not close: equal


def test_non_finite_calibration_data_is_named():
    qat = tvmq.prepare(Net(), "int-se")
    x = torch.randn(4, 3, 12, 12)
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="model input"):
        tvmq.calibrate(qat, [x])


def test_non_finite_weight_is_named():
    qat = tvmq.prepare(Net(), "int-se")
    tvmq.calibrate(qat, [torch.randn(4, 3, 12, 12)])
    name = next(n for n, m in qat.named_children() if isinstance(m, tvmq.qat.QLinear))
    with torch.no_grad():
        getattr(qat, name).weight[0, 0] = float("inf")
    with pytest.raises(NonFiniteError, match=f"layer '{name}' weight"):
        tvmq.convert(qat)


def test_empty_calibration_set_says_so():
    qat = tvmq.prepare(Net(), "int-se")
    with pytest.raises(tvmq.training.CalibrationError, match="calibration set was empty"):
        tvmq.calibrate(qat, [])


def test_nan_and_inf_inputs_are_defined_the_same_on_both_sides():
    x = torch.tensor([[float("nan"), float("inf"), -float("inf"), 0.3, -0.3]])
    m = OpModule(lambda x: torch.ops.tvmq.quantize(x, -4, 8))
    want = m(x)
    assert want.tolist() == [[0, 127, -128, 5, -5]]
    assert_bit_exact(run_tvm(m, x), want)


def test_max_pool_window_of_padding_only_is_the_minimum_on_both_sides():
    x = torch.full((1, 1, 2, 2), 5, dtype=torch.int8)
    m = OpModule(lambda x: torch.ops.tvmq.qmax_pool2d(x, [1, 1], [1, 1], [1, 1, 1, 1]))
    want = m(x)
    assert want[0, 0, 0, 0] == -128 and want[0, 0, 1, 1] == 5
    assert_bit_exact(run_tvm(m, x), want)


class HandMade(nn.Module):
    """A deploy graph written by hand (as in a user's .pt2): no convert, no checks."""

    def __init__(self, out_shift=4, big=False):
        super().__init__()
        self.register_buffer("w", torch.full((4, 16384, 3, 3), 127 if big else 1, dtype=torch.int8))
        self.register_buffer("b", torch.zeros(4, dtype=torch.int32))
        self.out_shift = out_shift

    def forward(self, x):
        q = torch.ops.tvmq.quantize(x, -4, 8)
        y = torch.ops.tvmq.qconv2d(q, self.w, self.b, [1, 1], [1, 1, 1, 1], [1, 1], 1, 0,
                                   self.out_shift, False, 8)
        return torch.ops.tvmq.dequantize(y, 0)


@pytest.mark.parametrize("model,match", [(HandMade(out_shift=40), "requantization shift 40"),
                                         (HandMade(big=True), "int32 accumulator")])
def test_a_users_program_gets_the_checks_convert_makes(model, match, tmp_path):
    ep = torch.export.export(model, (torch.randn(1, 16384, 4, 4),))
    with pytest.raises(ValueError, match=match):
        tvmq.build(ep, target="x86", out=tmp_path / "o")
    assert not (tmp_path / "o").exists()
