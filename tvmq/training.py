"""The reference QAT loop, and calibration for post-training use.

``train`` follows IOIQ's batch-norm schedule: the first half of the epochs *learn* (BN
normal, running statistics updated), the second half *lock* (BN folded into the quantized
weights), so the last epochs train exactly the arithmetic that will be deployed.
"""
from __future__ import annotations

from typing import Iterable

import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from torch import nn

from tvmq.qat import lock_batchnorm


def progress(**kw) -> Progress:
    """The rich progress bar every long tvmq job shows."""
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                    TextColumn("{task.completed}/{task.total}"), TextColumn("{task.fields[info]}"),
                    TimeElapsedColumn(), **kw)


def train(qat: nn.Module, loader: Iterable, epochs: int = 12, lr: float = 2e-3,
          lock_at: float = 0.5, seed: int = 0, quiet: bool = False,
          description: str = "QAT training") -> nn.Module:
    """Train ``qat`` in place with Adam + cosine schedule and cross entropy; returns it."""
    torch.manual_seed(seed)
    opt = torch.optim.Adam(qat.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    loss_fn = nn.CrossEntropyLoss()
    with progress(disable=quiet) as bar:
        task = bar.add_task(description, total=epochs, info="")
        for epoch in range(epochs):
            if epoch == int(epochs * lock_at):
                lock_batchnorm(qat)
            qat.train()
            total = count = 0.0
            for x, y in loader:
                opt.zero_grad()
                loss = loss_fn(qat(x), y)
                loss.backward()
                opt.step()
                total += loss.item() * len(y)
                count += len(y)
            sched.step()
            bar.update(task, advance=1, info=f"loss {total / count:.3f}")
    lock_batchnorm(qat)
    return qat.eval()


class CalibrationError(ValueError):
    """The calibration set cannot calibrate anything (it is empty)."""


@torch.no_grad()
def calibrate(qat: nn.Module, batches: Iterable) -> nn.Module:
    """Choose activation exponents from data (no weight update). BN is locked first so the
    statistics are those of the deployed arithmetic. ``batches`` yields inputs or (x, y)."""
    lock_batchnorm(qat)
    qat.eval()
    for m in qat.modules():  # only the activation observers learn (every scheme's has observe)
        if hasattr(m, "observe"):
            m.train()
    seen = 0
    for batch in batches:
        qat(batch[0] if isinstance(batch, (tuple, list)) else batch)
        seen += 1
    if not seen:
        raise CalibrationError("tvmq.calibrate: the calibration set was empty: pass at least"
                               " one batch of inputs")
    return qat.eval()
