"""IOIQ (seed 002): INT-SE data with incremental weight quantization, driven by tvmq.train;
fake quant equals the deploy model; the build is integer-only and bit-exact."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import tvmq
from tests.conftest import assert_bit_exact, run_on_board
from tests.test_qat_arithmetic import Net
from tvmq import schemes, zoo
from tvmq.quantizers import IntSEQuantizer, choose_exponent
from tvmq.schemes.ioiq import IOIQWeightQuantizer, PartiallyQuantizedError
from tvmq.training import stage_of


def _data(n=4, classes=5):
    return [(torch.randn(8, 3, 12, 12), torch.randint(0, classes, (8,))) for _ in range(n)]


@pytest.mark.parametrize("spec", ["ioiq", "ioiq:6", "ioiq:8,order=random", "ioiq:4,candidates=1",
                                  "ioiq:8,stages=100", "ioiq:8,candidates=2,stages=25/50/100"])
def test_spec_round_trips(spec):
    cfg = schemes.parse_spec(spec)
    assert schemes.parse_spec(cfg.spec) == cfg


@pytest.mark.parametrize("bad,match", [("ioiq:3", "bits=3"), ("ioiq:9", "bits=9"),
                                       ("ioiq:8,order=magnitude", "order='magnitude'"),
                                       ("ioiq:8,candidates=5", "candidates=5"),
                                       ("ioiq:8,stages=50/75", "ending at 100"),
                                       ("ioiq:8,stages=75/50/100", "increasing")])
def test_bad_arguments_are_named(bad, match):
    with pytest.raises(schemes.UnknownSchemeError, match=match):
        tvmq.prepare(zoo.digits_net(), bad)


def test_candidates_reach_the_quantizers():
    qat = tvmq.prepare(Net(), "ioiq:6,candidates=2")
    wq = [m for m in qat.modules() if isinstance(m, IOIQWeightQuantizer)]
    aq = [m for m in qat.modules() if isinstance(m, IntSEQuantizer)]
    assert wq and aq and all(m.candidates == 2 and m.bits == 6 for m in wq + aq)
    x = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    x[0] = 20.0  # an outlier ("singular value"): one candidate keeps it, more clip it
    s0 = choose_exponent(x, 4, 1)
    assert choose_exponent(x, 4, 2) == s0 - 1 and choose_exponent(x, 4, 4) == s0 - 2


@pytest.mark.parametrize("order", ["pruning", "random"])
def test_mask_grows_stage_by_stage_and_only_grows(order):
    torch.manual_seed(0)
    q = IOIQWeightQuantizer(8, order=order)
    w = torch.randn(16, 8, 3, 3, requires_grad=True)
    previous = torch.zeros(w.shape, dtype=torch.bool)
    for f in q.stages:
        q.set_stage(f)
        out = q(w)
        assert q.quantized_fraction == pytest.approx(f, abs=1 / w.numel())
        mask = q.mask if f < 1 else torch.ones(w.shape, dtype=torch.bool)
        assert (mask | ~previous).all()  # once quantized, stays quantized
        previous = mask.clone()
        on_grid = torch.isclose(out.detach() / 2.0 ** q.last_exponent,
                                torch.round(out.detach() / 2.0 ** q.last_exponent))
        assert on_grid[mask].all()  # M ⊙ Q(W)
        assert torch.equal(out.detach()[~mask], w.detach()[~mask])  # (1 − M) ⊙ W
    out.sum().backward()
    assert w.grad is not None and (w.grad != 0).all()  # quantized weights stay trainable


def test_pruning_order_quantizes_the_largest_weights_first():
    q = IOIQWeightQuantizer(8)
    w = torch.randn(4, 4, 3, 3)
    q.set_stage(0.5)
    q(w)
    assert w.abs()[q.mask].min() >= w.abs()[~q.mask].max()


def test_stages_split_the_epochs_and_end_in_the_last():
    assert [stage_of(e, 12, 4) for e in range(12)] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert [stage_of(e, 2, 4) for e in range(2)] == [1, 3]  # few epochs: last stage still runs


def test_train_runs_the_stages_and_fake_quant_equals_deploy():
    torch.manual_seed(0)
    qat = tvmq.prepare(Net(), "ioiq:8")
    seen = []
    wq = [m for m in qat.modules() if isinstance(m, IOIQWeightQuantizer)]
    orig = wq[0].set_stage
    wq[0].set_stage = lambda f: (seen.append(f), orig(f))[1]
    tvmq.train(qat, _data(), epochs=4, quiet=True)
    assert seen == [0.5, 0.75, 0.875, 1.0]
    assert all(m.quantized_fraction == 1.0 for m in wq)
    deploy = tvmq.convert(qat)
    x = torch.randn(16, 3, 12, 12)
    assert torch.equal(qat(x), deploy(x))  # not close: equal


def test_partially_quantized_model_is_refused_naming_the_layer():
    torch.manual_seed(0)
    qat = tvmq.prepare(Net(), "ioiq:8")
    tvmq.train(qat, _data(2), epochs=1, quiet=True)
    name, m = next((n, m) for n, m in qat.named_children() if hasattr(m, "weight_quant"))
    m.weight_quant.set_stage(0.5)
    qat.train()
    qat(torch.randn(2, 3, 12, 12))
    qat.eval()
    with pytest.raises(PartiallyQuantizedError, match=f"layer '{name}'.*50.0% of its weights"):
        tvmq.convert(qat)
    m.weight_quant.set_stage(1.0)
    tvmq.convert(qat)


def test_calibrated_only_ioiq_is_int_se():
    torch.manual_seed(0)
    model = Net()
    xs = [torch.randn(8, 3, 12, 12) for _ in range(2)]
    a = tvmq.convert(tvmq.calibrate(tvmq.prepare(model, "ioiq:8"), xs))
    b = tvmq.convert(tvmq.calibrate(tvmq.prepare(model, "int-se:8"), xs))
    x = torch.randn(4, 3, 12, 12)
    assert torch.equal(a(x), b(x))


def _trained_resnet20(spec):
    torch.manual_seed(0)
    qat = tvmq.prepare(zoo.resnet20(), spec)
    tvmq.train(qat, [(torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,)))], epochs=1,
               quiet=True)
    return tvmq.convert(qat)


def test_ioiq_builds_integer_only_and_bit_exact_x86(tmp_path):
    deploy = _trained_resnet20("ioiq:6")
    art = tvmq.build(deploy, torch.randn(1, 3, 32, 32), target="x86", out=tmp_path / "r20",
                     parity=8)
    assert art.manifest["parity"]["mismatches"] == 0
    assert art.manifest["recipe"]["spec"] == "ioiq:6"


@pytest.mark.timeout(900)
def test_ioiq_bit_exact_on_pi(emulated_pi):
    torch.manual_seed(0)
    qat = tvmq.prepare(zoo.digits_net(), "ioiq:8")
    tvmq.train(qat, [(torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,)))], epochs=1, quiet=True)
    deploy = tvmq.convert(qat)
    x = torch.randn(2, 1, 8, 8)
    assert_bit_exact(run_on_board(emulated_pi.address, deploy, x), deploy(x))
