"""Quantization schemes: the one extension point (DESIGN.md, "Schemes").

A scheme is one module in this package, registered by name with :func:`register_scheme`. It
is the only place that knows its math: its QAT quantizers (straight-through gradients), the
integer form of a layer in the deploy model, and the names of the ``relay_passes`` lowerings
that form may run as. Nothing outside ``tvmq/schemes/`` tests a scheme's name.

A :class:`Recipe` says which scheme each layer gets: a default scheme spec, overrides by
layer name (the float model's module names, e.g. ``"layers.0.conv1"``), and the layers that
keep 8-bit INT-SE (``keep_8bit``). A scheme *spec* is ``NAME[:ARGS]`` where ARGS are comma
separated, positional first, then ``key=value``:

>>> get_recipe("combined-ternary:2,act_bits=4").default.spec
'combined-ternary:2,act_bits=4'
>>> get_recipe("int-se:6").act_bits
6
"""
from __future__ import annotations

import dataclasses
import fnmatch
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from torch import nn


class UnknownSchemeError(ValueError):
    """A scheme name or argument that is not registered or out of range."""


# ----------------------------------------------------------------------------- schemes
@dataclass(frozen=True)
class SchemeConfig:
    """A scheme with its arguments (subclassed per scheme; ``__post_init__`` validates).

    ``positional`` names the fields ``NAME:a,b`` fills in order."""

    positional: ClassVar[tuple[str, ...]] = ()
    always_shown: ClassVar[tuple[str, ...]] = ()  # positional fields the spec always names
    scheme: ClassVar["Scheme"]

    @property
    def spec(self) -> str:
        """The canonical ``NAME[:ARGS]`` string that parses back to this config: positional
        arguments up to the last one that differs from its default, then ``key=value`` for
        every other field that differs."""
        defaults, pos = type(self)(), list(self.positional)
        differs = [f.name for f in dataclasses.fields(self)
                   if getattr(self, f.name) != getattr(defaults, f.name)
                   or f.name in self.always_shown]
        last = max((pos.index(p) for p in differs if p in pos), default=-1)
        args = [str(getattr(self, p)) for p in pos[:last + 1]]
        args += [f"{n}={getattr(self, n)}" for n in differs if n not in pos]
        return self.scheme.name + (":" + ",".join(args) if args else "")

    def to_json(self) -> dict:
        """Spec, fields, and the bit widths every scheme has (``weight_bits``, ``act_bits``)."""
        return {"spec": self.spec, **dataclasses.asdict(self),
                "weight_bits": self.weight_bits, "act_bits": self.act_bits}

    @property
    def weight_bits(self) -> int:
        raise NotImplementedError

    @property
    def act_bits(self) -> int:
        raise NotImplementedError


class Scheme:
    """What a scheme provides to every layer of tvmq (subclass and register one instance).

    Attributes
    ----------
    name : registry name (``"int-se"``).
    config : its :class:`SchemeConfig` subclass.
    lowerings : names of the ``relay_passes`` lowerings its integer conv may run as, best
        first where no measurement decides.
    keep_8bit : the layers a recipe of this scheme keeps at 8-bit INT-SE by default
        (``"input"`` the model input, ``"first"``/``"last"`` the first/last weighted layer).
    """

    name: ClassVar[str]
    config: ClassVar[type[SchemeConfig]]
    lowerings: ClassVar[tuple[str, ...]] = ("int8",)
    keep_8bit: ClassVar[tuple[str, ...]] = ()

    def parse(self, arg: str | None) -> SchemeConfig:
        """``"2,act_bits=4"`` -> config; range errors become :class:`UnknownSchemeError`."""
        kwargs: dict[str, Any] = {}
        types = {f.name: f.type for f in dataclasses.fields(self.config)}
        for i, part in enumerate(p.strip() for p in (arg or "").split(",") if p.strip()):
            key, eq, value = part.partition("=")
            if not eq:
                if i >= len(self.config.positional):
                    raise UnknownSchemeError(f"scheme {self.name!r} takes at most"
                                             f" {len(self.config.positional)} positional"
                                             f" argument(s) ({', '.join(self.config.positional)})")
                key, value = self.config.positional[i], part
            if key not in types:
                raise UnknownSchemeError(f"scheme {self.name!r} has no argument {key!r};"
                                         f" it takes {', '.join(types)}")
            kwargs[key] = _coerce(value, types[key], f"{self.name}: {key}")
        try:
            return self.config(**kwargs)
        except (TypeError, ValueError) as err:
            raise UnknownSchemeError(f"scheme {self.name!r}: {err}") from None

    # --- QAT
    def weight_quantizer(self, cfg: SchemeConfig) -> nn.Module:
        """The weight fake-quantizer of a conv/linear (straight-through gradient). It must
        provide ``integer(w) -> IntegerWeights`` for conversion."""
        raise NotImplementedError

    def act_quantizer(self, cfg: SchemeConfig, nonneg: bool) -> nn.Module:
        """The fake-quantizer of a layer's output (``nonneg``: it follows a ReLU). It must
        provide ``exponent`` and ``qrange(nonneg)`` once frozen."""
        raise NotImplementedError

    def fake_bias(self, cfg: SchemeConfig, bias, s_in: int | None, weight_quant):
        """The bias as the deploy model adds it (rounded onto its integer grid), for QAT's
        forward; ``s_in`` is the input's exponent in this forward. Default: unchanged."""
        return bias

    def integer_layer(self, m, io, cfg: SchemeConfig, iw, bias) -> nn.Module:
        """The deploy module of the QAT conv/linear ``m``: ``io`` holds its input/output
        exponents and integer ranges, ``iw`` the integer form of its weights (from its weight
        quantizer), ``bias`` its float bias with batch norm folded in."""
        raise NotImplementedError

    def describe(self, cfg: SchemeConfig) -> str:
        """One line for the build report."""
        return cfg.spec


def _coerce(value: str, typ, where: str):
    try:
        if typ in (int, "int"):
            return int(value)
        if typ in (float, "float"):
            return float(value)
        if typ in (bool, "bool"):
            return value.lower() in ("1", "true", "yes")
        return value
    except ValueError:
        raise UnknownSchemeError(f"{where}={value!r} is not a {getattr(typ, '__name__', typ)}") from None


SCHEMES: dict[str, Scheme] = {}


def register_scheme(cls: type[Scheme]) -> type[Scheme]:
    """Class decorator: register one instance of a :class:`Scheme` under ``cls.name``."""
    SCHEMES[cls.name] = cls()
    cls.config.scheme = SCHEMES[cls.name]
    return cls


def parse_spec(spec: "str | SchemeConfig") -> SchemeConfig:
    """``"combined-ternary:2"`` -> its config; a config is returned as it is."""
    if isinstance(spec, SchemeConfig):
        return spec
    name, _, arg = str(spec).partition(":")
    if name not in SCHEMES:
        raise UnknownSchemeError(
            f"unknown scheme {spec!r}: registered schemes are {', '.join(SCHEMES)}")
    return SCHEMES[name].parse(arg or None)


# ----------------------------------------------------------------------------- recipes
KEEP_CHOICES = ("input", "first", "last")
INT8 = "int-se:8"  # what a kept layer gets


@dataclass(frozen=True)
class LayerScheme:
    """What one weighted layer gets: the config of its weights and of its output."""

    weight: SchemeConfig
    act: SchemeConfig


@dataclass(frozen=True)
class Recipe:
    """How a model is quantized, layer by layer.

    Attributes
    ----------
    default : the scheme spec every layer gets unless overridden (``"int-se"``).
    overrides : ``{layer name or glob: spec}`` by the float model's module names.
    keep_8bit : which of ``"input"``, ``"first"``, ``"last"`` keep 8-bit INT-SE (None: the
        default scheme's own choice; INT-SE keeps none, the ternary schemes keep all three).
    output : ``"float"`` (the deploy model dequantizes its output) or ``"int"``.
    """

    default: "str | SchemeConfig" = "int-se"
    overrides: "tuple[tuple[str, str], ...] | dict" = ()
    keep_8bit: "tuple[str, ...] | None" = None
    output: str = "float"

    def __post_init__(self):
        object.__setattr__(self, "default", parse_spec(self.default))
        items = self.overrides.items() if isinstance(self.overrides, dict) else self.overrides
        overrides = tuple((str(k), parse_spec(v).spec) for k, v in items)
        object.__setattr__(self, "overrides", overrides)
        keep = self.default.scheme.keep_8bit if self.keep_8bit is None else tuple(self.keep_8bit)
        bad = [k for k in keep if k not in KEEP_CHOICES]
        if bad:
            raise UnknownSchemeError(f"keep_8bit: {bad} not among {KEEP_CHOICES}")
        object.__setattr__(self, "keep_8bit", keep)
        if self.output not in ("float", "int"):
            raise ValueError(f"output={self.output!r} must be 'float' or 'int'")

    # --- the default scheme's numbers (INT-SE recipes read like the old flat Recipe)
    @property
    def scheme(self) -> str:
        return self.default.scheme.name

    @property
    def name(self) -> str:
        """The spec of the default scheme (what ``--scheme`` took)."""
        return self.default.spec

    def __getattr__(self, item):  # weight_bits, act_bits, ... of the default config
        if item.startswith("_") or item in ("default",):
            raise AttributeError(item)
        try:
            return getattr(object.__getattribute__(self, "default"), item)
        except AttributeError:
            raise AttributeError(f"Recipe has no attribute {item!r}") from None

    # --- per layer
    def spec_for(self, layer: str) -> SchemeConfig:
        """The scheme config of ``layer`` (the last matching override wins)."""
        cfg = self.default
        for pattern, spec in self.overrides:
            if layer == pattern or fnmatch.fnmatchcase(layer, pattern):
                cfg = parse_spec(spec)
        return cfg

    def for_layer(self, layer: str, role: set[str]) -> LayerScheme:
        """Weights and output of ``layer``; ``role`` holds ``"first"``/``"last"`` when it is
        the first/last weighted layer. A kept first layer keeps 8-bit weights and quantizes
        its output like the rest; a kept last layer (the classifier) is INT-SE 8 throughout."""
        cfg = self.spec_for(layer)
        overridden = any(layer == p or fnmatch.fnmatchcase(layer, p) for p, _ in self.overrides)
        if overridden:
            return LayerScheme(cfg, cfg)
        int8 = parse_spec(INT8)
        if "last" in role and "last" in self.keep_8bit:
            return LayerScheme(int8, int8)
        if "first" in role and "first" in self.keep_8bit:
            return LayerScheme(int8, cfg)
        return LayerScheme(cfg, cfg)

    def input_config(self) -> SchemeConfig:
        """The quantizer config of the model input."""
        return parse_spec(INT8) if "input" in self.keep_8bit else self.default

    # --- serialisation
    def to_json(self) -> dict:
        return {"scheme": self.scheme, **self.default.to_json(),
                "overrides": dict(self.overrides), "keep_8bit": list(self.keep_8bit),
                "output": self.output}

    @classmethod
    def from_json(cls, data: dict) -> "Recipe":
        return cls(data.get("spec") or data.get("default") or data.get("scheme", "int-se"),
                   data.get("overrides", {}), data.get("keep_8bit"), data.get("output", "float"))


def get_recipe(recipe: "str | Path | dict | Recipe") -> Recipe:
    """A :class:`Recipe` from a scheme spec (``"int-se"``, ``"combined-ternary:2"``), a
    mapping (``{"default": ..., "overrides": {...}}`` or ``{layer: spec}`` with an optional
    ``"*"`` default), a JSON file holding such a mapping, or a Recipe."""
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, Path) or (isinstance(recipe, str) and recipe.endswith(".json")):
        path = Path(recipe)
        try:
            recipe = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise UnknownSchemeError(f"recipe file {str(path)!r}: {err}") from None
    if isinstance(recipe, dict):
        if any(k in recipe for k in ("default", "spec", "overrides", "keep_8bit")):
            return Recipe.from_json(recipe)
        layers = {k: v for k, v in recipe.items() if k != "*"}
        return Recipe(recipe.get("*", "int-se"), layers)
    return Recipe(str(recipe))


# the registered schemes (imported for their registration)
from tvmq.schemes import int_se, ioiq, mxqn, pot, ternary  # noqa: E402,F401
