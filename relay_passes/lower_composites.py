"""LowerTvmqComposites: ``tvmq.*`` composite functions -> integer TOPI/TE kernels (call_tir).

Pattern in: ``lv = tvmq_qconv2d_3(x, w, b)`` where ``tvmq_qconv2d_3`` is a private Relax
function with ``Composite = "tvmq.qconv2d"`` and its scalar arguments as JSON in
``tvmq.attrs`` (written by ``tvmq.frontend``). Result out: ``lv = R.call_tir(tvmq_qconv2d,
(x, w_packed, b_aligned), ...)`` whose PrimFunc is the kernel of ``topi_ops`` for the target,
with the shift requantization (and a fused ReLU) as the kernel's epilogue. Weights are packed
and biases pre-shifted here, at build time, in exact integer numpy.

Nothing below ``tvmq`` is imported: composites are found by their ``tvmq.<op>`` name, the
string contract with the frontend.
"""
from __future__ import annotations

import dataclasses
import json
from functools import partial
from typing import Callable

import numpy as np
import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from topi_ops import conv2d as conv_ops
from topi_ops import dense as dense_ops
from topi_ops import elementwise, pool


class LoweringError(ValueError):
    """A composite that cannot be lowered (non-constant weights, unknown op)."""


def _constant(expr: relax.Expr, what: str, node: str) -> np.ndarray:
    if not isinstance(expr, tvm.ir.expr.Constant):
        raise LoweringError(f"node {node!r}: {what} must be a constant known at build time")
    return expr.value.numpy()


def _aligned_bias(expr: relax.Expr, bias_shift: int, node: str) -> np.ndarray:
    """The bias brought to the accumulator's exponent once, at build time (exact)."""
    return (_constant(expr, "the bias", node).astype(np.int64) << bias_shift).astype(np.int32)


def int8_conv(bb, x, weight: np.ndarray, bias: np.ndarray, shift: np.ndarray | None,
              params: "conv_ops.Conv2dParams", target):
    """The int8 conv kernel on build-time constants: weights packed for the target, one
    shift for the layer (``params.out_shift``) or one per output channel (``shift``)."""
    packed = conv_ops.pack_conv2d(weight, bias, params, target)
    if shift is not None and len(set(shift.tolist())) == 1:  # uniform: the one-shift kernel
        params, shift = dataclasses.replace(params, out_shift=int(shift[0]),
                                            relu=params.lo == 0,
                                            bits=params.hi.bit_length() + 1), None
        if params.lo not in (0, -(1 << (params.bits - 1))):
            raise LoweringError(f"output range [{params.lo}, {params.hi}] is not an N-bit range")
    consts = [relax.const(p) for p in packed] + ([relax.const(shift.astype(np.int32))]
                                                  if shift is not None else [])
    kernel = partial(conv_ops.qconv2d, weight_shape=weight.shape, params=params, target=target)
    return bb.call_te(kernel, x, *consts, primfunc_name_hint="tvmq_qconv2d")


def int8_dense(bb, x, weight: np.ndarray, bias: np.ndarray, shift: np.ndarray | None,
               params: "dense_ops.DenseParams", target):
    """The int8 dense kernel (a 1x1 conv) on build-time constants."""
    packed = dense_ops.pack_dense(weight, bias, params, target)
    consts = [relax.const(p) for p in packed] + ([relax.const(shift.astype(np.int32))]
                                                  if shift is not None else [])
    kernel = partial(dense_ops.qdense, weight_shape=weight.shape, params=params, target=target)
    return bb.call_te(kernel, x, *consts, primfunc_name_hint="tvmq_qdense")


def _lower_qconv2d(bb, args, attrs, target, node):
    stride, padding, dilation, groups, bias_shift, out_shift, relu, bits = attrs
    x, w, b = args
    params = conv_ops.Conv2dParams(tuple(stride), tuple(padding), tuple(dilation), groups,
                                   out_shift, relu, bits)
    return int8_conv(bb, x, _constant(w, "the weight", node),
                     _aligned_bias(b, bias_shift, node), None, params, target)


def _lower_qlinear(bb, args, attrs, target, node):
    bias_shift, out_shift, relu, bits = attrs
    x, w, b = args
    return int8_dense(bb, x, _constant(w, "the weight", node), _aligned_bias(b, bias_shift, node),
                      None, dense_ops.DenseParams(out_shift, relu, bits), target)


def _lower_qconv2d_pc(bb, args, attrs, target, node):
    stride, padding, dilation, groups, lo, hi = attrs
    x, w, b, shift = args
    params = conv_ops.Conv2dParams(tuple(stride), tuple(padding), tuple(dilation), groups,
                                   None, lo=lo, hi=hi)
    return int8_conv(bb, x, _constant(w, "the weight", node), _constant(b, "the bias", node),
                     _constant(shift, "the shifts", node), params, target)


def _lower_qlinear_pc(bb, args, attrs, target, node):
    lo, hi = attrs
    x, w, b, shift = args
    return int8_dense(bb, x, _constant(w, "the weight", node), _constant(b, "the bias", node),
                      _constant(shift, "the shifts", node),
                      dense_ops.DenseParams(None, lo=lo, hi=hi), target)


def _lower_simple(kernel: Callable, name: str):
    def lower(bb, args, attrs, target, node):
        return bb.call_te(kernel, *args, *attrs, primfunc_name_hint=name)
    return lower


OPAQUE = ("tvmq_qconv2d", "tvmq_qdense", "tvmq_bitserial", "tvmq_shiftadd")
OP_PATTERN_OPAQUE = 8  # relax.OpPatternKind.kOpaque: FuseOps leaves the kernel alone

# composite name -> lowering rule, or {lowering name: rule} where a scheme's op may run as
# several kernels (the first is the default; ``plan`` picks per node). A new integer op adds
# one line here, or registers from its own module (``relay_passes.lower_ternary``).
LOWERINGS: dict[str, "Callable | dict[str, Callable]"] = {
    "tvmq.qconv2d": _lower_qconv2d,
    "tvmq.qlinear": _lower_qlinear,
    "tvmq.qconv2d_pc": _lower_qconv2d_pc,
    "tvmq.qlinear_pc": _lower_qlinear_pc,
    "tvmq.quantize": _lower_simple(elementwise.quantize, "tvmq_quantize"),
    "tvmq.dequantize": _lower_simple(elementwise.dequantize, "tvmq_dequantize"),
    "tvmq.qadd": _lower_simple(elementwise.qadd, "tvmq_qadd"),
    "tvmq.qrelu": _lower_simple(elementwise.qrelu, "tvmq_qrelu"),
    "tvmq.qmax_pool2d": _lower_simple(pool.qmax_pool2d, "tvmq_qmax_pool2d"),
    "tvmq.qavg_pool2d": _lower_simple(pool.qavg_pool2d, "tvmq_qavg_pool2d"),
}


def alternatives(composite: str, attrs: list | None = None) -> dict[str, Callable]:
    """The named lowerings of a composite (one entry, ``"int8"``, for a plain rule); with
    the call's scalar ``attrs``, only those whose ``rule.applies(attrs)`` holds."""
    rule = LOWERINGS[composite]
    rules = rule if isinstance(rule, dict) else {"int8": rule}
    if attrs is None:
        return rules
    return {n: r for n, r in rules.items() if getattr(r, "applies", lambda a: True)(attrs)}


def composite_calls(mod: tvm.IRModule):
    """``(node name, composite name, call, scalars)`` of every tvmq composite call in ``main``."""
    calls = []

    @relax.expr_functor.visitor
    class _Find(relax.PyExprVisitor):
        def visit_call_(self, call):
            super().visit_call_(call)
            if isinstance(call.op, relax.GlobalVar):
                attrs = mod[call.op].attrs or {}
                composite = str(attrs.get("Composite", ""))
                if composite.startswith("tvmq."):
                    calls.append((str(attrs.get("tvmq.node", call.op.name_hint)), composite,
                                  call, json.loads(str(attrs["tvmq.attrs"]))))

    _Find().visit_expr(mod["main"])
    return calls


@mutator
class _CompositeLowerer(PyExprMutator):
    def __init__(self, mod: tvm.IRModule, target: tvm.target.Target, plan: dict):
        super().__init__(mod)
        self.mod_ = mod
        self.target = target
        self.plan = plan

    def transform(self) -> tvm.IRModule:
        for gv, func in self.mod_.functions_items():
            if isinstance(func, relax.Function) and "Composite" not in (func.attrs or {}):
                self.builder_.update_func(gv, self.visit_expr(func))
        mod = self.builder_.get()
        for gv, func in list(mod.functions_items()):
            if isinstance(func, relax.Function) and str(
                    (func.attrs or {}).get("Composite", "")).startswith("tvmq."):
                del mod[gv]
            elif isinstance(func, tvm.tirx.PrimFunc) and gv.name_hint.startswith(OPAQUE):
                # keep each conv/dense kernel whole: its default schedule (and tuning)
                # sees exactly the blocks it was written for
                mod[gv] = func.with_attr("op_pattern", OP_PATTERN_OPAQUE)
        return mod

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = self.visit_expr_post_order(call)
        if not isinstance(call.op, relax.GlobalVar):
            return call
        func = self.mod_[call.op]
        attrs = func.attrs or {}
        composite = str(attrs.get("Composite", ""))
        if not composite.startswith("tvmq."):
            return call
        node = str(attrs.get("tvmq.node", call.op.name_hint))
        if composite not in LOWERINGS:
            raise LoweringError(f"node {node!r}: no integer kernel for {composite}")
        scalars = json.loads(str(attrs["tvmq.attrs"]))
        rules = alternatives(composite, scalars)
        name = self.plan.get(node, next(iter(rules)))
        if name not in rules:
            raise LoweringError(f"node {node!r}: {composite} has no lowering {name!r};"
                                f" it has {', '.join(rules)}")
        return rules[name](self.builder_, list(call.args), scalars, self.target, node)


@tvm.transform.module_pass(opt_level=0, name="LowerTvmqComposites")
class LowerTvmqComposites:
    """Every ``tvmq.*`` composite call -> ``call_tir`` of its target-specific TE kernel;
    ``plan`` = ``{node: lowering name}`` for composites with several (default: the first)."""

    def __init__(self, target: tvm.target.Target, plan: dict | None = None):
        self.target = target
        self.plan = dict(plan or {})

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        return _CompositeLowerer(mod, self.target, self.plan).transform()
