"""The bit-serial ternary conv (topi_ops.bitserial + schedules.bitserial) equals its integer
reference bit for bit: on this host (AVX-512 popcount), through an AVX2-only target (LLVM's
nibble-lookup popcount), and on the emulated Raspberry Pi 4 (NEON ``cnt``, aarch64 under
qemu); plus the assembly of each path and the reference itself against a direct loop."""
from __future__ import annotations

import re
import tempfile
from pathlib import Path

import numpy as np
import pytest
import tvm

from schedules.bitserial import scheduled_module
from schedules.targets import has_feature, resolve
from topi_ops.bitserial import (BitserialParams, layout, pack_ternary,
                                qconv2d_bitserial_python)

HOST = resolve("x86")
HASWELL = tvm.target.Target({"kind": "llvm", "mcpu": "haswell", "num-cores": 2})  # AVX2 only
PI4 = resolve("arm")


class Case:
    """One layer: shapes, conv parameters, ternary terms and their shifts, requantization."""

    def __init__(self, name, n, c, h, w, o, k, stride=1, padding=(1, 1, 1, 1), dilation=1,
                 groups=1, terms=1, abits=2, lo=-128, hi=127, seed=0, term_shifts=None,
                 out_shift=None, bias=200, x="random", zero_filters=()):
        self.name = name
        rng = np.random.default_rng(seed)
        self.params = BitserialParams((stride, stride), tuple(padding), (dilation, dilation),
                                      groups, abits, lo, hi)
        self.x = (np.full((n, c, h, w), (1 << abits) - 1, np.int8) if x == "clip" else
                  rng.integers(0, 1 << abits, (n, c, h, w)).astype(np.int8))
        self.terms = rng.integers(-1, 2, (terms, o, c // groups, k, k)).astype(np.int8)
        for f in zero_filters:
            self.terms[:, f] = 0
        self.term_shift = (np.asarray(term_shifts, np.int32)[:, None].repeat(o, 1)
                           if term_shifts is not None else
                           rng.integers(0, 4, (terms, o)).astype(np.int32))
        self.bias = rng.integers(-bias, bias + 1, o).astype(np.int32)
        # per-channel shifts, negative (left) and positive (round half up) ones
        self.out_shift = (np.asarray(out_shift, np.int32) if out_shift is not None else
                          np.resize(np.array([3, -1, 0, 5, 1, 2], np.int32), o))
        self.weight_shape = (o, c // groups, k, k)

    def want(self):
        return qconv2d_bitserial_python(self.x, self.terms, self.term_shift, self.bias,
                                        self.out_shift, self.params)

    def packed(self, target):
        return pack_ternary(self.terms, self.term_shift, self.bias, self.out_shift, self.params,
                            target)

    def module(self, target):
        return scheduled_module(self.x.shape, self.packed(target), self.weight_shape,
                                self.params, target)


CASES = [
    Case("c3-odd-hw", 1, 3, 9, 11, 5, 3),
    Case("c13-stride2-k3terms-u2out", 1, 13, 12, 10, 8, 3, stride=2, terms=3,
         term_shifts=(0, 3, 6), lo=0, hi=3, bias=2000),
    Case("c67-k2", 1, 67, 7, 7, 6, 3, terms=2, seed=1),
    Case("c64-k1-2bit", 1, 64, 8, 8, 16, 3, seed=2),
    Case("c200-abits4-k2", 1, 200, 6, 6, 8, 3, terms=2, abits=4, seed=3),
    Case("depthwise", 1, 16, 10, 10, 16, 3, groups=16, terms=2, seed=4),
    Case("grouped-asym-pad-stride2", 1, 12, 9, 9, 18, 3, stride=2, padding=(0, 1, 2, 1),
         groups=3, seed=5),
    Case("1x1-batch2-abits1", 2, 8, 8, 8, 16, 1, padding=(0, 0, 0, 0), abits=1, seed=6),
    Case("dilation2", 1, 6, 12, 12, 8, 3, padding=(2, 2, 2, 2), dilation=2, seed=7),
    Case("zero-filters-clip-acts", 1, 24, 6, 6, 6, 3, terms=3, term_shifts=(0, 3, 6),
         x="clip", zero_filters=(0, 3), seed=8),
    Case("int32-lanes", 1, 200, 8, 8, 4, 7, padding=(3, 3, 3, 3), abits=7, seed=9),
]
SATURATING = Case("saturate-both-ways", 1, 32, 8, 8, 12, 3, terms=2, seed=10, bias=50,
                  out_shift=[-2, -1, 0, 1, 2, 3] * 2)


def run_host(case: Case, target) -> np.ndarray:
    lib = tvm.compile(case.module(target), target=target)
    dev = tvm.cpu()
    args = [tvm.runtime.tensor(a, dev) for a in (case.x, *case.packed(target))]
    out = tvm.runtime.tensor(np.zeros(case.want().shape, np.int8), dev)
    lib(*args, out)
    return out.numpy()


def assert_exact(got, want):
    assert got.shape == want.shape and got.dtype == want.dtype
    bad = np.argwhere(got != want)
    assert len(bad) == 0, f"{len(bad)} of {want.size} differ; first at {bad[0].tolist()}: " \
                          f"{got[tuple(bad[0])]} != {want[tuple(bad[0])]}"


@pytest.mark.parametrize("case", CASES + [SATURATING], ids=lambda c: c.name)
def test_exact_on_host(case):
    assert_exact(run_host(case, HOST), case.want())


@pytest.mark.parametrize("case", CASES + [SATURATING], ids=lambda c: c.name)
def test_exact_avx2_popcount(case):
    assert has_feature(HOST, "avx2"), "this host cannot run the AVX2 build"
    assert_exact(run_host(case, HASWELL), case.want())


def test_edge_cases_are_what_they_claim():
    sat = SATURATING.want()
    assert (sat == -128).any() and (sat == 127).any()
    u2 = CASES[1].want()
    assert (u2 == 0).any() and (u2 == 3).any()
    zero = CASES[9]
    assert (zero.x == 3).all()
    want = zero.want()
    for f in (0, 3):  # an all-zero filter gives round_shift(bias)
        b, s = int(zero.bias[f]), int(zero.out_shift[f])
        expect = (b + (1 << (s - 1)) >> s) if s > 0 else b << -s
        assert (want[:, f] == np.clip(expect, -128, 127)).all()
    assert layout(200, 7, 7, 7, PI4).acc == "int32"  # the int32-lanes case on aarch64
    assert layout(512, 3, 3, 2, PI4) == (8, 4, 16, 2, "uint8", "uint16")
    assert layout(67, 3, 3, 2, HOST)[:4] == (64, 1, 2, 1)  # x86: 64-channel words


def test_reference_matches_direct_loop():
    case = Case("tiny", 1, 5, 5, 4, 3, 3, stride=2, padding=(1, 0, 2, 1), groups=1, terms=3,
                term_shifts=(0, 3, 6), lo=-20, hi=20)
    x, p = case.x.astype(np.int64), case.params
    xp = np.pad(x, ((0, 0), (0, 0), (p.padding[0], p.padding[2]), (p.padding[1], p.padding[3])))
    want = case.want()
    for o in range(want.shape[1]):
        for y in range(want.shape[2]):
            for xx in range(want.shape[3]):
                acc = int(case.bias[o])
                for i in range(case.terms.shape[0]):
                    win = xp[0, :, y * 2:y * 2 + 3, xx * 2:xx * 2 + 3]
                    acc += int((win * case.terms[i, o]).sum()) << int(case.term_shift[i, o])
                s = int(case.out_shift[o])
                r = (acc + (1 << (s - 1))) >> s if s > 0 else acc << -s
                assert want[0, o, y, xx] == max(-20, min(20, r))


def test_pack_ternary_rejects_bad_terms():
    terms = np.full((1, 2, 3, 1, 1), 2, np.int8)
    with pytest.raises(ValueError, match="-1, 0, \\+1"):
        pack_ternary(terms, np.zeros((1, 2), np.int32), np.zeros(2, np.int32),
                     np.zeros(2, np.int32), BitserialParams(), HOST)


# ----------------------------------------------------------------------------- aarch64
def pi_asm(case: Case) -> str:
    return tvm.compile(case.module(PI4), target=PI4).mod.inspect_source("s")


def test_pi4_asm_uses_neon_cnt():
    asm = pi_asm(CASES[3])
    assert re.search(r"\bcnt\s+v\d+\.(16|8)b", asm), "no NEON cnt"
    assert re.search(r"\band\s+v\d+\.(16|8)b", asm), "no vector AND"
    assert re.search(r"\beor\s+v\d+\.(16|8)b", asm), "no vector EOR (select form)"
    assert re.search(r"\buadalp\s+v\d+\.(8|4)h", asm), "no pairwise widening accumulate"
    assert re.search(r"\buaddlv\s", asm), "no horizontal sum across the lanes"


def test_pi4_asm_uses_q_registers_for_wide_channels():
    asm = pi_asm(CASES[4])  # 200 channels: 16-byte words
    assert re.search(r"\bcnt\s+v\d+\.16b", asm)


@pytest.mark.parametrize("target", [HOST, tvm.target.Target(
    {"kind": "llvm", "mcpu": "icelake-server", "num-cores": 2})], ids=["host", "icelake"])
def test_avx512_vpopcntdq_asm_uses_vpopcnt(target):
    if not has_feature(target, "avx512vpopcntdq"):  # only the host can lack it (icelake runs)
        pytest.skip("this host has no AVX-512 VPOPCNTDQ; the icelake build checks that path")
    asm = tvm.compile(CASES[4].module(target), target=target).mod.inspect_source("s")
    assert re.search(r"\bvpopcntq\b", asm), "no AVX-512 VPOPCNTDQ popcount"


def test_avx2_asm_has_no_vpopcnt():
    asm = tvm.compile(CASES[4].module(HASWELL), target=HASWELL).mod.inspect_source("s")
    assert "vpopcnt" not in asm and "vpshufb" in asm  # LLVM's nibble lookup


PI_CASES = CASES + [SATURATING]


@pytest.mark.timeout(900)
def test_exact_on_emulated_pi(emulated_pi, tmp_path):
    from deploy import remote

    board = remote.connect(emulated_pi.address)
    cross = tvm.support.cc.cross_compiler("aarch64-linux-gnu-g++")
    dev = board.session.cpu()
    failures = []
    for case in PI_CASES:
        lib = tmp_path / f"{case.name}.so"
        tvm.compile(case.module(PI4), target=PI4).export_library(str(lib), fcompile=cross)
        board.session.upload(str(lib))
        func = board.session.load_module(lib.name)["main"]
        want = case.want()
        args = [tvm.runtime.tensor(a, dev) for a in (case.x, *case.packed(PI4))]
        out = tvm.runtime.tensor(np.zeros(want.shape, np.int8), dev)
        func(*args, out)
        got = out.numpy()
        if (got != want).any():
            failures.append(f"{case.name}: {(got != want).sum()} of {want.size} differ")
    board.close()
    assert not failures, failures


def test_relax_call_te_and_default_schedule_rule():
    """How a lowering uses the kernel: packed arrays as Relax constants, the kernel through
    ``bb.call_te`` (Python objects bound with functools.partial), the schedule found through
    ``schedules.default.RULES`` by the block's ``schedule_rule``."""
    import functools

    from tvm import relax

    from schedules.default import apply_default_schedules
    from schedules.elementwise import is_scheduled
    from topi_ops.bitserial import qconv2d_bitserial

    case = CASES[2]
    packed = case.packed(HOST)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(case.x.shape, "int8"))
    with bb.function("main", [x]):
        kernel = functools.partial(qconv2d_bitserial, weight_shape=case.weight_shape,
                                   params=case.params, target=HOST)
        out = bb.emit(bb.call_te(kernel, x, *[relax.const(a) for a in packed],
                                 primfunc_name_hint="tvmq_bitserial_conv2d"))
        bb.emit_func_output(out)
    mod = apply_default_schedules(bb.get(), HOST)
    funcs = [f for _, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    assert len(funcs) == 1 and is_scheduled(funcs[0])
    ex = tvm.compile(mod, target=HOST)
    vm = relax.VirtualMachine(ex, tvm.cpu())
    assert_exact(vm["main"](tvm.runtime.tensor(case.x)).numpy(), case.want())
