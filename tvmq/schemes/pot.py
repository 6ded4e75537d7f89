"""Power-of-two weights: APTQ and APQ:B (seed 001, ALGORITHMS.md §2).

APTQ (``aptq``), per output filter ``f``: ``W_f ≈ 2^{p_f}·B⁺ − 2^{n_f}·B⁻``, every weight one of
``{−2^{n_f}, 0, +2^{p_f}}``. APQ (``apq:B``, B = 3..5): every weight one of
``{0, ±2^{e_f}, ±2^{e_f−1}, …}`` with ``2^{B−1} − 1`` magnitudes per sign below the filter's
top exponent ``e_f``. Multiplications become shifts.

Fitting (refitted at every forward of QAT; straight-through gradient to the float weights):

* **Thresholds.** For a given set of levels the L2-optimal assignment of a weight is the
  nearest level, so each threshold is the midpoint between two neighbouring levels
  (``2^{p−1}`` between 0 and ``2^p``; ``1.5·2^k`` between ``2^k`` and ``2^{k+1}``). They adapt
  per filter and per sign with the exponents ("unfixed boundary thresholds"); searching the
  exponents with midpoint thresholds *is* the joint search over exponents and thresholds.
  Ties go to the smaller magnitude (``|w| = 2^{p−1}`` becomes 0).
* **Exponents.** APTQ: ``p_f`` and ``n_f`` independently (positive and negative weights of the
  filter), APQ: ``e_f``; each the L2-best of every candidate in the layer's window, vectorised
  over filters.
* **Layer window ("global").** All exponents of a layer lie in ``[E − 6, E]``: the integer
  weight is ``±2^k`` with ``k ∈ 0..6`` times ``2^{E−6}``, a signed int8 after one shared shift
  (our choice: 7 powers, not 8, because +2^7 = 128 does not fit int8). ``E`` is the L2-best of
  four candidates ``E0, E0−1, E0−2, E0−3`` (``E0``: the level nearest to the layer's max |w|,
  as INT-SE chooses its exponent). APQ's levels below ``2^{E−6}`` are not representable:
  with ``B = 4`` a filter already has 7 magnitudes, so ``apq:5`` (15 magnitudes) fits like
  ``apq:4`` in an int8 datapath -- only a wider weight would tell them apart.
* **Clipping report.** At convert, the fraction of a layer's weights whose value differs
  from the window-free per-filter fit is measured; above ``max_clip`` (default 5 %) a
  :class:`PotWindowWarning` names the layer.

Activations: any activation quantizer of the registry (``act=NAME``, ``act_bits=N``); INT-SE
8-bit by default. First and last weighted layers and the input keep 8-bit INT-SE by default
(``keep_8bit``, like the ternary schemes; ``Recipe(..., keep_8bit=())`` quantizes them too).

Deploy: ``tvmq::pot_conv2d`` holds the weights as sign + exponent codes (int8: 0 for a zero
weight, ``±(k + 1)`` for ``±2^k``); the lowerings fold them into int8 weights for the int8
kernels (``int8-fold``) or run them as shifts and adds (``shift-add``, ``relay_passes.lower_pot``).
Linear layers fold into ``tvmq::qlinear_pc``.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from tvmq import bodies, ops
from tvmq.integer import Geometry, IntegerWeights, IntLinearPerChannel, per_channel_requant
from tvmq.quantizers import EXPONENT_RANGE, ExponentRangeError
from tvmq.schemes import SCHEMES, Scheme, SchemeConfig, register_scheme

POWERS = 7  # integer weights ±2^k, k in 0..6: signed int8 after one shared shift
WINDOW_CANDIDATES = 4  # window tops E0, E0-1, E0-2, E0-3
FREE_RANGE = 24  # exponents below a filter's top the window-free fit looks at


class PotWindowWarning(UserWarning):
    """A layer's exponent window changes more than ``max_clip`` of its weights."""


# ----------------------------------------------------------------------------- fitting
def nearest_level(a: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """The exponent ``k ∈ [lo, hi]`` of the power of two nearest to ``a ≥ 0`` (float), or
    ``lo − 1`` where 0 is nearer (the "zero" code). Ties go to the smaller magnitude.
    ``lo``/``hi`` broadcast against ``a``.

    >>> nearest_level(torch.tensor([0.0, 0.25, 0.26, 0.75, 0.76, 9.0]), torch.tensor(-1), torch.tensor(1)).tolist()
    [-2, -2, -1, -1, 0, 1]
    """
    m, ex = torch.frexp(a)  # a = m·2^ex, m in [0.5, 1)
    k = torch.where(m > 0.75, ex, ex - 1).to(torch.int64)  # nearest power, exact compare
    k = torch.minimum(k, hi)
    # below the lowest level: 2^lo if a > 2^(lo−1), else zero
    low = (k < lo)
    up = a > torch.pow(2.0, (lo - 1).to(a.dtype))
    k = torch.where(low, torch.where(up, lo.expand_as(k), lo.expand_as(k) - 1), k)
    return torch.where(a > 0, k, lo.expand_as(k) - 1)


def _value(sign: torch.Tensor, k: torch.Tensor, lo: torch.Tensor) -> torch.Tensor:
    """``sign·2^k`` (0 where ``k < lo``), float64, exact."""
    v = torch.ldexp(torch.ones_like(sign), k.to(torch.int32))
    return torch.where(k >= lo, sign * v, torch.zeros_like(v))


def top_exponent(a: float) -> int:
    """The exponent of the power of two nearest to ``a > 0`` (ties down)."""
    t = torch.tensor([a], dtype=torch.float64)
    return int(nearest_level(t, torch.tensor(-1000), torch.tensor(1000))[0])


@dataclass
class PotFit:
    """A layer's fitted power-of-two weights.

    ``value`` the quantized weight (float, exact), ``k`` [same shape] the integer exponent
    ``log2|w_q| − e_low`` (−1 for a zero weight), ``e_low`` the layer's shared exponent,
    ``top`` the window's top exponent; ``exps`` the per-filter exponents ([O, 2]: APTQ
    (p, n); [O, 1]: APQ's e)."""

    value: torch.Tensor
    k: torch.Tensor
    e_low: int
    top: int
    exps: torch.Tensor

    @property
    def integer(self) -> torch.Tensor:
        """The int8 weight ``sign·2^k`` (0 where ``k = −1``)."""
        mag = torch.where(self.k >= 0, torch.ones_like(self.k) << self.k.clamp_min(0), 0)
        return (torch.sign(self.value).to(torch.int64) * mag).to(torch.int8)

    @property
    def codes(self) -> torch.Tensor:
        """Sign + exponent codes: 0 for zero, ``±(k + 1)``."""
        return (torch.sign(self.value).to(torch.int64) * (self.k + 1)).to(torch.int8)


@torch.no_grad()
def _fit_in_window(w: torch.Tensor, mags: int, lo_w: int, hi_w: int, split_signs: bool):
    """Per-filter L2 fit with every exponent in ``[lo_w, hi_w]``: (value, exps, error)."""
    f = w.shape[0]
    a, sign = w.abs(), torch.sign(w)
    cand = torch.arange(lo_w, hi_w + 1, dtype=torch.int64).view(-1, 1, 1)  # [C, 1, 1]
    lo = torch.clamp(cand - (mags - 1), min=lo_w)
    k = nearest_level(a.unsqueeze(0), lo, cand)  # [C, F, N]
    err = (_value(sign.unsqueeze(0).expand_as(k), k, lo) - w.unsqueeze(0)) ** 2
    groups = [w > 0, w < 0] if split_signs else [torch.ones_like(w, dtype=torch.bool)]
    value, exps, total = torch.zeros_like(w), [], torch.zeros(f, dtype=w.dtype)
    rows = torch.arange(f)
    for g in groups:
        e = (err * g).sum(2)  # [C, F]
        best = e.argmin(0)  # first (lowest exponent) on ties
        value += torch.where(g, _value(sign, k[best, rows], lo[best, 0]), 0)
        exps.append(cand[best, 0, 0])
        total += e[best, rows]
    return value, torch.stack(exps, 1), total


@torch.no_grad()
def fit_pot(w: torch.Tensor, mags: int, split_signs: bool, top: int | None = None) -> PotFit:
    """Fit a layer's weights ``w`` [O, ...]: ``mags`` magnitudes per sign below each filter's
    top exponent (APTQ: 1 with ``split_signs``), every exponent in a window of ``POWERS``
    consecutive powers whose top is searched (or ``top`` when given)."""
    flat = w.detach().flatten(1).double()
    amax = float(flat.abs().max()) if flat.numel() else 0.0
    if amax == 0.0:
        z = torch.zeros_like(flat)
        return PotFit(z.reshape(w.shape).to(w.dtype), torch.full(w.shape, -1, dtype=torch.int64),
                      0, POWERS - 1, torch.zeros((w.shape[0], 2 if split_signs else 1),
                                                 dtype=torch.int64))
    tops = [top] if top is not None else [top_exponent(amax) - i for i in range(WINDOW_CANDIDATES)]
    best = None
    for t in tops:
        value, exps, err = _fit_in_window(flat, mags, t - POWERS + 1, t, split_signs)
        if best is None or float(err.sum()) < best[0]:
            best = (float(err.sum()), t, value, exps)
    _, t, value, exps = best
    e_low = t - POWERS + 1
    k = torch.where(value != 0, torch.frexp(value.abs())[1].to(torch.int64) - 1 - e_low, -1)
    return PotFit(value.reshape(w.shape).to(w.dtype), k.reshape(w.shape), e_low, t, exps)


@torch.no_grad()
def window_clip_fraction(w: torch.Tensor, fit: PotFit, mags: int, split_signs: bool) -> float:
    """Fraction of the weights whose value under the layer window differs from the
    window-free fit (each filter's exponents searched over ``FREE_RANGE`` powers below the
    layer's top): what the shared window costs this layer."""
    flat = w.detach().flatten(1).double()
    if flat.numel() == 0 or float(flat.abs().max()) == 0:
        return 0.0
    t = top_exponent(float(flat.abs().max()))
    free, _, _ = _fit_in_window(flat, mags, t - FREE_RANGE, t + 1, split_signs)
    return float((free != fit.value.reshape(free.shape).double()).double().mean())


class PotWeightQuantizer(nn.Module):
    """APTQ (``mags=1``, signs apart) or APQ (``mags = 2^{B−1} − 1``) power-of-two weights,
    refitted at every call; straight-through gradient."""

    def __init__(self, mags: int, split_signs: bool, max_clip: float = 0.05):
        super().__init__()
        self.mags, self.split_signs, self.max_clip = mags, split_signs, max_clip
        self.last_fit: PotFit | None = None

    def fit(self, w: torch.Tensor) -> PotFit:
        return fit_pot(w, self.mags, self.split_signs)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        fit = self.fit(w)
        self.last_fit = fit
        return w + (fit.value.to(w.dtype) - w).detach()

    def integer(self, w: torch.Tensor, where: str) -> IntegerWeights:
        """int8 ``±2^k`` (k in 0..6) and one exponent ``e_low`` for every channel (the layer's
        window); ``terms`` holds the sign + exponent codes."""
        fit = self.fit(w)
        lo, hi = EXPONENT_RANGE
        if not lo <= fit.e_low <= hi:
            raise ExponentRangeError(f"{where} weight: the window's exponent {fit.e_low} is"
                                     f" outside the supported range [{lo}, {hi}]")
        clipped = window_clip_fraction(w, fit, self.mags, self.split_signs)
        if clipped > self.max_clip:
            warnings.warn(PotWindowWarning(
                f"{where}: its exponent window 2^{fit.e_low}..2^{fit.top} changes"
                f" {100 * clipped:.1f} % of its weights against a per-filter fit (more than"
                f" max_clip = {100 * self.max_clip:.1f} %): its filters' magnitudes spread over"
                f" more than {POWERS} powers of two; keep it 8-bit (recipe override) or accept"
                f" the loss"), stacklevel=2)
        exponent = torch.full((w.shape[0],), fit.e_low, dtype=torch.int32)
        return IntegerWeights(fit.integer, exponent, fit.codes.unsqueeze(0), None)

    def extra_repr(self) -> str:
        return f"mags={self.mags}, split_signs={self.split_signs}, window={POWERS}"


def decode(codes: torch.Tensor) -> torch.Tensor:
    """Sign + exponent codes -> the int8 weight ``sign·2^(|c| − 1)`` (0 for code 0)."""
    c = codes.to(torch.int32)
    mag = torch.where(c != 0, torch.ones_like(c) << (c.abs() - 1).clamp_min(0), 0)
    return (torch.sign(c) * mag).to(torch.int8)


# ----------------------------------------------------------------------------- activations
# ----------------------------------------------------------------------------- deploy op
@torch.library.custom_op("tvmq::pot_conv2d", mutates_args=())
def pot_conv2d(x: torch.Tensor, codes: torch.Tensor, bias: torch.Tensor, shift: torch.Tensor,
               stride: list[int], padding: list[int], dilation: list[int], groups: int,
               lo: int, hi: int) -> torch.Tensor:
    """Power-of-two conv: ``qconv2d_pc(x, decode(codes), bias, shift, ...)``.

    ``codes`` [O, C/g, KH, KW] int8: 0 for a zero weight, ``±(k + 1)`` for ``±2^k`` with
    ``k ∈ 0..6``; ``bias`` [O] int32 at the accumulator's exponent; ``shift`` [O] int32."""
    if codes.numel() and int(codes.abs().max()) > POWERS:
        raise ValueError(f"pot_conv2d: codes must lie in [-{POWERS}, {POWERS}]")
    return ops.qconv2d_pc(x, decode(codes), bias, shift, stride, padding, dilation, groups,
                          lo, hi)


@pot_conv2d.register_fake
def _(x, codes, bias, shift, stride, padding, dilation, groups, lo, hi):
    return ops.conv_output(x, codes.shape[0], codes.shape[-2:], stride, padding, dilation)


@bodies.register_body("pot_conv2d")
def _body_pot_conv2d(bb, x, codes, bias, shift, stride, padding, dilation, groups, lo, hi):
    R = bodies.R
    c = bb.emit(R.astype(codes, "int32"))
    zero, one = relax_const(0), relax_const(1)
    exps = bb.emit(R.maximum(R.subtract(R.abs(c), one), zero))
    mag = bb.emit(R.left_shift(R.full_like(c, one), exps))
    signed = bb.emit(R.where(R.less(c, zero), R.negative(mag), mag))
    weight = bb.emit(R.astype(R.where(R.equal(c, zero), R.zeros_like(c), signed), "int8"))
    return bodies.body_qconv2d_pc(bb, x, weight, bias, shift, stride, padding, dilation,
                                  groups, lo, hi)


def relax_const(v: int):
    from tvm import relax

    return relax.const(v, "int32")


class IntPotConv2d(nn.Module):
    """Deploy form of a power-of-two conv (``tvmq::pot_conv2d``)."""

    def __init__(self, codes, bias, shift, geometry: Geometry, lo: int, hi: int):
        super().__init__()
        self.register_buffer("codes", codes.to(torch.int8))
        self.register_buffer("bias", bias.to(torch.int32))
        self.register_buffer("shift", shift.to(torch.int32))
        self.geometry, self.lo, self.hi = geometry, lo, hi

    def forward(self, x):
        g = self.geometry
        return torch.ops.tvmq.pot_conv2d(x, self.codes, self.bias, self.shift, g.stride,
                                         g.padding, g.dilation, g.groups, self.lo, self.hi)


# ----------------------------------------------------------------------------- schemes
def _act_config(name: str, bits: int) -> SchemeConfig:
    scheme = SCHEMES.get(name)
    if scheme is None or isinstance(scheme, Pot):
        raise ValueError(f"act={name!r} must be a registered scheme with its own activation"
                         f" quantizer (one of {', '.join(n for n, s in SCHEMES.items() if not isinstance(s, Pot))})")
    fields = {f for f in scheme.config.__dataclass_fields__}
    key = "bits" if "bits" in fields else "act_bits" if "act_bits" in fields else None
    try:
        return scheme.config(**({key: bits} if key else {}))
    except ValueError as err:
        raise ValueError(f"act={name}: {err} (give act_bits=N in its range)") from None


@dataclass(frozen=True)
class AptqConfig(SchemeConfig):
    """``aptq[:act=NAME,act_bits=N,max_clip=F]``: power-of-two ternary weights per filter
    (±2^p, ±2^n, 0); activations by scheme NAME (INT-SE 8-bit by default), a warning above max_clip of a layer's weights changed by the window."""

    act: str = "int-se"
    act_bits: int = 8
    max_clip: float = 0.05

    mags: ClassVar[int] = 1
    split_signs: ClassVar[bool] = True

    def __post_init__(self):
        if not 0.0 <= self.max_clip <= 1.0:
            raise ValueError(f"max_clip={self.max_clip} must be a fraction in [0, 1]")
        _act_config(self.act, self.act_bits)  # raises the activation scheme's own range error

    @property
    def act_config(self) -> SchemeConfig:
        return _act_config(self.act, self.act_bits)

    @property
    def weight_bits(self) -> int:
        return 2  # three values per weight (+ two exponents per filter)


@dataclass(frozen=True)
class ApqConfig(AptqConfig):
    """``apq:B[,act=NAME,act_bits=N,max_clip=F]``: B-bit (3..5) power-of-two weights, 2^(B-1)-1
    magnitudes per sign below a per-filter top exponent."""

    positional = ("bits",)
    always_shown = ("bits",)
    bits: int = 4
    act: str = "int-se"
    act_bits: int = 8
    max_clip: float = 0.05

    split_signs: ClassVar[bool] = False

    def __post_init__(self):
        if not 3 <= self.bits <= 5:
            raise ValueError(f"B={self.bits} must be in 3..5 (B = 2 is 'aptq'; more than 5 bits"
                             f" cannot be told apart in an int8 window of {POWERS} powers)")
        super().__post_init__()

    @property
    def mags(self) -> int:  # type: ignore[override]
        return (1 << (self.bits - 1)) - 1

    @property
    def weight_bits(self) -> int:
        return self.bits


@register_scheme
class Pot(Scheme):
    name = "aptq"
    config = AptqConfig
    lowerings = ("int8-fold", "shift-add")
    keep_8bit = ("input", "first", "last")

    def weight_quantizer(self, cfg):
        return PotWeightQuantizer(cfg.mags, cfg.split_signs, cfg.max_clip)

    def act_quantizer(self, cfg, nonneg: bool):
        act = cfg.act_config
        return act.scheme.act_quantizer(act, nonneg)

    def fake_bias(self, cfg, bias, s_in, weight_quant):
        """Rounded half up onto the accumulator grid ``2^(s_in + e_low)`` (the layer's
        window bottom), as ``per_channel_requant`` rounds it (main's QAT hook)."""
        fit = getattr(weight_quant, "last_fit", None)
        if s_in is None or fit is None:
            return bias
        step = 2.0 ** (s_in + fit.e_low)
        return bias + (torch.floor(bias / step + 0.5) * step - bias).detach()

    def integer_layer(self, m, io, cfg, iw, b):
        bias, shift = per_channel_requant(io.name, iw, b, io.s_in, io.s_out, io.in_max)
        if not hasattr(m, "groups"):
            return IntLinearPerChannel(iw.weight, bias, shift, io.out_lo, io.out_hi)
        return IntPotConv2d(iw.terms[0], bias, shift, Geometry.of(m), io.out_lo, io.out_hi)

    def describe(self, cfg) -> str:
        if cfg.split_signs:
            w = "weights ±2^p/±2^n/0 per filter (p, n and thresholds L2-fitted per sign)"
        else:
            w = (f"weights 0/±2^e..±2^(e-{min(cfg.mags, POWERS) - 1}) per filter"
                 f" ({cfg.mags} magnitudes per sign, top e L2-fitted)")
        return (f"{cfg.spec}: {w}, every exponent in a layer window of {POWERS} powers (int8"
                f" after one shift); activations {cfg.act_config.spec}"
                + (" (INT-SE 8-bit, the default)" if cfg.act_config.spec == "int-se" else ""))


@register_scheme
class Apq(Pot):
    name = "apq"
    config = ApqConfig
