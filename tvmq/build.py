"""``python -m tvmq.build [MODEL] --target arm|rpi5|x86 --out DIR``

MODEL is omitted (the built-in default: an INT-SE QAT CNN on scikit-learn's digits, trained
once and cached), a zoo name (``resnet18``, ``resnet20``: random weights, calibrated on
noise) or a ``.pt2`` written by ``tvmq.export``. This module only parses and reports; the
work is ``tvmq.build`` (``tvmq.artifact.build``).
"""
from __future__ import annotations

import argparse
import sys
import types
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from schedules.targets import TARGETS
from tvmq import data, zoo
from tvmq.artifact import Artifact, build, check_out
from tvmq.errors import USER_ERRORS, ModelFileError
from tvmq.schemes import SCHEMES, get_recipe

console = Console(stderr=True)


# the local dataset a zoo model calibrates on with --data DIR
ZOO_DATA = {"resnet20": data.cifar10, "resnet18": data.image_folder}


def zoo_program(name: str, scheme: str, images: torch.Tensor | None = None,
                calib_batches: int = 2, batch: int = 8):
    """A zoo model with random weights, calibrated (PTQ) on ``images`` (else noise), as a
    deploy program."""
    from tvmq import calibrate, convert, export, prepare

    factory, shape = zoo.ZOO[name]
    torch.manual_seed(0)
    qat = prepare(factory(), scheme)
    if images is None:
        batches = [torch.randn(shape) for _ in range(calib_batches)]
    else:
        batches = list(images[:calib_batches * batch].split(batch))
    calibrate(qat, batches)
    return export(convert(qat), torch.randn(shape), name=name)


def load_model(model: str | None, scheme: str, quiet: bool, data_dir: str | None = None):
    """The CLI's MODEL as (program, extra manifest fields, (images, labels) to measure
    accuracy on or None, inputs for the parity check or None for noise)."""
    if model is None or model == "digits":
        from tvmq.default_model import default_program

        with console.status("default model: training or loading from cache"):
            ep, acc = default_program(scheme, quiet=quiet)
        test = data.digits("test")
        return ep, {"accuracy": dict(acc)}, test.tensors, test.tensors[0]
    if model in zoo.ZOO:
        images, source = None, "noise"
        if data_dir is not None:
            if model not in ZOO_DATA:
                raise data.DatasetError(f"--data: {model} has no local dataset loader")
            loader = ZOO_DATA[model]
            images, source = loader(data_dir).tensors[0], f"{data_dir} ({loader.__name__})"
        with console.status(f"{model}: calibrating random weights on {source}"):
            program = zoo_program(model, scheme, images)
        return program, {"weights": f"random, calibrated on {source}"}, None, images
    if model.endswith(".pt2") or "/" in model or Path(model).exists():
        from tvmq.artifact import load_program

        return load_program(model), {}, None, None
    raise ModelFileError(f"model {model!r}: not a zoo name ({', '.join(zoo.ZOO)}) nor a .pt2 file")


def scheme_summary(manifest: dict) -> str:
    """The recipe in one line, in its scheme's own words (from the registry)."""
    from tvmq.schemes import Recipe

    recipe = manifest.get("recipe")
    if not recipe:
        return str(manifest.get("scheme"))
    r = Recipe.from_json(recipe)
    text = r.default.scheme.describe(r.default)
    if r.overrides:
        text += f"; overrides: {', '.join(f'{k}={v}' for k, v in r.overrides)}"
    return text


def layer_summary(layers: list[dict]) -> list[tuple[str, str]]:
    """Report rows: the layers kept at other weights than the default, and the kernels."""
    rows = []
    specs = [row["weights"] for row in layers]
    if specs:
        common = max(set(specs), key=specs.count)
        others = [f"{row['layer']} ({row['weights']})" for row in layers
                  if row["weights"] != common]
        if others:
            rows.append(("layers not " + common, ", ".join(others)))
    kernels: dict[str, int] = {}
    for row in layers:
        if "lowering" in row:
            kernels[row["lowering"]] = kernels.get(row["lowering"], 0) + 1
    if kernels:
        rows.append(("kernels", ", ".join(f"{k}: {n} layer(s)" for k, n in kernels.items())
                     + " (manifest 'layers' says why)"))
    return rows


def _schedules_line(m: dict) -> str:
    """Which schedules the build used: how many kernels the tuning database matched."""
    if not m.get("tuning_db"):
        return "default (no tuning database)"
    cov = m.get("tuned_kernels") or {}
    if not cov.get("tuned"):
        return (f"[red]default: {m['tuning_db']} matches none of the {cov.get('kernels', 0)}"
                " tunable kernels[/] (tuned for another model, CPU or tvmq version?)")
    return (f"tuned: {cov['tuned']} of {cov['kernels']} kernels from {m['tuning_db']}"
            " (default for the rest)")


def report(art: Artifact) -> Table:
    m = art.manifest
    table = Table(title=f"tvmq build -> {art.path}", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("model", m["model"])
    table.add_row("scheme", scheme_summary(m))
    for label, text in layer_summary(m.get("layers") or []):
        table.add_row(label, text)
    table.add_row("target", f"{m['target']['name']} ({m['target']['tvm'].get('mcpu', '')})")
    labels = {"float": "float model", "fake_quant": "QAT fake-quant",
              "deploy_torch": "deploy, PyTorch int ref", "deploy_tvm": "deploy, TVM (this host)"}
    for key, value in (m.get("accuracy") or {}).items():
        table.add_row(f"accuracy: {labels.get(key, key)}", f"{value:.2f} % (digits test split)")
    p = m["parity"]
    verdict = "[green]bit-exact[/]" if p["mismatches"] == 0 else "[red]MISMATCH[/]"
    table.add_row("parity vs PyTorch int ref",
                  f"{verdict}: {p['mismatches']} of {p['elements']} elements differ"
                  f" over {p['inputs']} inputs (run on this host)")
    s = m["sizes"]
    table.add_row("size", f"library {s['library_bytes'] / 1e3:.1f} kB; weights int8"
                  f" {s['int_weight_bytes'] / 1e3:.1f} kB vs float {s['float_weight_bytes'] / 1e3:.1f} kB")
    table.add_row("schedules", _schedules_line(m))
    table.add_row("build time", f"{m['build_seconds']:.1f} s")
    return table


def at_least_one(text: str) -> int:
    """argparse type of a count that must be >= 1 (``--parity``: a build always checks
    itself against the PyTorch integer reference; ``--rounds``)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: at least 1 is needed")
    return value


def validate_model(model: str | None, scheme: str) -> None:
    """Refuse a bad MODEL or --scheme before any work."""
    get_recipe(scheme)  # UnknownSchemeError naming the registered ones
    if model not in (None, "digits") and model not in zoo.ZOO:
        path = Path(model)
        if path.is_dir():
            from tvmq.artifact import load_program

            load_program(path)  # "is a directory" (and what it is)


def validate_args(args) -> None:
    """Refuse bad arguments before any work: target, scheme, MODEL, --out, --data."""
    from schedules.targets import resolve

    if args.target not in TARGETS:
        resolve(args.target)  # raises the clear error
    validate_model(args.model, args.scheme)
    name = "digits" if args.model is None else args.model if args.model in zoo.ZOO else None
    if args.out is not None:
        check_out(Path(args.out))
    elif name is not None:
        check_out(Path(f"build/{name}-{args.target}"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tvmq.build", description=__doc__.split("\n\n")[1])
    ap.add_argument("model", nargs="?", help="zoo name, .pt2 file, or nothing for the default")
    ap.add_argument("--target", default="x86", help=f"one of {', '.join(TARGETS)}")
    ap.add_argument("--out", default=None, help="artifact directory (default build/MODEL-TARGET)")
    ap.add_argument("--scheme", default="int-se",
                    help="for zoo/default models: a scheme spec NAME[:ARGS] ("
                    + "; ".join(f"{n}: {s.config.__doc__.strip().splitlines()[0]}"
                                for n, s in SCHEMES.items())
                    + ") or a recipe JSON file {layer: spec}")
    ap.add_argument("--parity", type=at_least_one, default=64,
                    help="inputs in the local parity check against the PyTorch integer"
                    " reference (at least 1)")
    ap.add_argument("--data", help="zoo models: calibrate and check parity on a local dataset"
                    " (resnet20: CIFAR-10 python batches; resnet18: an ImageNet-style folder)")
    ap.add_argument("--quiet", action="store_true", help="no training progress bars")
    ap.add_argument("--db", help="a tuning database (python -m tvmq.tune) for this target;"
                    " zoo models use the one shipped for this CPU when there is one")
    ap.add_argument("--no-db", action="store_true", help="default schedules only")
    ap.add_argument("--shift-only", action="store_true",
                    help="a PT2E int8 .pt2: round its scales to powers of two so every"
                    " requantization is a shift (default: fixed-point multipliers)")
    args = ap.parse_args(argv)
    try:
        validate_args(args)  # every argument checked before minutes of training
        ep, extra, accuracy_data, parity_data = load_model(args.model, args.scheme, args.quiet,
                                                           args.data)
        name = ep.tvmq_info.get("model", "model") if hasattr(ep, "tvmq_info") else "model"
        out = args.out or f"build/{name}-{args.target}"
        db = args.db
        if db is None and args.model in zoo.ZOO and not args.no_db:
            from schedules.targets import resolve
            from schedules.tuning import shipped_database

            db = shipped_database(args.model, resolve(args.target))  # tuned on this CPU kind
        with console.status(f"compiling {name} for {args.target}"):
            art = build(ep, target=args.target, out=out, name=name, parity=args.parity,
                        parity_data=parity_data, accuracy_data=accuracy_data, extra=extra,
                        db=db, shift_only=args.shift_only)
    except USER_ERRORS as err:
        console.print(f"[red]error:[/] {err}", highlight=False, soft_wrap=True)
        return 2
    Console().print(report(art))
    return 0 if art.manifest["parity"]["mismatches"] == 0 else 1


class _CallableModule(types.ModuleType):
    """``import tvmq.build`` rebinds ``tvmq.build`` to this module: keep it callable."""

    def __call__(self, *args, **kwargs):
        return build(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

if __name__ == "__main__":
    sys.exit(main())
