"""Combined ternary weights with box-plot activations (seed 000, ALGORITHMS.md §1).

Weights, per output filter: ``W ≈ Σ_{i=1..K} α_i T_i`` with ``T_i ∈ {-1, 0, +1}``, fitted by
the greedy residual rule (``Δ_i = 0.7·mean|R_i|``, ``α_i`` = mean of ``|R_i|`` where
``T_i ≠ 0``, ``R_{i+1} = R_i − α_i T_i``), refitted at every step of QAT, each ``α_i``
rounded to a power of two during training already, so QAT trains exactly the weights the
deploy model multiplies. K = 1 is ``ternary``, K = 2..3 ``combined-ternary:K``.
Straight-through gradient to the float shadow weights.

Activations after a ReLU: unsigned N-bit (``act_bits``, 2 by default, 2..7), clipped at the
box plot's upper whisker ``Q3 + 1.5·(Q3 − Q1)`` (quartiles by EMA in training, frozen at
convert), step ``2^round(log2(clip / (2^N − 1)))``: a power of two, so requantization is a
shift. Unsigned means four levels at 2 bits (0..3), not the two a signed 2-bit value keeps
after a ReLU. A value that does not follow a ReLU (a residual branch before its add) is
signed and keeps 8-bit INT-SE (our choice: the box plot clips one tail only).

Deploy: ``tvmq::ternary_conv2d`` keeps the terms (``[K, O, C/g, KH, KW]``) and their shifts
(``α_i = 2^(e_min + term_shift[i])`` per filter), so a lowering may fold them into int8
weights for the int8 kernels or run them bit-serially (``relay_passes``); linear layers fold
into ``tvmq::qlinear_pc``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from tvmq import bodies, ops
from tvmq.integer import (Geometry, IntegerWeights, IntLinearPerChannel, per_channel_requant)
from tvmq.quantizers import (EXPONENT_RANGE, ExponentRangeError, IntSEQuantizer, check_finite,
                             round_half_up)
from tvmq.schemes import Scheme, SchemeConfig, register_scheme

THRESHOLD = 0.7  # Δ = 0.7·mean|R| (TWN)
SPREAD = 5  # term exponents of a filter lie within 2^5 of its first: Σ 2^d·T fits int8 (≤ 96)
MAX_QUANTILE_ELEMENTS = 1 << 20  # torch.quantile's input is subsampled beyond this


class ZeroSpreadError(ValueError):
    """An activation whose box plot has no spread: all values seen were zero."""


# ----------------------------------------------------------------------------- weights
@torch.no_grad()
def fit_terms(w: torch.Tensor, k: int, threshold: float = THRESHOLD):
    """Greedy residual fit of ``k`` ternary terms per output filter.

    Returns ``(terms [K, O, ...] float in {-1, 0, 1}, exps [K, O] int64, active [K, O] bool)``
    with ``α = 2^exps`` where active. A term whose exponent falls more than ``SPREAD`` below
    the filter's first is dropped (it would not fit the int8 fold), and no later term may
    exceed the first's exponent (clamped), so ``|Σ 2^(e_i − e_min) T_i| ≤ K·2^SPREAD``.

    >>> t, e, a = fit_terms(torch.tensor([[1.0, -1.0, 0.1, 0.0]]), 1)
    >>> t[0].tolist(), e.tolist()
    ([[1.0, -1.0, 0.0, 0.0]], [[0]])
    """
    r = w.detach().flatten(1).double()
    terms = torch.zeros((k, *r.shape), dtype=r.dtype)
    exps = torch.zeros((k, r.shape[0]), dtype=torch.int64)
    active = torch.zeros((k, r.shape[0]), dtype=torch.bool)
    for i in range(k):
        a = r.abs()
        t = torch.sign(r) * (a > threshold * a.mean(1, keepdim=True))
        count = t.abs().sum(1)
        alpha = (a * t.abs()).sum(1) / count.clamp_min(1)
        ok = (count > 0) & (alpha > 0)
        e = torch.round(torch.log2(torch.where(ok, alpha, torch.ones_like(alpha)))).long()
        if i > 0:
            e = torch.minimum(e, exps[0])
            ok &= active[0] & (e >= exps[0] - SPREAD)
        t = t * ok[:, None]
        terms[i], exps[i], active[i] = t, torch.where(ok, e, 0), ok
        r = r - torch.where(ok, torch.pow(2.0, e.double()), 0.0)[:, None] * t
    return terms.reshape(k, *w.shape).to(w.dtype), exps, active


def ternary_value(w: torch.Tensor, k: int, fit=None) -> torch.Tensor:
    """``Σ α_i T_i`` with power-of-two ``α_i`` (float, exact)."""
    terms, exps, active = fit if fit is not None else fit_terms(w, k)
    alpha = torch.where(active, torch.pow(2.0, exps.double()), 0.0).to(w.dtype)
    return (terms * alpha.view(k, -1, *[1] * (w.dim() - 1))).sum(0)


def filter_exponents(exps: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """Each filter's ``e_min`` (the exponent of its integer weight); an all-zero filter
    takes the layer's median (its weights are zero; only its shift must stay in range)."""
    big = torch.iinfo(torch.int64).max
    e_min = torch.where(active, exps, big).min(0).values
    alive = active.any(0)
    if not alive.any():
        return torch.zeros_like(e_min)
    return torch.where(alive, e_min, e_min[alive].median())


class TernaryWeightQuantizer(nn.Module):
    """K-term ternary weights with power-of-two α per filter; straight-through gradient."""

    def __init__(self, terms: int):
        super().__init__()
        self.terms = terms
        self.last_exponents: torch.Tensor | None = None  # e_min per filter, latest forward

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        fit = fit_terms(w, self.terms)
        self.last_exponents = filter_exponents(fit[1], fit[2])
        return w + (ternary_value(w, self.terms, fit) - w).detach()

    def integer(self, w: torch.Tensor, where: str) -> IntegerWeights:
        """Terms as int8, ``term_shift = e_i − e_min`` per filter, the folded int8 weight and
        ``e_min`` as each channel's exponent. An all-zero filter takes the layer's median
        exponent (its weights are zero; only its shift must stay in range)."""
        check_finite(w, f"{where} weight")
        terms, exps, active = fit_terms(w, self.terms)
        e_min = filter_exponents(exps, active)
        lo, hi = EXPONENT_RANGE
        bad = ((e_min < lo) | (e_min > hi)).nonzero()
        if len(bad):
            f = int(bad[0])
            raise ExponentRangeError(f"{where} weight: filter {f}'s exponent {int(e_min[f])}"
                                     f" is outside the supported range [{lo}, {hi}]")
        shift = torch.where(active, exps - e_min, 0)
        t_int = terms.to(torch.int8)
        view = (self.terms, -1, *[1] * (w.dim() - 1))
        folded = (t_int.to(torch.int32) << shift.view(view).to(torch.int32)).sum(0)
        return IntegerWeights(folded.to(torch.int8), e_min.to(torch.int32), t_int,
                              shift.to(torch.int32))

    def extra_repr(self) -> str:
        return f"terms={self.terms}"


# ----------------------------------------------------------------------------- activations
class BoxPlotQuantizer(nn.Module):
    """Unsigned N-bit activations clipped at the box plot's upper whisker.

    Training: the quartiles Q1, Q3 of each batch update an exponential moving average; the
    step is ``2^round(log2(clip / (2^N − 1)))`` with ``clip = Q3 + 1.5·(Q3 − Q1)``. Eval and
    export use the frozen averages. ``x_q = clamp(floor(x / step + 1/2), 0, 2^N − 1)·step``
    (round half up, as the integer graph rounds), straight-through gradient inside the clip
    and none above it (the clipped STE of DoReFa/PACT: a clipped value does not move).

    A tensor with no spread at all (every value seen was 0, so clip = 0) has no defined
    step: :attr:`exponent` raises :class:`ZeroSpreadError` naming the layer at convert.
    A constant non-zero tensor is fine (clip = the constant).
    """

    def __init__(self, bits: int = 2, momentum: float = 0.1):
        super().__init__()
        self.bits, self.momentum = bits, momentum
        self.nonneg = True
        self.register_buffer("quartiles", torch.full((2,), float("nan")))
        self.last_exponent: int | None = None
        self.layer = "?"  # for error messages; set by prepare

    @property
    def levels(self) -> int:
        return (1 << self.bits) - 1

    def qrange(self) -> tuple[int, int]:
        return 0, self.levels

    @property
    def clip(self) -> float:
        q1, q3 = self.quartiles.tolist()
        return q3 + 1.5 * (q3 - q1)

    def _exponent(self, clip: float) -> int:
        if math.isnan(clip):
            raise RuntimeError(f"layer {self.layer!r}: the box-plot quantizer has seen no data:"
                               " run tvmq.calibrate or train first")
        if clip <= 0:
            raise ZeroSpreadError(
                f"layer {self.layer!r}: its activations were all zero on the data seen"
                " (box plot Q1 = Q3 = 0): no clip value; check the layer or the calibration data")
        return int(round(math.log2(clip / self.levels)))

    @property
    def exponent(self) -> int:
        return self._exponent(self.clip)

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        check_finite(x, f"layer {self.layer!r} activations")
        flat = x.detach().flatten().float()
        if flat.numel() > MAX_QUANTILE_ELEMENTS:
            flat = flat[:: flat.numel() // MAX_QUANTILE_ELEMENTS + 1]
        q = torch.quantile(flat, torch.tensor([0.25, 0.75]))
        if torch.isnan(self.quartiles).any():
            self.quartiles.copy_(q)
        else:
            self.quartiles.lerp_(q, self.momentum)

    def step(self, x: torch.Tensor) -> int | None:
        """The exponent for ``x``: observed (training) or frozen (eval); None while training
        has seen only zeros (the value then passes through unquantized)."""
        if self.training:
            self.observe(x)
        clip = self.clip
        if clip <= 0 and self.training:
            return None
        self.last_exponent = self._exponent(clip)
        return self.last_exponent

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = self.step(x)
        if e is None:
            return x
        step = 2.0 ** e
        q = torch.clamp(round_half_up(x / step), 0, self.levels) * step
        # clipped straight-through: no gradient through values the clip cuts off
        x = torch.clamp(x, max=self.levels * step)
        return x + (q - x).detach()

    def extra_repr(self) -> str:
        return f"bits={self.bits}, unsigned"


# ----------------------------------------------------------------------------- deploy op
@torch.library.custom_op("tvmq::ternary_conv2d", mutates_args=())
def ternary_conv2d(x: torch.Tensor, terms: torch.Tensor, term_shift: torch.Tensor,
                   bias: torch.Tensor, shift: torch.Tensor, stride: list[int],
                   padding: list[int], dilation: list[int], groups: int, lo: int, hi: int,
                   in_bits: int) -> torch.Tensor:
    """Combined-ternary conv: ``qconv2d_pc(x, Σ_i terms[i] << term_shift[i], ...)``.

    ``terms`` [K, O, C/g, KH, KW] int8 in {-1, 0, 1}; ``term_shift`` [K, O] int32 ≥ 0;
    ``in_bits``: the input is known to lie in ``[0, 2^in_bits − 1]`` (0: signed) -- what a
    bit-serial kernel needs to know, ignored by the arithmetic."""
    view = (terms.shape[0], -1, 1, 1, 1)
    weight = (terms.to(torch.int32) << term_shift.view(view)).sum(0).to(torch.int8)
    return ops.qconv2d_pc(x, weight, bias, shift, stride, padding, dilation, groups, lo, hi)


@ternary_conv2d.register_fake
def _(x, terms, term_shift, bias, shift, stride, padding, dilation, groups, lo, hi, in_bits):
    return ops.conv_output(x, terms.shape[1], terms.shape[-2:], stride, padding, dilation)


@bodies.register_body("ternary_conv2d")
def _body_ternary_conv2d(bb, x, terms, term_shift, bias, shift, stride, padding, dilation,
                         groups, lo, hi, in_bits):
    R = bodies.R
    k = int(terms.ty.shape[0])
    shifted = bb.emit(R.left_shift(R.astype(terms, "int32"),
                                   R.reshape(term_shift, (k, -1, 1, 1, 1))))
    weight = bb.emit(R.astype(R.sum(shifted, axis=[0]), "int8"))
    return bodies.body_qconv2d_pc(bb, x, weight, bias, shift, stride, padding, dilation,
                                  groups, lo, hi)


class IntTernaryConv2d(nn.Module):
    """Deploy form of a combined-ternary conv (``tvmq::ternary_conv2d``)."""

    def __init__(self, iw: IntegerWeights, bias, shift, geometry: Geometry, lo, hi, in_bits):
        super().__init__()
        self.register_buffer("terms", iw.terms)
        self.register_buffer("term_shift", iw.term_shift)
        self.register_buffer("bias", bias.to(torch.int32))
        self.register_buffer("shift", shift.to(torch.int32))
        self.geometry, self.lo, self.hi, self.in_bits = geometry, lo, hi, in_bits

    def forward(self, x):
        g = self.geometry
        return torch.ops.tvmq.ternary_conv2d(x, self.terms, self.term_shift, self.bias,
                                             self.shift, g.stride, g.padding, g.dilation,
                                             g.groups, self.lo, self.hi, self.in_bits)


# ----------------------------------------------------------------------------- schemes
@dataclass(frozen=True)
class TernaryConfig(SchemeConfig):
    """``ternary[:act_bits=N]``: one ternary term, N-bit box-plot activations (2..7)."""

    act_bits: int = 2

    def __post_init__(self):
        if not 2 <= self.act_bits <= 7:
            raise ValueError(f"act_bits={self.act_bits} must be in 2..7 (unsigned activations"
                             " are stored in int8: 0..2^N - 1)")

    @property
    def terms(self) -> int:
        return 1

    @property
    def weight_bits(self) -> int:
        return 2 * self.terms  # a (+1 mask, -1 mask) plane pair per term


@dataclass(frozen=True)
class CombinedTernaryConfig(TernaryConfig):
    """``combined-ternary:K[,act_bits=N]``: K = 2 or 3 ternary terms."""

    positional = ("terms",)
    always_shown = ("terms",)
    terms: int = 2
    act_bits: int = 2

    def __post_init__(self):
        super().__post_init__()
        if not 2 <= self.terms <= 3:
            raise ValueError(f"K={self.terms} must be 2 or 3 (K = 1 is 'ternary')")


@register_scheme
class Ternary(Scheme):
    name = "ternary"
    config = TernaryConfig
    lowerings = ("int8-fold", "bitserial")
    keep_8bit = ("input", "first", "last")

    def weight_quantizer(self, cfg):
        return TernaryWeightQuantizer(cfg.terms)

    def act_quantizer(self, cfg, nonneg: bool):
        return BoxPlotQuantizer(cfg.act_bits) if nonneg else IntSEQuantizer(8)

    def fake_bias(self, cfg, bias, s_in, weight_quant):
        """Rounded half up onto each channel's accumulator grid ``2^(s_in + e_min)``."""
        if s_in is None or weight_quant.last_exponents is None:
            return bias
        step = torch.pow(2.0, (s_in + weight_quant.last_exponents).double()).to(bias.dtype)
        return bias + (round_half_up(bias / step) * step - bias).detach()

    def integer_layer(self, m, io, cfg, iw, b):
        bias, shift = per_channel_requant(io.name, iw, b, io.s_in, io.s_out, io.in_max)
        if not hasattr(m, "groups"):
            return IntLinearPerChannel(iw.weight, bias, shift, io.out_lo, io.out_hi)
        in_bits = io.in_hi.bit_length() if io.in_lo == 0 else 0
        return IntTernaryConv2d(iw, bias, shift, Geometry.of(m), io.out_lo, io.out_hi, in_bits)

    def describe(self, cfg) -> str:
        return (f"{cfg.spec}: {cfg.terms} ternary term(s) per filter, power-of-two α;"
                f" {cfg.act_bits}-bit unsigned box-plot activations after ReLU")


@register_scheme
class CombinedTernary(Ternary):
    name = "combined-ternary"
    config = CombinedTernaryConfig
