"""INT-SE quantizers: an N-bit integer mantissa and one power-of-two shared exponent per tensor.

Written once and used by QAT (fake quantization with a straight-through estimator), by
``convert`` (to produce the integer mantissas) and, through the exponents they freeze, by
the integer reference in ``tvmq.ops``.

A tensor ``x`` is represented as ``D * 2^s`` with ``D`` in the signed N-bit range. The
exponent is chosen by MSE over four candidates (ALGORITHMS.md §3): ``s0``, the smallest
exponent that covers ``max|x|`` without clipping, and ``s0-1 .. s0-3``, which clip outliers
but resolve the bulk better.

>>> x = torch.tensor([0.1, -0.5, 0.25, 3.0])
>>> choose_exponent(x, bits=8)          # 3.0 needs 2^-5 * 127 = 3.97 -> s0 = -5
-5
"""
from __future__ import annotations

import math

import torch
from torch import nn

CANDIDATES = 4  # the paper found four candidates better than one or two
EXPONENT_RANGE = (-24, 15)  # keeps every shift of the integer graph well inside int32


class ExponentRangeError(ValueError):
    """A tensor's shared exponent fell outside what the integer datapath supports."""


class NonFiniteError(ValueError):
    """A weight or an activation seen in calibration/training is NaN or infinite."""


def check_finite(x: torch.Tensor, where: str) -> None:
    """Refuse NaN/inf: one would give a meaningless exponent and a model that is silently
    wrong (its reference equally so, so parity would still pass)."""
    if not bool(torch.isfinite(x).all()):
        bad = (~torch.isfinite(x)).sum().item()
        raise NonFiniteError(f"{where}: {bad} of {x.numel()} values are NaN or infinite")


def round_half_up(x: torch.Tensor) -> torch.Tensor:
    """``floor(x + 1/2)``: the integer graph's rounding (``round_shift``), in float."""
    return torch.floor(x + 0.5)


def qrange(bits: int) -> tuple[int, int]:
    """Signed ``bits``-bit integer range."""
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def covering_exponent(absmax: float, bits: int) -> int:
    """Smallest ``s`` with ``absmax <= (2^(bits-1) - 1) * 2^s``."""
    qmax = qrange(bits)[1]
    if absmax <= 0 or not math.isfinite(absmax):
        return EXPONENT_RANGE[0]
    s = math.ceil(math.log2(absmax / qmax))
    # guard the float log against an off-by-one at exact powers of two
    while absmax > qmax * 2.0**s:
        s += 1
    while s > EXPONENT_RANGE[0] and absmax <= qmax * 2.0 ** (s - 1):
        s -= 1
    return s


def fake_quantize(x: torch.Tensor, exponent: int, bits: int, lo: int | None = None
                  ) -> torch.Tensor:
    """``clamp(round_half_up(x / 2^s)) * 2^s`` in float, with a straight-through gradient:
    the integer graph's requantization, so QAT trains the arithmetic it deploys."""
    qlo, hi = qrange(bits)
    scale = 2.0**exponent
    q = torch.clamp(round_half_up(x / scale), qlo if lo is None else lo, hi) * scale
    return x + (q - x).detach()


def to_mantissa(x: torch.Tensor, exponent: int, bits: int) -> torch.Tensor:
    """Integer mantissa ``D`` of ``x`` at ``exponent`` (round half up, as in training)."""
    lo, hi = qrange(bits)
    return torch.clamp(round_half_up(x.detach() / 2.0**exponent), lo, hi).to(torch.int32)


@torch.no_grad()
def choose_exponent(x: torch.Tensor, bits: int, candidates: int = CANDIDATES) -> int:
    """The MSE-best exponent among ``s0, s0-1, ..., s0-(candidates-1)``."""
    x = x.detach().float()
    s0 = covering_exponent(float(x.abs().max()), bits)
    best, best_err = s0, math.inf
    for s in range(s0, s0 - candidates, -1):
        err = float(((fake_quantize(x, s, bits) - x) ** 2).mean())
        if err < best_err:
            best, best_err = s, err
    return best


def check_exponent(exponent: int, where: str) -> int:
    lo, hi = EXPONENT_RANGE
    if not lo <= exponent <= hi:
        raise ExponentRangeError(
            f"{where}: shared exponent {exponent} is outside the supported range [{lo}, {hi}]"
        )
    return exponent


class IntSEQuantizer(nn.Module):
    """Activation quantizer: INT-SE with an MSE-chosen exponent per batch during training and
    the rounded running average of those exponents once frozen (eval, export).

    The running average is what IOIQ calls the optimal truncation point's statistics: the
    deploy graph uses a fixed exponent, so the model is evaluated with it too.
    """

    def __init__(self, bits: int = 8, momentum: float = 0.1, candidates: int = CANDIDATES):
        super().__init__()
        self.bits = bits
        self.momentum = momentum
        self.candidates = candidates  # exponent candidates s0 .. s0-(candidates-1) (MSE)
        self.nonneg = False  # set by prepare when the value follows a ReLU
        self.register_buffer("running_exponent", torch.tensor(float("nan")))
        self.last_exponent: int | None = None  # the exponent the latest forward used

    @property
    def exponent(self) -> int:
        if torch.isnan(self.running_exponent):
            raise RuntimeError("quantizer has seen no data: run tvmq.calibrate or train first")
        return int(torch.round(self.running_exponent))

    def qrange(self) -> tuple[int, int]:
        """Integer range of the deploy tensor: signed N-bit, from 0 after a ReLU."""
        lo, hi = qrange(self.bits)
        return (0 if self.nonneg else lo), hi

    def observe(self, x: torch.Tensor) -> int:
        check_finite(x, f"layer {getattr(self, 'layer', '?')!r} activations")
        s = choose_exponent(x, self.bits, self.candidates)
        if torch.isnan(self.running_exponent):
            self.running_exponent.fill_(s)
        else:
            self.running_exponent.lerp_(torch.tensor(float(s), dtype=self.running_exponent.dtype),
                                        self.momentum)
        return s

    def step(self, x: torch.Tensor) -> int:
        """The exponent for ``x``: observed (training) or frozen (eval)."""
        s = self.observe(x) if self.training else self.exponent
        self.last_exponent = s
        return s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fake_quantize(x, self.step(x), self.bits)

    def extra_repr(self) -> str:
        return f"bits={self.bits}"


class IntSEWeightQuantizer(nn.Module):
    """Weight quantizer: INT-SE, exponent chosen by MSE from the current weights every call."""

    def __init__(self, bits: int = 8, candidates: int = CANDIDATES):
        super().__init__()
        self.bits = bits
        self.candidates = candidates

    def exponent(self, w: torch.Tensor) -> int:
        return choose_exponent(w, self.bits, self.candidates)

    def integer(self, w: torch.Tensor, where: str):
        """Integer form for conversion: the mantissas and one exponent for every channel."""
        from tvmq.integer import IntegerWeights

        check_finite(w, f"{where} weight")
        s_w = check_exponent(self.exponent(w), f"{where} weight")
        return IntegerWeights(to_mantissa(w, s_w, self.bits),
                              torch.full((w.shape[0],), s_w, dtype=torch.int32))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        self.last_exponent = self.exponent(w)
        return fake_quantize(w, self.last_exponent, self.bits)

    def extra_repr(self) -> str:
        return f"bits={self.bits}"
