"""LowerTvmqComposites: ``tvmq.*`` composite functions -> integer TOPI/TE kernels (call_tir).

Pattern in: ``lv = tvmq_qconv2d_3(x, w, b)`` where ``tvmq_qconv2d_3`` is a private Relax
function with ``Composite = "tvmq.qconv2d"`` and its scalar arguments as JSON in
``tvmq.attrs`` (written by ``tvmq.frontend``). Result out: ``lv = R.call_tir(tvmq_qconv2d,
(x, w_packed, b_aligned), ...)`` whose PrimFunc is the kernel of ``topi_ops`` for the target,
with the shift requantization (and a fused ReLU) as the kernel's epilogue. Weights are packed
and biases pre-shifted here, at build time, in exact integer numpy.

Layout: the integer graph keeps its 4-D activations channels-last (NHWC), the order the
conv kernel reads and writes, so nothing is repacked between layers. A rule marked
:func:`channels_last` takes and returns NHWC; the lowering converts once where the graph
enters (the input quantize writes NHWC) and wherever an NCHW-only consumer needs the value
(an ``R.permute_dims`` view that DeadCodeElimination drops when no one uses it).

Ranges: the lowering follows each value's integer range (``OUTPUT_RANGES``); a channels-last
rule is told its activation input's range, so a conv whose input is known to be >= 0 (a
fused ReLU upstream) uses the unsigned operand without an offset (``Conv2dParams.nonneg``).

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
import tvm_ffi
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from topi_ops import conv2d as conv_ops
from topi_ops import dense as dense_ops
from topi_ops import elementwise, pool, winograd


@tvm_ffi.register_error("tvmq.LoweringError")  # raised in a pass: reaches the caller as itself
class LoweringError(ValueError):
    """A composite that cannot be lowered (non-constant weights, unknown op)."""


def _constant(expr: relax.Expr, what: str, node: str) -> np.ndarray:
    if not isinstance(expr, tvm.ir.expr.Constant):
        raise LoweringError(f"node {node!r}: {what} must be a constant known at build time")
    return expr.value.numpy()


def _aligned_bias(expr: relax.Expr, bias_shift: int, node: str) -> np.ndarray:
    """The bias brought to the accumulator's exponent once, at build time (exact)."""
    return (_constant(expr, "the bias", node).astype(np.int64) << bias_shift).astype(np.int32)


INT8 = (-128, 127)  # the range of a value nothing more is known of


def channels_last(rule: Callable) -> Callable:
    """Mark a lowering rule as layout-aware: its 4-D int8 activations come and go NHWC, and
    it is called with ``input_range=(lo, hi)`` of its first argument."""
    rule.channels_last = True
    return rule


def nonneg(input_range) -> bool:
    """Is an input known to lie in [0, 127] (after a ReLU): unsigned operands are exact."""
    return input_range[0] >= 0


def int8_conv(bb, x, weight: np.ndarray, bias: np.ndarray, shift: np.ndarray | None,
              params: "conv_ops.Conv2dParams", target, input_range=INT8, layout=None,
              kernel=None):
    """The int8 conv kernel on build-time constants, NHWC in and out: weights packed for the
    target, one shift for the layer (``params.out_shift``) or one per output channel
    (``shift``); an input known to be >= 0 needs no unsigned offset. ``layout``: the packing
    (default the target's, ``conv_ops.conv_layout``); ``kernel``: the TE compute (default
    ``qconv2d``; a scheme's may wrap it, e.g. MXQN's decode and encode). A 3x3 stride-1
    conv runs as integer Winograd where that pays and provably stays within int32
    (``topi_ops.winograd``)."""
    params = dataclasses.replace(params, nonneg=nonneg(input_range))
    packed_weight = weight
    if (kernel is None and layout is None and winograd.applies(target, weight.shape, params)
            and winograd.fits_int32(weight, input_range)):
        packed_weight, layout = winograd.transform_weights(weight), conv_ops.PAIRS
        kernel = winograd.qconv2d_winograd
    packed = conv_ops.pack_conv2d(packed_weight, bias, params, target, layout)
    if shift is not None and len(set(shift.tolist())) == 1:  # uniform: the one-shift kernel
        params, shift = dataclasses.replace(params, out_shift=int(shift[0]),
                                            relu=params.lo == 0,
                                            bits=params.hi.bit_length() + 1), None
        if params.lo not in (0, -(1 << (params.bits - 1))):
            raise LoweringError(f"output range [{params.lo}, {params.hi}] is not an N-bit range")
    consts = [relax.const(p) for p in packed] + ([relax.const(shift.astype(np.int32))]
                                                  if shift is not None else [])
    kernel = partial(kernel or partial(conv_ops.qconv2d, layout="NHWC"),
                     weight_shape=weight.shape, params=params, target=target)
    return bb.call_te(kernel, x, *consts, primfunc_name_hint="tvmq_qconv2d")


def int8_dense(bb, x, weight: np.ndarray, bias: np.ndarray, shift: np.ndarray | None,
               params: "dense_ops.DenseParams", target, input_range=INT8, layout=None,
               kernel=None):
    """The int8 dense kernel (a 1x1 conv) on build-time constants; ``layout`` and ``kernel``
    as :func:`int8_conv`'s."""
    params = dataclasses.replace(params, nonneg=nonneg(input_range))
    packed = dense_ops.pack_dense(weight, bias, params, target, layout)
    consts = [relax.const(p) for p in packed] + ([relax.const(shift.astype(np.int32))]
                                                  if shift is not None else [])
    kernel = partial(kernel or dense_ops.qdense, weight_shape=weight.shape, params=params,
                     target=target)
    return bb.call_te(kernel, x, *consts, primfunc_name_hint="tvmq_qdense")


@channels_last
def _lower_qconv2d(bb, args, attrs, target, node, input_range):
    stride, padding, dilation, groups, bias_shift, out_shift, relu, bits = attrs
    x, w, b = args
    params = conv_ops.Conv2dParams(tuple(stride), tuple(padding), tuple(dilation), groups,
                                   out_shift, relu, bits)
    return int8_conv(bb, x, _constant(w, "the weight", node),
                     _aligned_bias(b, bias_shift, node), None, params, target, input_range)


@channels_last
def _lower_qlinear(bb, args, attrs, target, node, input_range):
    bias_shift, out_shift, relu, bits = attrs
    x, w, b = args
    return int8_dense(bb, x, _constant(w, "the weight", node), _aligned_bias(b, bias_shift, node),
                      None, dense_ops.DenseParams(out_shift, relu, bits), target, input_range)


@channels_last
def _lower_qconv2d_pc(bb, args, attrs, target, node, input_range):
    stride, padding, dilation, groups, lo, hi = attrs
    x, w, b, shift = args
    params = conv_ops.Conv2dParams(tuple(stride), tuple(padding), tuple(dilation), groups,
                                   None, lo=lo, hi=hi)
    return int8_conv(bb, x, _constant(w, "the weight", node), _constant(b, "the bias", node),
                     _constant(shift, "the shifts", node), params, target, input_range)


@channels_last
def _lower_qlinear_pc(bb, args, attrs, target, node, input_range):
    lo, hi = attrs
    x, w, b, shift = args
    return int8_dense(bb, x, _constant(w, "the weight", node), _constant(b, "the bias", node),
                      _constant(shift, "the shifts", node),
                      dense_ops.DenseParams(None, lo=lo, hi=hi), target, input_range)


def _lower_simple(kernel: Callable, name: str, layout_free: bool = False):
    """A kernel called with the composite's tensors then its scalars. ``layout_free``
    (elementwise): it runs channels-last as it is."""
    def lower(bb, args, attrs, target, node, input_range=None):
        return bb.call_te(kernel, *args, *attrs, primfunc_name_hint=name)
    return channels_last(lower) if layout_free else lower


def _lower_nhwc(kernel: Callable, name: str):
    """A kernel with a ``layout`` argument, lowered channels-last."""
    return _lower_simple(partial(kernel, layout="NHWC"), name, layout_free=True)


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
    "tvmq.quantize": _lower_nhwc(elementwise.quantize, "tvmq_quantize"),
    "tvmq.dequantize": _lower_simple(elementwise.dequantize, "tvmq_dequantize"),
    "tvmq.qadd": _lower_simple(elementwise.qadd, "tvmq_qadd", layout_free=True),
    "tvmq.qrelu": _lower_simple(elementwise.qrelu, "tvmq_qrelu", layout_free=True),
    "tvmq.qmax_pool2d": _lower_nhwc(pool.qmax_pool2d, "tvmq_qmax_pool2d"),
    "tvmq.qavg_pool2d": _lower_nhwc(pool.qavg_pool2d, "tvmq_qavg_pool2d"),
}


def signed_range(bits: int, relu: bool = False) -> tuple[int, int]:
    return (0 if relu else -(1 << (bits - 1)), (1 << (bits - 1)) - 1)


# composite -> the integer range of its output, from its scalars and its inputs' ranges
# (``OUTPUT_RANGES[op](scalars, input_ranges)``); a scheme's op adds its line from its module.
# A value whose producer is not here is taken as any int8.
OUTPUT_RANGES: dict[str, Callable] = {
    "tvmq.qconv2d": lambda s, _: signed_range(s[-1], s[-2]),  # ..., relu, bits
    "tvmq.qlinear": lambda s, _: signed_range(s[-1], s[-2]),
    "tvmq.qconv2d_pc": lambda s, _: (s[-2], s[-1]),  # ..., lo, hi
    "tvmq.qlinear_pc": lambda s, _: (s[-2], s[-1]),
    "tvmq.quantize": lambda s, _: signed_range(s[1]),  # exponent, bits
    "tvmq.qadd": lambda s, _: signed_range(s[3], s[2]),  # a_shift, b_shift, relu, bits
    "tvmq.qrelu": lambda s, r: (0, max(r[0][1], 0)),
    "tvmq.qmax_pool2d": lambda s, r: r[0],
    "tvmq.qavg_pool2d": lambda s, r: r[0],  # a mean stays between its inputs' bounds
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


def _is_activation(expr: relax.Expr) -> bool:
    """A 4-D int8 tensor variable: what the graph keeps channels-last."""
    ty = expr.ty if isinstance(expr, relax.Var) else None
    return isinstance(ty, relax.TensorType) and ty.ndim == 4 and str(ty.dtype) == "int8"


TO_NHWC, TO_NCHW = [0, 2, 3, 1], [0, 3, 1, 2]
DATA_MOVES = ("relax.reshape", "relax.permute_dims", "relax.squeeze", "relax.expand_dims",
              "relax.flatten")


def _moves_data(expr: relax.Expr) -> bool:
    """An op that only moves values (its output's integers are its input's)."""
    return (isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op)
            and expr.op.name in DATA_MOVES and isinstance(expr.args[0], relax.Var))


@mutator
class _CompositeLowerer(PyExprMutator):
    def __init__(self, mod: tvm.IRModule, target: tvm.target.Target, plan: dict):
        super().__init__(mod)
        self.mod_ = mod
        self.target = target
        self.plan = plan
        self.nhwc: dict = {}  # NCHW var -> its channels-last twin
        self.ranges: dict = {}  # var -> (lo, hi) of its integers

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

    def _composite(self, expr):
        """(node, composite, scalars) of a tvmq composite call, else None."""
        if not (isinstance(expr, relax.Call) and isinstance(expr.op, relax.GlobalVar)):
            return None
        attrs = self.mod_[expr.op].attrs or {}
        composite = str(attrs.get("Composite", ""))
        if not composite.startswith("tvmq."):
            return None
        return (str(attrs.get("tvmq.node", expr.op.name_hint)), composite,
                json.loads(str(attrs["tvmq.attrs"])))

    def _rule(self, node: str, composite: str, scalars: list) -> Callable:
        if composite not in LOWERINGS:
            raise LoweringError(f"node {node!r}: no integer kernel for {composite}")
        rules = alternatives(composite, scalars)
        name = self.plan.get(node, next(iter(rules)))
        if name not in rules:
            raise LoweringError(f"node {node!r}: {composite} has no lowering {name!r};"
                                f" it has {', '.join(rules)}")
        return rules[name]

    def _channels_last(self, arg: relax.Expr) -> relax.Expr:
        """The NHWC form of an activation: its twin, or a transpose (graph entry, or after a
        kernel that only runs NCHW)."""
        if not _is_activation(arg):
            return arg
        if arg not in self.nhwc:
            self.nhwc[arg] = self.builder_.emit(relax.op.permute_dims(arg, TO_NHWC),
                                                name_hint=f"{arg.name}_nhwc")
        return self.nhwc[arg]

    def _bind(self, var: relax.Var, value: relax.Expr) -> relax.Var:
        emit = (self.builder_.emit if isinstance(var, relax.DataflowVar)
                else self.builder_.emit_output)
        new = emit(value, name_hint=var.name)
        self.set_var_remap(var, new)
        return new

    def visit_var_binding_(self, binding) -> None:
        found = self._composite(binding.value)
        if found is None and _moves_data(binding.value):  # a reshape keeps its input's range
            value = self.visit_expr(binding.value)
            new = self._bind(binding.var, value)
            if value.args[0] in self.ranges:
                self.ranges[new] = self.ranges[value.args[0]]
            return
        if found is None:
            super().visit_var_binding_(binding)
            return
        node, composite, scalars = found
        rule = self._rule(node, composite, scalars)
        args = [self.visit_expr(a) for a in binding.value.args]
        in_ranges = [self.ranges.get(a, INT8) for a in args]
        if getattr(rule, "channels_last", False):
            out = self.builder_.normalize(rule(
                self.builder_, [self._channels_last(a) for a in args], scalars, self.target,
                node, input_range=in_ranges[0] if in_ranges else INT8))
            if out.ty.ndim == 4:
                nhwc = self.builder_.emit(out, name_hint=f"{binding.var.name}_nhwc")
                new = self._bind(binding.var, relax.op.permute_dims(nhwc, TO_NCHW))
                self.nhwc[new] = nhwc
            else:
                new = self._bind(binding.var, out)
        else:
            new = self._bind(binding.var, rule(self.builder_, args, scalars, self.target, node))
        if composite in OUTPUT_RANGES:
            self.ranges[new] = tuple(OUTPUT_RANGES[composite](scalars, in_ranges))


@tvm.transform.module_pass(opt_level=0, name="LowerTvmqComposites")
class LowerTvmqComposites:
    """Every ``tvmq.*`` composite call -> ``call_tir`` of its target-specific TE kernel;
    ``plan`` = ``{node: lowering name}`` for composites with several (default: the first)."""

    def __init__(self, target: tvm.target.Target, plan: dict | None = None):
        self.target = target
        self.plan = dict(plan or {})

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        return _CompositeLowerer(mod, self.target, self.plan).transform()
