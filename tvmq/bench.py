"""``python -m tvmq.bench``: tvmq against its peers, side by side, in one run.

Peers (each timed in its own process: PyTorch's and TVM's thread pools both spin and slow
each other down when they share one):

- ``torch_fp32``  PyTorch eager fp32 (the faster of NCHW and channels_last)
- ``torch_int8``  PyTorch int8, FX graph mode quantization on the x86 backend
- ``tvm_fp32``    TVM 0.27, float model, default pipeline, untuned
- ``tvmq_w8a8``   tvmq INT-SE W8A8 with its default schedules, untuned

The machine is shared and noisy, so the results are *ratios* within one run; absolute
milliseconds drift from run to run. Writes ``OUT/bench.json`` and ``OUT/bench.png``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PEERS = ("torch_fp32", "torch_int8", "tvm_fp32", "tvmq_w8a8")
LABELS = {"torch_fp32": "PyTorch fp32", "torch_int8": "PyTorch int8 (x86)",
          "tvm_fp32": "TVM fp32 untuned", "tvmq_w8a8": "tvmq W8A8 default"}
BAR = ("tvmq_w8a8", "torch_fp32", 2.0)  # this milestone's bar: tvmq <= 2x PyTorch fp32


# ----------------------------------------------------------------------------- one peer
def _stats(samples_ms: list[float]) -> dict:
    import numpy as np

    q1, med, q3 = np.percentile(samples_ms, [25, 50, 75])
    return {"median_ms": float(med), "iqr_ms": float(q3 - q1), "samples": len(samples_ms)}


def _time_python(fn, repeats: int, min_ms: float = 200.0) -> dict:
    """Median over ``repeats`` of the mean time of ``number`` calls (``number`` chosen so one
    repeat lasts at least ``min_ms``), after a warm-up."""
    for _ in range(3):
        fn()
    t = time.perf_counter()
    fn()
    number = max(1, int(min_ms / 1e3 / max(time.perf_counter() - t, 1e-6)))
    samples = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(number):
            fn()
        samples.append((time.perf_counter() - t) / number * 1e3)
    return _stats(samples)


def _time_vm(lib, x, repeats: int) -> dict:
    import tvm
    from tvm import relax

    vm = relax.VirtualMachine(lib, tvm.cpu())
    data = tvm.runtime.tensor(x.numpy())
    vm["main"](data)  # warm-up
    timer = vm.time_evaluator("main", tvm.cpu(), number=1, repeat=repeats, min_repeat_ms=200)
    return _stats([r * 1e3 for r in timer(data).results])


def _float_model(model: str):
    import torch

    from tvmq import zoo

    factory, shape = zoo.ZOO[model]
    torch.manual_seed(0)
    return factory().eval(), torch.randn(shape)


def run_peer(peer: str, model: str, threads: int, repeats: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    net, x = _float_model(model)
    if peer == "torch_fp32":
        best = None
        for fmt in (torch.contiguous_format, torch.channels_last):
            m, xi = net.to(memory_format=fmt), x.contiguous(memory_format=fmt)
            with torch.inference_mode():
                r = _time_python(lambda: m(xi), repeats)
            r["layout"] = "channels_last" if fmt is torch.channels_last else "NCHW"
            best = r if best is None or r["median_ms"] < best["median_ms"] else best
        return best
    if peer == "torch_int8":
        from torch.ao.quantization import get_default_qconfig_mapping
        from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

        torch.backends.quantized.engine = "x86"
        prepared = prepare_fx(net, get_default_qconfig_mapping("x86"), (x,))
        with torch.inference_mode():
            for _ in range(4):
                prepared(torch.randn_like(x))
        q = convert_fx(prepared)
        with torch.inference_mode():
            return {**_time_python(lambda: q(x), repeats), "engine": "x86 (fbgemm+onednn)"}
    if peer == "tvm_fp32":
        import tvm
        from tvm.relax.frontend.torch import from_exported_program

        from schedules.targets import resolve

        ep = torch.export.export(net, (x,))
        mod = from_exported_program(ep, unwrap_unit_return_tuple=True)
        t = time.perf_counter()
        lib = tvm.compile(mod, resolve("x86"))
        return {**_time_vm(lib, x, repeats), "build_s": time.perf_counter() - t}
    if peer == "tvmq_w8a8":
        import tvmq
        from tvmq.build import zoo_program

        ep = zoo_program(model, "int-se")
        t = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            art = tvmq.build(ep, target="x86", out=Path(tmp) / "a", parity=2)
            import tvm

            lib = tvm.runtime.load_module(str(art.library))
            return {**_time_vm(lib, x, repeats), "build_s": time.perf_counter() - t,
                    "parity_mismatches": art.manifest["parity"]["mismatches"]}
    raise ValueError(f"unknown peer {peer!r}")


# ----------------------------------------------------------------------------- the run
def _machine() -> dict:
    import torch
    import tvm

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), "unknown")
    return {"cpu": cpu, "llvm_mcpu": tvm.target.codegen.llvm_get_system_cpu(),
            "torch": torch.__version__, "tvm": tvm.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def _spawn(peer, args) -> dict:
    env = {**os.environ, "TVM_NUM_THREADS": str(args.threads), "OMP_NUM_THREADS": str(args.threads)}
    cmd = [sys.executable, "-m", "tvmq.bench", "--peer", peer, "--model", args.model,
           "--threads", str(args.threads), "--repeats", str(args.repeats)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": tail}
    return json.loads(lines[-1])


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    write(tmp)
    os.replace(tmp, path)


def _plot(results: dict, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [p for p in results if "median_ms" in results[p]]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    bars = ax.barh([LABELS[p] for p in names], [results[p]["median_ms"] for p in names],
                   xerr=[results[p]["iqr_ms"] / 2 for p in names],
                   color=["#4c72b0" if p != "tvmq_w8a8" else "#dd8452" for p in names])
    ax.bar_label(bars, fmt="%.1f ms", padding=4)
    ax.invert_yaxis()
    times = [results[p]["median_ms"] for p in names]
    if max(times) > 20 * min(times):  # an untuned peer would flatten the others
        ax.set_xscale("log")
    ax.set_xlabel("median latency, ms (lower is better)")
    ax.set_title(title)
    fig.tight_layout()
    _write_atomic(path, lambda p: fig.savefig(p, format="png", dpi=120))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tvmq.bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="resnet18", choices=["resnet18", "resnet20"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--out", default="bench")
    ap.add_argument("--skip", action="append", default=[], choices=PEERS)
    ap.add_argument("--peer", help=argparse.SUPPRESS)  # internal: time one peer, print JSON
    args = ap.parse_args(argv)
    if args.peer:
        print(json.dumps(run_peer(args.peer, args.model, args.threads, args.repeats)))
        return 0

    from rich.console import Console
    from rich.table import Table

    from tvmq.training import progress

    results = {}
    peers = [p for p in PEERS if p not in args.skip]
    with progress() as bar:
        task = bar.add_task(f"benchmark {args.model}", total=len(peers), info="")
        for peer in peers:
            bar.update(task, info=LABELS[peer])
            results[peer] = _spawn(peer, args)
            bar.advance(task)

    def ratio(a, b):
        ra, rb = results.get(a, {}), results.get(b, {})
        return ra["median_ms"] / rb["median_ms"] if "median_ms" in ra and "median_ms" in rb else None

    table = Table(title=f"{args.model}, batch 1, {args.threads} threads")
    for col in ("peer", "median ms", "IQR ms", "÷ PyTorch fp32", "÷ PyTorch int8", "note"):
        table.add_column(col, justify="left" if col in ("peer", "note") else "right")
    for peer in peers:
        r = results[peer]
        if "error" in r:
            table.add_row(LABELS[peer], "-", "-", "-", "-", f"[red]{r['error']}[/]")
            continue
        rf, ri = ratio(peer, "torch_fp32"), ratio(peer, "torch_int8")
        note = r.get("layout") or r.get("engine") or (f"build {r['build_s']:.0f} s" if "build_s" in r else "")
        table.add_row(LABELS[peer], f"{r['median_ms']:.2f}", f"{r['iqr_ms']:.2f}",
                      f"{rf:.2f}×" if rf else "-", f"{ri:.2f}×" if ri else "-", note)
    console = Console()
    console.print(table)
    peer, base, limit = BAR
    value = ratio(peer, base)
    verdict = None if value is None else value <= limit
    console.print(f"bar: {LABELS[peer]} <= {limit}× {LABELS[base]}: "
                  + ("not measured" if value is None else f"{value:.2f}× -> {'PASS' if verdict else 'FAIL'}"))

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"model": args.model, "threads": args.threads, "machine": _machine(),
              "results": results,
              "ratios": {f"{p}/{b}": ratio(p, b) for p in peers for b in ("torch_fp32", "torch_int8")
                         if p != b},
              "bar": {"what": f"{peer} <= {limit}x {base}", "ratio": value, "pass": verdict}}
    _write_atomic(out / "bench.json", lambda p: p.write_text(json.dumps(report, indent=2)))
    _plot(results, f"{args.model} latency, {args.threads} threads ({report['machine']['cpu']})",
          out / "bench.png")
    console.print(f"wrote {out / 'bench.json'} and {out / 'bench.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
