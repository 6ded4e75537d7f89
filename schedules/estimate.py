"""Static Cortex-A72 cycle estimate of a scheduled kernel (notes/arm-estimates.md).

Without a Pi, LLVM's machine-code analyser (``llvm-mca -mcpu=cortex-a72``, Debian's ``llvm``
package) gives the steady-state cycles of a loop body on the A72's pipeline model. The
estimate of a kernel is its main loop nest (the block carrying ``schedule_rule``):

* the aarch64 assembly of the scheduled module, cut into loops (a label and a backward
  branch to it); the hot loop is the innermost loop with the most instructions;
* its enclosing assembly loops are matched, innermost first, with the serial/parallel TIR
  loops of the main block (unrolled and vectorized loops are inside the hot loop's body);
* each level costs ``llvm-mca cycles/iteration of its own instructions`` (those not in the
  inner loop) x ``its iterations`` (the product of the TIR extents from the outside in).

It is an estimate: L1-resident data, one core, no cache misses or memory system; other loop
nests of the function (the data packing stages) are estimated apart (``stages``) when asked.
Compare kernels with each other, not with wall-clock time.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile

import tvm
from tvm import s_tir, tirx

METHOD = "llvm-mca cortex-a72 (estimate)"
A72 = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a72", "mattr": ["+neon"]}
MCA_ITERATIONS = 100


class EstimateError(RuntimeError):
    """The estimate cannot be made (no llvm-mca, no loop found)."""


def find_llvm_mca() -> str:
    for name in ("llvm-mca", *(f"llvm-mca-{v}" for v in range(30, 10, -1))):
        path = shutil.which(name)
        if path:
            return path
    raise EstimateError("llvm-mca not found: install Debian's `llvm` package (./setup.sh does: "
                        "apt-get install llvm); it provides the Cortex-A72 pipeline model")


def mca_cycles_per_iteration(lines: list[str], mcpu: str = "cortex-a72",
                             triple: str = "aarch64") -> float:
    """llvm-mca's steady-state cycles of one pass over ``lines`` (assembly instructions)."""
    body = [ln for ln in lines if ln.strip() and not ln.strip().startswith((".", "//", ";"))
            and not re.match(r"^\s*[\w$.]+:", ln)]
    if not body:
        return 0.0
    with tempfile.NamedTemporaryFile("w", suffix=".s") as f:
        f.write("\n".join(body) + "\n")
        f.flush()
        res = subprocess.run([find_llvm_mca(), f"-mtriple={triple}", f"-mcpu={mcpu}",
                              f"-iterations={MCA_ITERATIONS}", f.name],
                             capture_output=True, text=True, check=False)
    m = re.search(r"Total Cycles:\s+(\d+)", res.stdout)
    if res.returncode or not m:
        raise EstimateError(f"llvm-mca failed: {res.stderr.strip()[-500:]}")
    return int(m.group(1)) / MCA_ITERATIONS


def asm_loops(asm: str) -> tuple[list[str], list[tuple[int, int, str]]]:
    """(lines, loops): each loop is (first line, last line, label) from a label to the last
    backward branch to it (aarch64 ``b``/``b.cond``/``cbz``/``tbz`` or x86 ``jcc``)."""
    lines = asm.splitlines()
    labels = {}
    for i, ln in enumerate(lines):
        m = re.match(r"^(\.?[\w$.]+):", ln)
        if m:
            labels[m.group(1)] = i
    ends: dict[str, int] = {}
    for i, ln in enumerate(lines):
        m = re.match(r"^\s+(?:b\.\w+|b|cbnz|cbz|tbnz|tbz|j\w+)\s+(?:.*,\s*)?(\.L\w+)\s*(#.*)?$",
                     ln)
        if m and m.group(1) in labels and labels[m.group(1)] < i:
            ends[m.group(1)] = i
    return lines, sorted((labels[k], e, k) for k, e in ends.items())


def _instructions(lines, start, end, skip=None) -> list[str]:
    return [ln for i, ln in enumerate(lines[start:end + 1], start)
            if ln.startswith("\t") and not ln.strip().startswith(".")
            and not (skip and skip[0] <= i <= skip[1])]


def main_loops(func: tirx.PrimFunc) -> list[tuple[str, int]]:
    """(name, extent) of the loops of the main block (the one with ``schedule_rule``, its
    update after decompose_reduction) that stay loops in machine code: serial or parallel,
    extent > 1; outermost first."""
    sch = s_tir.Schedule(func)
    blocks = [(sch.get(b).name_hint, "schedule_rule" in sch.get(b).annotations)
              for b in sch.get_child_blocks(sch.get_sblock("root"))]
    main = [b for b, ruled in blocks if ruled and not b.endswith("_init")]
    # a tensorized update block lost its annotations: it is the init's sibling
    inits = [b[:-len("_init")] for b, ruled in blocks if ruled and b.endswith("_init")]
    main = main or [b for b, _ in blocks if inits and b.startswith(inits[0] + "_")
                    and not b.endswith("_init")]
    if not main:
        raise EstimateError("no block with a schedule_rule: nothing to estimate")
    loops = []
    for lp in sch.get_loops(sch.get_sblock(main[-1])):
        f = sch.get(lp)
        if int(f.extent) > 1 and f.kind in (tirx.ForKind.SERIAL, tirx.ForKind.PARALLEL):
            loops.append((str(f.loop_var.name), int(f.extent)))
    return loops


def _as_func(mod) -> tirx.PrimFunc:
    if isinstance(mod, tirx.PrimFunc):
        return mod
    if isinstance(mod, s_tir.Schedule):
        mod = mod.mod
    funcs = [f for _, f in mod.functions_items() if isinstance(f, tirx.PrimFunc)]
    if len(funcs) != 1:
        raise EstimateError(f"expected one PrimFunc, got {len(funcs)}")
    return funcs[0]


def per_entry_trips(lines: list[str], loop: tuple[int, int, str]) -> int | None:
    """Iterations per entry of an asm loop, when its counter is the usual one: ``add R, R,
    #S`` + ``cmp R, #E`` (from 0 or a ``mov R, #I`` before the loop), or ``subs R, R, #S``
    counting down from ``mov R, #I``; None when the pattern is not recognised."""
    start, end, _ = loop
    if not re.match(r"^\s+b\.ne\s", lines[end]):
        return None
    body = [ln.strip() for ln in lines[start:end] if ln.startswith("\t")]
    pre = []
    for ln in reversed(lines[:start]):
        if re.match(r"^\.?[\w$.]+:", ln) and not ln.startswith(".Ltmp"):
            break
        pre.append(ln.strip())

    def reg(r):
        return r[1:]  # x12 / w12 -> 12

    def init(r):
        for ln in pre:  # nearest first
            m = re.match(r"mov\s+[xw](\d+),\s+(#(-?\d+)|[xw]zr)$", ln)
            if m and m.group(1) == reg(r):
                return int(m.group(3)) if m.group(3) else 0
            if re.match(rf"\w+\s+[xw]{reg(r)}\b", ln):
                return None  # set some other way
        return 0 if not pre else None

    for ln in reversed(body):
        m = re.match(r"cmp\s+([xw]\d+),\s+#(\d+)$", ln)
        if m:
            r, e = m.group(1), int(m.group(2))
            step = [int(a.group(1)) for b in body
                    for a in [re.match(rf"add\s+[xw]{reg(r)},\s+[xw]{reg(r)},\s+#(\d+)$", b)] if a]
            i0 = init(r)
            if len(step) == 1 and i0 is not None and (e - i0) % step[0] == 0 and e > i0:
                return (e - i0) // step[0]
            return None
        m = re.match(r"subs\s+([xw]\d+),\s+([xw]\d+),\s+#(\d+)$", ln)
        if m and reg(m.group(1)) == reg(m.group(2)):
            i0 = init(m.group(1))
            st = int(m.group(3))
            return i0 // st if i0 and i0 % st == 0 else None
        if re.match(r"(cmp|cmn|subs|adds|tst|ands)\s", ln):
            return None
    return None


def estimate_cycles(mod, target=None, signature: tuple[str, int] | None = None) -> dict:
    """Estimated Cortex-A72 cycles of a scheduled kernel (a PrimFunc, an IRModule holding one,
    or a Schedule). ``target`` defaults to the Pi 4's A72 (an aarch64 target whose ``mcpu``
    llvm-mca knows).

    The hot loop's iterations come from ``signature`` = (instruction regex, how many times
    the whole kernel executes it), e.g. ``("uadalp", steps)``: iterations = that count /
    the matches in one pass of the hot loop (exact whatever LLVM unrolled or duplicated).
    Without it, from the TIR: the product of the main block's loop extents down to the one
    whose extent equals the hot loop's own trip count (the loops inside it were unrolled;
    ambiguous when two loops have that extent, e.g. ry = rx = 3: pass a signature).
    Each enclosing asm loop adds its own instructions' cycles x its iterations (the inner
    loop's iterations / the inner loop's trips per entry / copies of it), as long as trips
    can be read from the assembly. Returns ``cycles``, ``hot_loop_cycles_per_iter``,
    ``trips`` (hot loop iterations), ``levels`` (outermost first) and ``method``."""
    find_llvm_mca()
    target = tvm.target.Target(target or A72)
    mcpu = str(target.attrs.get("mcpu", "cortex-a72"))
    func = _as_func(mod)
    tir_loops = main_loops(func)
    if not tir_loops:
        raise EstimateError("the main block has no loop left to estimate")
    lib = tvm.compile(tvm.IRModule({"main": func}), target=target)
    lines, loops = asm_loops(lib.mod.inspect_source("s"))
    if not loops:
        raise EstimateError("no loop found in the assembly")

    def contains(outer, inner):
        return outer != inner and outer[0] <= inner[0] and inner[1] <= outer[1]

    def own(lp):  # its instructions, without those of loops nested in it
        nested = [o for o in loops if contains(lp, o)]
        return [ln for i, ln in enumerate(lines[lp[0]:lp[1] + 1], lp[0])
                if ln.startswith("\t") and not ln.strip().startswith(".")
                and not any(o[0] <= i <= o[1] for o in nested)]

    def parent(lp):
        ps = [o for o in loops if contains(o, lp) and (o[1] - o[0]) > (lp[1] - lp[0])]
        return min(ps, key=lambda o: o[1] - o[0]) if ps else None

    def depth(lp):
        d = 1
        while (lp := parent(lp)) is not None:
            d += 1
        return d

    innermost = [lp for lp in loops if not any(contains(lp, o) for o in loops)]
    if signature is not None:
        pattern, total = signature
        count = {lp: sum(bool(re.match(rf"\s+({pattern})\s", ln)) for ln in own(lp))
                 for lp in innermost}
        hot = max(innermost, key=lambda lp: (count[lp], len(own(lp))))
        if not count[hot]:
            raise EstimateError(f"no {pattern!r} instruction in any innermost loop")
        iterations = total / count[hot]
        source = f"{total} x {pattern} / {count[hot]} per iteration"
    else:
        # the hot loop: innermost, in a nest as deep as the main block's, the biggest
        deep = [lp for lp in innermost if depth(lp) >= len(tir_loops)] or innermost
        hot = max(deep, key=lambda lp: (depth(lp), len(own(lp))))
        trips = per_entry_trips(lines, hot)
        matched = len(tir_loops) - 1
        if trips is not None:
            for k in range(len(tir_loops) - 1, -1, -1):
                if tir_loops[k][1] == trips:
                    matched = k
                    break
        iterations = 1
        for _name, extent in tir_loops[:matched + 1]:
            iterations *= extent
        source = "TIR loops " + " x ".join(f"{n}({e})" for n, e in tir_loops[:matched + 1])
    levels = []
    lp, n = hot, iterations
    while lp is not None and len(levels) < len(tir_loops):
        per_iter = mca_cycles_per_iteration(own(lp), mcpu)
        levels.append({"asm_label": lp[2], "instructions": len(own(lp)),
                       "cycles_per_iter": per_iter, "iterations": n, "cycles": per_iter * n,
                       "trips_per_entry": per_entry_trips(lines, lp)})
        up, trips = parent(lp), levels[-1]["trips_per_entry"]
        if up is None or trips is None:
            break
        size = len(own(lp))
        copies = sum(1 for o in loops if parent(o) == up and abs(len(own(o)) - size) <= 0.1 * size)
        lp, n = up, n / trips / max(copies, 1)
    return {"cycles": sum(lv["cycles"] for lv in levels),
            "hot_loop_cycles_per_iter": levels[0]["cycles_per_iter"], "trips": iterations,
            "trips_from": source, "levels": levels[::-1], "method": METHOD}


# ----------------------------------------------------------------------------- comparisons
RESNET18_3X3 = [  # (channels, height/width): the 3x3 stride-1 convs of each ResNet-18 stage
    (64, 56), (128, 28), (256, 14), (512, 7)]


def int8_conv_module(channels: int, hw: int, target, nonneg: bool = False) -> tvm.IRModule:
    """tvmq's int8 conv (``topi_ops.conv2d`` + ``schedules.default``) for a 3x3 same conv
    (``nonneg``: its input known >= 0, as after a ReLU: the A72's 8-bit quads)."""
    import numpy as np
    from tvm import te

    from schedules.default import schedule_conv_pairs
    from schedules.elementwise import SCHEDULED
    from topi_ops.conv2d import Conv2dParams, pack_conv2d, qconv2d

    params = Conv2dParams((1, 1), (1, 1, 1, 1), (1, 1), 1, 8, False, nonneg=nonneg)
    rng = np.random.default_rng(0)
    w = rng.integers(-128, 128, (channels, channels, 3, 3)).astype(np.int8)
    w[0, 0, 0, 0] = -128  # a signed input then keeps the A72's int16 pairs (conv_layout)
    wp, bp = pack_conv2d(w, np.zeros(channels, np.int32), params, target)
    data = te.placeholder((1, hw, hw, channels), "int8", "data")  # NHWC, as the model runs it
    wt, bt = te.placeholder(wp.shape, str(wp.dtype), "w"), te.placeholder(bp.shape, "int32", "b")
    out = qconv2d(data, wt, bt, weight_shape=w.shape, params=params, target=target,
                  layout="NHWC")
    sch = s_tir.Schedule(te.create_prim_func([data, wt, bt, out]))
    schedule_conv_pairs(sch, sch.get_sblock("tvmq_conv_acc"), target)
    return tvm.IRModule({"main": sch.mod["main"].with_attr(SCHEDULED, True)})


def int8_signature(channels: int, hw: int, target, nonneg: bool = False) -> tuple[str, int]:
    """NEON int16 pairs: per 8 output channels x 2 input channels x tap x pixel, one
    ``smlal`` + one ``smlal2`` (8 int32 lanes). A72 8-bit quads (``nonneg``): per 8 output
    channels x 4 input channels, 2 ``smull`` + 2 ``smlal`` (+ 2 ``sadalp``)."""
    from topi_ops.conv2d import NEON_QUADS, PAIRS, conv_layout

    layout = conv_layout(target, nonneg)
    if layout not in (PAIRS, NEON_QUADS) or has_dotprod(target):
        raise EstimateError("int8_signature knows the NEON int16-pair and 8-bit quad kernels only")
    steps = -(-channels // 8) * hw * hw * 9 * -(-channels // layout.group)
    return r"smlal2?|smull2?", steps * 4


def has_dotprod(target) -> bool:
    return bool(tvm.target.codegen.llvm_cpu_has_features("dotprod", tvm.target.Target(target)))


# MACs (int8 x int8 products accumulated exactly into int32) per instruction of each NEON
# sequence an A72 kernel can use, and the loop body llvm-mca measures for the peak: eight
# independent chains (accumulators v24-v31, products v16-v23) so that latency does not bind.
PEAK_SEQUENCES = {
    # int16 x int16 -> int32 (today's pairs): 4 products per smlal
    "int16 smlal": (4, ["smlal v{acc}.4s, v0.4h, v1.4h"]),
    # 8-bit, input >= 0: two products per int16 lane, then folded into int32
    "8-bit smull+smlal+sadalp": (16 / 3, ["smull v{t}.8h, v0.8b, v1.8b",
                                          "smlal v{t}.8h, v2.8b, v3.8b",
                                          "sadalp v{acc}.4s, v{t}.8h"]),
    # 8-bit, any signs: one product per int16 lane (never overflows), then folded
    "8-bit smull+sadalp": (4, ["smull v{t}.8h, v0.8b, v1.8b", "sadalp v{acc}.4s, v{t}.8h"]),
}


def a72_peak_macs_per_cycle(mcpu: str = "cortex-a72") -> dict:
    """The A72's int8 multiply-accumulate peak by the same tool as the kernel estimates:
    llvm-mca on a loop of independent copies of each exact NEON sequence
    (``PEAK_SEQUENCES``). Returns ``{sequence: MACs/cycle}`` plus ``peak`` (the best) and
    ``sequence`` (which one)."""
    rates = {}
    for name, (per_instr, seq) in PEAK_SEQUENCES.items():
        body = [ins.format(t=16 + j, acc=24 + j) for j in range(8) for ins in seq]
        rates[name] = per_instr * len(body) / mca_cycles_per_iteration(body, mcpu)
    best = max(rates, key=rates.get)
    return {**rates, "peak": rates[best], "sequence": best}


def a72_share_of_peak(layers=RESNET18_3X3) -> list[dict]:
    """Per ResNet-18 3x3 conv: estimated A72 cycles of the int16-pair kernel (input of any
    sign) and of the 8-bit quad kernel (input >= 0), their MACs/cycle and share of
    :func:`a72_peak_macs_per_cycle`: of the whole conv loop nest (with its requantize
    epilogue; data packing apart) and of the hot loop alone. An estimate (llvm-mca)."""
    from schedules.targets import resolve

    arm = resolve("arm")
    peak = a72_peak_macs_per_cycle()["peak"]
    rows = []
    for c, hw in layers:
        macs = c * c * 9 * hw * hw
        row = {"layer": f"{c}->{c} 3x3 @{hw}x{hw}", "macs": macs, "peak": peak}
        for key, nonneg in (("pairs", False), ("quads8", True)):
            est = estimate_cycles(int8_conv_module(c, hw, arm, nonneg), arm,
                                  int8_signature(c, hw, arm, nonneg))
            hot_macs = macs / est["trips"]  # products per hot-loop iteration
            row[key] = est["cycles"]
            row[f"{key}_share"] = macs / est["cycles"] / peak
            row[f"{key}_hot_share"] = hot_macs / est["hot_loop_cycles_per_iter"] / peak
        row["speedup"] = row["pairs"] / row["quads8"]
        rows.append(row)
    return rows


def bitserial_conv_module(channels: int, hw: int, terms: int, target, abits: int = 2):
    """The bit-serial ternary conv (``topi_ops.bitserial``) for a 3x3 same conv, ``terms``
    ternary terms x ``abits``-bit activations; also returns its packed arrays."""
    import numpy as np

    from schedules.bitserial import scheduled_module
    from topi_ops.bitserial import BitserialParams, pack_ternary

    params = BitserialParams((1, 1), (1, 1, 1, 1), (1, 1), 1, abits, 0, (1 << abits) - 1)
    rng = np.random.default_rng(0)
    t = rng.integers(-1, 2, (terms, channels, channels, 3, 3)).astype(np.int8)
    shifts = np.tile(np.arange(terms, dtype=np.int32)[:, None] * 3, (1, channels))
    packed = pack_ternary(t, shifts, np.zeros(channels, np.int32),
                          np.full(channels, 6, np.int32), params, target)
    mod = scheduled_module((1, channels, hw, hw), packed, (channels, channels, 3, 3), params,
                           target)
    return mod, packed


def bitserial_signature(channels: int, hw: int, terms: int, target) -> tuple[str, int]:
    """The NEON step (one ``uadalp``) per output channel x pixel x term x tap x word."""
    from topi_ops.bitserial import layout

    lay = layout(channels, 3, 3, 2, target)
    words, lanes = lay.words, lay.lanes
    if lay.word_bits != 8 or lanes not in (8, 16):
        raise EstimateError("bitserial_signature needs the NEON step (8- or 16-byte words)")
    return "uadalp|uaddlp", channels * hw * hw * terms * 9 * words


def pack_stage_cycles(channels: int, hw: int, target, kind: str, nonneg: bool = False) -> float:
    """Estimated cycles of the per-inference data packing stage of the int8 kernel (a padded
    NHWC copy) or of the bit-serial kernel (bit planes), for a 3x3 same conv."""
    import numpy as np
    from tvm import te

    from topi_ops.bitserial import BitserialParams, qconv2d_bitserial
    from topi_ops.conv2d import Conv2dParams, pack_conv2d, qconv2d

    data = te.placeholder((1, channels, hw, hw), "int8", "data")
    if kind == "int8":
        params = Conv2dParams((1, 1), (1, 1, 1, 1), (1, 1), 1, 8, False, nonneg=nonneg)
        w = np.zeros((channels, channels, 3, 3), np.int8)
        wp, bp = pack_conv2d(w, np.zeros(channels, np.int32), params, target)
        out = qconv2d(te.placeholder((1, hw, hw, channels), "int8", "data"),
                      te.placeholder(wp.shape, str(wp.dtype)),
                      te.placeholder(bp.shape, "int32"), weight_shape=w.shape, params=params,
                      target=target, layout="NHWC")
        return stage_cycles(out, "tvmq_conv_data_pack", target)["cycles"]
    _, packed = bitserial_conv_module(channels, hw, 1, target)
    out = qconv2d_bitserial(data, *[te.placeholder(a.shape, str(a.dtype)) for a in packed],
                            (channels, channels, 3, 3),
                            BitserialParams((1, 1), (1, 1, 1, 1), (1, 1), 1, 2, 0, 3), target)
    return stage_cycles(out, "tvmq_bitserial_data_pack", target)["cycles"]


def resnet18_estimates(layers=RESNET18_3X3, terms=(1, 2)) -> list[dict]:
    """Estimated A72 cycles of the int8 kernel and the bit-serial kernel per layer: the conv
    loop nest (with its fused requantization) plus the data packing stage of each. The int8
    kernel is the one such a layer gets: its input is unsigned (the bit-serial kernel's
    premise), so 8-bit ``smull``/``sadalp`` quads; with its share of the A72's int8 MAC peak
    (:func:`a72_peak_macs_per_cycle`, the same tool)."""
    from schedules.targets import resolve

    arm = resolve("arm")
    peak = a72_peak_macs_per_cycle()["peak"]
    rows = []
    for c, hw in layers:
        pack8 = pack_stage_cycles(c, hw, arm, "int8", nonneg=True)
        pack_bits = pack_stage_cycles(c, hw, arm, "bits")
        conv8 = estimate_cycles(int8_conv_module(c, hw, arm, nonneg=True), arm,
                                int8_signature(c, hw, arm, nonneg=True))["cycles"]
        row = {"layer": f"{c}->{c} 3x3 @{hw}x{hw}", "int8_pack": pack8, "bitserial_pack": pack_bits,
               "int8": pack8 + conv8, "int8_peak_share": c * c * 9 * hw * hw / conv8 / peak,
               "peak_macs_per_cycle": peak}
        for k in terms:
            row[f"bitserial_k{k}"] = pack_bits + estimate_cycles(
                bitserial_conv_module(c, hw, k, arm)[0], arm,
                bitserial_signature(c, hw, k, arm))["cycles"]
            row[f"ratio_k{k}"] = row[f"bitserial_k{k}"] / row["int8"]
        rows.append(row)
    return rows


def stage_cycles(mod_builder_out, stage: str, target) -> dict:
    """Estimated cycles of one memory-bound stage of a kernel (e.g. its data packing), built
    alone: ``mod_builder_out`` is the kernel's output te.Tensor, ``stage`` the name of the
    stage's op; the stage gets the default loop-nest schedule it has inside the kernel."""
    from tvm import te

    from schedules.elementwise import schedule_loop_nest

    found, todo = None, [mod_builder_out]
    while todo and found is None:
        t = todo.pop()
        if t.op.name == stage:
            found = t
        todo.extend(t.op.input_tensors)
    if found is None:
        raise EstimateError(f"no stage {stage!r} in the kernel")
    inputs = list(found.op.input_tensors)
    if not all(isinstance(i.op, te.PlaceholderOp) for i in inputs):
        raise EstimateError(f"stage {stage!r} reads computed tensors: only stages reading the "
                            "kernel's inputs (data packing) can be built alone")
    sch = s_tir.Schedule(te.create_prim_func([*inputs, found]))
    block = sch.get_sblock(stage)
    schedule_loop_nest(sch, block, target)
    sch.annotate(block, "schedule_rule", "estimate_stage")
    return estimate_cycles(sch.mod, target)


def time_host(layers=RESNET18_3X3, terms=(1, 2), number: int = 5, repeat: int = 40) -> list[dict]:
    """Wall-clock milliseconds on this machine (median of ``repeat`` runs of ``number``
    calls; threads: TVM_NUM_THREADS, set it before importing tvm) of the int8 kernel and the
    bit-serial kernel, both built for the host target."""
    import numpy as np

    from schedules.targets import resolve

    host = resolve("x86")
    dev = tvm.cpu()
    rng = np.random.default_rng(0)

    def median_ms(mod, arrays, out_shape):
        lib = tvm.compile(mod, target=host)
        args = [tvm.runtime.tensor(a, dev) for a in arrays]
        out = tvm.runtime.tensor(np.zeros(out_shape, np.int8), dev)
        timer = lib.jit().time_evaluator("main", dev, number=number, repeat=repeat)
        return float(np.median(timer(*args, out).results)) * 1e3

    rows = []
    for c, hw in layers:
        x = rng.integers(0, 4, (1, c, hw, hw)).astype(np.int8)
        from topi_ops.conv2d import Conv2dParams, pack_conv2d
        params = Conv2dParams((1, 1), (1, 1, 1, 1), (1, 1), 1, 8, False)
        w = rng.integers(-128, 128, (c, c, 3, 3)).astype(np.int8)
        row = {"layer": f"{c}->{c} 3x3 @{hw}x{hw}",
               "int8_ms": median_ms(int8_conv_module(c, hw, host),
                                    [x, *pack_conv2d(w, np.zeros(c, np.int32), params, host)],
                                    (1, c, hw, hw))}
        for k in terms:
            mod, packed = bitserial_conv_module(c, hw, k, host)
            row[f"bitserial_k{k}_ms"] = median_ms(mod, [x, *packed], (1, c, hw, hw))
        rows.append(row)
    return rows


if __name__ == "__main__":
    print(f"Cortex-A72 cycles, {METHOD}; batch 1, one core; conv loop nest + data packing")
    for r in resnet18_estimates():
        print(f"{r['layer']:>22}  (packing: int8 {r['int8_pack'] / 1e6:.2f} M, bit planes "
              f"{r['bitserial_pack'] / 1e6:.2f} M)")
        print(f"{'':>22}  int8 {r['int8'] / 1e6:8.2f} M   bitserial K=1 "
              f"{r['bitserial_k1'] / 1e6:7.2f} M ({r['ratio_k1']:.2f}x)   K=2 "
              f"{r['bitserial_k2'] / 1e6:7.2f} M ({r['ratio_k2']:.2f}x)")
    peaks = a72_peak_macs_per_cycle()
    print(f"\nCortex-A72 int8 MAC peak, {METHOD}: {peaks['peak']:.2f} MACs/cycle "
          f"({peaks['sequence']}; " + ", ".join(f"{k} {v:.2f}" for k, v in peaks.items()
                                                if k in PEAK_SEQUENCES and k != peaks['sequence'])
          + ")")
    print(f"{'':>22}  conv loop nest (estimate): M cycles, % of peak (hot loop alone)")
    for r in a72_share_of_peak():
        print(f"{r['layer']:>22}  int16 pairs {r['pairs'] / 1e6:7.2f} M {100 * r['pairs_share']:5.1f}% "
              f"({100 * r['pairs_hot_share']:5.1f}%)   8-bit quads (input >= 0) "
              f"{r['quads8'] / 1e6:7.2f} M {100 * r['quads8_share']:5.1f}% "
              f"({100 * r['quads8_hot_share']:5.1f}%)   {r['speedup']:.2f}x")
    if "--host" in sys.argv:
        cpu = tvm.target.codegen.llvm_get_system_cpu()
        print(f"\nthis machine ({cpu}), TVM_NUM_THREADS={os.environ.get('TVM_NUM_THREADS')}: "
              "median ms")
        for r in time_host():
            print(f"{r['layer']:>22}  int8 {r['int8_ms']:7.3f}   bitserial K=1 "
                  f"{r['bitserial_k1_ms']:7.3f} ({r['bitserial_k1_ms'] / r['int8_ms']:.2f}x)   "
                  f"K=2 {r['bitserial_k2_ms']:7.3f} ({r['bitserial_k2_ms'] / r['int8_ms']:.2f}x)")
