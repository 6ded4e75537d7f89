"""MetaSchedule tuning of tvmq's integer kernels, and the tuning database.

The search space of a tvmq kernel is its default schedule with the free choices left open:
the schedule rule ``tvmq_qconv2d_pairs`` is registered with MetaSchedule
(``s_tir.meta_schedule.<target key>.<rule>``, called for blocks carrying that rule) and
returns one design space per choice of ``schedules.default.conv_schedules``: register tile
that fits the target's vector registers (output-channel blocks x columns), reduction order
(taps or input channels outermost), parallel loop (channel tiles x rows, or rows); grouped
and depthwise convs (``tvmq_qconv2d_grouped``) one per vector width x column tile; the
evolutionary search, guided by the XGBoost cost model, measures them on the target (locally, or
on a board over RPC). The default tile is one of the candidates, so a tuned kernel is never
slower than the default as measured.

A database directory holds MetaSchedule's JSON database (``database_workload.json``,
``database_tuning_record.json``) and ``tvmq.json`` naming the target it was tuned for.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from functools import partial
from pathlib import Path

import tvm
from tvm import s_tir
from tvm.ir.utils import derived_object
from tvm.s_tir import meta_schedule as ms

from schedules.default import (conv_loop_extents, conv_macs, conv_rows, conv_schedules,
                               ruled_blocks, schedule_conv_pairs)
from schedules.grouped import grouped_extents, grouped_schedules, schedule_conv_grouped
from schedules.targets import host_target
from topi_ops.winograd import WINOGRAD

SHIPPED = Path(__file__).parent / "tuned"  # databases tuned for the zoo on known CPUs
DB_META = "tvmq.json"
DB_FILES = ("database_workload.json", "database_tuning_record.json")
CONV_RULE = "tvmq_qconv2d_pairs"


class TuningDatabaseError(ValueError):
    """A tuning database that is missing, corrupt, or tuned for another target."""


# ----------------------------------------------------------------------------- search space
def _conv_choices(sch, block, target):
    lanes = int(sch.get(block).annotations["tvmq_block"])
    return conv_schedules(*conv_loop_extents(sch, block), target, lanes, conv_macs(sch, block),
                          conv_rows(sch, block), WINOGRAD in sch.get(block).annotations)


def _grouped_choices(sch, block, target):
    return grouped_schedules(*grouped_extents(sch, block))


# schedule rule -> (its choices for a block, the schedule that applies one)
SPACES = {CONV_RULE: (_conv_choices, schedule_conv_pairs),
          "tvmq_qconv2d_grouped": (_grouped_choices, schedule_conv_grouped)}


def _spaces(choices, schedule, target_of_key):
    def rule(sch: s_tir.Schedule, block) -> list[s_tir.Schedule]:
        target = target_of_key()
        spaces = []
        for choice in choices(sch, block, target):
            space = sch.copy()
            schedule(space, block, target, choice)
            spaces.append(space)
        return spaces
    return rule


def _x86_target():
    return tvm.target.Target.current(allow_none=True) or host_target()


def _arm_target():
    current = tvm.target.Target.current(allow_none=True)
    return current if current is not None and "arm_cpu" in current.keys else tvm.target.Target(
        {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a72",
         "mattr": ["+neon"], "num-cores": 4})


def register_rules() -> None:
    """Make MetaSchedule call tvmq's conv space for blocks tagged ``tvmq_qconv2d_pairs``.
    Idempotent; also run in MetaSchedule's builder worker processes."""
    for key, target_of in (("cpu", _x86_target), ("arm_cpu", _arm_target)):
        for name, (choices, schedule) in SPACES.items():
            tvm.register_global_func(f"s_tir.meta_schedule.{key}.{name}",
                                     _spaces(choices, schedule, target_of), override=True)


register_rules()


# ----------------------------------------------------------------------------- tasks
def extract_tasks(mod: tvm.IRModule, target: tvm.target.Target) -> list:
    """The tunable kernels of a module after tvmq's phases 1-2 (lowered, legalized): every
    PrimFunc with a block whose ``schedule_rule`` tvmq knows. Identical kernels are one task
    whose weight counts them."""
    tasks = ms.relax_integration.extract_tasks(mod, target)
    return [t for t in tasks if _has_rule(t.dispatched[0]["main"])]


def _has_rule(func) -> bool:
    return bool(ruled_blocks(s_tir.Schedule(func)))


# ----------------------------------------------------------------------------- database
def target_record(target: tvm.target.Target) -> dict:
    t = json.loads(str(target))
    return {k: t.get(k) for k in ("kind", "mtriple", "mcpu", "mattr")}


def check_database_dir(db_dir: str | Path) -> None:
    """``db_dir`` can hold a tuning database: it is one (has ``tvmq.json``), or is new, or an
    empty directory. A file, or a directory of other things, is refused (never adopted)."""
    db_dir = Path(db_dir)
    if db_dir.exists() and not db_dir.is_dir():
        raise TuningDatabaseError(f"{db_dir} is a file, not a tuning database directory:"
                                  " name a new or empty directory (or an existing database)")
    if db_dir.is_dir() and not (db_dir / DB_META).exists() and any(db_dir.iterdir()):
        names = sorted(p.name for p in db_dir.iterdir())
        raise TuningDatabaseError(
            f"{db_dir} is not a tvmq tuning database ({DB_META} is missing) and is not empty"
            f" (it holds {', '.join(names[:3])}{', ...' if len(names) > 3 else ''}): name a new"
            " or empty directory")


def open_database(db_dir: str | Path, target: tvm.target.Target, create: bool = False):
    """The JSON database in ``db_dir``, checked: present and parseable, tuned for ``target``."""
    db_dir = Path(db_dir)
    meta_path = db_dir / DB_META
    check_database_dir(db_dir)
    if create and not meta_path.exists():
        db_dir.mkdir(parents=True, exist_ok=True)
        meta = {"target": target_record(target), "tvm_version": tvm.__version__}
        tmp = meta_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(meta, indent=2))
        os.replace(tmp, meta_path)
    if not meta_path.is_file():
        raise TuningDatabaseError(f"{db_dir} is not a tvmq tuning database: {DB_META} is"
                                  " missing (create one with python -m tvmq.tune)")
    try:
        meta = json.loads(meta_path.read_text())
        tuned_for = meta["target"]
    except (ValueError, KeyError) as err:
        raise TuningDatabaseError(f"{meta_path} is corrupt: {err}") from None
    if tuned_for != target_record(target):
        raise TuningDatabaseError(
            f"{db_dir} was tuned for {_describe(tuned_for)}, not for {_describe(target_record(target))}:"
            " tune for this target (python -m tvmq.tune --target ...) or pass the matching --db")
    for name in DB_FILES:
        path = db_dir / name
        if not path.exists():
            if create:
                path.touch()
                continue
            raise TuningDatabaseError(f"{path} is missing: the database is incomplete")
        for number, line in enumerate(path.read_text().splitlines(), 1):
            try:
                json.loads(line)
            except ValueError:
                raise TuningDatabaseError(f"{path}, line {number}, is not JSON: the database is"
                                          " corrupt (truncated by an interrupted write?)") from None
    try:
        return ms.database.JSONDatabase(work_dir=str(db_dir), allow_missing=False)
    except Exception as err:  # noqa: BLE001  TVM's parser: a record that is JSON but not valid
        raise TuningDatabaseError(f"{db_dir} is corrupt: {str(err).strip().splitlines()[-1]}") from None


def database_cost(db) -> tuple[float, int] | None:
    """(seconds, trials) of every tuning run that built ``db`` (``last_tune.json``: its
    totals, or the one run of a database written before they were counted); None when there
    is no readable summary."""
    try:
        last = json.loads((Path(db) / "last_tune.json").read_text())
        return (float(last.get("total_seconds", last["seconds"])),
                int(last.get("total_trials", last["trials"])))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def shipped_database(model: str, target: tvm.target.Target) -> Path | None:
    """The database shipped with tvmq for a zoo model on this kind of CPU, if there is one."""
    want = target_record(target)
    for meta in sorted(SHIPPED.glob(f"{model}-*/{DB_META}")):
        try:
            if json.loads(meta.read_text())["target"] == want:
                return meta.parent
        except (ValueError, KeyError):
            continue
    return None


def _describe(rec: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in rec.items() if v)


def apply_database(mod: tvm.IRModule, target: tvm.target.Target, database,
                   coverage: dict | None = None) -> tvm.IRModule:
    """Schedule every kernel the database holds a record for (its best); mark them scheduled.
    ``coverage`` (a dict) receives ``kernels`` (tunable ones in ``mod``) and ``tuned`` (those
    the database matched): a database made for another model or an older tvmq matches none."""
    coverage = {} if coverage is None else coverage
    coverage.update(kernels=0, tuned=0)
    for gv, func in list(mod.functions_items()):
        if not isinstance(func, tvm.tirx.PrimFunc) or not _has_rule(func):
            continue
        coverage["kernels"] += 1
        # tasks are keyed as extract_tasks made them: a module {"main": func named "main"}
        task = tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
        sch = database.query_schedule(task, target, workload_name="main")
        if sch is not None:
            coverage["tuned"] += 1
            tuned = sch.mod["main"].with_attr("tirx.is_scheduled", True)
            mod[gv] = tuned.without_attr("global_symbol") if "global_symbol" not in (
                func.attrs or {}) else tuned.with_attr("global_symbol", func.attrs["global_symbol"])
    return mod


# ----------------------------------------------------------------------------- tuning
@derived_object
class _InProcessBuilder(ms.builder.PyBuilder):
    """Builds candidates in this process. MetaSchedule's LocalBuilder starts a new process
    pool for every batch, and each worker spends ~20 s importing TVM's tensor intrinsics: with
    a few tiles per kernel, that was most of the tuning time. A candidate is a TIR kernel that
    LLVM compiles in well under a second; a shared library is exported (cross-compiled for
    aarch64: a board loads it, it has no linker to finish a ``.tar``)."""

    def __init__(self, target: tvm.target.Target):
        self.cross = "aarch64" in str(target.attrs.get("mtriple", ""))

    def build(self, build_inputs):
        from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock
        from tvm.support import cc

        results = []
        for item in build_inputs:
            try:
                mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(item.mod)
                lib = tvm.compile(mod, target=item.target)
                path = os.path.join(tempfile.mkdtemp(prefix="tvmq-tune-"), "kernel.so")
                lib.export_library(path, **({"fcompile": cc.cross_compiler(
                    "aarch64-linux-gnu-g++")} if self.cross else {}))
                results.append(ms.builder.BuilderResult(path, None))
            except Exception as err:  # noqa: BLE001  a failed candidate, not a failed tuning
                results.append(ms.builder.BuilderResult(None, f"{type(err).__name__}: {err}"))
        return results


def _connect_direct(rpc_config):
    """MetaSchedule's RPC runner session, from one server instead of a tracker's pool."""
    from tvm import rpc

    return rpc.connect(rpc_config.tracker_host, int(rpc_config.tracker_port),
                       session_timeout=rpc_config.session_timeout_sec)


def _use_threads(n: int) -> None:
    """In a measuring worker, before its TVM pool exists: ``n`` threads, as the model runs
    (TVM's own default is half the logical CPUs: 1 on a 2-vCPU machine, and schedules tuned
    on 1 thread lose on 2)."""
    os.environ["TVM_NUM_THREADS"] = str(n)


def runner_for(rpc: str | None = None, tracker: str | None = None, key: str | None = None,
               timeout: float = 60, threads: int | None = None):
    """Local measurement (on ``threads`` TVM threads: the target's cores), or on a board: a
    server (``rpc``) or the boards of a tracker key."""
    evaluator = ms.runner.EvaluatorConfig(number=3, repeat=3, min_repeat_ms=50,
                                          enable_cpu_cache_flush=False)
    if tracker or rpc:
        host, port = (tracker or rpc).rsplit(":", 1)
        config = ms.runner.RPCConfig(tracker_host=host, tracker_port=int(port),
                                     tracker_key=key or "direct",
                                     session_timeout_sec=int(timeout) * 4)
        return ms.runner.RPCRunner(config, evaluator, max_workers=1,
                                   f_create_session=None if tracker else _connect_direct)
    return ms.runner.LocalRunner(timeout_sec=timeout, evaluator_config=evaluator,
                                 initializer=partial(_use_threads, threads or
                                                     len(os.sched_getaffinity(0))))


@derived_object
class _Progress(ms.measure_callback.PyMeasureCallback):
    """Reports (task name, trials so far, best latency so far) after each measured batch."""

    def __init__(self, names, report):
        self.names, self.report = names, report
        self.trials = [0] * len(names)
        self.best = [float("inf")] * len(names)
        self.errors: list[str] = []  # the first few build/run errors, to report

    def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results):
        for built, result in zip(builder_results, runner_results):
            self.trials[task_id] += 1
            error = built.error_msg or result.error_msg
            if error and len(self.errors) < 3:
                self.errors.append(f"{self.names[task_id]}: {error.strip()[-800:]}")
            if result.error_msg is None and result.run_secs:
                ms_ = 1e3 * sum(float(s) for s in result.run_secs) / len(result.run_secs)
                self.best[task_id] = min(self.best[task_id], ms_)
        self.report(self.names[task_id], sum(self.trials), self.best[task_id])


def tune(tasks: list, target: tvm.target.Target, db_dir: str | Path, trials: int, *,
         runner=None, timeout: float = 120, progress=None) -> dict:
    """Tune ``tasks`` (``extract_tasks``) for up to ``trials`` new measurements in total,
    adding to the database in ``db_dir`` (created if needed: rerun to resume). Returns a
    summary: per task, its best latency in the database."""
    database = open_database(db_dir, target, create=True)
    # MetaSchedule's scheduler first measures one batch per task in order: on a resumed run
    # the tasks without a record go first, so that a short rerun reaches them
    tasks = sorted(tasks, key=lambda t: database.has_workload(t.dispatched[0]) and
                   _best_ms(database, t, target) is not None)
    contexts, weights = [], []
    for task in tasks:
        contexts.append(ms.TuneContext(
            mod=task.dispatched[0], target=target,
            space_generator=ms.space_generator.PostOrderApply(
                sch_rules=[ms.schedule_rule.ApplyCustomRule()], postprocs=[], mutator_probs={}),
            # a space of a few tiles per kernel: a small population finds them all at once
            # (the defaults sample 512 and insist on 50 unmeasured, minutes per task)
            search_strategy=ms.search_strategy.EvolutionarySearch(
                population_size=64, init_measured_ratio=0.0, init_min_unmeasured=1,
                max_fail_count=2, genetic_num_iters=1),
            task_name=task.task_name, num_threads=os.cpu_count() or 2))
        weights.append(float(task.weight))
    start = time.perf_counter()
    callbacks = [*ms.measure_callback.MeasureCallback.create("default")]
    monitor = _Progress([t.task_name for t in tasks], progress or (lambda *_: None))
    callbacks.append(monitor)
    with target:
        ms.tune_tasks(tasks=contexts, task_weights=weights, work_dir=str(db_dir),
                      max_trials_global=trials, max_trials_per_task=trials,
                      num_trials_per_iter=16, builder=_InProcessBuilder(target),
                      runner=runner or runner_for(timeout=timeout, threads=int(
                          target.attrs.get("num-cores", 0) or 0) or None), database=database,
                      measure_callbacks=callbacks, cost_model="xgb")
    return {"seconds": round(time.perf_counter() - start, 1), "errors": list(monitor.errors),
            "tasks": [
        {"name": t.task_name, "weight": int(t.weight), "best_ms": _best_ms(database, t, target)}
        for t in tasks]}


def _best_ms(database, task, target) -> float | None:
    records = database.get_top_k(database.commit_workload(task.dispatched[0]), 1)
    if not records or not records[0].run_secs:
        return None
    return 1e3 * sum(float(s) for s in records[0].run_secs) / len(records[0].run_secs)


__all__ = ["TuningDatabaseError", "apply_database", "extract_tasks", "open_database",
           "register_rules", "runner_for", "shipped_database", "tune"]
