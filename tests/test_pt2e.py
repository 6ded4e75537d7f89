"""Bring your own QAT model: standard PT2E int8 models (torchao) -> tvmq's integer kernels.

The affine ops (zero points, fixed-point multipliers) match their PyTorch reference bit for
bit on x86 and on the emulated Pi; the importer maps XNNPACK / x86 / symmetric
configurations (per-tensor and per-channel weights) and refuses what it cannot map, naming
the node; a digits CNN trained with PT2E QAT builds for arm and runs on the emulated Pi.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import tvmq
from tests.conftest import OpModule, assert_bit_exact, int8, run_on_board, run_tvm
from tvmq import data, pt2e, zoo
from tvmq.ops_affine import f32, multiplier, multipliers

ops = torch.ops.tvmq
# torchao is installed by setup.sh (the pt2e extra, --no-deps): these tests always run
from torchao.quantization.pt2e.quantize_pt2e import (convert_pt2e, prepare_pt2e,  # noqa: E402
                                                     prepare_qat_pt2e)
from torchao.quantization.pt2e import move_exported_model_to_eval  # noqa: E402


# ----------------------------------------------------------------------------- multipliers
@pytest.mark.parametrize("m", [1e-9, 3.3e-5, 0.0123, 0.5, 0.7071, 0.99999999, 1.0, 3.7, 1000.0])
def test_multiplier_forms(m):
    mult, shift = multiplier(m)
    assert 1 <= shift <= 62
    if shift < 62:
        assert 1 << 30 <= mult < 1 << 31
    assert abs(mult * 2.0 ** -shift - m) <= m * 2.0 ** -30 + 2.0 ** -63
    p_mult, p_shift = multiplier(m, shift_only=True)
    assert p_mult & (p_mult - 1) == 0  # a power of two
    assert p_mult * 2.0 ** -p_shift == 2.0 ** round(math.log2(m))


def test_fixed_point_rounds_half_up():
    from tvmq.ops_affine import fixed_point
    v = torch.tensor([5, -5, 6, -6, 2**31 - 1, -2**31])
    assert fixed_point(v, torch.tensor(1), torch.tensor(2)).tolist()[:4] == [1, -1, 2, -1]
    big = fixed_point(v, torch.tensor(2**31 - 1), torch.tensor(62))
    assert big.tolist() == [(int(a) * (2**31 - 1) + 2**61) >> 62 for a in v]  # Python ints


# ----------------------------------------------------------------------------- ops, bit for bit
ZPS = [(0, 0), (-128, 127), (127, -128), (-1, -128)]  # (-128, ..): uint8 zero point 0 shifted


def conv_case(gen, x_zp, out_zp, shift_only=False, groups=1, relu=False, tiny=False):
    """A conv with per-channel scales spanning 7 decades (or tiny: saturating outputs)."""
    c, o = 6, 12
    w = int8(o, c // groups, 3, 3, gen=gen, lo=-127)
    w[0] = 127  # extreme filters
    w[1] = -127
    b = torch.randint(-30000, 30000, (o,), generator=gen, dtype=torch.int32)
    ms = torch.logspace(-9, -1 if not tiny else 1, o)
    mult, shift = multipliers(ms, shift_only)
    lo = max(-128, out_zp) if relu else -128
    return OpModule(lambda x, *t: ops.qconv2d_affine(x, *t, [2, 1], [1, 2, 0, 1], [1, 1], groups,
                                                      x_zp, out_zp, lo, 127),
                    w, b, mult, shift)


def op_cases(gen):
    """(name, module, inputs) of every affine op at edge values."""
    x = int8(2, 6, 9, 9, gen=gen)
    x[0, :, 0] = -128
    x[0, :, 1] = 127
    cases = []
    for x_zp, out_zp in ZPS:
        cases.append((f"conv-zp{x_zp},{out_zp}", conv_case(gen, x_zp, out_zp), (x,)))
    cases.append(("conv-shift-only", conv_case(gen, 3, -5, shift_only=True), (x,)))
    cases.append(("conv-saturating-relu", conv_case(gen, -128, 10, relu=True, tiny=True), (x,)))
    cases.append(("conv-grouped", conv_case(gen, 7, -2, groups=3), (x,)))
    xl = x.flatten(1)[:, :70].contiguous()
    w = int8(10, 70, gen=gen, lo=-127)
    b = torch.randint(-9000, 9000, (10,), generator=gen, dtype=torch.int32)
    for x_zp, out_zp in ZPS:
        mult, shift = multipliers(torch.logspace(-7, 0, 10))
        cases.append((f"linear-zp{x_zp},{out_zp}", OpModule(
            lambda x, *t, xz=x_zp, oz=out_zp: ops.qlinear_affine(x, *t, xz, oz, -128, 127),
            w, b, mult, shift), (xl,)))
    a_mult, shift = multiplier(1.7)
    b_mult = round(0.03 * 2.0 ** shift)
    for za, zb, zo in [(0, 0, 0), (-128, 127, -128), (127, -128, 127)]:
        cases.append((f"add-zp{za},{zb},{zo}", OpModule(
            lambda a, b, za=za, zb=zb, zo=zo: ops.qadd_affine(a, b, za, zb, a_mult, b_mult,
                                                              shift, zo, max(-128, zo), 127)),
                      (x, x.flip(0))))
    cases.append(("requantize", OpModule(lambda a: ops.requantize_affine(
        a, -128, *multiplier(2.9), 100, -128, 127)), (x,)))
    cases.append(("avg-pool", OpModule(lambda a: ops.qavg_pool2d_affine(
        a, [3, 3], [3, 3], -128, *multiplier(1 / 9 * 1.1), 3, -128, 127)), (x,)))
    xf = torch.randn(2, 3, 5, 5, generator=gen) * 4
    xf[0, 0, 0, :4] = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e30])
    xf[0, 0, 1, :4] = torch.tensor([0.5, 1.5, 2.5, -0.5]) * 0.25  # ties: half to even
    for zp in (-128, 0, 127):
        cases.append((f"quantize-zp{zp}", OpModule(
            lambda t, zp=zp: ops.quantize_affine(t, f32(1 / 0.25), zp, -128, 127)), (xf,)))
    cases.append(("dequantize", OpModule(lambda t: ops.dequantize_affine(t, f32(0.0123), -7)),
                  (x,)))
    return cases


CASE_NAMES = [c[0] for c in op_cases(torch.Generator().manual_seed(0))]


@pytest.mark.parametrize("name", CASE_NAMES)
def test_affine_ops_bit_exact_x86(name):
    _, module, inputs = dict((c[0], c) for c in op_cases(torch.Generator().manual_seed(7)))[name]
    assert_bit_exact(run_tvm(module, *inputs), module(*inputs))


def test_affine_ops_bit_exact_on_emulated_pi(emulated_pi, tmp_path):
    for name, module, inputs in op_cases(torch.Generator().manual_seed(11)):
        got = run_on_board(emulated_pi.address, module, *inputs, target="arm", tmp_path=tmp_path)
        assert_bit_exact(got, module(*inputs)), name


def test_quantize_matches_pt2e_quantize_per_tensor():
    x = torch.randn(4096, generator=torch.Generator().manual_seed(0)) * 3
    x[:8] = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, 1e9, -1e9, 0.0]) * 0.037
    for scale, zp, lo, hi, dtype in [(0.037, 3, -128, 127, torch.int8),
                                     (0.011, 200, 0, 255, torch.uint8)]:
        want = torch.ops.quantized_decomposed.quantize_per_tensor(x, scale, zp, lo, hi, dtype)
        off = 128 if dtype == torch.uint8 else 0
        got = ops.quantize_affine(x, f32(1.0 / scale), zp - off, lo - off, hi - off)
        assert torch.equal(got.to(torch.int32) + off, want.to(torch.int32))
        back = torch.ops.quantized_decomposed.dequantize_per_tensor(want, scale, zp, lo, hi, dtype)
        assert torch.equal(ops.dequantize_affine(got, f32(scale), zp - off), back)


# ----------------------------------------------------------------------------- the importer
class Small(nn.Module):
    """Every pattern the importer maps: conv(+pad, +relu), max pool, residual add + relu,
    1x1 conv, average pool, flatten, linear."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.c3 = nn.Conv2d(8, 16, 1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = torch.relu(self.c1(x))
        x = nn.functional.max_pool2d(x, 2, 2, padding=1)
        x = torch.relu(self.c2(x) + x)
        x = self.c3(x)
        x = nn.functional.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc(x)


def _ptq(model, quantizer, batches):
    batch = torch.export.Dim("batch", min=1, max=1024)
    gm = torch.export.export(model.eval(), (batches[0],), dynamic_shapes=({0: batch},)).module()
    prepared = prepare_pt2e(gm, quantizer)
    for b in batches:
        prepared(b)
    return convert_pt2e(prepared)


def output_scale(imported) -> float:
    (scale,) = [n.args[1] for n in imported.graph.nodes
                if str(n.target) == "tvmq.dequantize_affine.default"]
    return scale


def _agreement(want, got, scale):
    """Share of outputs equal to PT2E's float simulation, largest difference in LSB."""
    lsb = ((want - got).abs() / scale).round()
    return float((lsb == 0).float().mean()), float(lsb.max())


CONFIGS = [("xnnpack", True), ("xnnpack", False), ("x86", True), ("symmetric", True),
           ("symmetric", False)]


@pytest.mark.parametrize("kind,per_channel", CONFIGS, ids=[f"{k}-{'pc' if p else 'pt'}"
                                                            for k, p in CONFIGS])
def test_configs_import_and_build_bit_exact(kind, per_channel, tmp_path):
    torch.manual_seed(0)
    images = data.digits("train").tensors[0]
    converted = _ptq(Small(), pt2e.quantizer(kind, qat=False, per_channel=per_channel),
                     list(images[:256].split(64)))
    x1 = images[:1]
    program = torch.export.export(converted, (x1,))
    assert pt2e.is_pt2e(program)
    imported = pt2e.import_program(program, x1)
    names = {str(n.target) for n in imported.graph.nodes if n.op == "call_function"}
    assert {"tvmq.qconv2d_affine.default", "tvmq.qlinear_affine.default",
            "tvmq.qadd_affine.default", "tvmq.qmax_pool2d.default",
            "tvmq.qavg_pool2d_affine.default"} <= names
    test = data.digits("test").tensors[0][:64]
    with torch.no_grad():
        want = torch.cat([converted(x[None]) for x in test])
        got = torch.cat([imported.module()(x[None]) for x in test])
    same, worst = _agreement(want, got, output_scale(imported))
    # float simulation vs integer reference: roundings differ, a few LSB after 6 layers
    assert same > 0.8 and worst <= 4, (same, worst)
    art = tvmq.build(program, x1, target="x86", out=tmp_path / "art", parity=8,
                     parity_data=test)
    assert art.manifest["parity"]["mismatches"] == 0
    assert art.manifest["scheme"] == "pt2e"  # the manifest names where the model came from
    assert torch.equal(art.run(test[:1]), imported.module()(test[:1]))


def test_shift_only_is_a_pure_shift_and_bit_exact(tmp_path):
    images = data.digits("train").tensors[0]
    torch.manual_seed(0)
    converted = _ptq(Small(), pt2e.quantizer("x86", qat=False), list(images[:256].split(64)))
    x1 = images[:1]
    imported = pt2e.import_program(torch.export.export(converted, (x1,)), x1, shift_only=True)
    consts = dict(imported.named_buffers())
    mults = [v for k, v in consts.items() if k.endswith(tuple(f"mult_{i}" for i in range(99)))]
    assert mults and all(((m & (m - 1)) == 0).all() for m in mults)  # powers of two
    assert any(bool((m == 1).all()) for m in mults)  # the int32 round_shift epilogue
    art = tvmq.build(imported, x1, target="x86", out=tmp_path / "art", parity=8,
                     parity_data=data.digits("test").tensors[0])
    assert art.manifest["parity"]["mismatches"] == 0
    assert art.manifest["scheme"] == "pt2e-shift"


def test_x86_inductor_quantizer_float_output_is_refused_by_name(tmp_path):
    """X86InductorQuantizer itself leaves the last conv/linear's output in float (the inductor
    fuses the dequantize); tvmq needs a quantized output and says so, naming the node. Its
    configuration runs through ``pt2e.quantizer("x86")`` (above)."""
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer, get_default_x86_inductor_quantization_config)

    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(32, 10))
    quantizer = X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config())
    images = data.digits("train").tensors[0]
    converted = _ptq(model, quantizer, list(images[:128].split(64)))
    program = torch.export.export(converted, (images[:1],))
    with pytest.raises(pt2e.PT2EImportError, match=r"node 'linear'.*not to a quantize"):
        tvmq.build(program, images[:1], target="x86", out=tmp_path / "art")


def test_unmappable_node_is_refused_by_name(tmp_path):
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(1, 4, 3)

        def forward(self, x):
            return torch.sigmoid(self.c(x)).sum((2, 3))

    images = data.digits("train").tensors[0]
    converted = _ptq(Odd(), pt2e.quantizer("xnnpack", qat=False), [images[:32]])
    program = torch.export.export(converted, (images[:1],))
    with pytest.raises(pt2e.PT2EImportError, match=r"node 'sigmoid'.*no integer kernel"):
        tvmq.build(program, images[:1], target="x86", out=tmp_path / "no")
    assert not (tmp_path / "no").exists()


# ----------------------------------------------------------------------------- worked example
def qat_digits(kind="xnnpack", epochs=2):
    """The README's worked example: digits_net, PT2E QAT (torchao), convert."""
    torch.manual_seed(0)
    model = zoo.digits_net().train()
    example = torch.randn(64, 1, 8, 8)
    batch = torch.export.Dim("batch", min=1, max=1024)
    gm = torch.export.export(model, (example,), dynamic_shapes=({0: batch},)).module()
    prepared = prepare_qat_pt2e(gm, pt2e.quantizer(kind, qat=True))
    opt = torch.optim.Adam(prepared.parameters(), 3e-3)
    for _ in range(epochs):
        for x, y in data.loader("train"):
            opt.zero_grad()
            nn.functional.cross_entropy(prepared(x), y).backward()
            opt.step()
    move_exported_model_to_eval(prepared)
    return convert_pt2e(prepared)


def test_digits_pt2e_qat_on_emulated_pi(emulated_pi, tmp_path):
    converted = qat_digits()
    images, labels = data.digits("test").tensors
    x1 = images[:1]
    program = torch.export.export(converted, (x1,))
    path = tmp_path / "digits-pt2e.pt2"
    torch.export.save(program, path)
    pt2e_acc = data.accuracy(converted, data.loader("test"))
    # the build CLI's path: a .pt2 of a PT2E model
    art = tvmq.build(str(path), x1, target="arm", out=tmp_path / "arm", parity=len(labels),
                     parity_data=images, accuracy_data=(images, labels))
    tvm_acc = art.manifest["accuracy"]["deploy_tvm"]
    assert art.manifest["parity"]["mismatches"] == 0
    assert pt2e_acc > 85 and abs(tvm_acc - pt2e_acc) <= 2.0, (pt2e_acc, tvm_acc)
    report = tvmq.deploy.run(art, rpc=emulated_pi.address, repeat=1, min_repeat_ms=1,
                             warmup=0)
    assert report["boards"][0]["parity"]["mismatches"] == 0
    assert report["boards"][0]["parity"]["inputs"] == len(labels)
