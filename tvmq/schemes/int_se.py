"""INT-SE (IOIQ's data format, ALGORITHMS.md §3): N-bit weights and activations, each tensor
one power-of-two shared exponent chosen by MSE over four candidates; biases 16-bit within a
window of 7 bits above the accumulator's exponent; requantization one shift per layer.

Runs as ``tvmq::qconv2d`` / ``tvmq::qlinear`` (one shift per layer) on the int8 kernels.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from tvmq.integer import (IntConv2d, IntLinear, check_accumulator, shift_in_range)
from tvmq.quantizers import (IntSEQuantizer, IntSEWeightQuantizer, check_exponent,
                             check_finite, covering_exponent, fake_quantize, to_mantissa)
from tvmq.schemes import Scheme, SchemeConfig, register_scheme


@dataclass(frozen=True)
class IntSEConfig(SchemeConfig):
    """``int-se[:BITS]``: BITS-bit mantissas (2..8, default 8) for weights and activations."""

    positional = ("bits",)
    bits: int = 8
    bias_bits: int = 16
    bias_window: int = 7

    def __post_init__(self):
        if not 2 <= self.bits <= 8:
            raise ValueError(f"bits={self.bits}: tvmq's integer kernels take 2..8-bit mantissas")
        if not 2 <= self.bias_bits <= 24:
            raise ValueError(f"bias_bits={self.bias_bits} must be in 2..24")

    @property
    def weight_bits(self) -> int:
        return self.bits

    @property
    def act_bits(self) -> int:
        return self.bits


def bias_exponent(bias, s_t: int, cfg: IntSEConfig) -> int:
    """IOIQ's bias rule: ``bias_bits`` mantissa, exponent within ``[s_t, s_t + window]``."""
    s_b = covering_exponent(float(bias.detach().abs().max()), cfg.bias_bits)
    return min(max(s_b, s_t), s_t + cfg.bias_window)


def range_bits(lo: int, hi: int) -> tuple[int, bool]:
    """(bits, relu) of ``saturate`` that gives exactly ``[lo, hi]``: signed N-bit, or
    unsigned N-bit = signed (N+1)-bit from 0."""
    if lo == 0:
        return hi.bit_length() + 1, True
    return hi.bit_length() + 1, False


@register_scheme
class IntSE(Scheme):
    name = "int-se"
    config = IntSEConfig
    lowerings = ("int8",)

    def weight_quantizer(self, cfg: IntSEConfig):
        return IntSEWeightQuantizer(cfg.bits)

    def act_quantizer(self, cfg: IntSEConfig, nonneg: bool):
        return IntSEQuantizer(cfg.bits)

    def fake_bias(self, cfg: IntSEConfig, bias, s_in, weight_quant):
        if s_in is None or weight_quant.last_exponent is None:
            return bias
        s_b = bias_exponent(bias, s_in + weight_quant.last_exponent, cfg)
        return fake_quantize(bias, s_b, cfg.bias_bits)

    def integer_layer(self, m, io, cfg: IntSEConfig, iw, b):
        """``m``: the QAT conv/linear; ``io``: its input/output exponents and ranges;
        ``iw``: its weights' integer form; ``b``: its float bias (BN folded)."""
        where = f"layer {io.name!r}"
        with torch.no_grad():
            s_w = int(iw.exponent[0])
            s_t = io.s_in + s_w  # exponent of the accumulator
            check_finite(b, f"{where} bias")
            s_b = bias_exponent(b, s_t, cfg)
            b_int = to_mantissa(b, s_b, cfg.bias_bits)
        bias_shift = s_b - s_t
        out_shift = shift_in_range(io.s_out - s_t, where, "requantization shift")
        check_accumulator(io.name, iw.weight, b_int << bias_shift, io.in_max, out_shift)
        bits, relu = range_bits(io.out_lo, io.out_hi)
        if hasattr(m, "groups"):
            return IntConv2d(iw.weight, b_int, m.stride, m.padding, m.dilation, m.groups,
                             bias_shift, out_shift, relu, bits)
        return IntLinear(iw.weight, b_int, bias_shift, out_shift, relu, bits)


__all__ = ["IntSE", "IntSEConfig", "range_bits", "check_exponent"]
