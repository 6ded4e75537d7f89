"""Power-of-two weights (seed 001): APTQ and APQ:B from QAT to a multiplication-free kernel --
the fit, fake-quant = deploy, both lowerings bit-exact on x86 and the emulated Pi, builds."""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import pytest
import torch
import tvm
from torch import nn
from tvm import relax

import tvmq
from relay_passes import composite_calls
from relay_passes.lower_composites import LoweringError
from schedules.targets import resolve
from tests.conftest import OpModule, assert_bit_exact
from tvmq import schemes, zoo
from tvmq.compile import compile_relax
from tvmq.frontend import import_exported_program
from tvmq.integer import AccumulatorOverflowError
from tvmq.quantizers import IntSEQuantizer
from tvmq.schemes.pot import (POWERS, PotWindowWarning, decode, fit_pot,
                              nearest_level)

ops = torch.ops.tvmq
ROOT = Path(__file__).resolve().parents[1]
LOWERINGS = ("int8-fold", "shift-add")

# n, c, h, w, o, k, stride, padding (t, l, b, r), groups
CASES = [
    (1, 16, 10, 10, 24, 3, 1, (1, 1, 1, 1), 1),  # two channel blocks
    (2, 5, 9, 7, 7, 3, 2, (1, 1, 1, 1), 1),  # odd channels, stride 2, odd sizes
    (1, 3, 8, 8, 13, 1, 1, (0, 0, 0, 0), 1),  # 1x1, odd output channels
    (1, 8, 8, 8, 8, 3, 1, (1, 1, 1, 1), 8),  # depthwise
    (1, 9, 11, 11, 9, 3, 2, (1, 0, 1, 2), 9),  # depthwise, stride 2, uneven padding
    (1, 8, 9, 9, 12, 3, 2, (1, 1, 1, 1), 4),  # grouped, stride 2
]
CASE_IDS = [f"{c[1]}x{c[2]}x{c[3]}-o{c[4]}-k{c[5]}-s{c[6]}-g{c[8]}" for c in CASES]


def pot_case(case, gen, lo=-128, hi=127, x_range=(-128, 127)):
    """A pot conv with the edge cases built in: an all-zero filter, a filter of only positive
    and one of only negative weights, both ends of the exponent window (±2^0, ±2^6)."""
    n, c, h, w, o, k, stride, padding, groups = case
    x = torch.randint(x_range[0], x_range[1] + 1, (n, c, h, w), generator=gen, dtype=torch.int8)
    codes = torch.randint(-POWERS, POWERS + 1, (o, c // groups, k, k), generator=gen,
                          dtype=torch.int8)
    codes[0] = 0
    codes[1] = codes[1].abs().clamp_min(1)
    codes[2 % o] = -codes[2 % o].abs().clamp_min(1)
    codes[-1].view(-1)[0], codes[-1].view(-1)[-1] = 1, -POWERS  # 2^0 and -2^6
    bias = torch.randint(-3000, 3000, (o,), generator=gen, dtype=torch.int32)
    shift = torch.randint(1, 10, (o,), generator=gen, dtype=torch.int32)
    shift[0], shift[-1] = -2, 12  # a left shift and a large right shift
    m = OpModule(lambda x, cd, b, s: ops.pot_conv2d(x, cd, b, s, [stride] * 2, list(padding),
                                                    [1, 1], groups, lo, hi), codes, bias, shift)
    return m, x


def _compile(module, x, lowering, target):
    mod = import_exported_program(torch.export.export(module, (x,)))
    plan = {node: lowering for node, op, *_ in composite_calls(mod) if op == "tvmq.pot_conv2d"}
    assert plan, "no pot_conv2d in the graph"
    return compile_relax(mod, resolve(target), plan=plan)


def run_lowering(module, x, lowering, target="x86") -> torch.Tensor:
    vm = relax.VirtualMachine(_compile(module, x, lowering, target), tvm.cpu())
    return torch.from_numpy(vm["main"](tvm.runtime.tensor(x.numpy())).numpy())


def run_lowering_on_board(address, module, x, lowering, target="arm") -> torch.Tensor:
    """``tests.conftest.run_on_board`` with a chosen lowering."""
    from deploy import remote
    from tvmq.compile import export_library

    ex = _compile(module, x, lowering, target)
    with tempfile.TemporaryDirectory() as tmp:
        lib = Path(tmp) / "op.so"
        export_library(ex, resolve(target), str(lib))
        board = remote.connect(address)
        board.session.upload(str(lib))
        dev = board.session.cpu()
        vm = relax.VirtualMachine(board.session.load_module("op.so"), dev)
        vm.set_input("main", tvm.runtime.tensor(x.numpy(), dev))
        vm.invoke_stateful("main")
        return torch.from_numpy(vm.get_outputs("main").numpy())


# ----------------------------------------------------------------------------- registry
@pytest.mark.parametrize("spec", ["aptq", "apq:3", "apq:4", "apq:5", "aptq:act=ternary,act_bits=2",
                                  "apq:3,act_bits=6", "aptq:max_clip=0.1"])
def test_spec_round_trips(spec):
    cfg = schemes.parse_spec(spec)
    assert cfg.spec == spec and schemes.parse_spec(cfg.spec) == cfg
    assert "activations" in cfg.scheme.describe(cfg)


def test_registry_and_defaults():
    assert {"aptq", "apq"} <= set(schemes.SCHEMES)
    assert schemes.SCHEMES["aptq"].lowerings == LOWERINGS
    assert schemes.SCHEMES["apq"].keep_8bit == ("input", "first", "last")
    text = schemes.SCHEMES["aptq"].describe(schemes.parse_spec("aptq"))
    assert "INT-SE 8-bit" in text
    assert schemes.parse_spec("apq:3").mags == 3 and schemes.parse_spec("apq:5").mags == 15


@pytest.mark.parametrize("bad,match", [
    ("apq:2", "B=2 must be in 3..5"), ("apq:6", "B=6"), ("apq:x", "not a int"),
    ("aptq:act=nope", "act='nope'"), ("aptq:act=aptq", "act='aptq'"),
    ("aptq:act=ternary", "act=ternary: act_bits=8"), ("aptq:max_clip=2", "max_clip=2.0"),
    ("aptq:bits=3", "no argument 'bits'")])
def test_bad_scheme_arguments_are_named(bad, match):
    with pytest.raises(schemes.UnknownSchemeError, match=match):
        tvmq.prepare(zoo.digits_net(), bad)


def test_recipe_gives_any_activation_quantizer():
    qat = tvmq.prepare(zoo.digits_net(), {"*": "aptq", "layers.0.conv1": "apq:3,act=ternary,act_bits=3"})
    by_name = {m.layer_name: m for m in qat.modules() if hasattr(m, "layer_name")}
    assert type(by_name["layers.0.conv1"].out_quant).__name__ == "BoxPlotQuantizer"
    assert isinstance(by_name["layers.0.conv2"].out_quant, IntSEQuantizer)
    assert by_name["stem.0"].scheme.weight.spec == "int-se"  # kept 8-bit: first layer


# ----------------------------------------------------------------------------- fit
def _weights(seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(12, 6, 3, 3, generator=gen) * 0.05
    w[2] = 0  # all zero
    w[3] = w[3].abs()  # only positive
    w[4] = -w[4].abs()  # only negative
    w[5] *= 0.01  # a small filter: below the window's bottom
    return w


@pytest.mark.parametrize("mags,split", [(1, True), (3, False), (7, False)])
def test_fit_values_window_and_integer_form(mags, split):
    w = _weights()
    fit = fit_pot(w, mags, split)
    nz = fit.value != 0
    # every value is ±2^e with e in the layer's window of POWERS powers
    e = torch.frexp(fit.value[nz].abs().double())[1] - 1
    assert (e >= fit.e_low).all() and (e <= fit.top).all() and fit.top - fit.e_low == POWERS - 1
    assert torch.equal(fit.integer.double() * 2.0 ** fit.e_low, fit.value.double())
    assert fit.integer.abs().max() <= 64 and torch.equal(decode(fit.codes), fit.integer)
    assert not nz[2].any() and (fit.value[3] >= 0).all() and (fit.value[4] <= 0).all()
    per_filter = [set(fit.value[f][fit.value[f] != 0].abs().tolist()) for f in range(12)]
    if mags == 1:  # APTQ: one magnitude per sign and filter
        for f in range(12):
            pos = set(fit.value[f][fit.value[f] > 0].tolist())
            neg = set(fit.value[f][fit.value[f] < 0].tolist())
            assert len(pos) <= 1 and len(neg) <= 1
    else:
        assert all(len(s) <= min(mags, POWERS) for s in per_filter)


def test_thresholds_are_the_l2_optimal_midpoints():
    # levels 0 and 2^-2 only: a weight goes to 2^-2 iff it is above 2^-3 (ties to zero)
    a = torch.tensor([0.0, 0.1, 0.125, 0.126, 0.3, 0.374, 0.376, 10.0], dtype=torch.float64)
    k = nearest_level(a, torch.tensor(-2), torch.tensor(-1))
    assert k.tolist() == [-3, -3, -3, -2, -2, -2, -1, -1]


def test_aptq_fit_beats_fixed_thresholds():
    """Per-filter, per-sign L2 search vs TWN's fixed threshold 0.7·mean|w| with the same
    power-of-two rounding of the scale (each filter's α = 2^round(log2 mean|w| over T))."""
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(32, 16, 3, 3, generator=gen) * 0.05
    w[::3] += 0.03  # uneven: positive and negative halves differ
    fit = fit_pot(w, 1, True)
    flat = w.flatten(1)
    a = flat.abs()
    t = torch.sign(flat) * (a > 0.7 * a.mean(1, keepdim=True))
    alpha = (a * t.abs()).sum(1) / t.abs().sum(1)
    fixed = t * torch.pow(2.0, torch.round(torch.log2(alpha)))[:, None]
    err_fit = float((fit.value.flatten(1) - flat).pow(2).sum())
    err_fixed = float((fixed - flat).pow(2).sum())
    assert err_fit < err_fixed
    # and each sign's exponent is the best of its window: moving it by one is worse
    for f in range(4):
        for s, col in ((1, 0), (-1, 1)):
            sel = torch.sign(flat[f]) == s
            p = int(fit.exps[f, col])
            errs = {}
            for q in range(fit.e_low, fit.top + 1):
                v = torch.where(a[f] > 2.0 ** (q - 1), 2.0 ** q, 0.0)
                errs[q] = float(((v - a[f])[sel]).pow(2).sum())
            assert errs[p] == min(errs.values())


def test_apq_more_bits_fit_better_and_apq5_equals_apq4_in_the_window():
    w = _weights(1)
    errs = {m: float((fit_pot(w, m, False).value - w).pow(2).sum()) for m in (1, 3, 7, 15)}
    assert errs[1] > errs[3] > errs[7] and errs[7] == errs[15]


def test_window_clipping_warns_naming_the_layer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
    with torch.no_grad():
        model[0].weight[1:] *= 1e-4  # 7 of 8 filters far below the first: outside the window
    qat = tvmq.prepare(model, schemes.Recipe("aptq", keep_8bit=()))
    tvmq.calibrate(qat, [torch.randn(2, 3, 8, 8)])
    with pytest.warns(PotWindowWarning, match=r"layer '[^']+': its exponent window .* changes"):
        tvmq.convert(qat)
    quiet = tvmq.prepare(model, schemes.Recipe("aptq:max_clip=1", keep_8bit=()))
    tvmq.calibrate(quiet, [torch.randn(2, 3, 8, 8)])
    with warnings.catch_warnings():
        warnings.simplefilter("error", PotWindowWarning)
        tvmq.convert(quiet)


def test_bias_that_does_not_fit_is_named():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3))
    with torch.no_grad():
        model[2].bias[3] = 4e5  # 2^31 at an accumulator exponent near 2^-14 is 1.3e5
    qat = tvmq.prepare(model, schemes.Recipe("aptq", keep_8bit=()))
    tvmq.calibrate(qat, [torch.randn(2, 3, 8, 8)])
    with pytest.raises(AccumulatorOverflowError, match=r"layer '.*2'.*bias of output channel 3.*does not fit int32"):
        tvmq.convert(qat)


def test_straight_through_gradient_and_refit():
    q = schemes.SCHEMES["aptq"].weight_quantizer(schemes.parse_spec("aptq"))
    w = _weights().requires_grad_()
    q(w).sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))
    before = q.last_fit.value.clone()
    q((w * 4).detach())
    assert torch.equal(q.last_fit.value, before * 4)  # refitted each call (scale-equivariant)


@pytest.mark.parametrize("spec", ["aptq", "apq:3", "apq:4", "aptq:act=ternary,act_bits=2",
                                  "apq:5,act=ternary,act_bits=4"])
def test_fake_quant_computes_what_the_deploy_model_computes(spec):
    """Inputs on the integer grid, no bias: QAT's forward (eval) and the integer deploy
    model agree exactly -- power-of-two weights are exact in float and the activations round
    half up as the integer graph does."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.ReLU(),
                          nn.Conv2d(8, 4, 3, stride=2, groups=4, bias=False))
    qat = tvmq.prepare(model, schemes.Recipe(spec, keep_8bit=(), output="float"))
    x = torch.randint(-60, 60, (4, 3, 8, 8)).float() / 64  # on the 2^-6 grid
    tvmq.calibrate(qat, [x])
    qat.eval()
    deploy = tvmq.convert(qat)
    assert "IntPotConv2d" in {type(m).__name__ for m in deploy.modules()}
    assert torch.equal(qat(x), deploy(x))


# ----------------------------------------------------------------------------- kernels
@pytest.mark.parametrize("lowering", LOWERINGS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_pot_conv2d_exact_x86(case, lowering, gen):
    m, x = pot_case(case, gen)
    want = m(x)
    assert want.min() == -128 and want.max() == 127  # saturating both ways
    assert_bit_exact(run_lowering(m, x, lowering), want)


@pytest.mark.parametrize("lowering", LOWERINGS)
def test_pot_conv2d_unsigned_range_and_extreme_inputs(lowering, gen):
    """Output range 0..15 (after a ReLU) and every input at -128 (the largest products)."""
    m, _ = pot_case(CASES[1], gen, lo=0, hi=15)
    x = torch.full((2, 5, 9, 7), -128, dtype=torch.int8)
    assert_bit_exact(run_lowering(m, x, lowering), m(x))


def test_codes_out_of_range_are_refused(gen):
    m, x = pot_case(CASES[2], gen)
    m.c0[0, 0, 0, 0] = 8
    with pytest.raises(ValueError, match=r"codes must lie in \[-7, 7\]"):
        m(x)
    with pytest.raises(LoweringError, match="codes must lie in"):
        _compile(m, x, "int8-fold", "x86")


@pytest.mark.timeout(900)
@pytest.mark.parametrize("case", [CASES[0], CASES[1], CASES[4]], ids=[CASE_IDS[i] for i in (0, 1, 4)])
def test_pot_conv2d_exact_on_pi(emulated_pi, case, gen):
    m, x = pot_case(case, gen)
    want = m(x)
    for lowering in LOWERINGS:
        assert_bit_exact(run_lowering_on_board(emulated_pi.address, m, x, lowering), want)


# ----------------------------------------------------------------------------- models
@pytest.mark.parametrize("spec", ["aptq", "apq:4"])
def test_resnet20_builds_bit_exact_x86(spec, tmp_path, monkeypatch):
    monkeypatch.setenv("TVMQ_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)
    qat = tvmq.prepare(zoo.resnet20(), spec)
    tvmq.calibrate(qat, [torch.randn(4, 3, 32, 32) for _ in range(2)])
    deploy = tvmq.convert(qat)
    assert "IntPotConv2d" in {type(m).__name__ for m in deploy.modules()}
    art = tvmq.build(deploy, torch.randn(1, 3, 32, 32), target="x86", out=tmp_path / "r20",
                     parity=4)
    assert art.manifest["parity"]["mismatches"] == 0
    assert art.manifest["recipe"]["spec"] == spec
    pot_layers = [r for r in art.manifest["layers"] if r.get("op") == "tvmq.pot_conv2d"]
    pot_modules = [m for m in deploy.modules() if type(m).__name__ == "IntPotConv2d"]
    assert len(pot_layers) == len(pot_modules) >= 18  # every conv but the stem
    for row in pot_layers:  # measured, both kernels, the faster one chosen
        assert row["lowering"] in LOWERINGS and "ms measured" in row["reason"]
        assert "int8-fold" in row["reason"] and "shift-add" in row["reason"]


def test_resnet20_shift_add_everywhere_bit_exact(tmp_path, monkeypatch):
    monkeypatch.setenv("TVMQ_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)
    qat = tvmq.prepare(zoo.resnet20(), "aptq")
    tvmq.calibrate(qat, [torch.randn(4, 3, 32, 32) for _ in range(2)])
    deploy = tvmq.convert(qat)
    modules = [m for n, m in deploy.named_modules() if type(m).__name__ == "IntPotConv2d"]
    forced = {name: "shift-add" for name, m in deploy.named_modules()
              if type(m).__name__ == "IntPotConv2d"}
    art = tvmq.build(deploy, torch.randn(1, 3, 32, 32), target="x86", out=tmp_path / "r20",
                     parity=4, lowerings=forced)
    assert modules and art.manifest["parity"]["mismatches"] == 0
    rows = [r for r in art.manifest["layers"] if r.get("op") == "tvmq.pot_conv2d"]
    assert rows and all(r["lowering"] == "shift-add" for r in rows)


@pytest.mark.parametrize("lowering", LOWERINGS)
def test_resnet20_builds_for_arm_each_lowering(lowering, tmp_path, monkeypatch):
    """Cross-compiled for the Pi with every pot layer on one kernel (chosen, so no estimate
    is needed); the parity check runs the same lowerings built for this host."""
    monkeypatch.setenv("TVMQ_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)
    qat = tvmq.prepare(zoo.resnet20(), "apq:4")
    tvmq.calibrate(qat, [torch.randn(4, 3, 32, 32) for _ in range(2)])
    deploy = tvmq.convert(qat)
    forced = {name: lowering for name, m in deploy.named_modules()
              if type(m).__name__ == "IntPotConv2d"}
    art = tvmq.build(deploy, torch.randn(1, 3, 32, 32), target="arm", out=tmp_path / "arm",
                     parity=2, lowerings=forced)
    assert art.manifest["parity"]["mismatches"] == 0 and (tmp_path / "arm" / "manifest.json").is_file()


@pytest.mark.timeout(1800)
def test_resnet20_cli_builds_for_arm(tmp_path):
    out = tmp_path / "r20-arm"
    env = {"PYTHONPATH": str(ROOT), "TVMQ_CACHE": str(tmp_path / "cache"),
           "PATH": "/usr/local/bin:/usr/bin:/bin"}
    res = subprocess.run([sys.executable, "-m", "tvmq.build", "resnet20", "--scheme", "aptq",
                          "--target", "arm", "--out", str(out), "--parity", "4", "--quiet"],
                         cwd=ROOT, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["parity"]["mismatches"] == 0 and manifest["recipe"]["spec"] == "aptq"
    rows = [r for r in manifest["layers"] if r.get("op") == "tvmq.pot_conv2d"]
    assert rows and all(r["lowering"] in LOWERINGS for r in rows)


def test_lowering_plan_cache_key_covers_every_lowering_kernel_and_schedule_file(tmp_path):
    """The measured plan is cached by a hash of the code: a file added to or changed in any
    of the layers (a new scheme's lowering, say) measures again."""
    from types import ModuleType

    from tvmq.lowering_plan import _code_digest

    layers = []
    for name in ("relay_passes", "topi_ops", "schedules"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text("")
        layers.append(ModuleType(name))
        layers[-1].__file__ = str(tmp_path / name / "__init__.py")
    before = _code_digest(tuple(layers))
    (tmp_path / "topi_ops" / "log_codes.py").write_text("X = 1\n")
    added = _code_digest.__wrapped__(tuple(layers))
    (tmp_path / "topi_ops" / "log_codes.py").write_text("X = 2\n")
    changed = _code_digest.__wrapped__(tuple(layers))
    assert len({before, added, changed}) == 3
