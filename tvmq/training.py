"""The reference QAT loop, and calibration for post-training use.

``train`` also drives every quantizer with a schedule (``stages``/``set_stage``, e.g. IOIQ's
incremental weight quantization): the stages split the epochs evenly, the last epoch runs the
last stage, and the progress bar shows the stage and the quantized share.

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


# ----------------------------------------------------------------------------- staged quantizers
def staged_quantizers(model: nn.Module) -> list[nn.Module]:
    """Modules with a quantization schedule: ``stages`` (increasing fractions ending at 1)
    and ``set_stage(fraction)`` (e.g. IOIQ's incremental weight quantizer). Generic: any
    scheme's quantizer that has both is driven by :func:`train`."""
    return [m for m in model.modules() if hasattr(m, "stages") and hasattr(m, "set_stage")]


def stage_of(epoch: int, epochs: int, n_stages: int) -> int:
    """The stage index of ``epoch``: stages split the epochs evenly and the last epoch is
    always in the last stage (``ceil((epoch + 1) · n / epochs) − 1``)."""
    return min(n_stages - 1, -(-(epoch + 1) * n_stages // epochs) - 1)


def _set_stages(staged: list[nn.Module], epoch: int, epochs: int) -> str:
    """Set every staged quantizer's stage for ``epoch``; the progress text."""
    if not staged:
        return ""
    for m in staged:
        m.set_stage(m.stages[stage_of(epoch, epochs, len(m.stages))])
    first = staged[0]
    i = stage_of(epoch, epochs, len(first.stages))
    return f"stage {i + 1}/{len(first.stages)} ({100 * first.stages[i]:g}% quantized) "


def finish_observers(model: nn.Module) -> None:
    """Let every quantizer that decides once the data is seen (``finish_calibration(model)``,
    e.g. MXQN's fixed-or-log choice) decide; :func:`calibrate` and :func:`train` end here."""
    for m in list(model.modules()):
        if hasattr(m, "finish_calibration"):
            m.finish_calibration(model)


def train(qat: nn.Module, loader: Iterable, epochs: int = 12, lr: float = 2e-3,
          lock_at: float = 0.5, seed: int = 0, quiet: bool = False,
          description: str = "QAT training") -> nn.Module:
    """Train ``qat`` in place with Adam + cosine schedule and cross entropy; returns it."""
    torch.manual_seed(seed)
    opt = torch.optim.Adam(qat.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    loss_fn = nn.CrossEntropyLoss()
    staged = staged_quantizers(qat)
    with progress(disable=quiet) as bar:
        task = bar.add_task(description, total=epochs, info="")
        for epoch in range(epochs):
            stage = _set_stages(staged, epoch, epochs)
            if stage:
                bar.update(task, info=stage)
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
            bar.update(task, advance=1, info=f"{stage}loss {total / count:.3f}")
    lock_batchnorm(qat)
    finish_observers(qat)
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
    finish_observers(qat)
    return qat.eval()
