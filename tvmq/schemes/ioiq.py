"""IOIQ: integer-only incremental quantization (seed 002, ALGORITHMS.md §3).

The data format is INT-SE (``tvmq.schemes.int_se``): N-bit weights, activations and 16-bit
biases, one power-of-two shared exponent per tensor chosen by MSE over ``candidates``
exponents (``s0 .. s0-(candidates-1)``, four by default), the bias exponent within
``[s_t, s_t + 7]``, one requantization shift per layer. IOIQ adds *incremental
quantization* of the weights: a mask ``M`` marks the weights already quantized and the layer
computes with ``M ⊙ Q(W) + (1 − M) ⊙ W``; the quantized share grows stage by stage
(``stages``, 50/75/87.5/100 % by default), weights of largest ``|w|`` first
(``order=pruning``) or in a random order (``order=random``). Quantized weights stay
trainable (straight-through gradient), ``Q`` is re-evaluated at every step.

``tvmq.train`` drives the stages: every weight quantizer with ``stages``/``set_stage``
(here :class:`IOIQWeightQuantizer`) is told the stage of each epoch, and the progress bar
shows the stage and the quantized share. Batch norm learns, then locks (``tvmq.train``).

Optimal truncation point: ``P = s_out − (s_in + s_w)`` from the running averages of the
input and output exponents gathered in training -- :class:`~tvmq.quantizers.IntSEQuantizer`
keeps an exponential moving average of each batch's MSE exponent and rounds it once frozen
(eval, convert), and ``int_se.integer_layer`` uses ``out_shift = s_out − s_t``. The averages
are rounded to integers before ``P`` is formed (the deploy grid needs integer exponents), and
the model is evaluated with the same rounded exponents, so QAT equals deploy.

Deploy: exactly INT-SE (``tvmq::qconv2d`` / ``tvmq::qlinear`` on the int8 kernels). A model
whose masks are not all 100 % is refused at convert, naming the layer.

Specs: ``ioiq`` (8 bit), ``ioiq:6``, ``ioiq:8,order=random``, ``ioiq:8,candidates=1``,
``ioiq:8,stages=100`` (all at once), ``ioiq:8,stages=25/50/100``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tvmq.quantizers import IntSEQuantizer, IntSEWeightQuantizer, choose_exponent, fake_quantize
from tvmq.schemes import register_scheme
from tvmq.schemes.int_se import IntSE, IntSEConfig

ORDERS = ("pruning", "random")


class PartiallyQuantizedError(ValueError):
    """A layer still holds float weights (IOIQ's mask is not 100 %) at convert."""


def parse_stages(text: str) -> tuple[float, ...]:
    """``"50/75/87.5/100"`` -> ``(0.5, 0.75, 0.875, 1.0)``; increasing, ending at 100."""
    try:
        pct = [float(p) for p in str(text).split("/") if p.strip()]
    except ValueError:
        raise ValueError(f"stages={text!r}: percentages separated by '/', e.g. 50/75/87.5/100"
                         ) from None
    if not pct or pct[-1] != 100 or any(not 0 < p <= 100 for p in pct) or any(
            b <= a for a, b in zip(pct, pct[1:])):
        raise ValueError(f"stages={text!r}: increasing percentages in (0, 100] ending at 100")
    return tuple(p / 100 for p in pct)


@dataclass(frozen=True)
class IOIQConfig(IntSEConfig):
    """``ioiq[:BITS][,order=pruning|random][,candidates=1..4][,stages=50/75/87.5/100]``:
    INT-SE data (BITS 4..8, default 8) with incrementally quantized weights."""

    positional = ("bits",)
    bits: int = 8
    order: str = "pruning"
    candidates: int = 4
    stages: str = "50/75/87.5/100"

    def __post_init__(self):
        super().__post_init__()
        if not 4 <= self.bits <= 8:
            raise ValueError(f"bits={self.bits}: IOIQ takes 4..8-bit INT-SE data")
        if self.order not in ORDERS:
            raise ValueError(f"order={self.order!r} must be one of {', '.join(ORDERS)}")
        if not 1 <= self.candidates <= 4:
            raise ValueError(f"candidates={self.candidates} must be 1..4 (s0 .. s0-3)")
        parse_stages(self.stages)


class IOIQWeightQuantizer(IntSEWeightQuantizer):
    """INT-SE weights, quantized incrementally: ``where(M, Q(W), W)``.

    ``stages`` are the quantized fractions of the schedule; :meth:`set_stage` sets the
    current one and the mask grows to it at the next forward (it only grows: weights once
    quantized stay quantized, and trainable). A fresh quantizer is fully quantized (fraction
    1), so a model that is only calibrated, never trained, is plain INT-SE.
    """

    def __init__(self, bits: int = 8, candidates: int = 4, order: str = "pruning",
                 stages=(0.5, 0.75, 0.875, 1.0), seed: int = 0):
        super().__init__(bits, candidates)
        self.order, self.stages, self.seed = order, tuple(stages), seed
        self.register_buffer("fraction", torch.tensor(1.0))
        self.register_buffer("mask", torch.zeros(0, dtype=torch.bool))
        self.last_exponent: int | None = None
        self.layer = "?"

    @property
    def quantized_fraction(self) -> float:
        """Share of the weights quantized now (1.0 when the mask is full)."""
        if float(self.fraction) >= 1.0:
            return 1.0
        return float(self.mask.float().mean()) if self.mask.numel() else 0.0

    def set_stage(self, fraction: float) -> None:
        """Quantize ``fraction`` of the weights from the next forward on; a smaller fraction
        than the current one starts a new schedule (the mask is cleared)."""
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"fraction {fraction} not in [0, 1]")
        if fraction < float(self.fraction):
            self.mask = torch.zeros(0, dtype=torch.bool, device=self.fraction.device)
        self.fraction.fill_(fraction)

    @torch.no_grad()
    def _grow(self, w: torch.Tensor) -> None:
        """Extend the mask to ``round(fraction · numel)`` weights: the largest ``|w|`` among
        those not yet quantized (pruning) or random ones (random, seeded per layer)."""
        if self.mask.shape != w.shape:
            self.mask = torch.zeros_like(w, dtype=torch.bool)
        flat = self.mask.view(-1)
        want = int(round(float(self.fraction) * flat.numel()))
        need = want - int(flat.sum())
        if need <= 0:
            return
        if self.order == "pruning":
            score = w.detach().abs().flatten().float()
        else:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + int(flat.sum()))
            score = torch.rand(flat.numel(), generator=gen).to(w.device)
        score = score.masked_fill(flat, -math.inf)
        flat[score.topk(need).indices] = True

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        self.last_exponent = choose_exponent(w, self.bits, self.candidates)
        q = fake_quantize(w, self.last_exponent, self.bits)
        if float(self.fraction) >= 1.0:
            return q
        self._grow(w)
        return torch.where(self.mask, q, w)

    def integer(self, w: torch.Tensor, where: str):
        f = self.quantized_fraction
        if f < 1.0:
            raise PartiallyQuantizedError(
                f"{where}: only {100 * f:.1f}% of its weights are quantized (IOIQ stage"
                f" {float(self.fraction):.3g} of the schedule {self.stages}); an integer model"
                " needs 100%: finish the schedule (tvmq.train runs every stage) or call"
                " set_stage(1.0) on its weight quantizer")
        return super().integer(w, where)

    def extra_repr(self) -> str:
        return (f"bits={self.bits}, candidates={self.candidates}, order={self.order},"
                f" stages={self.stages}, quantized={100 * self.quantized_fraction:.1f}%")


@register_scheme
class IOIQ(IntSE):
    name = "ioiq"
    config = IOIQConfig

    def weight_quantizer(self, cfg: IOIQConfig):
        return IOIQWeightQuantizer(cfg.bits, cfg.candidates, cfg.order, parse_stages(cfg.stages))

    def act_quantizer(self, cfg: IOIQConfig, nonneg: bool):
        return IntSEQuantizer(cfg.bits, candidates=cfg.candidates)

    def integer_layer(self, m, io, cfg: IOIQConfig, iw, b):
        # the mask check (PartiallyQuantizedError) happens in weight_quant.integer
        return super().integer_layer(m, io, cfg, iw, b)

    def describe(self, cfg: IOIQConfig) -> str:
        stages = "/".join(f"{100 * f:g}" for f in parse_stages(cfg.stages))
        return (f"{cfg.spec}: INT-SE {cfg.bits}-bit, exponent by MSE over {cfg.candidates}"
                f" candidate(s); weights quantized incrementally ({stages} %, {cfg.order}"
                " order); BN learn then lock")


def weight_quantizers(qat) -> list:
    """The staged weight quantizers of a QAT model (what ``tvmq.train`` drives)."""
    return [m for m in qat.modules() if isinstance(m, IOIQWeightQuantizer)]


__all__ = ["IOIQ", "IOIQConfig", "IOIQWeightQuantizer", "PartiallyQuantizedError",
           "parse_stages", "weight_quantizers"]
