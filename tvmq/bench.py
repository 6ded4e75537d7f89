"""``python -m tvmq.bench``: tvmq against its peers, side by side, in one run.

Peers, each timed in its own process, one after the other (PyTorch's OpenMP pool and TVM's
thread pool both spin, and slow each other down when they share a process):

- ``torch_fp32``  PyTorch eager fp32, the faster of NCHW and channels_last
- ``torch_int8``  PyTorch int8: FX graph mode quantization, x86 backend
- ``tvm_fp32``    TVM, float model, default Relax pipeline, untuned
- ``tvmq_w8a8``   tvmq INT-SE W8A8 with its default schedules, untuned (``--scheme``: another
  of tvmq's schemes for the model, e.g. ``mxqn:4``; its rows then say so, and issue 11's
  goals, set for W8A8, are not judged)
- ``ort_fp32``, ``ort_int8``, ``et_fp32``, ``et_int8``: ONNX Runtime and ExecuTorch + XNNPACK
  (:mod:`tvmq.peers`; optional: ``pip install -e .[peers]``, reported unavailable otherwise)

Every peer is timed the same way: single calls timed from Python, the median of at least
``--calls`` (50) of them after ``WARMUP`` calls. Timing under load measures the load: the
foreign load (other processes' CPU) is measured before and while each peer is timed, and a
peer timed on a busy machine is rerun, then reported "not recorded: machine busy" unless
``--allow-busy`` (then recorded, with a warning in the table and the JSON).
Writes ``OUT/bench.json`` and ``OUT/bench.png``.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from deploy.report import write_atomic
from tvmq import peers as _peers

LABELS = {"torch_fp32": "PyTorch fp32", "torch_int8": "PyTorch int8 (x86)",
          "tvm_fp32": "TVM fp32 untuned", "tvm_fp32_tuned": "TVM fp32 tuned",
          "tvmq_w8a8": "tvmq W8A8 default",
          "tvmq_w8a8_tuned": "tvmq W8A8 tuned", **_peers.LABELS}
W8A8 = "int-se"  # tvmq's scheme in the benchmark unless --scheme names another


def label(peer: str, scheme: str = W8A8) -> str:
    """A peer's name in tables, plots and messages; tvmq's rows name a scheme other than
    W8A8 (``--scheme``)."""
    name = LABELS[peer]
    return name.replace("W8A8", scheme) if scheme != W8A8 and peer.startswith("tvmq") else name


BASELINES = ("torch_fp32", "torch_int8", "fastest_int8")
SHORT = {"torch_fp32": "fp32", "torch_int8": "int8", "fastest_int8": "fastest int8 peer"}
INT8_PEERS = ("torch_int8", "ort_int8", "et_int8")  # the int8 runtimes a user could pick instead
# issue 11's goals per model: (peer, at most this x the fastest int8 peer on the same host,
# same run); ResNet-20 "stays ahead of every peer"
GOALS = {"resnet18": (("tvmq_w8a8", 0.8), ("tvmq_w8a8_tuned", 0.7)),
         "resnet20": (("tvmq_w8a8", 1.0), ("tvmq_w8a8_tuned", 1.0))}
BAR = ("tvmq_w8a8", "torch_fp32", 2.0)  # the project's bar: tvmq W8A8 <= 2x PyTorch fp32
SEED = 0
WARMUP = 5            # untimed calls before timing
CALLS = 50            # timed single calls, at least (--calls)
MIN_TIMED_S = 1.0     # ... and at least this long: the load measured over it means something
MAX_CALLS = 100_000
CALIB_BATCHES = 8     # random batches every int8 peer's calibration sees (the same ones)
BUSY_TRIES = 3        # a peer timed on a busy machine is rerun this many times in all
BUSY_WAIT_S = 10.0    # ... this long after the machine was found busy
PARITY_INPUTS = 2     # tvmq.build's parity check (not the point here: keep it short)
RESULT = "TVMQ-BENCH-RESULT "  # prefix of the line a peer process prints its result on


# ----------------------------------------------------------------------------- timing
def _stats(samples_ms: list[float], number: int | None = None) -> dict:
    """Median and interquartile range of per-call times (ms); ``number`` calls per repeat
    (None: chosen by TVM's timer)."""
    import numpy as np

    q1, med, q3 = np.percentile(samples_ms, [25, 50, 75])
    return {"median_ms": float(med), "iqr_ms": float(q3 - q1), "q1_ms": float(q1),
            "q3_ms": float(q3), "repeats": len(samples_ms),
            "number": number}


def _time_python(fn, calls: int = CALLS) -> dict:
    """Time a callable the way every peer is timed: single calls timed from Python.

    Parameters
    ----------
    fn : callable
        Called with no arguments: one inference.
    calls : int
        Timed calls, at least; after ``WARMUP`` untimed ones, more until the timed calls
        last ``MIN_TIMED_S`` (at most ``MAX_CALLS``), so that the foreign load measured
        over them is not rounding noise.

    Returns
    -------
    dict
        ``median_ms``, ``iqr_ms``, quartiles (per call), ``calls``, and ``load``: the
        cores other processes used while the calls were timed (:func:`tvmq.peers.foreign_load`).
    """
    for _ in range(WARMUP):
        fn()
    own = _peers.own_pids()
    before = _peers.snapshot()
    samples = []
    t0 = time.perf_counter()
    while len(samples) < calls or (time.perf_counter() - t0 < MIN_TIMED_S
                                   and len(samples) < MAX_CALLS):
        t = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t) * 1e3)
    load = _peers.foreign_load(before, _peers.snapshot(), own)
    r = _stats(samples)
    for k in ("number", "repeats"):
        del r[k]
    return {**r, "calls": len(samples), "load": load}


def _time_vm(lib, x, calls: int = CALLS) -> dict:
    """Time ``main`` of a Relax VM library (or Executable) on ``x`` as :func:`_time_python`
    times every peer (one call timed from Python; the VM's own call overhead included, as
    every other runtime's is).

    Parameters
    ----------
    lib : tvm.runtime.Module or tvm.runtime.Executable
        The compiled model.
    x : torch.Tensor
        The float input.
    calls : int
        As :func:`_time_python`.
    """
    import tvm
    from tvm import relax

    vm = relax.VirtualMachine(lib, tvm.cpu())
    main = vm["main"]
    data = tvm.runtime.tensor(x.numpy())
    return _time_python(lambda: main(data), calls)


def _calib_batches(x) -> list:
    """The ``CALIB_BATCHES`` random batches every int8 peer is calibrated on (seeded)."""
    import torch

    g = torch.Generator().manual_seed(SEED + 1)
    return [torch.randn(x.shape, generator=g) for _ in range(CALIB_BATCHES)]


# ----------------------------------------------------------------------------- peers
def _float_model(model: str):
    """The zoo model with random weights (seed ``SEED``), in eval mode, and one input."""
    import torch

    from tvmq import zoo

    factory, shape = zoo.ZOO[model]
    torch.manual_seed(SEED)
    return factory().eval(), torch.randn(shape)


def torch_fp32(model: str, calls: int) -> dict:
    """PyTorch eager fp32 under ``inference_mode``: NCHW and channels_last, the faster."""
    import torch

    net, x = _float_model(model)
    best = None
    for name, fmt in (("NCHW", torch.contiguous_format), ("channels_last", torch.channels_last)):
        m, xi = copy.deepcopy(net).to(memory_format=fmt), x.contiguous(memory_format=fmt)
        with torch.inference_mode():
            r = {**_time_python(lambda: m(xi), calls), "note": name}
        best = r if best is None or r["median_ms"] < best["median_ms"] else best
    return best


def torch_int8(model: str, calls: int) -> dict:
    """PyTorch int8: ``prepare_fx``/``convert_fx`` with the x86 qconfig mapping, calibrated
    on random batches; ``{"unavailable": reason}`` when this torch has no FX quantization."""
    import torch

    try:
        from torch.ao.quantization import get_default_qconfig_mapping
        from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

        torch.backends.quantized.engine = "x86"
    except (ImportError, AttributeError, RuntimeError) as err:
        return {"unavailable": f"FX quantization (x86) unavailable in torch {torch.__version__}:"
                               f" {type(err).__name__}: {err}"}
    net, x = _float_model(model)
    prepared = prepare_fx(net, get_default_qconfig_mapping("x86"), (x,))
    with torch.inference_mode():
        for b in _calib_batches(x):
            prepared(b)
    q = convert_fx(prepared)
    with torch.inference_mode():
        return {**_time_python(lambda: q(x), calls), "note": "engine x86"}


def tvm_fp32(model: str, calls: int) -> dict:
    """TVM fp32: ``torch.export`` -> ``from_exported_program`` -> ``tvm.compile`` for the
    host target (default Relax pipeline, no tuning)."""
    import torch
    import tvm
    from tvm.relax.frontend.torch import from_exported_program

    from schedules.targets import resolve

    net, x = _float_model(model)
    t = time.perf_counter()
    mod = from_exported_program(torch.export.export(net, (x,)), unwrap_unit_return_tuple=True)
    lib = tvm.compile(mod, resolve("x86")).jit()  # the LLVM code generation happens here
    build_s = time.perf_counter() - t
    return {**_time_vm(lib, x, calls), "build_s": build_s, "note": f"build {build_s:.0f} s"}


def tvm_fp32_tuned(model: str, calls: int, trials: int = 0) -> dict:
    """TVM fp32 tuned by MetaSchedule's own default space (XGBoost cost model) with the same
    number of trials as tvmq's database: what a TVM user gets with that tuning budget."""
    import torch
    import tvm
    from tvm.relax.frontend.torch import from_exported_program
    from tvm.s_tir import meta_schedule as ms

    from schedules.targets import resolve

    if not trials:
        return {"unavailable": "no tuning budget: give --trials or a tvmq database"}
    from tvm import relax

    net, x = _float_model(model)
    target = resolve("x86")
    t = time.perf_counter()
    mod = from_exported_program(torch.export.export(net, (x,)), unwrap_unit_return_tuple=True)
    # tune_relax finds its tasks among call_tir kernels: legalize and fuse first
    with target:
        mod = tvm.transform.Sequential([
            relax.transform.DecomposeOpsForInference(), relax.transform.LegalizeOps(),
            relax.transform.AnnotateTIROpPattern(), relax.transform.FoldConstant(),
            relax.transform.FuseOps(), relax.transform.FuseTIR()])(mod)
    with tempfile.TemporaryDirectory() as work:
        db = ms.relax_integration.tune_relax(mod, {}, target, work, max_trials_global=trials,
                                             num_trials_per_iter=16)
        # apply the records to the very module they were tuned on (compile_relax would
        # legalize and fuse again, and its kernels would no longer match the records)
        with target, db:
            mod = relax.transform.MetaScheduleApplyDatabase()(mod)
        ex = tvm.compile(mod, target)
    tuning_s = time.perf_counter() - t
    return {**_time_vm(ex.jit(), x, calls), "tuning_s": tuning_s,
            "note": f"{trials} trials, tuned {tuning_s / 60:.0f} min"}


def tvmq_w8a8(model: str, calls: int, db: str | None = None, scheme: str = W8A8) -> dict:
    """tvmq INT-SE W8A8 (or ``scheme``), default schedules (or ``db``'s tuned ones): the CLI's
    path for a zoo model (``zoo_program`` then ``tvmq.build``), the library loaded back from
    ``model.so``."""
    import tvm

    import tvmq
    from tvmq.build import zoo_program

    _, x = _float_model(model)
    t = time.perf_counter()
    ep = zoo_program(model, scheme)
    with tempfile.TemporaryDirectory() as tmp:
        art = tvmq.build(ep, target="x86", out=Path(tmp) / model, parity=PARITY_INPUTS, db=db)
        build_s = time.perf_counter() - t
        lib = tvm.runtime.load_module(str(art.path / "model.so"))
        mismatches = art.manifest["parity"]["mismatches"]
        tuned = art.manifest["tuned_kernels"]  # how many kernels the database matched
        return {**_time_vm(lib, x, calls), "build_s": build_s, "scheme": art.manifest["scheme"],
                "parity_mismatches": mismatches, "tuned_kernels": tuned,
                "note": f"build {build_s:.0f} s, parity {'ok' if not mismatches else 'MISMATCH'}"
                        + (f", {tuned['tuned']}/{tuned['kernels']} kernels tuned" if tuned else "")}


def tvmq_w8a8_tuned(model: str, calls: int, db: str | None = None, scheme: str = W8A8) -> dict:
    """tvmq W8A8 with the kernels of a MetaSchedule database (``python -m tvmq.tune``; by
    default the one shipped for this CPU, if any)."""
    if db is None and scheme != W8A8:  # the shipped databases hold W8A8's kernels
        return {"unavailable": f"no tuning database for {scheme}: python -m tvmq.tune {model}"
                               f" --scheme {scheme} --db DIR, then --db DIR"}
    db = db or _shipped_db(model)
    if not Path(db, "tvmq.json").exists():
        return {"unavailable": f"no tuning database {db}: python -m tvmq.tune {model} --db {db}"}
    from schedules.tuning import database_cost

    result = tvmq_w8a8(model, calls, db, scheme)
    if cost := database_cost(db):  # the wall time of the tuning that made the database
        result["tuning_s"] = cost[0]
        result["note"] += f", tuned {result['tuning_s'] / 60:.0f} min"
    return result


def _shipped_db(model: str) -> str:
    from schedules.targets import resolve
    from schedules.tuning import shipped_database

    found = shipped_database(model, resolve("x86"))
    return str(found) if found else f"tuning/{model}-x86"


def _tuning_trials(model: str, db: str | None) -> int:
    """The trials behind tvmq's tuned database: the budget TVM fp32 gets too."""
    from schedules.tuning import database_cost

    cost = database_cost(db or _shipped_db(model))
    return cost[1] if cost else 0


PEERS = {fn.__name__: fn for fn in (torch_fp32, torch_int8, tvm_fp32, tvm_fp32_tuned,
                                    tvmq_w8a8, tvmq_w8a8_tuned)}
PEERS.update(_peers.PEERS)


# ----------------------------------------------------------------------------- runner
def _spawn(peer: str, args) -> dict:
    """Run one peer in a fresh process (``--peer``) and read its JSON result back."""
    env = {**os.environ, "TVM_NUM_THREADS": str(args.threads),
           "OMP_NUM_THREADS": str(args.threads)}
    cmd = [sys.executable, "-m", "tvmq.bench", "--peer", peer, "--model", args.model,
           "--threads", str(args.threads), "--calls", str(args.calls), "--scheme", args.scheme,
           *(["--db", args.db] if args.db else []), "--trials", str(args.trials)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env,
                              timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {args.timeout} s"}
    lines = [ln[len(RESULT):] for ln in proc.stdout.splitlines() if ln.startswith(RESULT)]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
        return {"error": tail}
    return json.loads(lines[-1])


def _run_peer(peer: str, args, say=print) -> dict:
    """One peer in its own process, on a machine that other processes leave alone.

    The foreign load is measured for ``BUSY_WINDOW_S`` before the peer starts and, by the
    peer itself, over its timed calls. Above ``args.busy_cores``: one line through ``say``,
    a pause of ``args.busy_wait`` s, a rerun; after ``args.busy_tries`` busy attempts the
    result is ``{"not_recorded": "machine busy", "busy": ...}``. With ``args.allow_busy`` the
    first result is kept, marked with ``busy`` (and the table's warning).
    """
    threshold, tries = args.busy_cores, max(1, args.busy_tries)
    busy = None
    for attempt in range(1, tries + 1):
        then = (f"rerunning in {args.busy_wait:g} s" if attempt < tries else
                "giving up" if not args.allow_busy else "recording anyway (--allow-busy)")
        pre = _peers.measure_load(args.busy_window)
        if pre["cores"] > threshold and not args.allow_busy:
            busy = {"before": pre, "during": None, "threshold": threshold, "attempts": attempt}
            say(f"{label(peer, args.scheme)}: {_peers.busy_line(pre, then)}")
            if attempt < tries:
                time.sleep(args.busy_wait)
            continue
        result = _spawn(peer, args)
        if "median_ms" not in result:  # unavailable or failed: nothing to guard
            return result
        during = result.get("load", {"cores": 0.0, "top": []})
        worst = max((pre, during), key=lambda d: d["cores"])
        if worst["cores"] <= threshold:
            return result
        busy = {"before": pre, "during": during, "threshold": threshold, "attempts": attempt}
        if args.allow_busy:
            say(f"{label(peer, args.scheme)}: "
                f"{_peers.busy_line(worst, 'recorded anyway (--allow-busy)')}")
            return {**result, "busy": busy}
        say(f"{label(peer, args.scheme)}: {_peers.busy_line(worst, then)}")
        if attempt < tries:
            time.sleep(args.busy_wait)
    return {"not_recorded": "machine busy", "busy": busy}


def round_order(peers: list[str], rnd: int) -> list[str]:
    """The peers in round ``rnd``: forward in even rounds, backward in odd ones, so no peer
    always runs right after the same one (whatever a process leaves behind, warm or busy
    caches, a clock change, does not always fall on the same neighbour: in forward-only runs
    tvmq tuned, always after tvmq default, measured 5-6 % slower than it, and a tie alone)."""
    return list(peers) if rnd % 2 == 0 else list(reversed(peers))


def _rounds(runs: list[dict]) -> dict:
    """One peer's result over its rounds: the recorded round whose median is the median of
    the rounds' (``rounds_ms``: every recorded round's median, in order). A round refused on
    a busy machine is left out (``rounds_not_recorded``); with none recorded, the last."""
    ok = [r for r in runs if "median_ms" in r]
    if not ok:
        return runs[-1]
    if len(runs) == 1:
        return ok[0]
    mid = sorted(ok, key=lambda r: r["median_ms"])[(len(ok) - 1) // 2]
    out = {**mid, "rounds_ms": [r["median_ms"] for r in ok]}
    if len(ok) < len(runs):
        out["rounds_not_recorded"] = len(runs) - len(ok)
    if any("busy" in r for r in ok) and "busy" not in out:
        out["busy"] = next(r["busy"] for r in ok if "busy" in r)
    if len(ok) > 1:
        out["note"] = (f"rounds {min(out['rounds_ms']):.2f}–{max(out['rounds_ms']):.2f}, "
                       + out.get("note", ""))
    return out


def _machine(threads: int) -> dict:
    """CPU model, LLVM's mcpu for it, thread count, library versions, date, tvmq commit."""
    import torch
    import tvm

    with open("/proc/cpuinfo") as f:
        cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")),
                   "unknown")
    git = ["git", "-C", str(Path(__file__).resolve().parent)]
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True)
    return {"cpu": cpu, "llvm_mcpu": tvm.target.codegen.llvm_get_system_cpu(),
            "threads": threads, "torch": torch.__version__, "tvm": tvm.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
            "tvmq_commit": head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")}


def _fastest_int8_ms(results: dict) -> float | None:
    """The median of the fastest int8 runtime a user could pick instead, if any ran."""
    int8 = [r["median_ms"] for p, r in results.items() if p in INT8_PEERS and "median_ms" in r]
    return min(int8) if int8 else None


def _ratios(results: dict) -> dict:
    """``{"peer/baseline": median ratio}`` for every measured peer and baseline."""
    ok = {p: r["median_ms"] for p, r in results.items() if "median_ms" in r}
    fastest = _fastest_int8_ms(results)
    if fastest is not None:
        ok["fastest_int8"] = fastest
    return {f"{p}/{b}": ok[p] / ok[b] for p in ok if p in results
            for b in BASELINES if b in ok and b != p}


def _plot(results: dict, title: str, path: Path, scheme: str = W8A8) -> None:
    """Horizontal bars of the medians, whiskers from the first to the third quartile; log
    scale when the medians span a lot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [p for p, r in results.items() if "median_ms" in r]
    times = [results[p]["median_ms"] for p in names]
    fig, ax = plt.subplots(figsize=(7, 0.6 * len(names) + 1.5))
    bars = ax.barh([label(p, scheme) for p in names], times,
                   xerr=[[results[p]["median_ms"] - results[p]["q1_ms"] for p in names],
                         [results[p]["q3_ms"] - results[p]["median_ms"] for p in names]],
                   color=["C1" if p == BAR[0] else "C0" for p in names])
    ax.bar_label(bars, fmt="%.1f ms", padding=4)
    ax.invert_yaxis()
    ax.margins(x=0.15)  # room for the labels
    if times and max(times) > 20 * min(times):  # an untuned peer would flatten the others
        ax.set_xscale("log")
    ax.set_xlabel("median latency, ms (lower is better)")
    ax.set_title(title, fontsize="medium")
    fig.tight_layout()
    write_atomic(path, lambda p: fig.savefig(p, format="png", dpi=120))
    plt.close(fig)


def _table(results: dict, ratios: dict, title: str, scheme: str = W8A8):
    """The rich table: median, IQR, ratio to each baseline, note."""
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=title, caption="÷ fp32, ÷ int8, ÷ fastest int8 peer: median over"
                  " PyTorch fp32's, PyTorch int8's, the fastest int8 runtime's")
    table.add_column("peer")
    for col in ("median ms", "IQR", *(f"÷ {SHORT[b]}" for b in BASELINES)):
        table.add_column(col, justify="right", no_wrap=True)
    table.add_column("note", min_width=14)
    for peer, r in results.items():
        if "median_ms" not in r:  # the reason is printed in full under the table
            note = ("[yellow]unavailable: " + escape(r["unavailable"].split(" (")[0]) + "[/]"
                    if "unavailable" in r else
                    f"[red]not recorded: {r['not_recorded']}[/]" if "not_recorded" in r
                    else "[red]failed[/]")
            table.add_row(label(peer, scheme), "-", "-", *("-" for _ in BASELINES), note)
            continue
        cells = ["1.00×" if peer == b else f"{ratios[f'{peer}/{b}']:.2f}×"
                 if f"{peer}/{b}" in ratios else "-" for b in BASELINES]
        note = r.get("note", "")
        if "busy" in r:
            worst = max((d for d in (r["busy"]["before"], r["busy"]["during"]) if d),
                        key=lambda d: d["cores"])
            note = f"[red]BUSY ({worst['cores']:.2f} foreign cores)[/] {escape(note)}"
        table.add_row(label(peer, scheme), f"{r['median_ms']:.2f}", f"{r['iqr_ms']:.2f}", *cells,
                      note if "busy" in r else escape(note))
    return table


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tvmq.bench",
                                 description=__doc__.split("\n\n")[0].strip("`"))
    ap.add_argument("--model", default="resnet18", choices=["resnet18", "resnet20"],
                    help="resnet18 at 1x3x224x224 or resnet20 at 1x3x32x32 (random weights)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--calls", "--repeats", type=int, default=CALLS,
                    help=f"timed single calls per peer, at least (default {CALLS}; more if"
                         f" they last under {MIN_TIMED_S:g} s)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="rounds, every peer once per round (round-robin, the order reversed"
                    " every other round), each in a fresh"
                         " process; reported: the round with the median median")
    ap.add_argument("--allow-busy", action="store_true",
                    help="record peers timed while other processes load the machine (marked"
                         " BUSY in the table and the JSON) instead of refusing them")
    ap.add_argument("--busy-cores", type=float, default=_peers.BUSY_CORES,
                    help="the machine is busy when other processes use more cores than this"
                         f" (default {_peers.BUSY_CORES:g})")
    ap.add_argument("--busy-tries", type=int, default=BUSY_TRIES,
                    help="attempts per peer on a busy machine before it is not recorded")
    ap.add_argument("--busy-wait", type=float, default=BUSY_WAIT_S,
                    help="seconds to wait after the machine was found busy")
    ap.add_argument("--busy-window", type=float, default=1.0,
                    help="seconds over which the load is measured before each peer")
    ap.add_argument("--out", default="bench", help="directory for bench.json and bench.png")
    ap.add_argument("--skip", action="append", default=[], choices=list(PEERS),
                    help="a peer not to run (repeatable)")
    ap.add_argument("--timeout", type=float, default=None, help="seconds allowed per peer")
    ap.add_argument("--db", help="tvmq's tuning database (default: the one shipped for this CPU)")
    ap.add_argument("--scheme", default=W8A8,
                    help="tvmq's quantization scheme NAME[:ARGS] (as tvmq.build; default"
                         f" {W8A8}: W8A8); the int8 peers stay standard int8")
    ap.add_argument("--trials", type=int, default=0,
                    help="TVM fp32's tuning budget (default: the trials of tvmq's database)")
    ap.add_argument("--layers", action="store_true",
                    help="also the ten slowest convolutions: tvmq vs PyTorch int8 per layer,"
                         " and each one's share of this CPU's measured int8 MAC peak")
    ap.add_argument("--layers-only", action="store_true", help="only the per-layer table")
    ap.add_argument("--kernels", action="store_true",
                    help="only the low-bit kernel table: ResNet-18's 3x3 layers, tvmq's int8"
                    " kernel beside the bit-serial ternary one (K = 1, 2; 2-bit activations)")
    ap.add_argument("--target", default="x86", choices=["x86", "arm"],
                    help="--kernels: x86 = timed on this host; arm = Cortex-A72 cycles"
                    " estimated by llvm-mca (no Pi needed; labelled as an estimate)")
    ap.add_argument("--peer", choices=list(PEERS), help=argparse.SUPPRESS)  # child process
    args = ap.parse_args(argv)
    if args.calls < CALLS and not args.peer:
        ap.error(f"--calls: at least {CALLS} (the median of fewer single calls is noise)")
    from tvmq.schemes import UnknownSchemeError, get_recipe

    try:
        recipe = get_recipe(args.scheme)
    except UnknownSchemeError as err:
        ap.error(f"--scheme: {err}")
    if not args.scheme.endswith(".json"):
        args.scheme = recipe.name  # canonical: "int-se:8" is W8A8, its goals are judged
    if args.peer:
        import torch

        torch.set_num_threads(args.threads)
        extra = ({"db": args.db, "scheme": args.scheme} if args.peer.startswith("tvmq") else
                 {"trials": args.trials or _tuning_trials(args.model, args.db)}
                 if args.peer == "tvm_fp32_tuned" else
                 {"threads": args.threads} if args.peer in _peers.PEERS else {})
        print(RESULT + json.dumps(PEERS[args.peer](args.model, args.calls, **extra)), flush=True)
        return 0

    from rich.console import Console

    from tvmq.training import progress

    if args.kernels:
        return _kernels(args)
    peers = [p for p in PEERS if p not in args.skip and not args.layers_only]
    runs = {p: [] for p in peers}
    with progress() as bar:
        task = bar.add_task(f"bench {args.model}", total=len(peers) * args.rounds, info="")
        for rnd in range(args.rounds):  # round-robin: a slow spell hits every peer alike
            for peer in round_order(peers, rnd):
                first = runs[peer][0] if runs[peer] else {}
                if "unavailable" in first or "error" in first:  # once is enough
                    bar.advance(task)
                    continue
                bar.update(task, info=f"{label(peer, args.scheme)} (own process)"
                           + (f", round {rnd + 1}/{args.rounds}" if args.rounds > 1 else ""))
                runs[peer].append(_run_peer(peer, args, say=lambda m: bar.console.print(
                    m, highlight=False, markup=False)))
                bar.advance(task)
        bar.update(task, info="done")
    results = {p: _rounds(rs) for p, rs in runs.items()}

    machine = _machine(args.threads)
    ratios = _ratios(results)
    peer, base, limit = BAR
    value = ratios.get(f"{peer}/{base}")
    passed = None if value is None else value <= limit
    title = f"{args.model}, batch 1, {args.threads} threads, {machine['cpu']} ({machine['llvm_mcpu']})"
    console = Console()
    if results:
        console.print(_table(results, ratios, title, args.scheme))
        for p, r in results.items():
            if "median_ms" not in r and "not_recorded" not in r:
                name = label(p, args.scheme)
                console.print(f"{name}: unavailable: {r['unavailable']}" if "unavailable" in r
                              else f"{name}: {r.get('error')}", highlight=False, markup=False)
            elif "busy" in r or "not_recorded" in r:
                b = r["busy"]
                worst = max((d for d in (b["before"], b["during"]) if d),
                            key=lambda d: d["cores"])
                console.print(f"{label(p, args.scheme)}: {_peers.busy_line(worst)}"
                              + (" (recorded: --allow-busy)" if "median_ms" in r else
                                 f" in {b['attempts']} attempts: not recorded"),
                              highlight=False, markup=False)
        verdict = ("not measured" if value is None
                   else f"{value:.2f}× -> {'[green]PASS[/]' if passed else '[red]FAIL[/]'}")
        console.print(f"bar: {label(peer, args.scheme)} <= {limit:g}× {LABELS[base]}: {verdict}")
        for line in _goal_lines(ratios, args.model) if args.scheme == W8A8 else []:
            console.print(line)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"model": args.model, "scheme": args.scheme, "threads": args.threads,
              "machine": machine,
              "timing": {"calls": args.calls, "min_timed_s": MIN_TIMED_S, "warmup": WARMUP,
                         "rounds": args.rounds,
                         "statistic": "median, IQR of single calls timed from Python",
                         "calib_batches": CALIB_BATCHES},
              "load_guard": {"busy_cores": args.busy_cores, "tries": args.busy_tries,
                             "allow_busy": args.allow_busy,
                             "busy_peers": [p for p, r in results.items() if "busy" in r],
                             "warning": ("recorded on a busy machine: "
                                         + ", ".join(p for p, r in results.items()
                                                     if "busy" in r and "median_ms" in r))
                             if any("busy" in r and "median_ms" in r
                                    for r in results.values()) else None},
              "results": results, "ratios": ratios,
              "bar": {"what": f"{peer} <= {limit:g}x {base}", "ratio": value, "pass": passed},
              "goals": [{"what": f"{p} <= {limit:g}x fastest_int8", "limit": limit,
                         "ratio": ratios.get(f"{p}/fastest_int8")}
                        for p, limit in GOALS[args.model]] if args.scheme == W8A8 else []}
    if args.layers or args.layers_only:
        from tvmq import bench_layers

        with console.status("per-layer benchmark (tvmq, PyTorch int8, peak: own processes)"):
            db = args.db or (_shipped_db(args.model) if Path(_shipped_db(args.model),
                                                               "tvmq.json").exists() else None)
            report["layers"] = bench_layers.measure(args.model, args.threads, 15, db)
        console.print(bench_layers.table(report["layers"], f"{args.model}: slowest convolutions,"
                                         f" {args.threads} threads"))
        console.print(_bound_line(report["layers"]["bound"], results), highlight=False)
    write_atomic(out / "bench.json", lambda p: p.write_text(json.dumps(report, indent=2)))
    plotted = any("median_ms" in r for r in results.values())
    if plotted:
        _plot(results, title, out / "bench.png", args.scheme)
    console.print(f"wrote {out / 'bench.json'}" + (f" and {out / 'bench.png'}" if plotted else ""))
    return 0


def _goal_lines(ratios: dict, model: str) -> list[str]:
    """Issue 11's goals for ``model``, each with this run's ratio and verdict."""
    lines = []
    for peer, limit in GOALS[model]:
        value = ratios.get(f"{peer}/fastest_int8")
        verdict = ("not measured" if value is None else f"{value:.2f}× -> "
                   + ("[green]PASS[/]" if value <= limit else "[red]FAIL[/]"))
        lines.append(f"goal: {LABELS[peer]} <= {limit:g}× the fastest int8 peer: {verdict}")
    return lines


def _bound_line(bound: dict, results: dict) -> str:
    """The model's conv MACs at the measured peak, against the fastest int8 peer: what no
    schedule of these MACs can beat (a goal below it needs fewer MACs or a faster unit)."""
    line = (f"MAC bound: {bound['conv_gmac']:.3f} GMAC of convolutions at the peak ="
            f" {bound['ms']:.3f} ms")
    fastest = _fastest_int8_ms(results)
    if fastest is not None:
        bound["fastest_int8_peer_ms"] = fastest
        bound["ratio_to_fastest_int8_peer"] = bound["ms"] / fastest
        line += f" = {bound['ratio_to_fastest_int8_peer']:.2f}× the fastest int8 peer"
    if bound.get("tvmq_products_g", bound["conv_gmac"]) < bound["conv_gmac"]:  # Winograd
        line += (f"; tvmq's kernels multiply {bound['tvmq_products_g']:.3f} G times"
                 f" (Winograd) = {bound['tvmq_ms']:.3f} ms at the peak")
        if fastest is not None:
            line += f" = {bound['tvmq_ms'] / fastest:.2f}×"
    return line


def _kernels(args) -> int:
    """int8 vs bit-serial per layer: estimated A72 cycles (arm) or host milliseconds (x86)."""
    from rich.console import Console
    from rich.table import Table

    from schedules import estimate

    console = Console()
    arm = args.target == "arm"
    with console.status("estimating with llvm-mca" if arm else "timing on this host"):
        if arm:
            rows = estimate.resnet18_estimates()
        else:
            os.environ.setdefault("TVM_NUM_THREADS", str(args.threads))
            rows = estimate.time_host()
    machine = _machine(args.threads)
    title = ("ResNet-18 3x3 layers: Cortex-A72 cycles, ESTIMATE (llvm-mca -mcpu=cortex-a72,"
             " one core, data in L1; conv loop nest + data packing; % of peak: the conv loop"
             " nest)" if arm else
             f"ResNet-18 3x3 layers: median ms on this host, {machine['cpu']}"
             f" ({machine['llvm_mcpu']}), {os.environ.get('TVM_NUM_THREADS')} threads")
    table = Table(title=title)
    unit, scale, key = ("M cycles", 1e-6, "") if arm else ("ms", 1.0, "_ms")
    share = ["int8 % of A72 int8 peak"] if arm else []
    for col in ("layer", f"int8 {unit}", *share, f"ternary K=1 x 2-bit {unit}", "÷ int8",
                f"K=2 x 2-bit {unit}", "÷ int8"):
        table.add_column(col, justify="right")
    for r in rows:
        i8, k1, k2 = r["int8" + key], r["bitserial_k1" + key], r["bitserial_k2" + key]
        table.add_row(r["layer"], f"{i8 * scale:.3g}",
                      *([f"{100 * r['int8_peak_share']:.0f} %"] if arm else []),
                      f"{k1 * scale:.3g}", f"{k1 / i8:.2f}", f"{k2 * scale:.3g}", f"{k2 / i8:.2f}")
    console.print(table)
    if arm:
        console.print(f"A72 int8 peak {rows[0]['peak_macs_per_cycle']:.2f} MACs/cycle per core:"
                      " llvm-mca on independent 8-bit smull+smlal+sadalp chains (an estimate,"
                      " like the table); int8 = the kernel for inputs >= 0 (8-bit quads)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"kernels-{args.target}.json"
    report = {"what": title, "machine": machine, "rows": rows,
              "method": estimate.METHOD if arm else "TVM time_evaluator, median"}
    write_atomic(path, lambda p: p.write_text(json.dumps(report, indent=2, default=str)))
    console.print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
