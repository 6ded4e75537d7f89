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

from topi_ops.pool import avg_pool_multiplier
from tvmq.quantizers import qrange
from tvmq.qat import UnsupportedOpError

R = relax.op
# aten ops that only move or reshape data: allowed between tvmq ops in a deploy graph
SHAPE_OPS = {"view", "reshape", "flatten", "_unsafe_view", "squeeze", "unsqueeze", "permute",
             "contiguous", "clone", "alias", "_assert_tensor_metadata", "expand", "transpose"}


# ----------------------------------------------------------------------------- Relax bodies
def _const(value, dtype):
    return relax.const(value, dtype)


def _round_shift(bb, x, shift):
    if shift > 0:
        x = bb.emit(R.add(x, _const(1 << (shift - 1), "int32")))
        return bb.emit(R.right_shift(x, _const(shift, "int32")))
    if shift < 0:
        return bb.emit(R.left_shift(x, _const(-shift, "int32")))
    return x


def _saturate(bb, x, bits, relu=False):
    lo, hi = qrange(bits)
    x = bb.emit(R.clip(x, 0 if relu else lo, hi))
    return bb.emit(R.astype(x, "int8"))


def _body_quantize(bb, x, exponent, bits):
    scaled = bb.emit(R.multiply(x, _const(2.0 ** -exponent, "float32")))
    rounded = bb.emit(R.floor(R.add(scaled, _const(0.5, "float32"))))
    lo, hi = qrange(bits)
    return bb.emit(R.astype(R.clip(rounded, lo, hi), "int8"))


def _body_dequantize(bb, x, exponent):
    return bb.emit(R.multiply(R.astype(x, "float32"), _const(2.0 ** exponent, "float32")))


def _add_bias(bb, acc, bias, bias_shift, shape):
    b = bb.emit(R.left_shift(bias, _const(bias_shift, "int32")))
    return bb.emit(R.add(acc, R.reshape(b, shape)))


def _body_qconv2d(bb, x, w, b, stride, padding, dilation, groups, bias_shift, out_shift, relu,
                  bits):
    acc = bb.emit(R.nn.conv2d(x, w, strides=stride, padding=padding, dilation=dilation,
                              groups=groups, out_dtype="int32"))
    acc = _add_bias(bb, acc, b, bias_shift, (1, -1, 1, 1))
    return _saturate(bb, _round_shift(bb, acc, out_shift), bits, relu)


def _body_qlinear(bb, x, w, b, bias_shift, out_shift, relu, bits):
    acc = bb.emit(R.matmul(x, R.permute_dims(w), out_dtype="int32"))
    acc = _add_bias(bb, acc, b, bias_shift, (1, -1))
    return _saturate(bb, _round_shift(bb, acc, out_shift), bits, relu)


def _body_qadd(bb, a, b, a_shift, b_shift, relu, bits):
    a = _round_shift(bb, bb.emit(R.astype(a, "int32")), a_shift)
    b = _round_shift(bb, bb.emit(R.astype(b, "int32")), b_shift)
    return _saturate(bb, bb.emit(R.add(a, b)), bits, relu)


def _body_qrelu(bb, x):
    return bb.emit(R.maximum(x, _const(0, "int8")))


def _body_qmax_pool2d(bb, x, kernel, stride, padding):
    return bb.emit(R.nn.max_pool2d(x, kernel, stride, padding))


def _body_qavg_pool2d(bb, x, kernel, stride, bits):
    # window sum as a depthwise conv with an all-ones kernel: exact, integer only
    channels = int(x.ty.shape[1])
    ones = relax.const(torch.ones((channels, 1, *kernel), dtype=torch.int8).numpy())
    total = bb.emit(R.nn.conv2d(x, ones, strides=stride, groups=channels, out_dtype="int32"))
    mult, shift = avg_pool_multiplier(kernel[0] * kernel[1])
    total = bb.emit(R.multiply(total, _const(mult, "int32")))
    return _saturate(bb, _round_shift(bb, total, shift), bits)


# op name -> Relax body builder; its positional parameters after ``bb`` are the op's schema
BODIES: dict[str, Callable] = {
    "quantize": _body_quantize, "dequantize": _body_dequantize, "qconv2d": _body_qconv2d,
    "qlinear": _body_qlinear, "qadd": _body_qadd, "qrelu": _body_qrelu,
    "qmax_pool2d": _body_qmax_pool2d, "qavg_pool2d": _body_qavg_pool2d,
}


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
        attrs = {"Composite": f"tvmq.{op}", "tvmq.attrs": json.dumps(scalars),
                 "tvmq.node": node.name}
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


def import_exported_program(ep: torch.export.ExportedProgram) -> tvm.IRModule:
    """The Relax module of a tvmq deploy program, quantized ops as ``tvmq.*`` composites."""
    check_supported(ep)
    return from_exported_program(ep, custom_convert_map=custom_convert_map(),
                                 run_ep_decomposition=False, unwrap_unit_return_tuple=True)
