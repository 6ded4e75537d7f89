"""Import a ``torch.export`` program of a tvmq deploy model into Relax.

Each ``tvmq::<op>`` node becomes a call of a private Relax function carrying the attribute
``Composite = "tvmq.<op>"`` (and its scalar arguments as JSON in ``tvmq.attrs``) whose body
is the same integer reference written in plain Relax ops. That module compiles and runs as
it is -- a slow but exact fallback -- and ``relay_passes.LowerTvmqComposites`` finds each
composite by its attribute and swaps it for a fast TOPI kernel.
"""
from __future__ import annotations

import json
from typing import Callable

import torch
import tvm
from torch import fx
from tvm import relax
from tvm.relax.frontend.torch import from_exported_program

import tvmq.schemes  # noqa: F401  every scheme's ops and bodies are registered
from tvmq.bodies import BODIES
from tvmq.integer import check_program
import tvmq.ops_affine  # noqa: E402,F401  affine (PT2E) ops + bodies; quantized_decomposed ops
from tvmq.qat import UnsupportedOpError

# aten ops that only move or reshape data: allowed between tvmq ops in a deploy graph
SHAPE_OPS = {"view", "reshape", "flatten", "_unsafe_view", "squeeze", "unsqueeze", "permute",
             "contiguous", "clone", "alias", "_assert_tensor_metadata", "expand", "transpose"}


# ----------------------------------------------------------------------------- converters
def _make_converter(op: str):
    body = BODIES[op]

    def convert(node: fx.Node, importer) -> relax.Var:
        if getattr(node.target, "namespace", None) != "tvmq":
            # the importer keys converters by overload name only: never shadow another op
            raise UnsupportedOpError(f"node {node.name!r}: {node.target} is not a tvmq op")
        bb_main = importer.block_builder
        tensors = [importer.env[a] for a in node.args if isinstance(a, fx.Node)]
        scalars = [a for a in node.args if not isinstance(a, fx.Node)]
        bb = relax.BlockBuilder()
        params = [relax.Var(f"t{i}", t.ty) for i, t in enumerate(tensors)]
        stack = list(node.meta.get("nn_module_stack", {}).values())
        attrs = {"Composite": f"tvmq.{op}", "tvmq.attrs": json.dumps(scalars),
                 "tvmq.node": node.name, "tvmq.module": stack[-1][0] if stack else ""}
        with bb.function(f"tvmq_{op}", params, attrs=attrs, private=True):
            with bb.dataflow():
                out = bb.emit_output(body(bb, *params, *scalars))
            bb.emit_func_output(out)
        func = bb.get()[f"tvmq_{op}"]
        gv = bb_main.add_func(func, f"tvmq_{node.name}")
        return bb_main.emit(relax.Call(gv, tensors), name_hint=node.name)

    return convert


def custom_convert_map() -> dict[str, Callable]:
    """``{"<op>.default": converter}`` for every tvmq op, keyed as the TVM importer wants."""
    return {f"{op}.default": _make_converter(op) for op in BODIES}


def check_supported(ep: torch.export.ExportedProgram) -> None:
    """Refuse, naming the node, any op that is neither a tvmq op nor shape-only."""
    for node in ep.graph.nodes:
        if node.op != "call_function":
            continue
        target = node.target
        ns = getattr(target, "namespace", None)
        name = getattr(target, "__name__", str(target)).split(".")[0]
        if ns == "tvmq" and name in BODIES:
            continue
        if ns == "aten" and name in SHAPE_OPS:
            continue
        if str(target) == "<built-in function getitem>":
            continue
        where = node.meta.get("stack_trace", "").strip().splitlines()[-1:] or [""]
        raise UnsupportedOpError(
            f"node {node.name!r} ({target}) cannot be lowered to tvmq's integer kernels: only"
            f" tvmq ops and shape-only aten ops may appear in a deploy graph. {where[0]}".strip()
        )


def rewrite_program(ep, example=None, shift_only: bool = False):
    """A PT2E int8 program (``quantized_decomposed`` ops) -> tvmq ops (``tvmq.pt2e``)."""
    from tvmq import pt2e

    return pt2e.import_program(ep, example, shift_only=shift_only) if pt2e.is_pt2e(ep) else ep


def import_exported_program(ep: torch.export.ExportedProgram) -> tvm.IRModule:
    """The Relax module of a tvmq deploy program, quantized ops as ``tvmq.*`` composites."""
    ep = rewrite_program(ep)
    check_supported(ep)
    check_program(ep)  # a .pt2 from anywhere gets the checks convert makes
    return from_exported_program(ep, custom_convert_map=custom_convert_map(),
                                 run_ep_decomposition=False, unwrap_unit_return_tuple=True)
