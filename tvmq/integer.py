"""The integer deploy model's layers, and the checks that make them safe.

Every deploy module holds integer buffers and calls one ``tvmq::<op>`` custom op
(``tvmq.ops``, or a scheme's own op), so a deploy model *is* the PyTorch integer reference.
Schemes build their layers from these parts (``tvmq.schemes``); ``tvmq.conversion`` walks
the graph. Here, and only here, the integer datapath is checked: shifts representable and no
int32 accumulator that could overflow, with the layer named.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from tvmq.quantizers import ExponentRangeError, check_finite

INT32_MAX = (1 << 31) - 1


class AccumulatorOverflowError(ValueError):
    """An int32 accumulator of a layer could overflow for some input."""


@dataclass
class IntegerWeights:
    """A conv/linear layer's weights in integer form (what a scheme's ``integer(w)`` gives).

    ``weight`` is the integer weight the int8 kernels multiply (int8 range), ``exponent``
    the power of two of each output channel ([O] int32; equal entries for a per-tensor
    scheme). Schemes with a structured form keep it too: ``terms`` [K, O, ...] in {-1, 0, 1}
    with ``term_shift`` [K, O] (weight = sum of terms << term_shift), for their own kernels.
    """

    weight: torch.Tensor
    exponent: torch.Tensor
    terms: torch.Tensor | None = None
    term_shift: torch.Tensor | None = None

    @property
    def uniform(self) -> bool:
        return bool((self.exponent == self.exponent[0]).all())


@dataclass(frozen=True)
class Geometry:
    """Stride, padding (top, left, bottom, right), dilation and groups of a conv."""

    stride: list
    padding: list
    dilation: list
    groups: int

    @classmethod
    def of(cls, m) -> "Geometry":
        return cls(list(m.stride), [m.padding[0], m.padding[1], m.padding[0], m.padding[1]],
                   list(m.dilation), m.groups)


def shift_in_range(value: int, where: str, what: str, lo: int = -31, hi: int = 31) -> int:
    if not lo <= value <= hi:
        raise ExponentRangeError(f"{where}: {what} {value} is outside [{lo}, {hi}]: the"
                                 " exponents of its tensors are too far apart")
    return value


def check_accumulator(name: str, w_int: torch.Tensor, b_aligned: torch.Tensor, in_max: int,
                      out_shift: "int | torch.Tensor") -> None:
    """Worst case of ``sum(x*w) + b`` (+ rounding half, or after a left shift) per output
    channel, for inputs of magnitude at most ``in_max``; ``out_shift`` scalar or per channel."""
    shift = torch.as_tensor(out_shift, dtype=torch.int64).expand(w_int.shape[0])
    worst = w_int.abs().flatten(1).sum(1).to(torch.int64) * in_max + b_aligned.abs().to(torch.int64)
    worst = worst + torch.where(shift > 0, 1 << (shift - 1).clamp_min(0), 0)
    worst = worst << (-shift).clamp_min(0)
    channel = int(worst.argmax())
    if int(worst[channel]) > INT32_MAX:
        raise AccumulatorOverflowError(
            f"layer {name!r}: output channel {channel} can reach |{int(worst[channel])}| in its"
            f" int32 accumulator (> 2^31 - 1); its weights are too large for inputs up to"
            f" {in_max} -- use fewer input channels, smaller weights or a narrower scheme"
        )


def per_channel_requant(name: str, iw: IntegerWeights, bias: torch.Tensor, s_in: int,
                        s_out: int, in_max: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(int32 bias at each channel's accumulator exponent, int32 shift per channel), checked.

    The accumulator of channel ``f`` has exponent ``s_in + exponent[f]``; the bias is rounded
    onto it (half up, as the integer graph rounds) and the output shift is
    ``s_out - (s_in + exponent[f])``."""
    check_finite(bias, f"layer {name!r} bias")
    s_t = s_in + iw.exponent.to(torch.int64)
    shift = s_out - s_t
    for f, p in enumerate(shift.tolist()):
        shift_in_range(int(p), f"layer {name!r} channel {f}", "requantization shift")
    scaled = torch.floor(bias.double() * torch.pow(2.0, -s_t.double()) + 0.5)
    if scaled.abs().max() > INT32_MAX:
        channel = int(scaled.abs().argmax())
        raise AccumulatorOverflowError(
            f"layer {name!r}: the bias of output channel {channel} ({float(bias[channel]):.4g})"
            f" does not fit int32 at the accumulator's exponent 2^{int(s_t[channel])}")
    b_int = scaled.to(torch.int32)
    check_accumulator(name, iw.weight, b_int, in_max, shift)
    return b_int, shift.to(torch.int32)


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
    """Integer conv, one shift for the layer: int8 weight, int bias at ``s_b``."""

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


class IntConv2dPerChannel(nn.Module):
    """Integer conv with a shift per output channel and an output range ``[lo, hi]``."""

    def __init__(self, weight, bias, shift, geometry: Geometry, lo: int, hi: int):
        super().__init__()
        self.register_buffer("weight", weight.to(torch.int8))
        self.register_buffer("bias", bias.to(torch.int32))
        self.register_buffer("shift", shift.to(torch.int32))
        self.geometry, self.lo, self.hi = geometry, lo, hi

    def forward(self, x):
        g = self.geometry
        return torch.ops.tvmq.qconv2d_pc(x, self.weight, self.bias, self.shift, g.stride,
                                         g.padding, g.dilation, g.groups, self.lo, self.hi)


class IntLinearPerChannel(nn.Module):
    """Integer dense with a shift per output channel and an output range ``[lo, hi]``."""

    def __init__(self, weight, bias, shift, lo: int, hi: int):
        super().__init__()
        self.register_buffer("weight", weight.to(torch.int8))
        self.register_buffer("bias", bias.to(torch.int32))
        self.register_buffer("shift", shift.to(torch.int32))
        self.lo, self.hi = lo, hi

    def forward(self, x):
        return torch.ops.tvmq.qlinear_pc(x, self.weight, self.bias, self.shift, self.lo, self.hi)


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


# ----------------------------------------------------------------------------- programs
def _constants(ep) -> dict:
    """Placeholder name -> tensor for every weight/buffer/constant an exported program holds."""
    sig, out = ep.graph_signature, {}
    for mapping, store in ((sig.inputs_to_parameters, ep.state_dict),
                           (sig.inputs_to_buffers, ep.state_dict),
                           (sig.inputs_to_lifted_tensor_constants, ep.constants)):
        for placeholder, key in mapping.items():
            if key in store:
                out[placeholder] = store[key]
    return out


def check_program(ep) -> None:
    """The checks ``convert`` makes, on a program from anywhere (a user's ``.pt2``): every
    shift representable and no int32 accumulator that could overflow, for int8 inputs,
    naming the node. ``tvmq.build`` runs it before lowering."""
    consts = _constants(ep)
    for node in ep.graph.nodes:
        if node.op != "call_function" or getattr(node.target, "namespace", None) != "tvmq":
            continue
        op = node.target.__name__.split(".")[0]
        where = f"node {node.name!r}"

        def tensor(i):
            arg = node.args[i]
            return consts.get(getattr(arg, "name", None))

        if op in ("qconv2d", "qlinear"):
            bias_shift, out_shift = node.args[-4], node.args[-3]
            shift_in_range(out_shift, where, "requantization shift")
            shift_in_range(bias_shift, where, "bias shift", lo=0)
            w, b = tensor(1), tensor(2)
            if w is not None and b is not None:
                b_aligned = b.to(torch.int64) << bias_shift
                check_accumulator(node.name, w.flatten(1) if w.dim() > 1 else w[:, None],
                                  b_aligned, 128, out_shift)
        elif op in ("qconv2d_pc", "qlinear_pc"):
            w, b, s = tensor(1), tensor(2), tensor(3)
            if s is not None:
                for p in s.tolist():
                    shift_in_range(int(p), where, "requantization shift")
            if w is not None and b is not None and s is not None:
                check_accumulator(node.name, w.flatten(1), b, 128, s.to(torch.int64))
        elif op == "qadd":
            for p in node.args[2:4]:
                shift_in_range(p, where, "alignment shift", lo=-23)
