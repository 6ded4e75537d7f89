"""The scheme layer: registry, per-layer recipes, per-channel shifts, combined ternary weights
with box-plot activations (seed 000) -- QAT, conversion and the kernels, bit-exact."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import tvmq
from schedules.targets import has_feature, resolve
from tests.conftest import OpModule, assert_bit_exact, int8, run_on_board, run_tvm
from tests.test_ops_exact import CONV_CASES, X86_PATHS
from tvmq import schemes, zoo
from tvmq.schemes.ternary import BoxPlotQuantizer, ZeroSpreadError, fit_terms

ops = torch.ops.tvmq
SCHEME_SPECS = ["int-se", "int-se:6", "ternary", "combined-ternary:2", "combined-ternary:3",
                "combined-ternary:2,act_bits=4"]
CASE_IDS = lambda c: "x".join(map(str, c[:6])) + f"-s{c[6]}-g{c[9]}"  # noqa: E731


# ----------------------------------------------------------------------------- registry, recipes
@pytest.mark.parametrize("spec", SCHEME_SPECS)
def test_spec_round_trips(spec):
    cfg = schemes.parse_spec(spec)
    assert cfg.spec == spec and schemes.parse_spec(cfg.spec) == cfg


@pytest.mark.parametrize("bad,match", [
    ("combined-ternary:4", "K=4 must be 2 or 3"), ("combined-ternary:1", "K=1"),
    ("ternary:act_bits=9", "act_bits=9"), ("ternary:act_bits=1", "act_bits=1"),
    ("int-se:9", "bits=9"), ("ternary:k=2", "no argument 'k'"), ("combined-ternary:x", "not a int")])
def test_bad_scheme_arguments_are_named(bad, match):
    with pytest.raises(schemes.UnknownSchemeError, match=match):
        tvmq.prepare(zoo.digits_net(), bad)


def test_registry_lists_every_scheme():
    assert {"int-se", "ternary", "combined-ternary"} <= set(schemes.SCHEMES)
    assert schemes.SCHEMES["ternary"].lowerings == ("int8-fold", "bitserial")


def test_recipe_per_layer_mapping_and_json(tmp_path):
    mapping = {"*": "combined-ternary:2", "layers.0.conv2": "int-se:8", "layers.1.*": "ternary"}
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps(mapping))
    for recipe in (mapping, str(path)):
        qat = tvmq.prepare(zoo.digits_net(), recipe)
        by_name = {m.layer_name: m for m in qat.modules() if hasattr(m, "layer_name")}
        assert by_name["layers.0.conv2"].scheme.weight.spec == "int-se"
        assert by_name["layers.0.conv1"].scheme.weight.spec == "combined-ternary:2"
        assert by_name["layers.1.conv1"].scheme.weight.spec == "ternary"
        assert by_name["stem.0"].scheme.weight.spec == "int-se"  # kept: first layer
        assert by_name["fc"].scheme.act.spec == "int-se"  # kept: the classifier
    r = qat.tvmq_recipe
    assert schemes.Recipe.from_json(json.loads(json.dumps(r.to_json()))) == r


def test_keep_8bit_is_a_recipe_setting():
    kept = tvmq.prepare(zoo.digits_net(), schemes.Recipe("ternary"))
    none = tvmq.prepare(zoo.digits_net(), schemes.Recipe("ternary", keep_8bit=()))
    first = lambda q: next(m for m in q.modules() if getattr(m, "layer_name", "") == "stem.0")  # noqa
    assert first(kept).scheme.weight.spec == "int-se"
    assert first(none).scheme.weight.spec == "ternary"
    assert tvmq.get_recipe("int-se").keep_8bit == ()  # INT-SE unchanged: N bits everywhere


# ----------------------------------------------------------------------------- quantizers
def test_fit_terms_greedy_residual_and_power_of_two_alphas():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(6, 4, 3, 3, generator=gen)
    w[2] = 0  # an all-zero filter
    w[3] = w[3].abs()  # only positive weights
    for k in (1, 2, 3):
        terms, exps, active = fit_terms(w, k)
        assert set(terms.unique().tolist()) <= {-1.0, 0.0, 1.0}
        assert not active[:, 2].any() and (terms[:, 2] == 0).all()
        assert (terms[0, 3] >= 0).all()
        # each later term's exponent is within the spread of the first: the fold fits int8
        for i in range(1, k):
            assert ((exps[0] - exps[i])[active[i]] <= 5).all()
        # the first term follows the rule: Δ = 0.7 mean|w|, α = 2^round(log2(mean |w| over T))
        f = 0
        a = w[f].abs()
        t = torch.sign(w[f]) * (a > 0.7 * a.mean())
        assert torch.equal(terms[0, f], t)
        alpha = a[t != 0].mean()
        assert int(exps[0, f]) == round(float(torch.log2(alpha)))
    # more terms fit better
    errs = [float((tvmq.schemes.ternary.ternary_value(w, k) - w).pow(2).sum()) for k in (1, 2, 3)]
    assert errs[0] > errs[1] > errs[2]


def test_ternary_weight_integer_form_folds_exactly():
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(8, 3, 3, 3, generator=gen) * 0.1
    w[5] = 0
    q = tvmq.schemes.ternary.TernaryWeightQuantizer(3)
    iw = q.integer(w, "layer 't'")
    assert iw.terms.shape == (3, 8, 3, 3, 3) and iw.term_shift.shape == (3, 8)
    assert (iw.term_shift >= 0).all() and iw.weight.abs().max() <= 96
    # integer weight x 2^exponent per filter == the fake-quantized float weight, exactly
    deq = iw.weight.double() * torch.pow(2.0, iw.exponent.double()).view(-1, 1, 1, 1)
    assert torch.equal(deq, tvmq.schemes.ternary.ternary_value(w, 3).double())


def test_box_plot_two_bits_are_four_unsigned_levels():
    q = BoxPlotQuantizer(2).train()
    x = torch.relu(torch.randn(10000, generator=torch.Generator().manual_seed(0)))
    y = q(x)
    q.eval()
    step = 2.0 ** q.exponent
    levels = sorted((y / step).round().unique().tolist())
    assert levels == [0.0, 1.0, 2.0, 3.0]
    q1, q3 = torch.quantile(x, torch.tensor([0.25, 0.75])).tolist()
    clip = q3 + 1.5 * (q3 - q1)
    assert abs(q.clip - clip) < 1e-6 and q.exponent == round(torch.log2(torch.tensor(clip / 3)).item())
    frozen = q.exponent
    q(x * 100)  # eval: frozen
    assert q.exponent == frozen


def test_box_plot_zero_spread_is_named():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU(),
                          nn.Flatten(), nn.Linear(16, 2))
    qat = tvmq.prepare(model, schemes.Recipe("ternary", keep_8bit=()))
    with torch.no_grad():
        qat.tvmq_conv_1.weight.zero_()
        qat.tvmq_conv_1.bias.fill_(-1.0)  # ReLU(-1) = 0 everywhere
    tvmq.calibrate(qat, [torch.randn(4, 1, 6, 6)])
    with pytest.raises(ZeroSpreadError, match="layer '0'"):
        tvmq.convert(qat)


@pytest.mark.parametrize("spec", ["ternary", "combined-ternary:2", "combined-ternary:3,act_bits=3"])
def test_fake_quant_computes_what_the_deploy_model_computes(spec):
    """On inputs on the integer grid, with biases on the accumulator's grid, QAT's forward
    and the integer deploy model agree exactly (same rounding, power-of-two α, same clip)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.ReLU())
    qat = tvmq.prepare(model, schemes.Recipe(spec, keep_8bit=(), output="float"))
    x = torch.randint(-60, 60, (4, 3, 8, 8)).float() / 64  # on the 2^-6 grid
    tvmq.calibrate(qat, [x])
    deploy = tvmq.convert(qat)
    assert torch.equal(qat(x), deploy(x))


# ----------------------------------------------------------------------------- kernels
def _pc_case(case, gen, lo=-128, hi=127):
    n, c, h, w, o, k, stride, padding, dil, groups = case
    x = int8(n, c, h, w, gen=gen)
    wt = int8(o, c // groups, k, k, gen=gen)
    b = torch.randint(-3000, 3000, (o,), generator=gen, dtype=torch.int32)
    shift = torch.randint(-2, 9, (o,), generator=gen, dtype=torch.int32)
    shift[0], shift[-1] = -2, 10  # both directions, saturating and rounding
    m = OpModule(lambda x, w, b, s: ops.qconv2d_pc(x, w, b, s, [stride] * 2, list(padding),
                                                   [dil] * 2, groups, lo, hi), wt, b, shift)
    return m, x


@pytest.mark.parametrize("lo,hi", [(-128, 127), (0, 3)])
@pytest.mark.parametrize("case", CONV_CASES, ids=CASE_IDS)
def test_qconv2d_per_channel_shift(case, lo, hi, gen):
    m, x = _pc_case(case, gen, lo, hi)
    want = m(x)
    assert want.min() == lo and want.max() == hi
    assert_bit_exact(run_tvm(m, x), want)


@pytest.mark.parametrize("path", sorted(X86_PATHS))
@pytest.mark.parametrize("case", CONV_CASES[:3] + CONV_CASES[5:6], ids=CASE_IDS)
def test_qconv2d_per_channel_each_x86_path(path, case, gen):
    target, feature = X86_PATHS[path]
    if not has_feature(resolve("x86"), feature):
        pytest.skip(f"this host has no {feature}: its kernels cannot run here")
    m, x = _pc_case(case, gen)
    assert_bit_exact(run_tvm(m, x, target=target), m(x))


def test_qlinear_per_channel(gen):
    x, wt = int8(3, 70, gen=gen), int8(11, 70, gen=gen)
    b = torch.randint(-1000, 1000, (11,), generator=gen, dtype=torch.int32)
    s = torch.tensor([-1, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9], dtype=torch.int32)
    m = OpModule(lambda x, w, b, s: ops.qlinear_pc(x, w, b, s, 0, 7), wt, b, s)
    assert_bit_exact(run_tvm(m, x), m(x))


def ternary_case(case, gen, k=2, in_bits=2, spread=(0, 3, 6), zero_filter=True, clip_all=False):
    """A ternary conv with unsigned ``in_bits`` inputs and edge cases built in."""
    n, c, h, w, o, kk, stride, padding, dil, groups = case
    hi_in = (1 << in_bits) - 1
    x = torch.full((n, c, h, w), hi_in, dtype=torch.int8) if clip_all else \
        torch.randint(0, hi_in + 1, (n, c, h, w), generator=gen, dtype=torch.int8)
    terms = torch.randint(-1, 2, (k, o, c // groups, kk, kk), generator=gen, dtype=torch.int8)
    if zero_filter:
        terms[:, 0] = 0
    tshift = torch.tensor(spread[:k], dtype=torch.int32).view(k, 1).expand(k, o).contiguous()
    b = torch.randint(-200, 200, (o,), generator=gen, dtype=torch.int32)
    shift = torch.randint(0, 5, (o,), generator=gen, dtype=torch.int32)
    m = OpModule(lambda x, t, ts, b, s: ops.ternary_conv2d(
        x, t, ts, b, s, [stride] * 2, list(padding), [dil] * 2, groups, 0, 3, in_bits),
        terms, tshift, b, shift)
    return m, x


@pytest.mark.parametrize("clip_all", [False, True])
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("case", CONV_CASES, ids=CASE_IDS)
def test_ternary_conv2d_exact_x86(case, k, clip_all, gen):
    m, x = ternary_case(case, gen, k=k, clip_all=clip_all)
    assert_bit_exact(run_tvm(m, x), m(x))


# ----------------------------------------------------------------------------- on the Pi
@pytest.mark.timeout(600)
@pytest.mark.parametrize("case", [CONV_CASES[0], CONV_CASES[2], CONV_CASES[3], CONV_CASES[5]],
                         ids=CASE_IDS)
def test_per_channel_and_ternary_on_pi(emulated_pi, case, gen):
    m, x = _pc_case(case, gen)
    assert_bit_exact(run_on_board(emulated_pi.address, m, x), m(x))
    m, x = ternary_case(case, gen, k=3)
    assert_bit_exact(run_on_board(emulated_pi.address, m, x), m(x))


# ----------------------------------------------------------------------------- models
@pytest.mark.parametrize("spec", ["ternary", "combined-ternary:2", "combined-ternary:3,act_bits=4"])
def test_scheme_builds_bit_exact(spec, tmp_path):
    torch.manual_seed(0)
    qat = tvmq.prepare(zoo.resnet20(), spec)
    tvmq.calibrate(qat, [torch.randn(4, 3, 32, 32) for _ in range(2)])
    deploy = tvmq.convert(qat)
    kinds = {type(m).__name__ for m in deploy.modules()}
    assert "IntTernaryConv2d" in kinds
    art = tvmq.build(deploy, torch.randn(1, 3, 32, 32), target="x86", out=tmp_path / "r20",
                     parity=8)
    assert art.manifest["parity"]["mismatches"] == 0
    assert art.manifest["recipe"]["spec"] == spec
