"""Integer Winograd F(2x2, 3x3) (``topi_ops.winograd``): the 3x3 stride-1 conv on AVX2 hosts
without VNNI. Built for an AVX2-only target (``znver3``) and run on this host (any AVX2 CPU
runs it): the integer transforms compose to 4 x the conv; the int32 accumulator and the
requantized output bit-exact against the PyTorch integer reference on edge values (inputs
-128 / 127 / 0, weights -128 / 127, odd sizes, uneven padding, channels that fill no
block, two images); per-channel shifts and a fused residual add through the whole
pipeline; the choice (which targets and convs) and the build-time int32 bound, with a
conv that could overflow kept on the direct kernel, still exact."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import tvm
from tvm import s_tir, te

from schedules.default import schedule_conv_pairs
from schedules.elementwise import SCHEDULED
from schedules.targets import has_feature, resolve
from tests.conftest import OpModule, assert_bit_exact, int8, run_tvm
from tests.test_asm import conv_body
from topi_ops import winograd
from topi_ops.conv2d import PAIRS, Conv2dParams, pack_conv2d
from tvmq.compile import compile_relax, lower_graph
from tvmq.frontend import import_exported_program
from tvmq.ops import _conv_i32

ops = torch.ops.tvmq

ZNVER3 = {"kind": "llvm", "mcpu": "znver3", "num-cores": 2}  # AVX2, no AVX-512 / VNNI
TARGET = tvm.target.Target(ZNVER3)
needs_avx2 = pytest.mark.skipif(not has_feature(resolve("x86"), "avx2"),
                                reason="this host cannot run AVX2 code")


def params(padding=(1, 1, 1, 1), out_shift=0, relu=False, stride=1, groups=1):
    return Conv2dParams((stride,) * 2, padding, (1, 1), groups, out_shift, relu)


# ----------------------------------------------------------------------------- the algebra
def test_integer_transforms_give_four_times_the_conv():
    rng = np.random.default_rng(0)
    for _ in range(200):
        d = rng.integers(-128, 128, (4, 4))
        g = rng.integers(-128, 128, (3, 3))
        u = winograd.G2 @ g @ winograd.G2.T
        v = winograd.BT @ d @ winograd.BT.T
        y = winograd.AT @ (u * v) @ winograd.AT.T
        direct = np.array([[(d[i:i + 3, j:j + 3] * g).sum() for j in range(2)] for i in range(2)])
        assert (y == 4 * direct).all()
    w = rng.integers(-128, 128, (5, 3, 3, 3))
    u = winograd.transform_weights(w.astype(np.int8))
    assert u.shape == (5, 3, 16, 1) and u.dtype == np.int16
    assert np.abs(u).max() <= 9 * 128


def test_which_convs_and_targets():
    conv = (64, 64, 3, 3)
    assert winograd.applies(TARGET, conv, params())
    assert winograd.applies(TARGET, conv, params(padding=(0, 0, 0, 0)))
    assert not winograd.applies(TARGET, conv, params(stride=2))
    assert not winograd.applies(TARGET, (64, 64, 1, 1), params(padding=(0, 0, 0, 0)))
    assert not winograd.applies(TARGET, (64, 8, 3, 3), params(groups=8))
    assert not winograd.applies(TARGET, (64, 3, 3, 3), params())  # an RGB stem: folded taps
    assert not winograd.applies(TARGET, conv, params(), pad=5)  # an affine input's zero point
    assert winograd.applies(TARGET, (128, 128, 3, 3), params())  # 512 KB transformed
    assert not winograd.applies(TARGET, (256, 256, 3, 3), params())  # 2 MB: past L2
    for other in ({"kind": "llvm", "mcpu": "icelake-server"},  # VNNI: int8 products are cheaper
                  {"kind": "llvm", "mcpu": "sapphirerapids"},  # AMX
                  {"kind": "llvm", "mcpu": "alderlake"},  # AVX-VNNI
                  {"kind": "llvm", "mcpu": "x86-64"}):  # no AVX2
        assert not winograd.applies(tvm.target.Target(other), conv, params()), other
    assert not winograd.applies(resolve("arm"), conv, params())  # the Pi 4
    assert not winograd.applies(resolve("rpi5"), conv, params())


def test_int32_bound_from_the_weights():
    rng = np.random.default_rng(1)
    typical = rng.integers(-128, 128, (64, 512, 3, 3)).astype(np.int8)
    assert winograd.fits_int32(typical, (-128, 127))
    # 1024 channels of -128: the output transform's sums could pass 2^31 (4 x the conv's
    # own sum, 4 x 1024 x 9 x 128 x 128, would not): the direct kernel keeps it
    extreme = np.full((8, 1024, 3, 3), -128, np.int8)
    assert not winograd.fits_int32(extreme, (-128, 127))
    assert winograd.fits_int32(extreme[:, :512], (-128, 127))
    # the bound follows the input's range: 4 x 127 instead of 4 x 128
    edge = np.full((8, 914, 3, 3), -128, np.int8)
    assert winograd.fits_int32(edge, (0, 127)) and not winograd.fits_int32(edge, (-128, 127))


# ----------------------------------------------------------------------------- the kernel
def run_kernel(x: np.ndarray, w: np.ndarray, b: np.ndarray, p: Conv2dParams,
               accumulator: bool) -> np.ndarray:
    """The Winograd kernel (pack, TE compute, the conv schedule) built for znver3 and run
    here, NHWC in and out; ``accumulator``: the int32 ``conv + bias``."""
    wp, bp = pack_conv2d(winograd.transform_weights(w), b, p, TARGET, PAIRS)
    data = te.placeholder(x.shape, "int8", "data")
    wt, bt = te.placeholder(wp.shape, "int16", "w"), te.placeholder(bp.shape, "int32", "b")
    out = winograd.qconv2d_winograd(data, wt, bt, weight_shape=w.shape, params=p,
                                    target=TARGET,
                                    epilogue=(lambda v, ch: v) if accumulator else None)
    sch = s_tir.Schedule(te.create_prim_func([data, wt, bt, out]))
    schedule_conv_pairs(sch, sch.get_sblock("tvmq_conv_acc"), TARGET)
    lib = tvm.compile(tvm.IRModule({"main": sch.mod["main"].with_attr(SCHEDULED, True)}),
                      target=TARGET)
    dev = tvm.cpu()
    res = tvm.runtime.tensor(np.zeros([int(v) for v in out.shape], str(out.dtype)), dev)
    lib["main"](*[tvm.runtime.tensor(a, dev) for a in (x, wp, bp)], res)
    return res.numpy()


CASES = {  # (N, C, H, W, O, padding (t, l, b, r))
    "same": (1, 16, 8, 8, 16, (1, 1, 1, 1)),
    "odd-sizes": (1, 13, 9, 11, 20, (1, 1, 1, 1)),  # half tiles, channels fill no pair/block
    "valid": (2, 8, 7, 10, 8, (0, 0, 0, 0)),
    "uneven-padding": (1, 24, 6, 5, 9, (0, 2, 1, 0)),
}


def values(kind: str, n, c, h, w, o, rng):
    full = lambda v, shape: np.full(shape, v, np.int8)  # noqa: E731
    x_shape, w_shape = (n, h, w, c), (o, c, 3, 3)
    if kind == "x127-wmin":
        return full(127, x_shape), full(-128, w_shape)
    if kind == "xmin-wmin":  # the largest products: (-128) x (-128)
        return full(-128, x_shape), full(-128, w_shape)
    if kind == "x0":
        return full(0, x_shape), rng.integers(-128, 128, w_shape, dtype=np.int8)
    if kind == "extremes":  # -128 / 127 everywhere, mixed: transformed values at their bounds
        return (rng.choice(np.array([-128, 127], np.int8), x_shape),
                rng.choice(np.array([-128, 127], np.int8), w_shape))
    return (rng.integers(-128, 128, x_shape, dtype=np.int8),
            rng.integers(-128, 128, w_shape, dtype=np.int8))


@needs_avx2
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("kind", ["x127-wmin", "xmin-wmin", "x0", "extremes", "random"])
def test_kernel_bit_exact(case, kind):
    n, c, h, w, o, padding = CASES[case]
    rng = np.random.default_rng(abs(hash((case, kind))) % 2**32)
    x, wt = values(kind, n, c, h, w, o, rng)
    b = rng.integers(-3000, 3000, o).astype(np.int32)
    tx, tw, tb = torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(wt), torch.from_numpy(b)
    top, left, bottom, right = padding
    padded = torch.nn.functional.pad(tx.int(), (left, right, top, bottom))
    want_acc = _conv_i32(padded, tw, [1, 1], 0, [1, 1], 1) + tb.view(1, -1, 1, 1)
    got_acc = run_kernel(x, wt, b, params(padding), accumulator=True)
    assert_bit_exact(torch.from_numpy(got_acc).permute(0, 3, 1, 2), want_acc)
    shift = int(np.ceil(np.log2(128 * 128 * c * 9)))  # the extreme sums land inside int8
    for out_shift, relu in ((shift, False), (3, True), (0, False)):
        want = ops.qconv2d(tx.contiguous(), tw, tb, [1, 1], list(padding), [1, 1], 1, 0,
                           out_shift, relu, 8)
        got = run_kernel(x, wt, b, params(padding, out_shift, relu), accumulator=False)
        assert_bit_exact(torch.from_numpy(got).permute(0, 3, 1, 2), want)


# ----------------------------------------------------------------------------- the graph
def _kernels(module: torch.nn.Module, x: torch.Tensor) -> list[str]:
    """Names of the blocks the lowered graph's kernels hold, with a Winograd annotation."""
    mod = lower_graph(import_exported_program(torch.export.export(module, (x,))), TARGET)
    found = []
    for _gv, func in mod.functions_items():
        if isinstance(func, tvm.tirx.PrimFunc):
            sch = s_tir.Schedule(func)
            found += [sch.get(b).name_hint for b in sch.get_child_blocks(sch.get_sblock("root"))
                      if winograd.WINOGRAD in sch.get(b).annotations]
    return found


def residual_block(w1, b1, w2, b2):
    """relu -> conv -> conv + x (the add fused into the second conv's epilogue)."""
    def fn(x, w1, b1, w2, b2):
        r = ops.qrelu(x)
        y = ops.qconv2d(r, w1, b1, [1, 1], [1, 1, 1, 1], [1, 1], 1, 2, 9, True, 8)
        y = ops.qconv2d(y, w2, b2, [1, 1], [1, 1, 1, 1], [1, 1], 1, 2, 9, False, 8)
        return ops.qadd(y, r, 1, 0, True, 8)
    return OpModule(fn, w1, b1, w2, b2)


@needs_avx2
def test_residual_block_through_the_pipeline(gen):
    x = int8(1, 32, 10, 10, gen=gen)
    x[0, :, 0, :] = 127
    w1, w2 = int8(32, 32, 3, 3, gen=gen), int8(32, 32, 3, 3, gen=gen)
    w1[0], w2[1] = -128, 127
    b1 = torch.randint(-3000, 3000, (32,), generator=gen, dtype=torch.int32)
    b2 = torch.randint(-3000, 3000, (32,), generator=gen, dtype=torch.int32)
    m = residual_block(w1, b1, w2, b2)
    assert "tvmq_conv_acc" in _kernels(m, x)  # both convs are Winograd's
    assert_bit_exact(run_tvm(m, x, target=ZNVER3), m(x))
    # the same graph for an AVX-512 VNNI CPU keeps the direct kernel
    vnni = tvm.target.Target({"kind": "llvm", "mcpu": "icelake-server"})
    mod = lower_graph(import_exported_program(torch.export.export(m, (x,))), vnni)
    assert not any(winograd.WINOGRAD in str(f) for _, f in mod.functions_items())


@needs_avx2
def test_per_channel_shifts_bit_exact(gen):
    """The PT2E op (a shift and an output range per channel) takes the same kernel."""
    x, w = int8(1, 16, 7, 9, gen=gen), int8(24, 16, 3, 3, gen=gen)
    b = torch.randint(-2000, 2000, (24,), generator=gen, dtype=torch.int32)
    shift = torch.randint(4, 12, (24,), generator=gen, dtype=torch.int32)
    m = OpModule(lambda x, w, b, s: ops.qconv2d_pc(x, w, b, s, [1, 1], [1, 1, 1, 1], [1, 1],
                                                   1, -128, 127), w, b, shift)
    assert _kernels(m, x)
    assert_bit_exact(run_tvm(m, x, target=ZNVER3), m(x))


@needs_avx2
def test_a_conv_that_could_overflow_keeps_the_direct_kernel():
    x = torch.full((1, 1024, 4, 4), -128, dtype=torch.int8)
    w = torch.full((8, 1024, 3, 3), -128, dtype=torch.int8)
    b = torch.zeros(8, dtype=torch.int32)
    m = OpModule(lambda x, w, b: ops.qconv2d(x, w, b, [1, 1], [1, 1, 1, 1], [1, 1], 1, 0, 24,
                                             False, 8), w, b)
    assert not _kernels(m, x)
    assert_bit_exact(run_tvm(m, x, target=ZNVER3), m(x))


def test_asm_multiplies_int16_pairs():
    """Code only (nothing runs): the batched product's hot loop is vpmaddwd on ymm."""
    from tvmq.peak import innermost_loop

    gen = torch.Generator().manual_seed(0)
    x, w = int8(1, 32, 8, 8, gen=gen), int8(16, 32, 3, 3, gen=gen)
    m = OpModule(lambda x, w, b: ops.qconv2d(x, w, b, [1, 1], [1, 1, 1, 1], [1, 1], 1, 2, 7,
                                             False, 8), w, torch.zeros(16, dtype=torch.int32))
    ex = compile_relax(import_exported_program(torch.export.export(m, (x,))), TARGET)
    (lib,) = [lib for lib in ex.mod.imports if lib.kind == "llvm"] or ex.mod.imports[:1]
    body = conv_body(lib.inspect_source("s"))
    _, hot = innermost_loop(body, "vpmaddwd")
    mnemonics = [i.split()[0] for i in hot]
    assert mnemonics.count("vpmaddwd") >= 4 and "zmm" not in body
