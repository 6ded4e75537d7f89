"""``convert``: freeze a QAT model into the integer deploy model.

Every QAT module is replaced by a deploy module holding integer buffers and calling one
``tvmq::<op>`` custom op (``tvmq.ops``), so the deploy model *is* the PyTorch integer
reference and ``torch.export`` of it is what TVM imports. Here, and only here, the integer
datapath is checked: exponents in range, shifts representable, and no int32 accumulator
that could overflow, with the layer named.
"""
from __future__ import annotations

import copy

import torch
import torch.fx as fx
from torch import nn

from tvmq import ops
from tvmq.qat import (QAdd, QAvgPool2d, QConv2d, QLinear, QMaxPool2d, QReLU, QuantInput,
                      _QWeighted, UnsupportedOpError)
from tvmq.quantizers import (ExponentRangeError, check_exponent, covering_exponent,
                             to_mantissa)
from tvmq.schemes import Recipe

INT32_MAX = (1 << 31) - 1


class AccumulatorOverflowError(ValueError):
    """An int32 accumulator of a layer could overflow for some input."""


# ----------------------------------------------------------------------------- deploy modules
class Quantize(nn.Module):
    def __init__(self, exponent: int, bits: int):
        super().__init__()
        self.exponent, self.bits = exponent, bits

    def forward(self, x):
        return torch.ops.tvmq.quantize(x, self.exponent, self.bits)


class Dequantize(nn.Module):
    def __init__(self, exponent: int):
        super().__init__()
        self.exponent = exponent

    def forward(self, x):
        return torch.ops.tvmq.dequantize(x, self.exponent)


class IntConv2d(nn.Module):
    """Integer conv: int8 weight, int bias at ``s_b``, shifts fixed at conversion."""

    def __init__(self, weight, bias, stride, padding, dilation, groups, bias_shift, out_shift,
                 relu, bits):
        super().__init__()
        self.register_buffer("weight", weight.to(torch.int8))
        self.register_buffer("bias", bias.to(torch.int32))
        self.stride, self.dilation, self.groups = list(stride), list(dilation), groups
        self.padding = [padding[0], padding[1], padding[0], padding[1]]
        self.bias_shift, self.out_shift, self.relu, self.bits = bias_shift, out_shift, relu, bits

    def forward(self, x):
        return torch.ops.tvmq.qconv2d(x, self.weight, self.bias, self.stride, self.padding,
                                      self.dilation, self.groups, self.bias_shift,
                                      self.out_shift, self.relu, self.bits)


class IntLinear(nn.Module):
    def __init__(self, weight, bias, bias_shift, out_shift, relu, bits):
        super().__init__()
        self.register_buffer("weight", weight.to(torch.int8))
        self.register_buffer("bias", bias.to(torch.int32))
        self.bias_shift, self.out_shift, self.relu, self.bits = bias_shift, out_shift, relu, bits

    def forward(self, x):
        return torch.ops.tvmq.qlinear(x, self.weight, self.bias, self.bias_shift,
                                      self.out_shift, self.relu, self.bits)


class IntAdd(nn.Module):
    def __init__(self, a_shift, b_shift, relu, bits):
        super().__init__()
        self.a_shift, self.b_shift, self.relu, self.bits = a_shift, b_shift, relu, bits

    def forward(self, a, b):
        return torch.ops.tvmq.qadd(a, b, self.a_shift, self.b_shift, self.relu, self.bits)


class IntReLU(nn.Module):
    def forward(self, x):
        return torch.ops.tvmq.qrelu(x)


class IntMaxPool2d(nn.Module):
    def __init__(self, kernel, stride, padding):
        super().__init__()
        self.kernel, self.stride = list(kernel), list(stride)
        self.padding = [padding[0], padding[1], padding[0], padding[1]]

    def forward(self, x):
        return torch.ops.tvmq.qmax_pool2d(x, self.kernel, self.stride, self.padding)


class IntAvgPool2d(nn.Module):
    def __init__(self, kernel, stride, bits):
        super().__init__()
        self.kernel, self.stride, self.bits = list(kernel), list(stride), bits

    def forward(self, x):
        return torch.ops.tvmq.qavg_pool2d(x, self.kernel, self.stride, self.bits)


# ----------------------------------------------------------------------------- conversion
def _shift(value: int, where: str, what: str, lo: int = -31, hi: int = 31) -> int:
    if not lo <= value <= hi:
        raise ExponentRangeError(f"{where}: {what} {value} is outside [{lo}, {hi}]: the"
                                 " exponents of its tensors are too far apart")
    return value


def _check_accumulator(name: str, w_int: torch.Tensor, b_aligned: torch.Tensor, in_bits: int,
                       out_shift: int) -> None:
    """Worst case of ``sum(x*w) + b`` (+ rounding half, or after a left shift) per channel."""
    in_max = 1 << (in_bits - 1)
    worst = w_int.abs().flatten(1).sum(1).to(torch.int64) * in_max + b_aligned.abs().to(torch.int64)
    worst = worst + (1 << (out_shift - 1) if out_shift > 0 else 0)
    worst = worst << max(-out_shift, 0)
    channel = int(worst.argmax())
    if int(worst[channel]) > INT32_MAX:
        raise AccumulatorOverflowError(
            f"layer {name!r}: output channel {channel} can reach |{int(worst[channel])}| in its"
            f" int32 accumulator (> 2^31 - 1); its weights are too large for {in_bits}-bit"
            " inputs -- use fewer input channels, smaller weights or a narrower scheme"
        )


def _convert_weighted(name: str, m: _QWeighted, recipe: Recipe) -> nn.Module:
    (q_in,) = m.input_quant
    s_in = check_exponent(q_in.exponent, f"layer {name!r} input")
    s_out = check_exponent(m.out_quant.exponent, f"layer {name!r} output")
    with torch.no_grad():
        w, b = m.folded()
        s_w = check_exponent(m.weight_quant.exponent(w), f"layer {name!r} weight")
        w_int = to_mantissa(w, s_w, recipe.weight_bits)
        s_t = s_in + s_w  # exponent of the accumulator
        s_b = covering_exponent(float(b.abs().max()), recipe.bias_bits)
        s_b = min(max(s_b, s_t), s_t + recipe.bias_window)
        b_int = to_mantissa(b, s_b, recipe.bias_bits)
    bias_shift = s_b - s_t
    out_shift = _shift(s_out - s_t, f"layer {name!r}", "requantization shift")
    _check_accumulator(name, w_int, b_int << bias_shift, recipe.act_bits, out_shift)
    if isinstance(m, QConv2d):
        return IntConv2d(w_int, b_int, m.stride, m.padding, m.dilation, m.groups, bias_shift,
                         out_shift, m.relu, recipe.act_bits)
    return IntLinear(w_int, b_int, bias_shift, out_shift, m.relu, recipe.act_bits)


def _convert_module(name: str, m: nn.Module, recipe: Recipe) -> nn.Module:
    if isinstance(m, _QWeighted):
        return _convert_weighted(name, m, recipe)
    if isinstance(m, QuantInput):
        return Quantize(check_exponent(m.out_quant.exponent, "model input"), recipe.act_bits)
    if isinstance(m, QAdd):
        s_out = check_exponent(m.out_quant.exponent, f"add {name!r} output")
        # each aligned input must stay below 2^30 so that their int32 sum cannot overflow
        a, b = (_shift(s_out - q.exponent, f"add {name!r}", "alignment shift",
                       lo=-(30 - recipe.act_bits + 1)) for q in m.input_quant)
        return IntAdd(a, b, m.relu, recipe.act_bits)
    if isinstance(m, QReLU):
        return IntReLU()
    if isinstance(m, QMaxPool2d):
        return IntMaxPool2d(m.kernel, m.stride, m.padding)
    if isinstance(m, QAvgPool2d):
        if m.input_hw is None:
            raise RuntimeError(f"{name!r}: run the model on data (calibrate/train) first")
        kernel, stride = m.window(m.input_hw)
        return IntAvgPool2d(kernel, stride, recipe.act_bits)
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
            setattr(deploy, node.target, _convert_module(node.target, src, recipe))
    deploy.output_exponent = q_out.exponent
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
