"""Which kernel each quantized layer runs as: the lowering plan of a build.

Most tvmq ops have one lowering. A scheme's op may have several (``relay_passes.LOWERINGS``:
``tvmq.ternary_conv2d`` runs as ``int8-fold`` or ``bitserial``); the plan picks per layer by
speed: *measured* on this host for host targets (each candidate compiled alone with tvmq's
pipeline and timed), *estimated* for boards (Cortex-A72 cycles of the kernel's hot loop from
``llvm-mca``, ``schedules.estimate``). Same-shaped layers are measured once; results are
cached under ``$TVMQ_CACHE/lowering-plan`` by a hash of the workload, target and code. The
plan and each reason go into the manifest.
"""
from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

import numpy as np
import tvm
from tvm import relax

import relay_passes
import schedules
import topi_ops
from relay_passes import alternatives, composite_calls
from schedules.targets import is_host

TIMING = {"number": 20, "repeat": 5}


@functools.cache
def _code_digest(packages=(relay_passes, topi_ops, schedules)) -> bytes:
    """Every source file of the layers a measurement depends on (lowerings, kernels,
    schedules) and TVM's version: a change to any of them measures again."""
    h = hashlib.sha256(tvm.__version__.encode())
    for package in packages:
        for path in sorted(Path(package.__file__).parent.glob("*.py")):
            h.update(path.name.encode() + path.read_bytes())
    return h.digest()


def _workload(composite, call, scalars, target) -> str:
    shapes = [[int(d) for d in a.ty.shape] for a in call.args]
    h = hashlib.sha256(json.dumps([composite, shapes, scalars, str(target)]).encode())
    h.update(_code_digest())
    return h.hexdigest()[:20]


def _one_op_module(mod: tvm.IRModule, call: relax.Call) -> tvm.IRModule:
    """``main(x) = composite(x, constants...)``: the layer alone, for timing."""
    x = call.args[0]
    param = relax.Var("x", x.ty)
    bb = relax.BlockBuilder()
    composite = mod[call.op]
    with bb.function("main", [param]):
        with bb.dataflow():
            gv = bb.add_func(composite, call.op.name_hint)
            out = bb.emit_output(relax.Call(gv, [param, *call.args[1:]]))
        bb.emit_func_output(out)
    return bb.get()


KERNELS = ("tvmq_qconv2d", "tvmq_qdense", "tvmq_bitserial", "tvmq_shiftadd")


def _signature(func, target) -> tuple[str, int] | None:
    """(instruction, how many times the kernel runs it) of the hot loop, for the NEON
    kernels whose step instruction is known; None: count from the TIR loops."""
    from topi_ops.conv2d import PAIRS, conv_layout

    buffers = [p.ty for p in func.params if hasattr(p.ty, "shape")]
    out = buffers[-1]
    if len(out.shape) != 4:
        return None
    n, o, oh, ow = (int(d) for d in out.shape)
    masks = [b for b in buffers if len(b.shape) == 7]
    if masks:  # the bit-serial kernel: one uadalp per output x term x tap x word
        _o, kh, kw, words, k, _two, _lanes = (int(d) for d in masks[0].shape)
        return ("uadalp|uaddlp", n * o * oh * ow * k * kh * kw * words) \
            if str(masks[0].dtype) == "uint8" else None
    weights = [b for b in buffers if len(b.shape) == 6]
    if weights and conv_layout(target) == PAIRS:  # int16 pairs: smlal + smlal2 per 8 x 2
        ob, kh, kw, cg, _block, _group = (int(d) for d in weights[0].shape)
        return r"smlal2?|smull2?", n * ob * oh * ow * kh * kw * cg * 4
    return None


def _cost(one: tvm.IRModule, node: str, lowering: str, target) -> tuple[float, str]:
    from tvmq.compile import ApplyDefaultSchedules, compile_relax, lower_graph

    if is_host(target):
        ex = compile_relax(one, target, plan={node: lowering})
        vm = relax.VirtualMachine(ex, tvm.cpu())
        shape = [int(d) for d in one["main"].params[0].ty.shape]
        x = tvm.runtime.tensor(np.zeros(shape, dtype=str(one["main"].params[0].ty.dtype)))
        t = vm.time_evaluator("main", tvm.cpu(), **TIMING)(x)
        return t.median * 1e3, "ms measured on this host"
    from schedules.estimate import EstimateError, estimate_cycles

    with target:
        mod = ApplyDefaultSchedules(target)(lower_graph(one, target, {node: lowering}))
    func = next(f for gv, f in mod.functions_items()
                if isinstance(f, tvm.tirx.PrimFunc) and gv.name_hint.startswith(KERNELS))
    func = func.with_attr("global_symbol", "main")  # a kernel of a Relax module is private
    try:
        cycles = estimate_cycles(func, target, _signature(func, target))["cycles"]
    except EstimateError:  # not the step the signature counts (a generic path): TIR loops
        cycles = estimate_cycles(func, target, None)["cycles"]
    return cycles, f"cycles on a {target.attrs.get('mcpu')}, llvm-mca estimate of the conv loop nest"


def plan(mod: tvm.IRModule, target, cache: Path | None = None, prefer: dict | None = None,
         ) -> dict[str, dict]:
    """``{node: {"lowering", "reason", "module", "costs"}}`` for every tvmq composite call
    of ``mod``; ``prefer`` = ``{node or module: lowering}`` forces a choice."""
    prefer = prefer or {}
    result = {}
    for node, composite, call, scalars in composite_calls(mod):
        module = str((mod[call.op].attrs or {}).get("tvmq.module", ""))
        rules = alternatives(composite, scalars)
        forced = prefer.get(node) or prefer.get(module)
        if forced or len(rules) == 1:
            name = forced or next(iter(rules))
            result[node] = {"lowering": name, "module": module, "op": composite,
                            "reason": "chosen by the user" if forced else
                            "the only lowering that applies"}
            continue
        key = _workload(composite, call, scalars, target)
        path = cache / f"{key}.json" if cache else None
        costs = None
        if path is not None and path.is_file():
            try:
                costs = json.loads(path.read_text())
            except ValueError:
                costs = None
        if costs is None:
            one = _one_op_module(mod, call)
            costs = {}
            for name in rules:
                value, unit = _cost(one, node, name, target)
                costs[name] = {"value": value, "unit": unit}
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(costs))
        best = min(costs, key=lambda n: costs[n]["value"])
        unit = costs[best]["unit"]
        reason = ", ".join(f"{n} {c['value']:.4g}" for n, c in costs.items()) + f" ({unit})"
        result[node] = {"lowering": best, "module": module, "op": composite, "reason": reason,
                        "costs": costs}
    return result
