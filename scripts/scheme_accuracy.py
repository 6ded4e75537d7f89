"""Accuracy of every scheme on the digits test split: ``python scripts/scheme_accuracy.py``.

For each seed: the float ``digits_net`` is trained once (12 epochs, Adam, lr 2e-3), then
each scheme's QAT copy of it is trained with tvmq's reference loop (``--qat-epochs``, BN
learns for the first half and is locked for the second), converted, and the integer deploy
model (the PyTorch integer reference, which every kernel matches bit for bit) is scored on
the test split. Writes ``docs/accuracy-digits.json`` and prints a table (mean over seeds).
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tvmq import convert, data, prepare, train, zoo  # noqa: E402
from tvmq.default_model import HYPER  # noqa: E402

SCHEMES = ["int-se:8", "ternary", "combined-ternary:2", "combined-ternary:2,act_bits=4",
           "combined-ternary:3", "combined-ternary:3,act_bits=4"]


def run(seed: int, schemes: "list[str] | dict[str, str]", qat_epochs: int, quiet: bool) -> dict:
    """Float accuracy and each scheme's (``{label: spec}``, or specs labelled by themselves)."""
    torch.manual_seed(seed)
    model = zoo.digits_net()
    train_loader, test_loader = data.loader("train", HYPER["batch_size"]), data.loader("test")
    train(model, train_loader, HYPER["float_epochs"], HYPER["lr"], seed=seed, quiet=quiet,
          description=f"float (seed {seed})")
    out = {"float": data.accuracy(model.eval(), test_loader)}
    for label, spec in (schemes.items() if isinstance(schemes, dict)
                        else ((s, s) for s in schemes)):
        torch.manual_seed(seed)
        qat = prepare(copy.deepcopy(model), spec)
        train(qat, train_loader, qat_epochs, HYPER["qat_lr"], seed=seed, quiet=quiet,
              description=f"{spec} (seed {seed})")
        out[label] = data.accuracy(convert(qat), test_loader)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--qat-epochs", type=int, default=HYPER["qat_epochs"])
    ap.add_argument("--schemes", nargs="+", default=SCHEMES)
    ap.add_argument("--out", default="docs/accuracy-digits.json")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    start = time.time()
    runs = [run(s, args.schemes, args.qat_epochs, args.quiet) for s in args.seeds]
    rows = {k: [r[k] for r in runs] for k in runs[0]}
    result = {"dataset": "scikit-learn digits, test split (360 images)", "seeds": args.seeds,
              "float_epochs": HYPER["float_epochs"], "qat_epochs": args.qat_epochs,
              "torch": torch.__version__, "seconds": round(time.time() - start),
              "accuracy": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    table = Table(title=f"digits test accuracy, deploy model (seeds {args.seeds})")
    for col in ("scheme", "mean %", "per seed", "vs float"):
        table.add_column(col)
    base = statistics.mean(rows["float"])
    for k, v in rows.items():
        m = statistics.mean(v)
        table.add_row(k, f"{m:.2f}", " ".join(f"{a:.2f}" for a in v), f"{m - base:+.2f}")
    Console().print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
