"""The conv kernel uses the CPU's integer multiply-accumulate instruction for its target, read
from the generated assembly: AVX-512 VNNI ``vpdpbusd`` (``vpdpwssd`` for reductions too long
for u8 sums) or AVX2 ``vpmaddwd`` on x86, NEON ``smlal`` on the Pi 4 (aarch64,
cross-compiled: no board needed to read code)."""
from __future__ import annotations

import re

import pytest
import torch

from schedules.targets import has_feature, resolve
from tests.conftest import OpModule, int8
from tvmq.compile import compile_relax
from tvmq.frontend import import_exported_program

ops = torch.ops.tvmq


def conv_assembly(target, channels: int = 16) -> str:
    gen = torch.Generator().manual_seed(0)
    x, w = int8(1, channels, 8, 8, gen=gen), int8(16, channels, 3, 3, gen=gen)
    b = torch.zeros(16, dtype=torch.int32)
    m = OpModule(lambda x, w, b: ops.qconv2d(x, w, b, [1, 1], [1, 1, 1, 1], [1, 1], 1, 2, 7,
                                             False, 8), w, b)
    ex = compile_relax(import_exported_program(torch.export.export(m, (x,))), resolve(target))
    (lib,) = [lib for lib in ex.mod.imports if lib.kind == "llvm"] or ex.mod.imports[:1]
    return lib.inspect_source("s")


def conv_body(asm: str) -> str:
    """The assembly of the conv kernel: from its global label to the next global label (its
    parallel bodies are local labels in between)."""
    starts = [(m.start(), m.group(1)) for m in re.finditer(r"^([A-Za-z_][\w.$]*):", asm, re.M)]
    bounds = zip(starts, starts[1:] + [(len(asm), "")])
    body = "\n".join(asm[a:b] for (a, name), (b, _) in bounds if "qconv2d" in name)
    assert body, "no qconv2d function in the assembly"
    return body


AVX2_CPU = {"kind": "llvm", "mcpu": "haswell", "num-cores": 2}
VNNI_CPU = {"kind": "llvm", "mcpu": "icelake-server", "num-cores": 2}


def test_avx2_conv_uses_vpmaddwd():
    body = conv_body(conv_assembly(AVX2_CPU))
    assert "vpmaddwd" in body and "zmm" not in body


def test_avx512_vnni_conv_uses_vpdpbusd():
    body = conv_body(conv_assembly(VNNI_CPU))
    assert re.search(r"vpdpbusd\s+.*zmm", body), "no 512-bit vpdpbusd"


AVXVNNI_CPU = {"kind": "llvm", "mcpu": "alderlake", "num-cores": 2}  # AVX-VNNI, no AVX-512


def test_avx_vnni_conv_uses_256_bit_vpdpbusd():
    """Alder Lake and later: u8 quads on 8 lanes, the VEX ``vpdpbusd`` on ymm (signed input:
    the +128 offset, like AVX-512 VNNI); no zmm."""
    body = conv_body(conv_assembly(AVXVNNI_CPU))
    assert re.search(r"vpdpbusd\s+.*ymm", body) and "zmm" not in body


@pytest.mark.skipif(not has_feature(resolve("x86"), "avxvnni"),
                    reason="this host has no AVX-VNNI: its kernels cannot run here (the"
                           " assembly is checked above on every host)")
def test_avx_vnni_conv_exact_on_this_host():
    from tests.conftest import assert_bit_exact, run_tvm

    gen = torch.Generator().manual_seed(0)
    x, w = int8(1, 16, 8, 8, gen=gen), int8(16, 16, 3, 3, gen=gen)
    x[0, :, :2], w[0] = -128, -128
    b = torch.zeros(16, dtype=torch.int32)
    m = OpModule(lambda x, w, b: ops.qconv2d(x, w, b, [1, 1], [1, 1, 1, 1], [1, 1], 1, 2, 7,
                                             False, 8), w, b)
    assert_bit_exact(run_tvm(m, x, target=AVXVNNI_CPU), m(x))


def test_avx512_vnni_long_reduction_uses_vpdpwssd():
    # 7320 channels x 3x3: u8 x s8 sums could pass 2^31, so the int16-pair layout is used
    body = conv_body(conv_assembly(VNNI_CPU, channels=7320))
    assert re.search(r"vpdpwssd\s+.*zmm", body) and "vpdpbusd" not in body


def test_this_host_gets_its_best_path():
    body = conv_body(conv_assembly("x86"))
    host = resolve("x86")
    want = "vpdpbusd" if has_feature(host, "avx512vnni") else "vpmaddwd" if has_feature(
        host, "avx2") else None
    if want is None:
        pytest.skip("this host has neither AVX2 nor AVX-512 VNNI: generic vector code")
    assert want in body


def test_pi4_conv_uses_neon_smlal():
    body = conv_body(conv_assembly("arm"))
    assert re.search(r"\bsmlal2?\b", body), "no NEON widening multiply-accumulate"
    assert "sdot" not in body  # a Pi 4's Cortex-A72 has no dot product instructions


def test_pi5_conv_uses_sdot():
    body = conv_body(conv_assembly("rpi5"))
    assert re.search(r"\bsdot\b", body), "no ARMv8.2 dot product on a dotprod target"
