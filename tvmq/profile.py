"""Where a compiled model's time goes, kernel by kernel:
``python -m tvmq.profile [MODEL] [--db DIR] [--rounds N] [--out DIR]``.

Each kernel the model calls is timed two ways, in one process, on this machine:

- **in sequence**: the model's own calls replayed in order, with the model's own tensors,
  each call timed alone: the caches as the previous kernels leave them (weights that the rest
  of the model evicted, an output buffer last written long ago);
- **warm**: the same call repeated on its own, its data in cache (what ``--layers`` of
  ``python -m tvmq.bench`` and MetaSchedule measure).

The difference is what the model's data movement costs each kernel. The model is built as
``python -m tvmq.build`` builds it (same kernels, the same shipped tuning database for zoo
models unless ``--no-db``), its VM program as bytecode so that an instrument sees each call;
the replay calls the kernels directly, without the VM. Prints a table and writes
``profile.json`` and ``profile.png`` (default ``bench/profile-MODEL``).
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from deploy.report import write_atomic


def profile(library, x: np.ndarray, rounds: int = 15, say=print) -> dict:
    """Time ``library``'s kernels in sequence and warm (see the module doc); medians over
    ``rounds``. ``library``: a Relax VM library built with a bytecode VM program."""
    import tvm
    from tvm import relax

    vm, calls = relax.VirtualMachine(library, tvm.cpu()), []

    def record(func, name, before_run, _ret, *args):  # the VM's builtins are left out
        if before_run and not name.startswith("vm.builtin"):
            calls.append((name, func, args))
        return 0  # go on

    data = tvm.runtime.tensor(np.ascontiguousarray(x))
    vm.set_instrument(record)
    vm["main"](data)  # one inference: its kernel calls in order, with the tensors they use
    if not calls:
        raise ValueError("the VM called no kernel: build the VM program as bytecode"
                         " (tvmq.compile.interpreted_vm) so that its calls can be seen")
    model = relax.VirtualMachine(library, tvm.cpu())["main"]

    def in_sequence() -> list[float]:
        times = []
        for _, func, args in calls:
            start = time.perf_counter()
            func(*args)
            times.append(time.perf_counter() - start)
        return times

    def warm(func, args) -> float:
        for _ in range(3):
            func(*args)
        times = []
        for _ in range(10):
            start = time.perf_counter()
            func(*args)
            times.append(time.perf_counter() - start)
        return float(np.median(times))

    for _ in range(5):
        model(data)
        in_sequence()
    whole, sequence, alone = [], [], []
    for r in range(rounds):
        say(f"round {r + 1}/{rounds}")
        whole.append(min(_timed(model, data) for _ in range(5)))
        sequence += [in_sequence() for _ in range(3)]
        alone.append([warm(func, args) for _, func, args in calls])
    sequence, alone = np.median(sequence, 0) * 1e6, np.median(alone, 0) * 1e6
    kernels = [{"kernel": name, "sequence_us": round(float(s), 2), "warm_us": round(float(w), 2)}
               for (name, _, _), s, w in zip(calls, sequence, alone)]
    return {"model_ms": round(float(np.median(whole)) * 1e3, 4),
            "sequence_ms": round(float(sequence.sum()) / 1e3, 4),
            "warm_ms": round(float(alone.sum()) / 1e3, 4), "rounds": rounds, "kernels": kernels}


def _timed(fn, arg) -> float:
    start = time.perf_counter()
    fn(arg)
    return time.perf_counter() - start


def table(result: dict, title: str):
    from rich.table import Table

    table = Table(title=title, caption=f"model (interpreted VM) {result['model_ms']:.3f} ms;"
                  f" kernels in sequence {result['sequence_ms']:.3f} ms, warm"
                  f" {result['warm_ms']:.3f} ms")
    table.add_column("#", justify="right")
    table.add_column("kernel")
    for col in ("in sequence µs", "warm µs", "difference", "share"):
        table.add_column(col, justify="right", no_wrap=True)
    total = sum(k["sequence_us"] for k in result["kernels"])
    for i, k in enumerate(result["kernels"], 1):
        extra = k["sequence_us"] - k["warm_us"]
        table.add_row(str(i), k["kernel"], f"{k['sequence_us']:.1f}", f"{k['warm_us']:.1f}",
                      f"{extra:+.1f}", f"{100 * k['sequence_us'] / total:.1f} %")
    return table


def plot(result: dict, title: str, path: Path) -> None:
    """Each kernel's warm time and what the model's caches add to it, stacked bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kernels = result["kernels"]
    names = [f"{i}. {k['kernel']}" for i, k in enumerate(kernels, 1)]
    warm = [k["warm_us"] for k in kernels]
    extra = [max(0.0, k["sequence_us"] - k["warm_us"]) for k in kernels]
    fig, ax = plt.subplots(figsize=(8, 0.28 * len(names) + 1.5))
    ax.barh(names, warm, color="C0", label="warm (alone, data in cache)")
    ax.barh(names, extra, left=warm, color="C1", label="added in the model's sequence")
    ax.invert_yaxis()
    ax.tick_params(axis="y", labelsize="small")
    ax.set_xlabel("µs per call (median)")
    ax.set_title(title, fontsize="medium")
    ax.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    write_atomic(path, lambda p: fig.savefig(p, format="png", dpi=120))
    plt.close(fig)


def main(argv=None) -> int:
    from rich.console import Console

    from tvmq.build import at_least_one, validate_model
    from tvmq.errors import USER_ERRORS, ArtifactError

    ap = argparse.ArgumentParser(prog="python -m tvmq.profile",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", help="zoo name, .pt2 file, or nothing for the default")
    ap.add_argument("--scheme", default="int-se", help="for zoo/default models (as tvmq.build)")
    ap.add_argument("--db", help="a tuning database for this CPU (zoo models: the shipped one)")
    ap.add_argument("--no-db", action="store_true", help="default schedules only")
    ap.add_argument("--rounds", type=at_least_one, default=15, help="rounds of timing (medians)")
    ap.add_argument("--out", help="directory for profile.json and profile.png"
                    " (default bench/profile-MODEL)")
    args = ap.parse_args(argv)
    console = Console(stderr=True)
    try:
        validate_model(args.model, args.scheme)
        if args.out and Path(args.out).exists() and not Path(args.out).is_dir():
            raise ArtifactError(f"--out {args.out} is a file, not a directory: name a directory"
                                " for profile.json and profile.png")
        result = _profile_model(args, console)
    except USER_ERRORS as err:
        console.print(f"[red]error:[/] {err}", highlight=False, soft_wrap=True)
        return 2
    name = result["model"]
    machine = result["machine"]
    title = (f"{name}: kernels in the model vs alone, {machine['cpu']} ({machine['llvm_mcpu']}),"
             f" {machine['threads']} threads")
    Console().print(table(result, title))
    out = Path(args.out or f"bench/profile-{name}")
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "profile.json", lambda p: Path(p).write_text(json.dumps(result, indent=2)))
    plot(result, title, out / "profile.png")
    console.print(f"wrote {out / 'profile.json'} and {out / 'profile.png'}")
    return 0


def _profile_model(args, console) -> dict:
    import tvm

    import tvmq
    from schedules.targets import resolve
    from schedules.tuning import shipped_database
    from tvmq import zoo
    from tvmq.artifact import _Runner, default_threads, quiet_tvm_log
    from tvmq.bench import _machine
    from tvmq.build import load_model
    from tvmq.compile import interpreted_vm

    program, _extra, _acc, _parity = load_model(args.model, args.scheme, quiet=True)
    name = program.tvmq_info.get("model", "model") if hasattr(program, "tvmq_info") else "model"
    db = args.db
    if db is None and args.model in zoo.ZOO and not args.no_db:
        db = shipped_database(args.model, resolve("x86"))
    with tempfile.TemporaryDirectory() as tmp, interpreted_vm():
        with console.status(f"building {name} (VM program as bytecode)"):
            art = tvmq.build(program, target="x86", out=Path(tmp) / name, parity=1, db=db)
        x, _ = art.parity_data()
        with quiet_tvm_log():
            library = tvm.runtime.load_module(str(art.library))
        # on a thread whose TVM pool has the threads a build runs with (TVM's own default
        # is half the logical CPUs: 1 on a 2-vCPU machine)
        runner = _Runner(default_threads({"threads": 0, "target": {}}))
        with console.status("timing") as status:
            result = runner.call(profile, library, x[0], args.rounds, status.update)
        runner.close()
    return {"model": name, "db": str(db) if db else None, "machine": _machine(runner.threads),
            **result}


if __name__ == "__main__":
    raise SystemExit(main())
