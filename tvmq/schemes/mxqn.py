"""MXQN: mixed fixed-point / logarithmic post-training quantization (seed 004, ALGORITHMS §4).

No retraining: ``qat = tvmq.prepare(model, "mxqn")``, ``tvmq.calibrate(qat, batches)``,
``tvmq.convert(qat)``. Weights are INT-SE 8 (fixed point, one exponent per tensor, MSE over
four candidates). Each layer's output is quantized either fixed point (INT-SE, ``BITS``
bits) or logarithmically, whichever has the higher SQNR
``10·log10(‖x‖² / ‖x − Q(x)‖²)`` on the calibration data (a sample of every batch seen).
Both SQNRs, the choice and why are kept on the quantizer (:func:`layer_choices`).

Fixed point: exponent ``s`` among ``s0 .. s0−3`` with the best SQNR on the whole sample.

Logarithmic, the integer form (our design). Levels ``m = 1..L`` have magnitude
``2^(e0 + (m−1)·step)`` with ``step = 1/2`` (base √2, default) or ``1`` (``base=2``), and 0.
A log-quantized tensor is stored as an int8 *code* ``c = sign · m`` (``m = 0``: zero;
``[0, L]`` after a ReLU). ``L`` = the codes of ``BITS`` bits (``2^(BITS−1) − 1`` signed,
``2^BITS − 1`` unsigned), at most 16 (√2) or 15 (base 2) so the decoded value fits int16.

- *Decode* (in the consumer's op): ``D = sign(c) · table[|c|]`` at exponent ``s_d``, with the
  exact int32 table ``table[m] = (m−1 odd ? 181 : 128) << ((m−1) >> 1)`` for √2 (``s_d =
  e0 − 7``: the odd half-steps are ``round(√2 · 2^7) = 181``, the one fixed constant), and
  ``table[m] = 1 << (m−1)`` for base 2 (``s_d = e0``). The value the network computes with
  is exactly ``D · 2^s_d`` (QAT's fake quantization returns the same number).
- *Encode* (in the producer's op): the accumulator is rounded onto the fine grid
  ``s_e = e0 − 7`` (``r = round_shift(acc, s_e − s_t)``, half up, as every requantization)
  and ``|c| = #{m : |r| ≥ T_m}`` with the integer thresholds
  ``T_m = ceil(2^(7 + (m−1)·step − step/2))`` (geometric midpoints between levels), clamped
  to the code range. QAT's fake quantization does exactly this on ``y / 2^s_e``.

A value may be log-coded only when its producer is an MXQN conv/linear (it encodes) and all
its consumers are MXQN convs/linears (they decode): the output of an add, a pool, the model
input and the model output stay fixed point. Max pooling and flatten pass codes through
(decoding is monotone, so the max of codes is the code of the max). A log choice whose
decoded range could overflow a consumer's int32 accumulator falls back to fixed point;
every fallback is recorded in the layer's ``reason``.

Deploy ops: layers with neither a log input nor a log output are plain INT-SE
(``tvmq::qconv2d``/``qlinear`` on the int8 kernels); the others run as ``tvmq::mx_qconv2d`` /
``tvmq::mx_qlinear`` (decode, int32 conv, encode or clamp), lowered by
``relay_passes.lower_mxqn`` onto tvmq's int8 conv kernel (decoded values as int16 pairs;
``topi_ops.log_codes``), grouped convs to integer Relax ops.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tvmq import bodies, ops
from tvmq.integer import INT32_MAX, check_accumulator, shift_in_range
from tvmq.quantizers import (IntSEQuantizer, IntSEWeightQuantizer,
                             check_finite, covering_exponent, fake_quantize, round_half_up)
from tvmq.schemes import register_scheme
from tvmq.schemes.int_se import IntSE, IntSEConfig, bias_exponent
from tvmq.quantizers import to_mantissa

FRAC = 7  # fractional bits of the fine grid: √2 ≈ 181 / 2^7
SQRT2_Q = 181  # round(√2 · 2^7)
MAX_LEVELS = {"sqrt2": 16, "2": 15}  # decoded |D| ≤ 181 << 7 = 23168, 1 << 14 = 16384
SAMPLE_PER_BATCH = 1 << 14  # elements of each calibration batch kept for the SQNR
SAMPLE_BATCHES = 64
FIXED, LOG = 1, 2


class CalibrationDataError(ValueError):
    """The calibration data cannot choose a layer's quantization (all zero)."""


@dataclass(frozen=True)
class MXQNConfig(IntSEConfig):
    """``mxqn[:BITS][,base=sqrt2|2]``: INT-SE 8 weights; BITS-bit activations (2..8, default
    8), each layer fixed point or logarithmic (step √2 or 2) by SQNR on calibration data."""

    positional = ("bits",)
    bits: int = 8
    base: str = "sqrt2"

    def __post_init__(self):
        super().__post_init__()
        if self.base not in MAX_LEVELS:
            raise ValueError(f"base={self.base!r} must be 'sqrt2' or '2'")

    @property
    def weight_bits(self) -> int:
        return 8


# ----------------------------------------------------------------------------- log grid
@dataclass(frozen=True)
class LogGrid:
    """The log levels of one tensor: ``L`` levels from ``2^e0`` by ``step``; signed or not."""

    e0: int
    levels: int
    base: str
    nonneg: bool

    @property
    def half(self) -> bool:
        return self.base == "sqrt2"

    @property
    def decode_exponent(self) -> int:
        return self.e0 - FRAC if self.half else self.e0

    @property
    def encode_exponent(self) -> int:
        return self.e0 - FRAC

    def table(self) -> torch.Tensor:
        """int32 ``[L + 1]``: the decoded magnitude of each code (0 for code 0)."""
        m = torch.arange(self.levels, dtype=torch.int64)
        if self.half:
            v = torch.where(m % 2 == 1, SQRT2_Q, 1 << FRAC) << (m >> 1)
        else:
            v = torch.ones_like(m) << m
        return torch.cat([torch.zeros(1, dtype=torch.int64), v]).to(torch.int32)

    def thresholds(self) -> torch.Tensor:
        """int32 ``[L]``: ``|r| ≥ T_m`` (r on the grid ``2^encode_exponent``) means level ≥ m."""
        step = 0.5 if self.half else 1.0
        t = [math.ceil(2.0 ** (FRAC + m * step - step / 2)) for m in range(self.levels)]
        return torch.tensor([min(v, INT32_MAX) for v in t], dtype=torch.int32)

    def code_range(self) -> tuple[int, int]:
        return (0 if self.nonneg else -self.levels), self.levels

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """Codes of float ``x`` (exactly what the encode of the deploy op computes)."""
        r = round_half_up(x.detach().double() / 2.0 ** self.encode_exponent)
        t = self.thresholds().double()
        pos = (r.unsqueeze(-1) >= t).sum(-1)
        neg = (r.unsqueeze(-1) <= -t).sum(-1)
        lo, hi = self.code_range()
        return (pos - neg).clamp(lo, hi)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Integer values of ``codes`` (int64) at ``decode_exponent``."""
        table = self.table().to(torch.int64)
        v = table[codes.abs().clamp(max=self.levels).long()]
        return torch.where(codes < 0, -v, v)

    def fake_quantize(self, x: torch.Tensor) -> torch.Tensor:
        v = self.decode(self.codes(x)).to(x.dtype) * 2.0 ** self.decode_exponent
        return x + (v - x).detach()


def log_levels(bits: int, nonneg: bool, base: str) -> int:
    codes = (1 << bits) - 1 if nonneg else (1 << (bits - 1)) - 1
    return min(codes, MAX_LEVELS[base], 127)


def sqnr(x: torch.Tensor, q: torch.Tensor) -> float:
    """``10·log10(‖x‖² / ‖x − q‖²)`` in dB (inf when exact)."""
    signal = float((x.double() ** 2).sum())
    noise = float(((x.double() - q.double()) ** 2).sum())
    return math.inf if noise == 0 else 10 * math.log10(signal / noise)


# ----------------------------------------------------------------------------- quantizer
class MXQNQuantizer(IntSEQuantizer):
    """Activation quantizer choosing fixed point or logarithmic by SQNR.

    Calibration (train mode): like INT-SE (each batch fake-quantized at its own MSE
    exponent) while a sample of every batch is kept. :meth:`finish_calibration` (called by
    ``tvmq.calibrate``/``tvmq.train``) then decides: ``mode``, ``sqnr_fixed``, ``sqnr_log``
    (dB), ``reason``. Frozen (eval): the chosen quantization.
    """

    def __init__(self, bits: int = 8, base: str = "sqrt2"):
        super().__init__(bits)
        self.base = base
        self.register_buffer("mode", torch.tensor(0))
        self.register_buffer("fixed_exponent", torch.tensor(0))
        self.register_buffer("log_e0", torch.tensor(0))
        self.register_buffer("absmax", torch.tensor(0.0))
        self.sqnr_fixed = self.sqnr_log = float("nan")
        self.reason = "not calibrated"
        self.log_blocked: str | None = None  # why this value cannot be log-coded
        self._samples: list[torch.Tensor] = []

    # --- calibration

    def report(self) -> dict:
        """This layer's choice for the manifest (``conversion.layer_table``)."""
        return {"activation": "log" if self.is_log else "fixed",
                "sqnr_fixed_db": round(self.sqnr_fixed, 2),
                "sqnr_log_db": round(self.sqnr_log, 2), "activation_choice": self.reason}
    def observe(self, x: torch.Tensor) -> int:
        s = super().observe(x)
        flat = x.detach().flatten()
        if flat.numel() > SAMPLE_PER_BATCH:
            flat = flat[:: flat.numel() // SAMPLE_PER_BATCH + 1]
        self._samples = (self._samples + [flat.clone()])[-SAMPLE_BATCHES:]
        self.absmax.fill_(max(float(self.absmax), float(x.detach().abs().max())))
        self.mode.fill_(0)
        return s

    def grid(self, e0: int | None = None) -> LogGrid:
        return LogGrid(int(self.log_e0) if e0 is None else e0,
                       log_levels(self.bits, self.nonneg, self.base), self.base, self.nonneg)

    @torch.no_grad()
    def finish_calibration(self, model: nn.Module) -> None:
        """Choose fixed or log from the sample (see the module docstring)."""
        if not self._samples:
            if int(self.mode):
                return  # decided before, no new data
            raise CalibrationDataError(f"layer {self.layer!r}: saw no calibration data")
        x = torch.cat(self._samples).double()
        absmax = float(self.absmax)
        if absmax == 0:
            raise CalibrationDataError(
                f"layer {self.layer!r}: its activations were all zero on the calibration data:"
                " no exponent can be chosen (SQNR undefined); calibrate with real inputs or"
                " check the layer")
        s0 = covering_exponent(absmax, self.bits)
        fixed = {s: sqnr(x, fake_quantize(x, s, self.bits))
                 for s in range(s0, s0 - 4, -1)}
        s_best = max(fixed, key=fixed.get)
        levels = log_levels(self.bits, self.nonneg, self.base)
        step = 0.5 if self.base == "sqrt2" else 1.0
        top = math.ceil(math.log2(absmax) / step - 0.5) * step  # level nearest above max
        e0_cover = math.ceil(top - (levels - 1) * step)
        logs = {e: sqnr(x, self.grid(e).fake_quantize(x)) for e in range(e0_cover,
                                                                          e0_cover - 4, -1)}
        e_best = max(logs, key=logs.get)
        self.sqnr_fixed, self.sqnr_log = fixed[s_best], logs[e_best]
        self.fixed_exponent.fill_(s_best)
        self.running_exponent.fill_(s_best)
        self.log_e0.fill_(e_best)
        why = self.log_blocked = log_blocker(self, model)
        if self.sqnr_log > self.sqnr_fixed and why is None:
            self.mode.fill_(LOG)
            self.reason = f"log: SQNR {self.sqnr_log:.1f} dB > fixed {self.sqnr_fixed:.1f} dB"
        else:
            self.mode.fill_(FIXED)
            self.reason = (f"fixed: SQNR {self.sqnr_fixed:.1f} dB >= log {self.sqnr_log:.1f} dB"
                           if why is None else f"fixed (fallback: {why}; log SQNR"
                           f" {self.sqnr_log:.1f} dB > fixed {self.sqnr_fixed:.1f} dB)")
        self._samples = []

    # --- frozen
    @property
    def is_log(self) -> bool:
        return int(self.mode) == LOG

    def _decided(self):
        if not int(self.mode):
            raise RuntimeError(f"layer {self.layer!r}: the MXQN quantizer has not chosen fixed"
                               " or log yet: run tvmq.calibrate (or tvmq.train) first")

    @property
    def exponent(self) -> int:
        """The exponent of the integer tensor consumers see (decoded, for log)."""
        self._decided()
        return self.grid().decode_exponent if self.is_log else int(self.fixed_exponent)

    def qrange(self) -> tuple[int, int]:
        """Integer range of the (decoded) values consumers compute with."""
        if self.is_log:
            vmax = int(self.grid().table()[-1])
            return (0 if self.nonneg else -vmax), vmax
        return super().qrange()

    def step(self, x):
        if self.training:
            return super().step(x)
        self.last_exponent = self.exponent
        return self.last_exponent

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            return super().forward(x)
        s = self.step(x)
        if self.is_log:
            return self.grid().fake_quantize(x)
        return fake_quantize(x, s, self.bits)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, base={self.base}, {self.reason}"


def _is_mxqn_layer(m) -> bool:
    from tvmq.qat import _QWeighted
    return isinstance(m, _QWeighted) and isinstance(m.scheme.weight, MXQNConfig)


def log_blocker(q: MXQNQuantizer, model: nn.Module) -> str | None:
    """Why ``q``'s value cannot be log-coded in ``model`` (None: it can)."""
    from tvmq.conversion import output_quantizers
    if any(o is q for o in output_quantizers(model)):
        return "model output"
    producers = [m for m in model.modules() if getattr(m, "out_quant", None) is q]
    if not producers or not all(_is_mxqn_layer(m) for m in producers):
        return "not produced by an MXQN conv/linear"
    consumers = [m for m in model.modules() if any(i is q for i in getattr(m, "input_quant", ()))]
    if not consumers:
        return "no consumer"
    if not all(_is_mxqn_layer(m) for m in consumers):
        kinds = sorted({type(m).__name__ for m in consumers if not _is_mxqn_layer(m)})
        return f"consumed by {', '.join(kinds)}"
    vmax = int(q.grid().table()[-1])
    for m in consumers:
        with torch.no_grad():
            w, _ = m.folded()
            iw = m.weight_quant.integer(w, f"layer {m.layer_name!r}")
        worst = int(iw.weight.abs().flatten(1).sum(1).max()) * vmax
        if worst > INT32_MAX >> 1:  # half the range left for the bias and rounding
            return f"decoded inputs up to {vmax} could overflow {m.layer_name!r}'s int32 accumulator"
    return None


def finish_calibration(model: nn.Module) -> None:
    """Let every MXQN quantizer of ``model`` choose (what ``tvmq.calibrate`` calls)."""
    for m in model.modules():
        if isinstance(m, MXQNQuantizer):
            m.finish_calibration(model)


def layer_choices(qat: nn.Module) -> list[dict]:
    """Per weighted MXQN layer: its output's choice and both SQNRs (for the manifest and the
    build report): ``{"layer", "activation": "fixed"|"log", "sqnr_fixed_db", "sqnr_log_db",
    "base", "bits", "reason", "log_blocked"}``."""
    rows = []
    for m in qat.modules():
        q = getattr(m, "out_quant", None)
        if isinstance(q, MXQNQuantizer) and hasattr(m, "layer_name"):
            rows.append({"layer": m.layer_name,
                         "activation": "log" if q.is_log else "fixed",
                         "sqnr_fixed_db": round(q.sqnr_fixed, 2),
                         "sqnr_log_db": round(q.sqnr_log, 2), "base": q.base, "bits": q.bits,
                         "reason": q.reason, "log_blocked": q.log_blocked})
    return rows


# ----------------------------------------------------------------------------- deploy ops
def _decode(x, table):
    levels = table.shape[0] - 1
    xi = x.to(torch.int64)
    v = table.to(torch.int64)[xi.abs().clamp(max=levels)]
    return torch.where(xi < 0, -v, v)


def _finish(acc, thresholds, out_shift, out_log, lo, hi):
    if out_shift > 0:
        r = (acc + (1 << (out_shift - 1))) >> out_shift
    else:
        r = acc << (-out_shift)
    if out_log:
        t = thresholds.to(torch.int64)
        r = (r.unsqueeze(-1) >= t).sum(-1) - (r.unsqueeze(-1) <= -t).sum(-1)
    return r.clamp(lo, hi).to(torch.int8)


@torch.library.custom_op("tvmq::mx_qconv2d", mutates_args=())
def mx_qconv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, table: torch.Tensor,
               thresholds: torch.Tensor, stride: list[int], padding: list[int],
               dilation: list[int], groups: int, bias_shift: int, out_shift: int, in_log: bool,
               out_log: bool, lo: int, hi: int) -> torch.Tensor:
    """MXQN conv: decode log codes (``in_log``), int32 conv + ``bias << bias_shift``,
    ``round_shift(·, out_shift)``, encode to log codes (``out_log``) or clamp to [lo, hi]."""
    xi = _decode(x, table) if in_log else x.to(torch.int64)
    top, left, bottom, right = padding
    xi = F.pad(xi, (left, right, top, bottom))
    acc = F.conv2d(xi.double(), weight.double(), None, stride, 0, dilation, groups)
    acc = acc.round().to(torch.int64) + (bias.to(torch.int64) << bias_shift).view(1, -1, 1, 1)
    return _finish(acc, thresholds, out_shift, out_log, lo, hi)


@mx_qconv2d.register_fake
def _(x, weight, bias, table, thresholds, stride, padding, dilation, groups, bias_shift,
      out_shift, in_log, out_log, lo, hi):
    return ops.conv_output(x, weight.shape[0], weight.shape[-2:], stride, padding, dilation)


@torch.library.custom_op("tvmq::mx_qlinear", mutates_args=())
def mx_qlinear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, table: torch.Tensor,
               thresholds: torch.Tensor, bias_shift: int, out_shift: int, in_log: bool,
               out_log: bool, lo: int, hi: int) -> torch.Tensor:
    """MXQN dense (see :func:`mx_qconv2d`)."""
    xi = _decode(x, table) if in_log else x.to(torch.int64)
    acc = (xi.double() @ weight.double().T).round().to(torch.int64)
    acc = acc + (bias.to(torch.int64) << bias_shift)
    return _finish(acc, thresholds, out_shift, out_log, lo, hi)


@mx_qlinear.register_fake
def _(x, weight, bias, table, thresholds, bias_shift, out_shift, in_log, out_log, lo, hi):
    return x.new_empty((x.shape[0], weight.shape[0]), dtype=torch.int8)


def _register_bodies():
    from relay_passes.lower_mxqn import emit_mx_qconv2d, emit_mx_qlinear
    bodies.register_body("mx_qconv2d")(emit_mx_qconv2d)
    bodies.register_body("mx_qlinear")(emit_mx_qlinear)


_register_bodies()


class IntMXConv2d(nn.Module):
    """Deploy form of an MXQN conv with a log-coded input and/or output."""

    def __init__(self, weight, bias, table, thresholds, geometry, bias_shift, out_shift,
                 in_log, out_log, lo, hi):
        super().__init__()
        self.register_buffer("weight", weight.to(torch.int8))
        self.register_buffer("bias", bias.to(torch.int32))
        self.register_buffer("table", table.to(torch.int32))
        self.register_buffer("thresholds", thresholds.to(torch.int32))
        self.geometry = geometry
        self.bias_shift, self.out_shift = bias_shift, out_shift
        self.in_log, self.out_log, self.lo, self.hi = in_log, out_log, lo, hi

    def forward(self, x):
        g = self.geometry
        return torch.ops.tvmq.mx_qconv2d(x, self.weight, self.bias, self.table, self.thresholds,
                                         g.stride, g.padding, g.dilation, g.groups,
                                         self.bias_shift, self.out_shift, self.in_log,
                                         self.out_log, self.lo, self.hi)


class IntMXLinear(IntMXConv2d):
    def forward(self, x):
        return torch.ops.tvmq.mx_qlinear(x, self.weight, self.bias, self.table, self.thresholds,
                                         self.bias_shift, self.out_shift, self.in_log,
                                         self.out_log, self.lo, self.hi)


# ----------------------------------------------------------------------------- scheme
@register_scheme
class MXQN(IntSE):
    name = "mxqn"
    config = MXQNConfig
    lowerings = ("int8", "int8-kernel", "int32-log")

    def weight_quantizer(self, cfg: MXQNConfig):
        return IntSEWeightQuantizer(8)

    def act_quantizer(self, cfg: MXQNConfig, nonneg: bool):
        return MXQNQuantizer(cfg.bits, cfg.base)

    def integer_layer(self, m, io, cfg: MXQNConfig, iw, b):
        from tvmq.integer import Geometry
        q_in, q_out = m.input_quant[0], m.out_quant
        in_log = isinstance(q_in, MXQNQuantizer) and q_in.is_log
        out_log = isinstance(q_out, MXQNQuantizer) and q_out.is_log
        if not (in_log or out_log):
            return super().integer_layer(m, io, cfg, iw, b)
        where = f"layer {io.name!r}"
        with torch.no_grad():
            s_t = io.s_in + int(iw.exponent[0])
            check_finite(b, f"{where} bias")
            s_b = bias_exponent(b, s_t, cfg)
            b_int = to_mantissa(b, s_b, cfg.bias_bits)
        bias_shift = s_b - s_t
        if out_log:
            grid = q_out.grid()
            out_shift = shift_in_range(grid.encode_exponent - s_t, where, "log encode shift")
            thresholds = grid.thresholds()
            lo, hi = grid.code_range()
        else:
            out_shift = shift_in_range(io.s_out - s_t, where, "requantization shift")
            thresholds = torch.zeros(1, dtype=torch.int32)
            lo, hi = io.out_lo, io.out_hi
        table = q_in.grid().table() if in_log else torch.zeros(2, dtype=torch.int32)
        check_accumulator(io.name, iw.weight, b_int << bias_shift, io.in_max, out_shift)
        if hasattr(m, "groups"):
            return IntMXConv2d(iw.weight, b_int, table, thresholds, Geometry.of(m), bias_shift,
                               out_shift, in_log, out_log, lo, hi)
        return IntMXLinear(iw.weight, b_int, table, thresholds, None, bias_shift, out_shift,
                           in_log, out_log, lo, hi)

    def describe(self, cfg: MXQNConfig) -> str:
        return (f"{cfg.spec}: INT-SE 8 weights; {cfg.bits}-bit activations, per layer fixed"
                f" point or logarithmic (step {'√2' if cfg.base == 'sqrt2' else '2'}) by SQNR"
                " on the calibration data; post-training, no retraining")


__all__ = ["MXQN", "MXQNConfig", "MXQNQuantizer", "LogGrid", "CalibrationDataError",
           "layer_choices", "finish_calibration", "sqnr"]
