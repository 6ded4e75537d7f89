"""Deploy a built artifact to boards over TVM RPC and check it there.

``run`` uploads the artifact's library to a board (a server at ``rpc="HOST:PORT"``, or the
free boards of ``key`` at ``tracker="HOST:PORT"``), runs it on the inputs of the build's parity
check, compares the board's outputs bit for bit with the PyTorch integer reference stored in
the artifact, and times it with TVM's ``time_evaluator``. The report goes to the artifact
directory as ``deploy.json`` and ``deploy.png``; ``python -m tvmq.deploy`` also prints a table.

    report = tvmq.deploy.run("build/digits-arm", tracker="127.0.0.1:9190", key="rpi4")
"""
from __future__ import annotations

import platform
import time
from pathlib import Path

import numpy as np

from deploy import remote
from deploy import report as reports
from deploy.remote import BoardError
from tvmq.artifact import Artifact, default_threads

__all__ = ["run", "BoardError"]

OPTIONAL_FEATURES = ("dotprod", "i8mm", "sve")  # beyond a Pi 4's Cortex-A72 (NEON)


def _row(board: remote.Board, result: remote.RemoteRun, want: np.ndarray) -> dict:
    got = np.stack(result.outputs)
    q1, med, q3 = np.percentile(result.times_ms, [25, 50, 75])
    return {
        "board": board.name, "machine": board.machine, "label": board.label,
        "emulated": board.emulated,
        "parity": {"inputs": len(want), "elements": int(want.size),
                   "mismatches": int((got != want).sum())},
        "threads": result.threads,
        "median_ms": float(med), "q1_ms": float(q1), "q3_ms": float(q3),
        "times_ms": result.times_ms,
    }


def run(artifact: str | Path | Artifact, *, rpc: str | None = None, tracker: str | None = None,
        key: str = "rpi4", boards: int = 1, repeat: int = 10, number: int = 0,
        min_repeat_ms: float = 200, warmup: int = 3, inputs: int | None = None,
        session_timeout: float = 600, write: bool = True, progress=None,
        threads: int | None = None) -> dict:
    """Deploy, check and time ``artifact`` on one board (``rpc``) or on ``boards`` boards of
    ``key`` from ``tracker`` (``boards=0``: every free one). Returns the report (also written
    to the artifact directory unless ``write=False``); ``progress(message)`` narrates.
    ``threads``: TVM worker threads on the board (default: ``TVM_NUM_THREADS`` if set, else
    the target's core count, e.g. 4 for a Pi); each board's row says how many ran."""
    if (rpc is None) == (tracker is None):
        raise BoardError("name one board: rpc='HOST:PORT' or tracker='HOST:PORT' with a key")
    for name, value, low in (("repeat", repeat, 1), ("number", number, 0),
                             ("min_repeat_ms", min_repeat_ms, 0), ("warmup", warmup, 0),
                             ("threads", threads if threads is not None else 1, 1)):
        if value < low:
            raise BoardError(f"{name}={value}: must be at least {low}")
    art = artifact if isinstance(artifact, Artifact) else Artifact.open(artifact)
    threads = threads or default_threads(art.manifest)
    art.verify()
    xs, want = art.parity_data()
    if inputs is not None:
        xs, want = xs[:inputs], want[:inputs]
    say = progress or (lambda _msg: None)

    say(f"connecting to {rpc or f'{key} boards via tracker {tracker}'}")
    sessions = ([remote.connect(rpc, session_timeout)] if rpc else
                remote.request(tracker, key, boards, session_timeout))
    target = art.manifest["target"]
    needed = [a.lstrip("+") for a in target["tvm"].get("mattr", [])
              if a.lstrip("+") in OPTIONAL_FEATURES]
    rows = []
    try:
        for board in sessions:
            remote.check_features(board, needed, f"{art.path} (target {target['name']})")
            say(f"{board.name}: upload, run {len(xs)} parity inputs, time")
            result = remote.run(board, art.library, list(xs), repeat=repeat, number=number,
                                min_repeat_ms=min_repeat_ms, warmup=warmup, threads=threads)
            rows.append(_row(board, result, want))
    finally:
        for board in sessions:
            board.close()
    report = {
        "model": art.manifest.get("model"), "target": art.manifest["target"]["name"],
        "artifact": str(art.path), "library_sha256": art.manifest["checksums"]["model.so"],
        "threads": threads,
        "timer": {"repeat": repeat, "number": number or "auto", "min_repeat_ms": min_repeat_ms,
                  "warmup": warmup},
        "client": platform.node(), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "boards": rows,
    }
    if write:
        reports.write(report, art.path)
    return report
