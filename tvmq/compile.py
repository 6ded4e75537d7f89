"""The tvmq compilation pipeline: graph phases of ``relay_passes``, the schedule phase of
``schedules``, then TVM's CPU lowering; and export of the library (cross-compiled for
aarch64 targets with Debian's ``aarch64-linux-gnu-g++``)."""
from __future__ import annotations

import shutil
from contextlib import contextmanager

import tvm
from tvm import relax
from tvm.relax.backend.cpu_generic import pipeline as cpu_generic

from relay_passes import VerifyIntegerKernels, legalize_passes, lowering_passes
from schedules.default import apply_default_schedules
from schedules.elementwise import apply_memory_bound_schedules
from schedules.targets import AARCH64_TRIPLE, is_host
from schedules.tuning import apply_database
from tvmq.errors import ToolchainError

CROSS_CXX = f"{AARCH64_TRIPLE}-g++"
VM_EXEC_MODE = "compiled"  # the VM program as machine code (relax.build); "bytecode" interprets


@contextmanager
def interpreted_vm():
    """Builds inside this block compile the VM program to bytecode: the VM then calls each
    kernel through its interpreter, where an instrument sees every call (``tvmq.profile``).
    The kernels are the same machine code either way."""
    global VM_EXEC_MODE
    saved, VM_EXEC_MODE = VM_EXEC_MODE, "bytecode"
    try:
        yield
    finally:
        VM_EXEC_MODE = saved


@tvm.transform.module_pass(opt_level=0, name="ApplyDefaultSchedules")
class ApplyDefaultSchedules:
    """Phase 3: the hand-written schedule of every tvmq kernel for the target."""

    def __init__(self, target):
        self.target = target

    def transform_module(self, mod, _ctx):
        mod = apply_default_schedules(mod, self.target)  # conv/dense kernels
        return apply_memory_bound_schedules(mod, self.target)  # everything else


def graph_passes(target: tvm.target.Target, plan: dict | None = None) -> list:
    """Phases 1-2: what tuning extracts its tasks from, and phase 3 schedules. ``plan``:
    ``{node: lowering name}`` (``tvmq.lowering_plan``) where an op has several kernels."""
    return [*lowering_passes(target, _names(plan)), *legalize_passes(target)]


def _names(plan: dict | None) -> dict:
    return {k: (v["lowering"] if isinstance(v, dict) else v) for k, v in (plan or {}).items()}


def lower_graph(mod: tvm.IRModule, target: tvm.target.Target, plan=None) -> tvm.IRModule:
    with target:
        return tvm.transform.Sequential(graph_passes(target, plan))(mod)


@tvm.transform.module_pass(opt_level=0, name="ApplyTuningDatabase")
class ApplyTuningDatabase:
    """Phase 3a: the best tuned schedule of every kernel the database holds; ``coverage``
    receives how many of the tunable kernels it matched."""

    def __init__(self, target, database, coverage: dict | None = None):
        self.target, self.database, self.coverage = target, database, coverage

    def transform_module(self, mod, _ctx):
        return apply_database(mod, self.target, self.database, self.coverage)


def pipeline(target: tvm.target.Target, database=None, plan=None,
             coverage: dict | None = None) -> tvm.transform.Pass:
    @tvm.transform.module_pass(opt_level=0, name="tvmq")
    def _pipeline(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        with target:
            return tvm.transform.Sequential([
                # Phase 1. tvmq composites -> integer kernels; verify integer only
                # Phase 2. TVM legalization and fusion of what remains
                *graph_passes(target, plan),
                # Phase 3. tuned schedules from the database, default schedules for the rest
                *([ApplyTuningDatabase(target, database, coverage)]
                  if database is not None else []),
                ApplyDefaultSchedules(target),
                # Phase 4. TVM's CPU lowering to the VM
                *cpu_generic.dataflow_lower_passes(target),
                *cpu_generic.finalize_passes(target),
                # the module handed to codegen: every kernel integer only (its PrimFunc
                # bodies), but the input quantize and the output dequantize
                VerifyIntegerKernels(),
            ])(mod)
    return _pipeline


def compile_relax(mod: tvm.IRModule, target: tvm.target.Target,
                  database=None, plan=None, coverage: dict | None = None) -> relax.Executable:
    """Compile with tvmq's pipeline; ``database``: a tuning database (schedules.tuning);
    ``plan``: the lowering of each node that has several (``tvmq.lowering_plan``);
    ``coverage``: receives how many tunable kernels the database matched.

    The VM program is compiled to machine code with the kernels (``exec_mode="compiled"``),
    not interpreted bytecode: one call dispatches ~25 kernels, and interpreting them cost
    ResNet-20 4 % of its 0.16 ms (interleaved A/B, AMD EPYC znver4)."""
    return relax.build(mod, target, exec_mode=VM_EXEC_MODE,
                       relax_pipeline=pipeline(target, database, plan, coverage))


def export_library(ex: relax.Executable, target: tvm.target.Target, path: str) -> None:
    """Write the shared library; cross-compile when ``target`` is not this machine."""
    if is_host(target):
        ex.export_library(path)
        return
    if shutil.which(CROSS_CXX) is None:
        raise ToolchainError(
            f"cross compiler {CROSS_CXX!r} not found: install Debian's g++-aarch64-linux-gnu"
            " (the project's setup script does)")
    ex.export_library(path, fcompile=tvm.support.cc.cross_compiler(CROSS_CXX))
