"""Quantization recipes: one registry entry per scheme of ALGORITHMS.md.

``tvmq.prepare(model, "int-se")`` or ``"int-se:6"`` looks the name up here. A scheme is a
factory from its optional ``:ARG`` to a :class:`Recipe`; the CLI's choices, the tests'
parameters and the manifest's ``scheme`` field are all derived from this registry.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable


class UnknownSchemeError(ValueError):
    """A scheme name that is not registered."""


@dataclass(frozen=True)
class Recipe:
    """How a model is quantized.

    Attributes
    ----------
    scheme : registry name, e.g. ``"int-se"``.
    weight_bits, act_bits : mantissa widths of weights and activations (INT-SE: both N).
    bias_bits : mantissa width of biases (our choice: 16, exponent window [s_t, s_t + 7]).
    bias_window : how far (in bits) the bias exponent may sit above the accumulator's.
    output : ``"float"`` (the deploy model dequantizes its output) or ``"int"``.
    """

    scheme: str = "int-se"
    weight_bits: int = 8
    act_bits: int = 8
    bias_bits: int = 16
    bias_window: int = 7
    output: str = "float"

    def __post_init__(self):
        for name in ("weight_bits", "act_bits"):
            bits = getattr(self, name)
            if not 2 <= bits <= 8:
                raise ValueError(f"{name}={bits}: tvmq's integer kernels take 2..8-bit mantissas")
        if not 2 <= self.bias_bits <= 24:
            raise ValueError(f"bias_bits={self.bias_bits} must be in 2..24")
        if self.output not in ("float", "int"):
            raise ValueError(f"output={self.output!r} must be 'float' or 'int'")

    @property
    def name(self) -> str:
        """Name that round-trips through :func:`get_recipe`."""
        default = SCHEMES[self.scheme](None)
        return self.scheme if self == default else f"{self.scheme}:{self.weight_bits}"

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


SCHEMES: dict[str, Callable[[str | None], Recipe]] = {}


def register_scheme(name: str):
    def wrap(factory):
        SCHEMES[name] = factory
        return factory
    return wrap


@register_scheme("int-se")
def _int_se(arg: str | None) -> Recipe:
    """INT-SE (IOIQ §3 data format): N-bit weights and activations, default 8."""
    bits = int(arg) if arg else 8
    return Recipe("int-se", weight_bits=bits, act_bits=bits)


def get_recipe(recipe: "str | Recipe") -> Recipe:
    """Resolve ``"int-se"``, ``"int-se:6"`` or a :class:`Recipe`."""
    if isinstance(recipe, Recipe):
        return recipe
    name, _, arg = str(recipe).partition(":")
    if name not in SCHEMES:
        raise UnknownSchemeError(
            f"unknown scheme {recipe!r}: registered schemes are {', '.join(SCHEMES)}"
        )
    try:
        return SCHEMES[name](arg or None)
    except ValueError as err:
        raise UnknownSchemeError(f"scheme {recipe!r}: {err}") from None
