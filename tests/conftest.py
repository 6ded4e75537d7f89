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


# ----------------------------------------------------------------------------- boards
@pytest.fixture(scope="session")
def emulated_pi():
    """The emulated Raspberry Pi 4 (aarch64 TVM runtime under qemu) for the whole session."""
    from deploy.boards import emulated_pi as start
    from tvmq.default_model import cache_dir

    with start(cache_dir()) as board:
        yield board


@pytest.fixture(scope="session")
def emulated_pi5():
    """The emulated Raspberry Pi 5 (Cortex-A76: dotprod, so the sdot kernels run)."""
    from deploy.boards import emulated_pi as start
    from tvmq.default_model import cache_dir

    with start(cache_dir(), target="rpi5") as board:
        yield board


def run_on_board(board_address: str, module: nn.Module, *inputs: torch.Tensor,
                 target="arm", tmp_path=None) -> torch.Tensor:
    """torch.export -> tvmq pipeline for ``target`` -> cross-compiled library -> run on the
    board at ``board_address`` over RPC."""
    import tempfile
    from pathlib import Path

    from deploy import remote
    from tvmq.compile import export_library

    tgt = resolve(target)
    ep = torch.export.export(module, tuple(inputs))
    ex = compile_relax(import_exported_program(ep), tgt)
    with tempfile.TemporaryDirectory(dir=tmp_path) as tmp:
        lib = Path(tmp) / "op.so"
        export_library(ex, tgt, str(lib))
        board = remote.connect(board_address)
        board.session.upload(str(lib))
        dev = board.session.cpu()
        vm = relax.VirtualMachine(board.session.load_module("op.so"), dev)
        vm.set_input("main", *[tvm.runtime.tensor(x.numpy(), dev) for x in inputs])
        vm.invoke_stateful("main")
        return torch.from_numpy(vm.get_outputs("main").numpy())
