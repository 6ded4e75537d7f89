"""Deploy reports: one row per board (parity with the PyTorch integer reference, latency), as
a rich table, a JSON file and a PNG bar chart, each written atomically. Emulated boards are
labelled emulated in all three: their timings say nothing about a real Pi."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def write_atomic(path: Path, write) -> None:
    """``write(tmp)`` into a temporary sibling of ``path``, then rename it into place."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def board_title(row: dict) -> str:
    kind = "EMULATED" if row["emulated"] else row["label"]
    return f"{row['board']} [{kind}, {row['machine']}]"


def table(report: dict):
    from rich.table import Table

    t = Table(title=f"tvmq deploy: {report['model']} ({report['target']})",
              caption="latency: time_evaluator over RPC; emulated boards run under qemu,"
                      " their timings are not Raspberry Pi timings")
    for col, justify in (("board", "left"), ("kind", "left"), ("parity", "right"),
                         ("median ms", "right"), ("q1–q3 ms", "right"), ("repeats", "right")):
        t.add_column(col, justify=justify, no_wrap=col != "board",
                     min_width=21 if col == "board" else None)
    for r in report["boards"]:
        p = r["parity"]
        ok = p["mismatches"] == 0
        kind = "[yellow]emulated[/]" if r["emulated"] else r["label"]
        t.add_row(r["board"], f"{kind} ({r['machine']})",
                  f"[{'green' if ok else 'red'}]{p['mismatches']}/{p['elements']} differ[/]",
                  f"{r['median_ms']:.3f}", f"{r['q1_ms']:.3f}–{r['q3_ms']:.3f}",
                  str(len(r["times_ms"])))
    return t


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["boards"]
    fig, ax = plt.subplots(figsize=(8, 0.7 * len(rows) + 1.6))
    bars = ax.barh([board_title(r) for r in rows], [r["median_ms"] for r in rows],
                   xerr=[[r["median_ms"] - r["q1_ms"] for r in rows],
                         [r["q3_ms"] - r["median_ms"] for r in rows]],
                   color=["C7" if r["emulated"] else "C0" for r in rows], hatch=None)
    for bar, r in zip(bars, rows):
        if r["emulated"]:
            bar.set_hatch("//")
    ax.bar_label(bars, fmt="%.3f ms", padding=4)
    ax.invert_yaxis()
    ax.margins(x=0.2)
    ax.set_xlabel("median latency, ms (hatched: EMULATED under qemu, not a Pi timing)")
    ax.set_title(f"{report['model']} on {report['target']}", fontsize="medium")
    fig.tight_layout()
    write_atomic(path, lambda p: fig.savefig(p, format="png", dpi=120))
    plt.close(fig)


def write(report: dict, out_dir: Path, stem: str = "deploy") -> tuple[Path, Path]:
    """``out_dir/deploy.json`` and ``out_dir/deploy.png``."""
    json_path, png_path = out_dir / f"{stem}.json", out_dir / f"{stem}.png"
    write_atomic(json_path, lambda p: p.write_text(json.dumps(report, indent=2)))
    plot(report, png_path)
    return json_path, png_path
