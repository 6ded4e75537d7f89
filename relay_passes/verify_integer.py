"""VerifyIntegerOnly: prove the lowered deploy graph computes on integers only.

The one exception (ALGORITHMS.md, model boundary): a ``tvmq_quantize`` kernel that reads a
float *input of the function* and a ``tvmq_dequantize`` kernel whose float result is
*returned*. Any other binding that reads or writes a float tensor is an error naming the
binding (its name is the torch node's, e.g. ``sigmoid``) and the op.
"""
from __future__ import annotations

import tvm
import tvm_ffi
from tvm import relax


# registered with TVM's FFI so that raised inside ``relax.build``'s passes it reaches the caller
# as itself (TVM's own way: ``tvm_ffi.register_error``), not as a RuntimeError
@tvm_ffi.register_error("tvmq.FloatOpError")
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


# ----------------------------------------------------------------------------------------
# The final module: every PrimFunc body, after fusion, scheduling and CPU lowering.
#
# verify_integer_only above reads only the graph before legalization; a kernel can still do
# float math on integer tensors (a hand-written PrimFunc, a Relax op that legalizes into
# float TIR, a fused neighbour). verify_integer_kernels reads the module handed to codegen:
#
# - in ``main``, a binding that touches a float tensor is a call of a PrimFunc (checked
#   below), an allocation or the VM's input checks; anything else is refused;
# - a PrimFunc parameter is the *model input* when every call passes main's float parameter
#   there, the *model output* when every call passes a tensor that main returns;
# - in a PrimFunc body no expression is float, except (quantize) ``Cast(int, f)`` where ``f``
#   is a rounding/clamping affine map of one element loaded from a model-input parameter,
#   and (dequantize) a store into a model-output parameter whose value is an affine map of
#   one ``Cast(float, integer expression)``. Float buffers other than those two roles can be
#   neither loaded nor stored, so float flows only input -> quantize -> integer, and
#   integer -> dequantize -> output.
# ----------------------------------------------------------------------------------------
import tvm_ffi  # noqa: E402
from tvm import tirx  # noqa: E402
from tvm.ir import PrimType  # noqa: E402
from tvm.ir.prim import expr as _pe  # noqa: E402

# VM/Relax ops in main that move or describe tensors but compute nothing
_NON_ARITHMETIC = {"relax.builtin.alloc_tensor", "relax.vm.alloc_tensor",
                   "relax.memory.alloc_tensor", "relax.vm.alloc_storage",
                   "relax.memory.alloc_storage", "relax.vm.kill_object",
                   "relax.memory.kill_tensor", "relax.memory.kill_storage", "relax.null_value"}
_NON_ARITHMETIC_PACKED = {"vm.builtin.check_tensor_info", "vm.builtin.match_shape"}
# float ops the boundary quantize/dequantize may use (an affine map, rounding, clamping)
_AFFINE = (_pe.Mul, _pe.Add, _pe.Sub, _pe.Div, _pe.Min, _pe.Max)
_ROUNDING = {"tirx.floor", "tirx.round", "tirx.nearbyint", "tirx.trunc", "tirx.ceil"}


def _is_float_dtype(dtype) -> bool:
    return str(dtype).startswith(("float", "bfloat"))


def _prim_float(node) -> bool:
    """``node`` is a scalar (or vector) expression or variable of a float type."""
    ty = getattr(node, "ty", None)
    return isinstance(ty, PrimType) and _is_float_dtype(ty.dtype)


def _is_buffer(node) -> bool:
    return isinstance(getattr(node, "ty", None), tirx.BufferType)


def _show(node, limit: int = 160) -> str:
    text = " ".join(str(node).split())
    return text if len(text) <= limit else text[:limit] + " ..."


def _is_call(node, *ops: str) -> bool:
    """``node`` calls one of the TIR ops ``ops``."""
    return (isinstance(node, tvm.ir.expr.Call) and isinstance(node.op, tvm.ir.Op)
            and node.op.name in ops)


def _int_constant(node, value: int) -> bool:
    """The integer constant ``value``, or a vector of it."""
    node = node.value if isinstance(node, _pe.Broadcast) else node
    return isinstance(node, _pe.IntImm) and int(node.value) == value


class _KernelChecker:
    """Walks one PrimFunc body; raises FloatOpError at the first float it may not hold."""

    def __init__(self, name: str, inputs: set, outputs: set):
        self.name, self.inputs, self.outputs = name, inputs, outputs

    def fail(self, node, why: str):
        raise self.remember(FloatOpError(
            f"float operation in kernel {self.name!r}: {_show(node)} ({why}); only the model"
            " input's quantize and the model output's dequantize may compute on floats"))

    def remember(self, err: FloatOpError) -> FloatOpError:
        self.error = err
        return err

    def is_param(self, buf, params) -> bool:
        return any(buf.same_as(p) for p in params)

    # the boundary patterns ------------------------------------------------------------
    def affine(self, node, visitor, leaf) -> int:
        """Check that a float ``node`` is an affine/rounding map of leaves; returns the
        number of leaves (``leaf(node, visitor)`` accepts one or returns False)."""
        if isinstance(node, _pe.FloatImm):
            return 0
        if isinstance(node, _pe.Broadcast) and isinstance(node.value, _pe.FloatImm):
            return 0
        if isinstance(node, _AFFINE):
            return self.affine(node.a, visitor, leaf) + self.affine(node.b, visitor, leaf)
        if _is_call(node, *_ROUNDING) and len(node.args) == 1:
            return self.affine(node.args[0], visitor, leaf)
        if (_is_call(node, "prim.if_then_else", "tirx.if_then_else")
                and self.nan_test(node.args[0], visitor)):
            # a quantize's NaN rule: if isnan(x) then a constant else the scaled x
            return max(self.affine(node.args[1], visitor, leaf),
                       self.affine(node.args[2], visitor, leaf))
        if isinstance(node, _pe.Select) and self.nan_test(node.condition, visitor):
            return max(self.affine(node.true_value, visitor, leaf),
                       self.affine(node.false_value, visitor, leaf))
        if leaf(node, visitor):
            return 1
        self.fail(node, "not part of the boundary quantize/dequantize")

    def nan_test(self, node, visitor) -> bool:
        """The boundary quantize's NaN rule tests one element of the model input: ``isnan``,
        or its bits (``topi_ops.requantize.is_nan``: ``(bits(x) & mask) > inf``)."""
        if not self.inputs:
            return False
        if isinstance(node, (_pe.GT, _pe.LT)):  # the simplifier may write either side first
            masked, limit = (node.a, node.b) if isinstance(node, _pe.GT) else (node.b, node.a)
            operands = (masked.args if _is_call(masked, "tirx.bitwise_and") else
                        (masked.a, masked.b) if isinstance(masked, _pe.BitwiseAnd) else None)
            if operands is None or not _int_constant(limit, 0x7F800000):
                return False
            bits, mask = operands
            while isinstance(bits, _pe.Cast) and not _prim_float(bits):  # widened to int64
                bits = bits.value
            return (_int_constant(mask, 0x7FFFFFFF) and _is_call(bits, "tirx.reinterpret")
                    and self.input_load(bits.args[0], visitor))
        return _is_call(node, "tirx.isnan") and self.input_load(node.args[0], visitor)

    def input_load(self, node, visitor) -> bool:
        if isinstance(node, tvm.ir.expr.TensorLoad) and self.is_param(node.source, self.inputs):
            for index in node.indices:
                visitor.visit(index)
            return True
        return False

    def int_cast(self, node, visitor) -> bool:
        if isinstance(node, _pe.Cast) and not _prim_float(node.value):
            visitor.visit(node.value)
            return True
        return False

    # the walk ---------------------------------------------------------------------------
    def visit(self, node, visitor):
        if isinstance(node, (tvm.ir.expr.TensorRegion,)) or _is_buffer(node):
            return None  # buffer declarations and read/write regions compute nothing
        if isinstance(node, tirx.BufferStore):
            if _is_float_dtype(node.buffer.dtype):
                if not self.is_param(node.buffer, self.outputs):
                    self.fail(node, f"stores float into {node.buffer.name!r}, which is not"
                                    " the model output")
                if self.affine(node.value, visitor, self.int_cast) != 1:
                    self.fail(node.value, "the output dequantize must convert exactly one"
                                          " integer")
                for index in node.indices:
                    visitor.visit(index)
                return None
            return visitor.default_visit(node)
        if self.nan_test(node, visitor):
            return None  # the input quantize's NaN -> 0 rule: a test of one input element
        if (isinstance(node, _pe.Cast) and not _prim_float(node) and _prim_float(node.value)
                and self.inputs):
            if self.affine(node.value, visitor, self.input_load) != 1:
                self.fail(node, "the input quantize must read exactly one input element")
            return None
        if _prim_float(node):
            if isinstance(node, tvm.ir.expr.TensorLoad):
                if self.is_param(node.source, self.inputs):
                    self.fail(node, f"uses the model input {node.source.name!r} outside a"
                                    " quantize to an integer")
                self.fail(node, f"loads float from {node.source.name!r}, which is not the"
                                " model input")
            self.fail(node, f"{str(node.ty.dtype)} expression")
        return visitor.default_visit(node)

    def check(self, func: tirx.PrimFunc):
        self.error = None
        try:  # the FFI walk re-raises our error as a RuntimeError: raise the original
            tvm_ffi.structural_visit(func.body, self.visit)
        except Exception:
            if self.error is None:
                raise
            raise self.error from None


def _bindings(func: relax.Function):
    body = func.body
    if not isinstance(body, relax.SeqExpr):
        return []
    return [b for block in body.blocks for b in block.bindings]


def _returned(func: relax.Function, roots) -> set:
    body = func.body
    ret = body.body if isinstance(body, relax.SeqExpr) else body
    values = {b.var: b.value for b in _bindings(func)}
    while isinstance(ret, relax.Var) and isinstance(values.get(ret), (relax.Var, relax.Tuple)):
        ret = values[ret]
    fields = ret.fields if isinstance(ret, relax.Tuple) else [ret]
    return {roots(f) for f in fields if isinstance(f, relax.Var)}


def _kernel_roles(mod: tvm.IRModule):
    """{PrimFunc name: (input params, output params)} from every call in every Relax
    function, plus the main-level check of non-kernel bindings."""
    call_tir = tvm.ir.Op.get("relax.call_tir")
    roles = {}  # name -> list of per-parameter role sets, intersected over call sites
    for gv, func in mod.functions.items():
        if not isinstance(func, relax.Function):
            continue
        aliases = {b.var: b.value for b in _bindings(func) if isinstance(b.value, relax.Var)}

        def root(v):
            while v in aliases:
                v = aliases[v]
            return v

        float_params = {p for p in func.params if _floats(p.ty)} if gv.name_hint == "main" \
            else set()
        returned = _returned(func, root) if gv.name_hint == "main" else set()
        for binding in _bindings(func):
            value = binding.value
            if not isinstance(value, relax.Call):
                continue
            callee, args = None, None
            if value.op == call_tir:
                callee = value.args[0]
                args = list(value.args[1].fields) + [binding.var]
            elif isinstance(value.op, tvm.ir.GlobalVar) and isinstance(
                    mod.functions.get(value.op), tirx.PrimFunc):
                callee, args = value.op, list(value.args)
            if callee is None:
                touches = _floats(binding.var.ty) or any(
                    _floats(getattr(a, "ty", None)) for a in value.args)
                name = getattr(value.op, "name", None)
                if isinstance(value.op, relax.ExternFunc):
                    name = str(value.op.global_symbol)
                elif name in ("relax.call_packed", "relax.call_builtin_with_ctx") and \
                        value.args and isinstance(value.args[0], relax.ExternFunc):
                    name = str(value.args[0].global_symbol)
                if touches and name not in _NON_ARITHMETIC and name not in \
                        _NON_ARITHMETIC_PACKED:
                    raise FloatOpError(
                        f"float operation left in the compiled module: {binding.var.name!r} ="
                        f" {_op_name(value)} in {gv.name_hint!r}; only the input quantize"
                        " and the output dequantize may touch floats")
                continue
            prim = mod[callee]
            sites = []
            for arg in args[:len(prim.params)]:
                r = root(arg) if isinstance(arg, relax.Var) else None
                sites.append({"input"} if r in float_params else
                             {"output"} if r in returned else set())
            sites += [set()] * (len(prim.params) - len(sites))
            old = roles.get(callee.name_hint)
            roles[callee.name_hint] = sites if old is None else [
                a & b for a, b in zip(old, sites)]
    return roles


def verify_integer_kernels(mod: tvm.IRModule) -> None:
    """Raise :class:`FloatOpError` naming the kernel and the expression unless every
    PrimFunc of ``mod`` computes on integers only, outside the boundary quantize (reads the
    float model input) and dequantize (writes the float model output)."""
    roles = _kernel_roles(mod)
    for gv, func in mod.functions.items():
        if not isinstance(func, tirx.PrimFunc):
            continue
        sites = roles.get(gv.name_hint, [set()] * len(func.params))
        inputs = {p for p, r in zip(func.params, sites) if "input" in r}
        outputs = {p for p, r in zip(func.params, sites) if "output" in r}
        _KernelChecker(gv.name_hint, inputs, outputs).check(func)


@tvm.transform.module_pass(opt_level=0, name="VerifyIntegerKernels")
class VerifyIntegerKernels:
    """A pass that checks :func:`verify_integer_kernels` and returns the module unchanged."""

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        verify_integer_kernels(mod)
        return mod
