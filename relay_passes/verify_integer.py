"""VerifyIntegerOnly: prove the lowered deploy graph computes on integers only.

The one exception (ALGORITHMS.md, model boundary): a ``tvmq_quantize`` kernel that reads a
float *input of the function* and a ``tvmq_dequantize`` kernel whose float result is
*returned*. Any other binding that reads or writes a float tensor is an error naming the
binding (its name is the torch node's, e.g. ``sigmoid``) and the op.
"""
from __future__ import annotations

import tvm
from tvm import relax


class FloatOpError(TypeError):
    """A floating-point operation remained in a graph that must be integer only."""


def _floats(ty) -> bool:
    if isinstance(ty, relax.TensorType):
        return ty.dtype is not None and str(ty.dtype).startswith(("float", "bfloat"))
    if isinstance(ty, relax.TupleType):
        return any(_floats(f) for f in ty.fields)
    return False


def _op_name(call: relax.Call) -> str:
    if call.op == tvm.ir.Op.get("relax.call_tir"):
        return f"call_tir {call.args[0].name_hint}"
    return getattr(call.op, "name", None) or getattr(call.op, "name_hint", str(call.op))


def _returned_vars(func: relax.Function) -> set:
    body = func.body.body
    values = body.fields if isinstance(body, relax.Tuple) else [body]
    return {v for v in values if isinstance(v, relax.Var)}


def verify_integer_only(mod: tvm.IRModule, func_name: str = "main") -> None:
    """Raise :class:`FloatOpError` unless ``func_name`` is integer only between the boundary
    quantize and dequantize."""
    func = mod[func_name]
    params = set(func.params)
    returned = _returned_vars(func)
    call_tir = tvm.ir.Op.get("relax.call_tir")
    # dataflow outputs are re-bound once more outside the block: follow those aliases
    aliases = {}
    for block in func.body.blocks:
        for binding in block.bindings:
            if isinstance(binding.value, relax.Var):
                aliases[binding.value] = binding.var
    for block in func.body.blocks:
        for binding in block.bindings:
            value = binding.value
            if not isinstance(value, relax.Call):
                continue
            inputs = value.args[1].fields if value.op == call_tir else value.args
            touches_float = _floats(binding.var.ty) or any(_floats(a.ty) for a in inputs)
            if not touches_float:
                continue
            op = _op_name(value)
            if value.op == call_tir:
                callee = value.args[0].name_hint
                if callee.startswith("tvmq_quantize") and all(a in params for a in inputs):
                    continue
                out = aliases.get(binding.var, binding.var)
                if callee.startswith("tvmq_dequantize") and (
                        binding.var in returned or out in returned):
                    continue
            raise FloatOpError(
                f"float operation left in the integer deploy graph: {binding.var.name!r} ="
                f" {op} (node {binding.var.name!r}); only the input quantize and the output"
                " dequantize may touch floats"
            )


@tvm.transform.module_pass(opt_level=0, name="VerifyIntegerOnly")
class VerifyIntegerOnly:
    """A pass that checks :func:`verify_integer_only` and returns the module unchanged."""

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        verify_integer_only(mod)
        return mod
