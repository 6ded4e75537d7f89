"""The AMX-INT8 conv path (``topi_ops.conv2d.AMX_QUADS``, ``schedules.amx``): its layout choice,
its assembly (cross-compiled for Sapphire Rapids: runs on any host), and its exactness against
the PyTorch integer reference where the host has AMX."""
from __future__ import annotations

import re

import pytest
import torch

from schedules.targets import has_feature, resolve
from tests.conftest import OpModule, assert_bit_exact, int8, run_tvm
from tests.test_asm import VNNI_CPU, conv_assembly, conv_body
from topi_ops.conv2d import AMX_QUADS, VNNI_QUADS, Conv2dParams, amx_fits, conv_layout, pack_conv2d

ops = torch.ops.tvmq
AMX_CPU = {"kind": "llvm", "mcpu": "sapphirerapids", "num-cores": 2}


def test_layout_choice():
    assert conv_layout(resolve(AMX_CPU)) == conv_layout(resolve(AMX_CPU), nonneg=True) == AMX_QUADS
    assert conv_layout(resolve(VNNI_CPU)) == VNNI_QUADS
    # the same packing as VNNI quads, so the same u8 offset and bias correction
    assert AMX_QUADS[:3] == VNNI_QUADS[:3]
    assert amx_fits(64, 56) and amx_fits(128, 4)
    assert not amx_fits(16, 56) and not amx_fits(96, 56) and not amx_fits(64, 3)


def test_amx_packing_equals_vnni_packing():
    rng = torch.Generator().manual_seed(0)
    w = int8(32, 64, 3, 3, gen=rng).numpy()
    b = torch.randint(-999, 999, (32,), generator=rng, dtype=torch.int32).numpy()
    params = Conv2dParams((1, 1), (1, 1, 1, 1), (1, 1), 1, 7)
    for got, want in zip(pack_conv2d(w, b, params, resolve(AMX_CPU)),
                         pack_conv2d(w, b, params, resolve(VNNI_CPU))):
        assert (got == want).all()


def test_amx_conv_uses_tiles():
    """64 input channels: the conv row is ``tdpbusd`` on tiles, the tile configuration loaded
    in the kernel and the tile permission requested (arch_prctl through syscall)."""
    body = conv_body(conv_assembly(AMX_CPU, channels=64))
    for instruction in ("ldtilecfg", "tilezero", "tileloadd", "tdpbusd", "tilestored",
                        "tilerelease"):
        assert re.search(rf"\b{instruction}\b", body), f"no {instruction}"
    assert re.search(r"call\w*\s+syscall", body), "no arch_prctl permission request"
    assert not re.search(r"\bvpdpbusd\b", body)


def test_conv_not_fitting_tiles_stays_on_vnni():
    """16 input channels are a quarter of a 64-byte tile row: the VNNI kernel (zmm vpdpbusd)."""
    body = conv_body(conv_assembly(AMX_CPU, channels=16))
    assert re.search(r"vpdpbusd\s+.*zmm", body) and "tdpbusd" not in body


AMX_CASES = [  # (C, H, W, O, k, stride, padding, dilation)
    (64, 8, 8, 16, 3, 1, 1, 1),     # one 16-pixel tile per row, 8 of them pad columns
    (64, 9, 40, 48, 3, 2, 1, 1),    # stride 2: A rows 2 C apart; O = 3 blocks of 16
    (128, 6, 35, 64, 3, 1, 1, 1),   # 2 x 2 C tiles, 2 steps of 64 channels, 35 -> 48 pixels
    (64, 7, 33, 32, 1, 1, 0, 1),    # 1x1 without padding: packs only the pixels it reads
    (64, 7, 20, 32, 1, 2, 0, 1),    # strided 1x1
    (64, 12, 21, 16, 3, 1, 2, 2),   # dilation 2
    # 63 channels: quads padded to 64 (zero weights). (62 would fold the 3 taps into 47
    # quads, topi_ops.conv2d.folds_taps: no tiles, the VNNI vector kernel, which an
    # emulating host without AVX-512 cannot build)
    (63, 6, 16, 20, 3, 1, 1, 1),
]
CASE_IDS = ["x".join(map(str, c)) for c in AMX_CASES]
# signed input with -128/127 edges (u8 offset); input after a ReLU (known >= 0: no offset);
# a shift per output channel, saturating both ways
VARIANTS = ("signed", "relu-input", "per-channel")


def amx_conv(case, variant, gen):
    """(module, input) of one AMX-sized conv with edge values: the largest products (-128 x
    -128, 127 x 127) in the first rows and output channels."""
    c, h, w, o, k, stride, pad, dil = case
    x, wt = int8(1, c, h, w, gen=gen), int8(o, c, k, k, gen=gen)
    x[0, :, 0], wt[0] = -128, -128
    x[0, :, 1], wt[1] = 127, 127
    b = torch.randint(-3000, 3000, (o,), generator=gen, dtype=torch.int32)
    geometry = ([stride] * 2, [pad] * 4, [dil] * 2, 1)
    if variant == "per-channel":
        shift = torch.randint(-2, 9, (o,), generator=gen, dtype=torch.int32)
        shift[0], shift[-1] = -2, 10
        return OpModule(lambda x, w, b, s: ops.qconv2d_pc(x, w, b, s, *geometry, -128, 127),
                        wt, b, shift), x
    if variant == "relu-input":  # the ReLU's output range reaches the conv: u8 without offset
        return OpModule(lambda x, w, b: ops.qconv2d(ops.qrelu(x), w, b, *geometry, 2, 7, True,
                                                    8), wt, b), x
    return OpModule(lambda x, w, b: ops.qconv2d(x, w, b, *geometry, 2, 0, False, 8), wt, b), x


HOST = resolve("x86")


@pytest.mark.skipif(not (has_feature(HOST, "amx-int8") and has_feature(HOST, "amx-tile")),
                    reason="this host has no AMX-INT8: its tile kernels cannot run here (their"
                           " assembly is checked on every host, their addressing emulated)")
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("case", AMX_CASES, ids=CASE_IDS)
def test_amx_conv_exact_on_this_host(case, variant, gen):
    assert conv_layout(HOST) == AMX_QUADS
    m, x = amx_conv(case, variant, gen)
    assert_bit_exact(run_tvm(m, x, target=HOST), m(x))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("case", AMX_CASES, ids=CASE_IDS)
def test_amx_tile_addressing_emulated(case, variant, gen, monkeypatch):
    """The row kernel's tile addressing (A rows sw * C bytes apart, B tiles, C rows, the 2 x 2
    blocking, the padded row) on this host: the same kernel built on tiles emulated by TIR
    loops (``schedules.amx.EMULATE``) for a target that claims AMX, exact against PyTorch."""
    import schedules.amx

    monkeypatch.setattr(schedules.amx, "EMULATE", True)
    target = {"kind": "llvm", "mcpu": str(HOST.attrs["mcpu"]), "num-cores": 2,
              "mattr": ["+amx-tile", "+amx-int8"]}
    assert conv_layout(resolve(target)) == AMX_QUADS
    m, x = amx_conv(case, variant, gen)
    assert_bit_exact(run_tvm(m, x, target=target), m(x))
