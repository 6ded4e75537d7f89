"""Shared test helpers: run a module containing tvmq ops through the whole TVM path."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import tvm
from torch import nn
from tvm import relax

import tvmq  # noqa: F401  registers tvmq:: ops
from schedules.targets import resolve
from tvmq.compile import compile_relax
from tvmq.frontend import import_exported_program


class OpModule(nn.Module):
    """``forward(*xs) = fn(*xs, *buffers)``: one tvmq op with constant operands."""

    def __init__(self, fn, *consts):
        super().__init__()
        self.fn = fn
        for i, c in enumerate(consts):
            self.register_buffer(f"c{i}", c)
        self.n = len(consts)

    def forward(self, *xs):
        return self.fn(*xs, *[getattr(self, f"c{i}") for i in range(self.n)])


def run_tvm(module: nn.Module, *inputs: torch.Tensor, target="x86") -> torch.Tensor:
    """torch.export -> tvmq frontend -> tvmq pipeline -> VM on this host."""
    ep = torch.export.export(module, tuple(inputs))
    ex = compile_relax(import_exported_program(ep), resolve(target))
    vm = relax.VirtualMachine(ex, tvm.cpu())
    out = vm["main"](*[tvm.runtime.tensor(x.numpy()) for x in inputs])
    return torch.from_numpy(out.numpy())


def assert_bit_exact(got: torch.Tensor, want: torch.Tensor):
    assert got.dtype == want.dtype and got.shape == want.shape, (got.dtype, want.dtype, got.shape, want.shape)
    diff = (got != want).sum().item()
    assert diff == 0, f"{diff} of {want.numel()} elements differ; first at {torch.nonzero(got != want)[0].tolist()}"


def int8(*shape, gen, lo=-128, hi=127):
    return torch.randint(lo, hi + 1, shape, generator=gen, dtype=torch.int8)


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(1234)
