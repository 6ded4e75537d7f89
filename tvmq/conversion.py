"""``convert``: freeze a QAT model into the integer deploy model.

Every QAT module is replaced by a deploy module holding integer buffers and calling one
``tvmq::<op>`` custom op (``tvmq.ops``), so the deploy model *is* the PyTorch integer
reference and ``torch.export`` of it is what TVM imports. Here, and only here, the integer
datapath is checked: exponents in range, shifts representable, and no int32 accumulator
that could overflow, with the layer named.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn

from tvmq.integer import (INT32_MAX, AccumulatorOverflowError, Dequantize, IntAdd,
                          IntAvgPool2d, IntMaxPool2d, IntReLU, Quantize, shift_in_range)
from tvmq.qat import (QAdd, QAvgPool2d, QMaxPool2d, QReLU, QuantInput, _QWeighted,
                      UnsupportedOpError)
from tvmq.quantizers import check_exponent
from tvmq.schemes import Recipe
from tvmq.schemes.int_se import range_bits

__all__ = ["convert", "AccumulatorOverflowError", "INT32_MAX", "output_quantizers"]


@dataclass(frozen=True)
class LayerIO:
    """A weighted layer's input and output as the integer graph sees them: exponents and
    integer ranges (what its scheme's ``integer_layer`` builds from)."""

    name: str
    s_in: int
    in_lo: int
    in_hi: int
    s_out: int
    out_lo: int
    out_hi: int

    @property
    def in_max(self) -> int:
        return max(-self.in_lo, self.in_hi)


def _value_range(q, nonneg: bool) -> tuple[int, int]:
    lo, hi = q.qrange()
    return (0 if nonneg else lo), hi


def _convert_weighted(name: str, m: _QWeighted) -> nn.Module:
    (q_in,) = m.input_quant
    with torch.no_grad():  # the weights first: a bad weight explains a bad output exponent
        w, b = m.folded()
        iw = m.weight_quant.integer(w, f"layer {name!r}")
    in_lo, in_hi = _value_range(q_in, m.input_nonneg[0] if m.input_nonneg else False)
    out_lo, out_hi = _value_range(m.out_quant, m.relu)
    io = LayerIO(name, check_exponent(q_in.exponent, f"layer {name!r} input"), in_lo, in_hi,
                 check_exponent(m.out_quant.exponent, f"layer {name!r} output"), out_lo, out_hi)
    return m.scheme.weight.scheme.integer_layer(m, io, m.scheme.weight, iw, b)


def _convert_module(name: str, m: nn.Module) -> nn.Module:
    if isinstance(m, _QWeighted):
        return _convert_weighted(name, m)
    if isinstance(m, QuantInput):
        bits, _ = range_bits(*m.out_quant.qrange())
        return Quantize(check_exponent(m.out_quant.exponent, "model input"), bits)
    if isinstance(m, QAdd):
        s_out = check_exponent(m.out_quant.exponent, f"add {name!r} output")
        # each aligned input must stay below 2^30 so that their int32 sum cannot overflow
        shifts = [shift_in_range(s_out - q.exponent, f"add {name!r}", "alignment shift",
                                 lo=-(30 - q.qrange()[1].bit_length()))
                  for q in m.input_quant]
        bits, relu = range_bits(*_value_range(m.out_quant, m.relu))
        return IntAdd(*shifts, relu or m.relu, bits)
    if isinstance(m, QReLU):
        return IntReLU()
    if isinstance(m, QMaxPool2d):
        return IntMaxPool2d(m.kernel, m.stride, m.padding)
    if isinstance(m, QAvgPool2d):
        if m.input_hw is None:
            raise RuntimeError(f"{name!r}: run the model on data (calibrate/train) first")
        kernel, stride = m.window(m.input_hw)
        bits, _ = range_bits(*m.input_quant[0].qrange())
        return IntAvgPool2d(kernel, stride, bits)
    raise UnsupportedOpError(f"{name!r}: no integer form for {type(m).__name__}")


def output_quantizers(qat: fx.GraphModule):
    """The quantizer of each model output, found by following passthrough nodes back."""
    out = next(n for n in qat.graph.nodes if n.op == "output")
    values = out.args[0] if isinstance(out.args[0], (tuple, list)) else (out.args[0],)
    result = []
    for v in values:
        node = v
        while True:
            if node.op == "call_module":
                m = qat.get_submodule(node.target)
                if hasattr(m, "out_quant"):
                    result.append(m.out_quant)
                    break
                if isinstance(m, QAvgPool2d):
                    result.append(m.input_quant[0])
                    break
            node = node.args[0]
    return result


def _describe_act(q) -> str:
    lo, hi = q.qrange()
    kind = type(q).__name__.replace("Quantizer", "")
    return f"{kind} {'unsigned' if lo == 0 else 'signed'} [{lo}, {hi}]"


def layer_table(qat: fx.GraphModule) -> list[dict]:
    """What each weighted layer runs as: its name in the float model, the deploy module,
    the scheme of its weights and its output, whether a recipe kept it at 8 bits."""
    rows = []
    for module, m in qat.named_children():
        if isinstance(m, _QWeighted):
            rows.append({"layer": m.layer_name, "module": module,
                         "weights": m.scheme.weight.spec, "output": _describe_act(m.out_quant),
                         "scheme": m.scheme.act.spec,
                         # a quantizer may add what it chose (MXQN: fixed or log, SQNRs)
                         **getattr(m.out_quant, "report", lambda: {})()})
    return rows


def convert(qat: fx.GraphModule) -> fx.GraphModule:
    """The frozen integer deploy model of a trained/calibrated QAT model.

    Its forward takes the float input and returns the dequantized float output (or, with a
    recipe ``output="int"``, the integer mantissa; the exponent is ``.output_exponent``).
    """
    recipe: Recipe = qat.tvmq_recipe
    qat = qat.eval()
    (q_out,) = output_quantizers(qat)
    deploy = copy.deepcopy(qat)
    for node in deploy.graph.nodes:
        if node.op == "call_module" and node.target.startswith("tvmq_"):
            src = qat.get_submodule(node.target)
            setattr(deploy, node.target, _convert_module(node.target, src))
    deploy.output_exponent = q_out.exponent
    deploy.tvmq_layers = layer_table(qat)
    if recipe.output == "float":
        out = next(n for n in deploy.graph.nodes if n.op == "output")
        deploy.add_submodule("tvmq_output", Dequantize(q_out.exponent))
        with deploy.graph.inserting_before(out):
            deq = deploy.graph.call_module("tvmq_output", (out.args[0],))
        out.args = (deq,)
    deploy.delete_all_unused_submodules()
    deploy.graph.lint()
    deploy.recompile()
    deploy.tvmq_recipe = recipe
    return deploy
