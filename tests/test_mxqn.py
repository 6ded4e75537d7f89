"""MXQN (seed 004): post-training, per-layer fixed point or logarithmic activations by SQNR;
log codes decode/encode exactly; fake quant equals deploy; kernels bit-exact on x86 and the
emulated Pi; bad calibration data named."""
from __future__ import annotations

import pytest
import torch
import tvm
from torch import nn

import tvmq
from tests.conftest import OpModule, assert_bit_exact, run_on_board, run_tvm
from schedules.targets import resolve
from tvmq import schemes, zoo
from tvmq.schemes.mxqn import (LOG, CalibrationDataError, LogGrid, MXQNQuantizer,
                               layer_choices)

ops = torch.ops.tvmq


class Chain(nn.Module):
    """conv-ReLU -> maxpool -> conv-ReLU -> conv -> linear: every inner value may be log."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.pool = nn.MaxPool2d(2)
        self.c2 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.c3 = nn.Conv2d(8, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 6 * 6, 5)

    def forward(self, x):
        return self.fc(self.c3(self.c2(self.pool(self.c1(x)))).flatten(1))


def _calibrated(spec, model=None, force_log=False):
    torch.manual_seed(0)
    qat = tvmq.prepare(model or Chain(), spec).double()
    tvmq.calibrate(qat, [torch.randn(8, 3, 12, 12).double() for _ in range(3)])
    if force_log:  # the choice is data-driven; force the log path where it is possible
        for q in qat.modules():
            if isinstance(q, MXQNQuantizer) and q.reason.startswith("fixed:"):
                q.mode.fill_(LOG)
    return qat


@pytest.mark.parametrize("spec", ["mxqn", "mxqn:4", "mxqn:4,base=2", "mxqn:6,base=sqrt2"])
def test_spec_round_trips(spec):
    cfg = schemes.parse_spec(spec)
    assert schemes.parse_spec(cfg.spec) == cfg and cfg.weight_bits == 8


def test_bad_base_is_named():
    with pytest.raises(schemes.UnknownSchemeError, match="base='3'"):
        tvmq.prepare(zoo.digits_net(), "mxqn:base=3")


def test_log_grid_is_exact_integers():
    g = LogGrid(e0=-3, levels=16, base="sqrt2", nonneg=True)
    t = g.table()
    assert t[:6].tolist() == [0, 128, 181, 256, 362, 512] and int(t[-1]) == 181 << 7
    assert g.decode_exponent == -10 and g.code_range() == (0, 16)
    # a value exactly on a level decodes to it; √2 levels are 181/128 of the octave below
    x = torch.tensor([2.0 ** -3, 2.0 ** -2, 2.0 ** -2.5, 0.0, 1e-9])
    v = g.fake_quantize(x)
    assert v.tolist()[:2] == [0.125, 0.25] and v[2] == 181 * 2.0 ** -10 and v[3] == v[4] == 0
    g2 = LogGrid(e0=0, levels=7, base="2", nonneg=False)
    assert g2.table().tolist() == [0, 1, 2, 4, 8, 16, 32, 64]
    assert g2.codes(torch.tensor([-100.0, -1.0, 0.6, 0.75, 3.0])).tolist() == [-7, -1, 0, 1, 3]


def test_choice_and_both_sqnrs_are_retrievable():
    qat = _calibrated("mxqn:4")
    rows = layer_choices(qat)
    assert [r["layer"] for r in rows] == ["c1.0", "c2.0", "c3", "fc"]
    for r in rows:
        assert r["activation"] in ("fixed", "log") and r["sqnr_fixed_db"] > 0
        assert r["sqnr_log_db"] > 0 and r["reason"]
    fc = rows[-1]
    assert fc["activation"] == "fixed" and fc["log_blocked"] == "model output"
    assert rows[0]["log_blocked"] is None  # c1 -> maxpool -> c2: codes may flow
    # the SQNR decides: each choice is the better one unless a fallback says why
    for r in rows:
        if r["activation"] == "log":
            assert r["sqnr_log_db"] > r["sqnr_fixed_db"]
        elif "fallback" not in r["reason"]:
            assert r["sqnr_fixed_db"] >= r["sqnr_log_db"]


@pytest.mark.parametrize("spec", ["mxqn", "mxqn:4", "mxqn:4,base=2"])
@pytest.mark.parametrize("force_log", [False, True])
def test_fake_quant_equals_deploy(spec, force_log):
    qat = _calibrated(spec, force_log=force_log)
    deploy = tvmq.convert(qat)
    kinds = {type(m).__name__ for m in deploy.modules()}
    if force_log:
        assert "IntMXConv2d" in kinds and "IntMXLinear" in kinds
    x = torch.randn(16, 3, 12, 12)
    assert torch.equal(qat(x.double()).float(), deploy(x))  # not close: equal


def test_all_zero_calibration_is_named():
    qat = tvmq.prepare(Chain(), "mxqn")
    with pytest.raises(CalibrationDataError, match="model input.*all zero"):
        tvmq.calibrate(qat, [torch.zeros(4, 3, 12, 12)])


def test_empty_calibration_set_says_so():
    with pytest.raises(tvmq.training.CalibrationError, match="empty"):
        tvmq.calibrate(tvmq.prepare(Chain(), "mxqn"), [])


def test_uncalibrated_convert_is_named():
    qat = tvmq.prepare(Chain(), "mxqn").eval()
    with pytest.raises(RuntimeError, match="run tvmq.calibrate"):
        tvmq.convert(qat)


def _mx_case(in_log, out_log, gen, base="sqrt2"):
    levels = 16 if base == "sqrt2" else 15
    g = LogGrid(0, levels, base, nonneg=False)
    if in_log:
        x = torch.randint(-levels, levels + 1, (2, 6, 7, 7), generator=gen, dtype=torch.int8)
    else:
        x = torch.randint(-128, 128, (2, 6, 7, 7), generator=gen, dtype=torch.int8)
    w = torch.randint(-127, 128, (5, 6, 3, 3), generator=gen, dtype=torch.int8)
    b = torch.randint(-3000, 3000, (5,), generator=gen, dtype=torch.int32)
    lo, hi = g.code_range() if out_log else (-128, 127)
    m = OpModule(lambda x, w, b, t, th: ops.mx_qconv2d(
        x, w, b, t, th, [1, 1], [1, 1, 1, 1], [1, 1], 1, 2, 3 if out_log else 9, in_log,
        out_log, lo, hi), w, b, g.table(), g.thresholds())
    return m, x


@pytest.mark.parametrize("base", ["sqrt2", "2"])
@pytest.mark.parametrize("in_log,out_log", [(True, False), (False, True), (True, True)])
def test_mx_qconv2d_bit_exact_x86(in_log, out_log, base, gen):
    m, x = _mx_case(in_log, out_log, gen, base)
    want = m(x)
    assert len(want.unique()) > 5
    assert_bit_exact(run_tvm(m, x), want)


def test_mx_qlinear_bit_exact_x86(gen):
    g = LogGrid(0, 16, "sqrt2", nonneg=True)
    x = torch.randint(0, 17, (3, 40), generator=gen, dtype=torch.int8)
    w = torch.randint(-127, 128, (7, 40), generator=gen, dtype=torch.int8)
    b = torch.randint(-3000, 3000, (7,), generator=gen, dtype=torch.int32)
    m = OpModule(lambda x, w, b, t, th: ops.mx_qlinear(x, w, b, t, th, 1, 4, True, True, 0, 16),
                 w, b, g.table(), g.thresholds())
    assert_bit_exact(run_tvm(m, x), m(x))


ZNVER3 = {"kind": "llvm", "mcpu": "znver3", "num-cores": 2}  # AVX2 without AVX-512: vpmaddwd


def _edge_case(in_log, out_log, base, groups=1):
    """Codes beyond the levels (-128, 127, +-(L + 1): clipped to L), +-L and 0; weights -128
    and 127; the decoded extremes (181 << 7 = 23168 for sqrt2) times them in every window."""
    levels = 16 if base == "sqrt2" else 15
    g = LogGrid(0, levels, base, nonneg=False)
    gen = torch.Generator().manual_seed(7)
    pick = torch.tensor([-128, 127, -levels - 1, levels + 1, -levels, levels, 0, 1, -1] if in_log
                        else [-128, 127, 0, 1, -1], dtype=torch.int8)
    x = pick[torch.randint(0, len(pick), (2, 6, 7, 7), generator=gen)]
    x[0, :, 2:5, 2:5] = pick[0]  # whole windows at the most negative code
    w = torch.where(torch.rand(6, 6 // groups, 3, 3, generator=gen) < 0.5, -128, 127).to(torch.int8)
    w[0], w[1] = -128, 127  # a window of the most negative code: both signs saturate
    b = torch.randint(-3000, 3000, (6,), generator=gen, dtype=torch.int32)
    lo, hi = g.code_range() if out_log else (-128, 127)
    # the largest accumulator, shifted, at twice the top threshold (or int8 bound): every
    # level and both bounds are reachable
    top = (int(g.table()[-1]) if in_log else 128) * 128 * 6 // groups * 9
    shift = (top // (2 * int(g.thresholds()[-1] if out_log else 128))).bit_length() - 1
    m = OpModule(lambda x, w, b, t, th: ops.mx_qconv2d(
        x, w, b, t, th, [1, 1], [1, 1, 1, 1], [1, 1], groups, 0, shift, in_log, out_log, lo, hi),
        w, b, g.table(), g.thresholds())
    return m, x, (lo, hi)


@pytest.mark.parametrize("target", ["x86", ZNVER3], ids=["host", "avx2"])
@pytest.mark.parametrize("base", ["sqrt2", "2"])
@pytest.mark.parametrize("in_log,out_log", [(True, False), (False, True), (True, True)])
def test_mx_qconv2d_edge_values_bit_exact(in_log, out_log, base, target):
    """The int8 kernel's decode (int16 pairs: vpdpwssd, vpmaddwd on AVX2) and encode
    against the reference at the extremes: both output bounds reached."""
    m, x, (lo, hi) = _edge_case(in_log, out_log, base)
    want = m(x)
    assert (want == lo).any() and (want == hi).any()
    assert_bit_exact(run_tvm(m, x, target=target), want)


def _kernels(m, x, target="x86"):
    from tvmq.compile import lower_graph
    from tvmq.frontend import import_exported_program

    mod = lower_graph(import_exported_program(torch.export.export(m, (x,))), resolve(target))
    return [gv.name_hint for gv, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]


def _mx_linear(table):
    g = LogGrid(0, 16, "sqrt2", nonneg=True)
    w = torch.randint(-127, 128, (7, 40), generator=torch.Generator().manual_seed(3),
                      dtype=torch.int8)
    return OpModule(lambda x, w, b, t, th: ops.mx_qlinear(x, w, b, t, th, 1, 4, True, True, 0,
                                                          16), w, torch.zeros(7, dtype=torch.int32),
                    table, g.thresholds())


def test_mx_ops_run_on_the_int8_conv_kernel():
    """A dense MXQN conv and linear are tvmq's conv kernel (no TOPI conv2d/matmul left); a
    grouped one keeps the int32 Relax ops, exact too."""
    m, x, _ = _edge_case(True, True, "sqrt2")
    names = _kernels(m, x)
    assert any(n.startswith("tvmq_qconv2d") for n in names), names
    assert not any("conv2d" in n and not n.startswith("tvmq_") for n in names), names
    x = torch.randint(0, 17, (3, 40), generator=torch.Generator().manual_seed(4), dtype=torch.int8)
    names = _kernels(_mx_linear(LogGrid(0, 16, "sqrt2", nonneg=True).table()), x)
    assert any(n.startswith("tvmq_qdense") for n in names), names
    assert not any("matmul" in n or "dense" in n and not n.startswith("tvmq_") for n in names)
    grouped, x, (lo, hi) = _edge_case(True, True, "sqrt2", groups=3)
    assert any("conv2d" in n and not n.startswith("tvmq_") for n in _kernels(grouped, x))
    want = grouped(x)
    assert (want == lo).any() and (want == hi).any()
    assert_bit_exact(run_tvm(grouped, x), want)


def test_log_table_too_wide_for_int16_is_named():
    """A hand-made table beyond int16 (the reference op takes it): one clear line naming the
    node, before any kernel is built."""
    from relay_passes import LoweringError

    table = LogGrid(0, 16, "sqrt2", nonneg=True).table()
    table[-1] = 40000
    x = torch.randint(0, 17, (3, 40), generator=torch.Generator().manual_seed(4), dtype=torch.int8)
    with pytest.raises(LoweringError, match=r"node 'mx_qlinear'.*fits int16"):
        run_tvm(_mx_linear(table), x)


def test_mxqn_model_builds_integer_only_and_bit_exact(tmp_path):
    qat = _calibrated("mxqn:4", force_log=True).float()
    deploy = tvmq.convert(qat)
    art = tvmq.build(deploy, torch.randn(1, 3, 12, 12), target="x86", out=tmp_path / "mx",
                     parity=8)
    assert art.manifest["parity"]["mismatches"] == 0


@pytest.mark.timeout(900)
def test_mxqn_bit_exact_on_pi(emulated_pi, gen):
    m, x = _mx_case(True, True, gen)
    assert_bit_exact(run_on_board(emulated_pi.address, m, x), m(x))
    deploy = tvmq.convert(_calibrated("mxqn:4", force_log=True).float())
    x = torch.randn(2, 3, 12, 12)
    assert_bit_exact(run_on_board(emulated_pi.address, deploy, x), deploy(x))
