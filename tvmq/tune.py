"""python -m tvmq.tune MODEL --target x86|arm|rpi5 --trials N --db DIR [--rpc HOST:PORT | --tracker HOST:PORT --key KEY]

Tune the integer kernels of MODEL with MetaSchedule (XGBoost cost model) for a target: the
tasks are the conv/dense kernels of the lowered integer graph, measured on this machine or on a
board (a TVM RPC server, or the boards of a tracker key). Records go to the database DIR (interrupt and rerun to
resume: a rerun adds trials); ``python -m tvmq.build MODEL --target T --db DIR`` applies it."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from schedules import tuning
from schedules.targets import TARGETS, resolve
from tvmq.compile import lower_graph
from tvmq.errors import USER_ERRORS
from tvmq.frontend import import_exported_program
from tvmq.schemes import get_recipe

console = Console(stderr=True)


def tune(program, target="x86", db="tuning", trials: int = 64, *, rpc: str | None = None,
         tracker: str | None = None, key: str | None = None, max_tasks: int | None = None,
         timeout: float = 120, progress=None) -> dict:
    """Tune ``program`` (an ExportedProgram with tvmq ops) for ``target`` into database ``db``.
    ``max_tasks``: only the heaviest tasks (by MACs x occurrences). Returns a summary."""
    tgt = resolve(target)
    mod = lower_graph(import_exported_program(program), tgt)
    tasks = tuning.extract_tasks(mod, tgt)
    tasks.sort(key=lambda t: -t.weight * _flops(t))
    if max_tasks:
        tasks = tasks[:max_tasks]
    runner = (tuning.runner_for(rpc=rpc, tracker=tracker, key=key, timeout=timeout)
              if rpc or tracker else None)
    summary = tuning.tune(tasks, tgt, db, trials, runner=runner, timeout=timeout,
                          progress=progress)
    summary.update(target=target, db=str(db), trials=trials,
                   measured_on=f"{key} via tracker {tracker}" if tracker else
                   f"the server at {rpc}" if rpc else "this machine")
    return summary


def _flops(task) -> float:
    from tvm.s_tir import analysis
    try:
        return float(analysis.estimate_tir_flops(task.dispatched[0]))
    except Exception:  # noqa: BLE001  ordering only
        return 0.0


def main(argv=None) -> int:
    from tvmq.build import load_model

    ap = argparse.ArgumentParser(prog="python -m tvmq.tune", description=__doc__.split("\n\n")[1])
    ap.add_argument("model", nargs="?", help="zoo name, .pt2 file, or nothing for the default")
    ap.add_argument("--target", default="x86", help=f"one of {', '.join(TARGETS)}")
    ap.add_argument("--trials", type=int, default=64, help="new measurements, all tasks together")
    ap.add_argument("--db", default=None, help="database directory (default tuning/MODEL-TARGET)")
    ap.add_argument("--scheme", default="int-se")
    ap.add_argument("--tasks", type=int, help="tune only the N heaviest kernels")
    where = ap.add_mutually_exclusive_group()
    where.add_argument("--rpc", metavar="HOST:PORT", help="measure on the board at this server")
    where.add_argument("--tracker", metavar="HOST:PORT", help="measure on boards of this tracker")
    ap.add_argument("--key", default="rpi4", help="tracker key of the boards (default rpi4)")
    ap.add_argument("--timeout", type=float, default=120, help="per build / run, seconds")
    args = ap.parse_args(argv)
    if args.trials < 1:
        ap.error(f"--trials {args.trials}: must be at least 1")
    try:
        resolve(args.target)  # every argument checked before minutes of training
        get_recipe(args.scheme)
        if args.db:
            tuning.check_database_dir(args.db)
        ep = load_model(args.model, args.scheme, True)[0]
        name = getattr(ep, "tvmq_info", {}).get("model", "model")
        db = Path(args.db or f"tuning/{name}-{args.target}")
        tuning.check_database_dir(db)
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), console=console) as bar:
            job = bar.add_task(f"tuning {name} for {args.target}", total=args.trials)

            def progress(task_name, trials, best_ms):
                bar.update(job, completed=min(trials, args.trials),
                           description=f"{task_name}: best {best_ms:.3f} ms")
            summary = tune(ep, args.target, db, args.trials, rpc=args.rpc, tracker=args.tracker,
                           key=args.key if args.tracker else None, max_tasks=args.tasks,
                           timeout=args.timeout, progress=progress)
    except USER_ERRORS as err:
        console.print(f"[red]error:[/] {err}", highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        console.print("interrupted: the database keeps every committed trial; rerun to resume")
        return 130
    table = Table(title=f"tvmq tune {name} ({args.target}) -> {db}",
                  caption=f"{summary['seconds']} s; measured on {summary['measured_on']}")
    for col in ("kernel", "occurrences", "best ms"):
        table.add_column(col, justify="left" if col == "kernel" else "right")
    for t in summary["tasks"]:
        table.add_row(t["name"], str(t["weight"]),
                      "-" if t["best_ms"] is None else f"{t['best_ms']:.4f}")
    Console().print(table)
    record_run(db, summary)
    return 0


def record_run(db: Path, summary: dict) -> None:
    """Write ``last_tune.json``: this run's summary, plus the time and trials of every run
    that built the database (``total_seconds``, ``total_trials``: a resumed database's cost,
    which the benchmark reports beside it)."""
    seconds, trials = tuning.database_cost(db) or (0.0, 0)  # none: a new database
    summary = {**summary, "total_seconds": round(seconds + summary["seconds"], 1),
               "total_trials": trials + summary["trials"]}
    (Path(db) / "last_tune.json").write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    sys.exit(main())
