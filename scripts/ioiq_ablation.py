"""IOIQ ablation on digits (seed 002's findings, in shape): ``python scripts/ioiq_ablation.py``.

For each seed the float ``digits_net`` is trained once (``HYPER["float_epochs"]`` epochs,
Adam, lr 2e-3, as ``scripts/scheme_accuracy.py``), then every variant's QAT copy of it is
trained with ``tvmq.train`` for ``--qat-epochs`` (BN learns for the first half, then locks;
IOIQ's stages split the epochs), converted, and the integer deploy model (the PyTorch
integer reference the kernels match bit for bit) is scored on the test split (360 images).

Variants: IOIQ 8 bit with 4 / 2 / 1 exponent candidates; pruning vs random order;
incremental (50/75/87.5/100 %) vs all at once (``stages=100``); 6 bit; plain INT-SE 8 and 6
trained for the same epochs. Writes ``docs/ioiq-ablation-digits.json`` and prints a table.

Paper (ResNet-18, CIFAR-10): 8 bit −0.03 %, 6 bit −4.35 % vs float; 4 candidates −0.18 %,
2 candidates ≈ −0.3 %, 1 candidate (s) −0.43 %; pruning order −0.18 %, random −0.37 %.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from scheme_accuracy import run  # noqa: E402  same float model, same QAT loop
from tvmq.default_model import HYPER  # noqa: E402

VARIANTS = {
    "ioiq:8 (4 candidates, pruning, incremental)": "ioiq:8",
    "ioiq:8 2 candidates": "ioiq:8,candidates=2",
    "ioiq:8 1 candidate": "ioiq:8,candidates=1",
    "ioiq:8 random order": "ioiq:8,order=random",
    "ioiq:8 all at once": "ioiq:8,stages=100",
    "int-se:8 (plain QAT)": "int-se:8",
    "ioiq:6": "ioiq:6",
    "ioiq:6 all at once": "ioiq:6,stages=100",
    "int-se:6 (plain QAT)": "int-se:6",
}
PAPER = {"float": "0 (FP32)", "ioiq:8 (4 candidates, pruning, incremental)": "-0.03 / -0.18",
         "ioiq:8 2 candidates": "≈ -0.3", "ioiq:8 1 candidate": "-0.43 (s only)",
         "ioiq:8 random order": "-0.37", "ioiq:6": "-4.35"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--qat-epochs", type=int, default=HYPER["qat_epochs"])
    ap.add_argument("--only", nargs="*", help="labels or specs of the variants to run")
    ap.add_argument("--out", default="docs/ioiq-ablation-digits.json")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    variants = {k: v for k, v in VARIANTS.items()
                if not args.only or k in args.only or v in args.only}
    start = time.time()
    runs = [run(s, variants, args.qat_epochs, args.quiet) for s in args.seeds]
    rows = {k: [r[k] for r in runs] for k in runs[0]}
    result = {"dataset": "scikit-learn digits, test split (360 images)", "seeds": args.seeds,
              "float_epochs": HYPER["float_epochs"], "qat_epochs": args.qat_epochs,
              "specs": variants, "torch": torch.__version__,
              "seconds": round(time.time() - start), "accuracy": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    table = Table(title=f"IOIQ ablation, digits test accuracy of the deploy model (seeds"
                        f" {args.seeds}, {args.qat_epochs} QAT epochs)")
    for col in ("variant", "mean %", "per seed", "vs float", "paper (ResNet-18/CIFAR-10)"):
        table.add_column(col)
    base = statistics.mean(rows["float"])
    for k, v in rows.items():
        m = statistics.mean(v)
        table.add_row(k, f"{m:.2f}", " ".join(f"{a:.2f}" for a in v), f"{m - base:+.2f}",
                      PAPER.get(k, ""))
    Console().print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
