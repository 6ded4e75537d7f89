"""This CPU's peak int8 multiply-accumulate rate: measured, and cross-checked by llvm-mca.

The measured peak is a TIR loop of ``accumulators`` independent chains per thread, each step
one multiply-add instruction whose operand is the chain's own accumulator (``acc = madd(acc,
acc, b)``): every step depends on the previous one, so LLVM can neither hoist the multiply
out of the loop (it did when both operands were loop invariant: the AVX2 loop was left with
``vpaddd`` only and "measured" 968 GMAC/s on a 2-core host) nor fold steps together. The
hot loop's assembly is checked: it must hold exactly ``accumulators x unroll`` multiply-add
instructions on registers and nothing else but loop control (``hot_loop``).

The estimate is ``threads x clock x IPC x MACs per instruction``: IPC is llvm-mca's
steady-state multiply-add instructions per cycle of that same hot loop on the target's mcpu
model, the clock is measured by timing a dependent chain of scalar add/xor whose cycles per
pass llvm-mca also gives (``measure_clock``).
"""
from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

MCA_FALLBACK = {  # llvm-mca model when the installed llvm-mca does not know the target's mcpu
    "avx512vnni": "icelake-server", "avxvnni": "alderlake", "avx2": "haswell"}


@dataclass(frozen=True)
class MacInstruction:
    """One multiply-add instruction a peak loop is made of."""
    name: str          # as reported, e.g. "vpdpbusd zmm"
    mnemonic: str      # as it appears in the assembly
    macs: int          # int8 (or int16) multiply-accumulates per instruction
    lanes: int         # int32 accumulator lanes
    operand: str       # TIR dtype of the multiplied operands
    intrinsic: str
    feature: str       # the CPU feature it needs
    add: bool          # the product is added by a separate vpaddd (AVX2 vpmaddwd)


VPDPBUSD_ZMM = MacInstruction("vpdpbusd zmm", "vpdpbusd", 64, 16, "int8x64",
                              "llvm.x86.avx512.vpdpbusd.512", "avx512vnni", False)
VPMADDWD_YMM = MacInstruction("vpmaddwd ymm + vpaddd", "vpmaddwd", 16, 8, "int16x16",
                              "llvm.x86.avx2.pmadd.wd", "avx2", True)


class PeakError(RuntimeError):
    """The peak loop is not what it should be (hoisted, spilled) or cannot be analysed."""


def resolve_target(target=None):
    """The target (a preset name, dict or Target); this host by default."""
    from schedules.targets import resolve

    return resolve(target if target is not None else "x86")


def mac_instruction(target) -> MacInstruction:
    """The widest int8 multiply-add the target has: ``vpdpbusd`` zmm on AVX-512 VNNI, else
    ``vpmaddwd`` ymm (int8 widened to int16, as tvmq's AVX2 kernels do)."""
    from schedules.targets import has_feature

    if has_feature(target, "avx512vnni"):
        return VPDPBUSD_ZMM
    if has_feature(target, "avx2"):
        return VPMADDWD_YMM
    raise PeakError(f"no AVX2 or AVX-512 VNNI on target {target}: no int8 peak loop for it")


def default_accumulators(ins: MacInstruction) -> int:
    """Independent chains per thread: >= latency x throughput with margin (a vpdpbusd chain
    is ~4-5 cycles at up to 2 per cycle; a vpmaddwd + vpaddd chain ~4 cycles at 2 per cycle),
    and fits the register file with the shared operand (32 zmm; 16 ymm without AVX-512)."""
    return 16 if ins.lanes == 16 else 12


def peak_func(target, threads: int, accumulators: int, iters: int):
    """The peak PrimFunc: ``threads`` parallel iterations, each ``iters`` steps of
    ``accumulators`` independent ``acc = madd(acc, acc, b)`` (the ``b`` operand from A)."""
    from tvm.script import tirx as T

    ins = mac_instruction(target)
    lanes, n = ins.lanes, accumulators
    vec, intrin = f"int32x{lanes}", ins.intrinsic

    @T.prim_func(s_tir=True)
    def peak(A: T.Buffer((n + 1, lanes), "int32"), C: T.Buffer((threads, n, lanes), "int32")):
        T.func_attr({"global_symbol": "peak", "tirx.noalias": True})
        for core in T.parallel(threads):
            acc = T.alloc_buffer((n * lanes,), "int32", scope="local")
            for j in T.unroll(n):
                acc[T.ramp(j * lanes, 1, lanes)] = A.vload([j, 0], vec)
            b = T.reinterpret(A.vload([n, 0], vec), dtype=ins.operand)
            for _it in T.serial(iters):
                for j in T.unroll(n):
                    if ins.add:
                        acc[T.ramp(j * lanes, 1, lanes)] = acc[T.ramp(j * lanes, 1, lanes)] + \
                            T.call_llvm_pure_intrin(
                                T.llvm_lookup_intrinsic_id(intrin),
                                T.reinterpret(acc[T.ramp(j * lanes, 1, lanes)],
                                              dtype=ins.operand), b, dtype=vec)
                    else:
                        acc[T.ramp(j * lanes, 1, lanes)] = T.call_llvm_pure_intrin(
                            T.llvm_lookup_intrinsic_id(intrin), acc[T.ramp(j * lanes, 1, lanes)],
                            T.reinterpret(acc[T.ramp(j * lanes, 1, lanes)], dtype=ins.operand),
                            b, dtype=vec)
            for j in T.unroll(n):
                for lane in T.vectorized(lanes):
                    C[core, j, lane] = acc[j * lanes + lane]

    return peak


def clock_func(chain: int, iters: int):
    """A dependent chain of ``chain`` x (add, xor) on one int32 per pass, ``iters`` passes;
    the added and xored values come from A (LLVM cannot fold the chain)."""
    from tvm.script import tirx as T

    @T.prim_func(s_tir=True)
    def clock(A: T.Buffer((3,), "int32"), C: T.Buffer((1,), "int32")):
        T.func_attr({"global_symbol": "clock", "tirx.noalias": True})
        x = T.alloc_buffer((1,), "int32", scope="local")
        x[0] = A[0]
        for _it in T.serial(iters):
            for _k in T.unroll(chain):
                x[0] = T.bitwise_xor(x[0] + A[1], A[2])
        C[0] = x[0]

    return clock


def _body(line: str) -> str | None:
    """The instruction of an assembly line (comments stripped), None for labels/directives."""
    s = line.split("#", 1)[0].rstrip()
    if not s.startswith("\t") or s.strip().startswith(".") or not s.strip():
        return None
    return s.strip()


def _count(instrs: list[str], mnemonic: str) -> int:
    return sum(1 for b in instrs if b.split()[0] == mnemonic)


def innermost_loop(asm: str, mnemonic: str) -> tuple[str, list[str]]:
    """(label, instructions) of the innermost loop holding the most ``mnemonic``."""
    from schedules.estimate import asm_loops

    lines, loops = asm_loops(asm)
    innermost = [lp for lp in loops
                 if not any(o != lp and lp[0] <= o[0] and o[1] <= lp[1] for o in loops)]
    if not innermost:
        raise PeakError("no loop in the assembly")

    def body(lp):
        return [b for ln in lines[lp[0]:lp[1] + 1] if (b := _body(ln))]

    hot = max(innermost, key=lambda lp: _count(body(lp), mnemonic))
    return hot[2], body(hot)


def hot_loop(asm: str, ins: MacInstruction) -> dict:
    """The innermost loop holding the most ``ins`` instructions, checked: register operands
    only (no spill, no reload), a ``vpaddd`` per ``vpmaddwd`` when the add is separate, and
    nothing else but loop control. Returns its ``instructions``, the ``mac_instructions`` in
    one pass and ``unroll`` (TIR steps per pass, from the loop counter's step)."""
    label, instrs = innermost_loop(asm, ins.mnemonic)
    macs = _count(instrs, ins.mnemonic)
    if not macs:
        raise PeakError(f"no {ins.mnemonic} in any loop: LLVM hoisted or rewrote the "
                        "multiply-add")
    adds = _count(instrs, "vpaddd")
    vector = [b for b in instrs if b.split()[0] not in (ins.mnemonic, "vpaddd")
              and any(r in b for r in ("%xmm", "%ymm", "%zmm"))]
    control = [b for b in instrs if b.split()[0] not in (ins.mnemonic, "vpaddd")
               and b not in vector]
    if any("(" in b for b in instrs if b.split()[0] in (ins.mnemonic, "vpaddd")) or vector:
        raise PeakError(f"the hot loop spills or reloads: {[b for b in instrs if '(' in b]}")
    if adds != (macs if ins.add else 0):
        raise PeakError(f"{adds} vpaddd for {macs} {ins.mnemonic} in the hot loop")
    if len(control) > 4 or not all(re.match(r"(add|sub|inc|dec|cmp|j)\w*\s", b)
                                   for b in control):
        raise PeakError(f"unexpected instructions in the hot loop: {control}")
    unroll = None
    for b in control:  # the counter: add $-K / sub $K (counting down), add $K + cmp (up)
        m = re.match(r"(add|sub)[lq]?\s+\$(-?\d+),\s+%\w+$", b)
        if m:
            unroll = abs(int(m.group(2)))
        elif re.match(r"(inc|dec)[lq]?\s+%\w+$", b):
            unroll = 1
    return {"label": label, "instructions": instrs, "mac_instructions": macs,
            "unroll": unroll}


@lru_cache(maxsize=None)
def _mca_cpus() -> frozenset[str]:
    from schedules.estimate import find_llvm_mca

    res = subprocess.run([find_llvm_mca(), "-mtriple=x86_64", "-mcpu=help"],
                         capture_output=True, text=True, check=False)
    return frozenset(m.group(1) for m in re.finditer(r"^\s+([\w.-]+)\s+- Select",
                                                     res.stdout + res.stderr, re.M))


def mca_model(mcpu: str, feature: str) -> str:
    """The llvm-mca CPU model for ``mcpu``: itself when this llvm-mca knows it, else the
    ``MCA_FALLBACK`` model for the instruction's feature (Debian's llvm-mca 14 predates
    znver4)."""
    return mcpu if mcpu in _mca_cpus() else MCA_FALLBACK[feature]


def mca_cycles(instructions: list[str], model: str) -> float:
    """llvm-mca's steady-state cycles per pass of ``instructions`` on ``model``."""
    from schedules.estimate import mca_cycles_per_iteration

    return mca_cycles_per_iteration(["\t" + b for b in instructions], model, triple="x86_64")


def _min_seconds(lib, name, *args, number: int, repeat: int) -> float:
    import tvm

    timer = lib.time_evaluator(name, tvm.cpu(), number=number, repeat=repeat)
    return min(timer(*args).results)


def measure_clock(target=None, chain: int = 32, iters: int = 200_000, repeat: int = 5) -> dict:
    """The core clock, measured: a dependent add/xor chain (``clock_func``), its cycles per
    pass from llvm-mca (latency bound: 1 cycle per op), divided by the fastest run's time.
    Falls back to /proc/cpuinfo's "cpu MHz" (nominal under a hypervisor) when llvm-mca or
    the chain's loop is missing. Returns ``ghz``, ``method``."""
    import tvm

    target = resolve_target(target)
    mcpu = str(target.attrs.get("mcpu", ""))
    try:
        lib = tvm.compile(clock_func(chain, iters), target=target)
        _, instrs = innermost_loop(lib.mod.inspect_source("s"), "xorl")
        steps = _count(instrs, "xorl")  # one xor per step
        if not steps:
            raise PeakError("no xor in the clock chain's loop")
        model = mca_model(mcpu, "avx2")
        cycles = mca_cycles(instrs, model)
        passes = iters * chain / steps
        seconds = _min_seconds(lib.jit(), "clock", tvm.runtime.tensor(np.array([1, 3, 5],
                               np.int32)), tvm.runtime.tensor(np.zeros(1, np.int32)),
                               number=1, repeat=repeat)
        return {"ghz": cycles * passes / seconds / 1e9, "chain_steps": steps,
                "chain_cycles": cycles,
                "method": f"dependent add/xor chain, {cycles:.0f} cycles per pass "
                          f"(llvm-mca {model}) / time"}
    except Exception as err:  # noqa: BLE001 - fall back to the kernel's figure, say so
        with open("/proc/cpuinfo") as f:
            mhz = [float(m.group(1)) for m in re.finditer(r"cpu MHz\s*:\s*([\d.]+)", f.read())]
        if not mhz:
            raise
        return {"ghz": max(mhz) / 1e3, "method": f"/proc/cpuinfo cpu MHz ({err})"}


def peak_gmacs(threads: int, target=None, accumulators: int | None = None,
               iters: int = 4_000_000, number: int = 1, repeat: int = 5) -> dict:
    """This CPU's int8 multiply-accumulate peak in GMAC/s on ``threads`` threads, for
    ``target`` (default: this host; its mcpu picks ``vpdpbusd`` zmm = 64 MACs on AVX-512
    VNNI, else ``vpmaddwd`` ymm = 16 MACs).

    * ``measured_gmacs``: the fastest of ``repeat`` runs of ``peak_func`` (its hot loop
      checked by ``hot_loop``) on ``threads`` threads, or ``threads`` x the fastest run on
      one thread if larger (``measured_all_threads_gmacs`` is the former): cores are alike
      and one core alone runs at least as fast as each of several, so the product bounds
      the all-thread rate, and it holds when another process keeps a core busy (on a shared
      2-core VM the 2-thread run often measured one core's rate);
    * ``estimated_gmacs``: threads x ``clock_ghz`` (``measure_clock``) x ``ipc`` (llvm-mca's
      multiply-add instructions per cycle for that same hot loop) x MACs per instruction;
    * ``gmacs``, the peak: when llvm-mca models the target's own CPU, the larger of the two.
      A measurement can only undershoot (another process, a cold start, a loop that misses
      the issue rate, like ``vpmaddwd`` + ``vpaddd`` on Zen 4 at 1.5 a cycle where the model
      allows 2), and the estimate is the pipeline model's bound at the clock this core ran:
      the larger bounds every kernel built from the same instruction. When llvm-mca does not
      know the CPU (Debian's llvm-mca 14 and ``znver4``) its estimate is of another
      microarchitecture (``mca_model``: icelake-server issues 2 ``vpdpbusd`` zmm a cycle,
      Zen 4 one): it is reported, and the peak is the measured rate.
    Kernels on other units (AMX tiles) are not bounded by it. Use the kernels' ``threads``
    (the TVM pool must have them: the caller sets TVM_NUM_THREADS before the first TVM call,
    as ``tvmq.bench_layers`` does for its child process; this function never changes the
    environment of the process it runs in)."""
    import tvm

    target = resolve_target(target)
    ins = mac_instruction(target)
    n = accumulators or default_accumulators(ins)
    lib = tvm.compile(peak_func(target, threads, n, iters), target=target)
    loop = hot_loop(lib.mod.inspect_source("s"), ins)
    if loop["unroll"] is not None and loop["mac_instructions"] != n * loop["unroll"]:
        raise PeakError(f"{loop['mac_instructions']} {ins.mnemonic} per pass of the hot loop, "
                        f"expected {n} accumulators x {loop['unroll']} steps")
    mcpu = str(target.attrs.get("mcpu", ""))
    model = mca_model(mcpu, ins.feature)
    ipc = loop["mac_instructions"] / mca_cycles(loop["instructions"], model)
    clock = measure_clock(target)
    rng = np.random.default_rng(0)
    a = tvm.runtime.tensor(rng.integers(-2**31, 2**31, (n + 1, ins.lanes), dtype=np.int64)
                           .astype(np.int32))
    c = tvm.runtime.tensor(np.zeros((threads, n, ins.lanes), np.int32))
    seconds = _min_seconds(lib.jit(), "peak", a, c, number=number, repeat=repeat)
    measured = all_threads = threads * iters * n * ins.macs / seconds / 1e9
    if threads > 1:  # threads x one core's rate: holds when another process takes a core
        one = tvm.compile(peak_func(target, 1, n, iters), target=target).jit()
        c1 = tvm.runtime.tensor(np.zeros((1, n, ins.lanes), np.int32))
        seconds = _min_seconds(one, "peak", a, c1, number=number, repeat=repeat)
        measured = max(all_threads, threads * iters * n * ins.macs / seconds / 1e9)
    estimated = threads * clock["ghz"] * ipc * ins.macs
    own_model = model == mcpu
    measuring = (f"{n} independent {ins.mnemonic} chains per thread, fastest of {repeat} "
                 f"runs" + (f" on {threads} threads or {threads} x on one" if threads > 1
                             else ""))
    estimating = (f"threads x clock x llvm-mca {model} IPC {ipc:.2f} x {ins.macs} MACs; "
                  f"clock: {clock['method']}")
    method = (f"max(measured: {measuring}; estimated: {estimating})" if own_model else
              f"measured: {measuring} (llvm-mca has no {mcpu} model; the {model} estimate "
              f"is reported, not used: {estimating})")
    return {"gmacs": max(measured, estimated) if own_model else measured,
            "threads": threads, "instruction": ins.name, "macs_per_instruction": ins.macs,
            "measured_gmacs": measured, "measured_all_threads_gmacs": all_threads,
            "estimated_gmacs": estimated,
            "clock_ghz": clock["ghz"], "ipc": ipc,
            "measured_ipc": measured / (threads * clock["ghz"] * ins.macs),
            "mcpu": mcpu, "mca_model": model, "accumulators": n,
            "hot_loop": {k: loop[k] for k in ("label", "mac_instructions", "unroll")},
            "method": method}
