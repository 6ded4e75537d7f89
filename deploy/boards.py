"""Processes that serve TVM RPC on this machine: the emulated Raspberry Pi (tvmq's aarch64
server under ``qemu-aarch64``), a local x86 server (TVM's ``tvm.exec.rpc_server``) and a
tracker (``tvm.exec.rpc_tracker``). Each binds 127.0.0.1 unless told otherwise, runs in its
own process group (its session children die with it), dies with the Python process that
started it (even a SIGKILLed one: ``PR_SET_PDEATHSIG``) and is a context manager.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from deploy.runtime_build import build_board_runtime

LOCALHOST = "127.0.0.1"
QEMU = "qemu-aarch64"
AARCH64_SYSROOT = "/usr/aarch64-linux-gnu"  # Debian's libc6-dev-arm64-cross / libc6-arm64-cross
# -cpu of qemu per tvmq target: a Pi 4's Cortex-A72 faults on +dotprod code, as a real Pi 4 does
EMULATED_CPUS = {"arm": "cortex-a72", "rpi5": "cortex-a76"}


class BoardStartError(RuntimeError):
    """A local server, tracker or emulated board did not start."""


def _die_with_parent(parent_pid: int):
    """preexec_fn: SIGTERM the started process when its parent dies, however it dies (Linux's
    PR_SET_PDEATHSIG; a no-op elsewhere). The signal comes when the *thread* that started the
    process ends: start servers from a thread that outlives them (the main thread does)."""
    def preexec():
        if not sys.platform.startswith("linux"):
            return
        import ctypes
        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent_pid:  # the parent died before prctl took effect
            os.kill(os.getpid(), signal.SIGKILL)
    return preexec


def free_port(host: str = LOCALHOST) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class ServerProcess:
    """A started server; ``address`` is ``(host, port)``. Stop it with ``stop()`` or ``with``."""

    def __init__(self, name: str, argv: list[str], host: str, port: int,
                 ready: str, startup_timeout: float = 60.0):
        self.name, self.host, self.port = name, host, port
        self._log = tempfile.NamedTemporaryFile("w+", prefix="tvmq-board-", suffix=".log",
                                                delete=False)
        # no shell in between: the PID is the server's own, its process group holds its children
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True,
                                     preexec_fn=_die_with_parent(os.getpid()))
        deadline = time.monotonic() + startup_timeout
        while not re.search(ready, self.log()):
            if self.proc.poll() is not None:
                raise BoardStartError(f"{name} exited at start (status {self.proc.returncode}):"
                                      f"\n{self.log()[-2000:]}")
            if time.monotonic() > deadline:
                self.stop()
                raise BoardStartError(f"{name} did not start within {startup_timeout:.0f} s:"
                                      f"\n{self.log()[-2000:]}")
            time.sleep(0.1)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def log(self) -> str:
        return Path(self._log.name).read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(5)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(5)
        self._log.close()
        Path(self._log.name).unlink(missing_ok=True)

    def __enter__(self):
        return self

    def __exit__(self, *_exc):
        self.stop()


def emulated_pi(cache_dir, *, port: int = 0, host: str = LOCALHOST, tracker: str | None = None,
                key: str = "rpi4", target: str = "arm", progress=None,
                server_args: list[str] | tuple[str, ...] = ()) -> ServerProcess:
    """A Raspberry Pi emulated by ``qemu-aarch64`` (user mode) running tvmq's board server:
    a real aarch64 TVM runtime answering real TVM RPC. Timings from it are emulated.

    ``server_args`` go to ``tvmq_rpc_server`` after ours (a later flag wins), e.g.
    ``["--session-timeout", "60", "--max-sessions", "2", "--max-upload-mb", "64"]``."""
    if shutil.which(QEMU) is None:
        raise BoardStartError(f"{QEMU} not found: install Debian's qemu-user (./setup.sh does)")
    runtime = build_board_runtime(cache_dir, progress=progress)
    cpu = EMULATED_CPUS.get(target)
    if cpu is None:
        raise BoardStartError(f"no emulated board for target {target!r}; "
                              f"choose one of {sorted(EMULATED_CPUS)}")
    port = port or free_port(host)
    label = f"emulated Raspberry Pi (qemu-aarch64 -cpu {cpu})"
    argv = [QEMU, "-cpu", cpu, "-L", AARCH64_SYSROOT, str(runtime / "tvmq_rpc_server"),
            "--host", host, "--port", str(port), "--label", label,
            "--exit-with-parent"]  # an orphaned board would hold the port and its sessions
    if tracker:
        argv += ["--tracker", tracker, "--key", key]
    argv += list(server_args)
    return ServerProcess(label, argv, host, port, ready=r"listening on")


def local_server(*, port: int = 0, host: str = LOCALHOST, tracker: str | None = None,
                 key: str = "x86") -> ServerProcess:
    """TVM's own RPC server on this machine (the x86 board: no cross compiling needed)."""
    port = port or free_port(host)
    argv = [sys.executable, "-m", "tvm.exec.rpc_server", "--host", host,
            "--port", str(port), "--port-end", str(port + 1)]
    if tracker:
        argv += ["--tracker", tracker, "--key", key]
    return ServerProcess(f"TVM RPC server (x86, {host}:{port})", argv, host, port,
                         ready=r"bind to")


def tracker(*, port: int = 0, host: str = LOCALHOST) -> ServerProcess:
    """TVM's RPC tracker: boards register under a key, clients request one."""
    port = port or free_port(host)
    argv = [sys.executable, "-m", "tvm.exec.rpc_tracker", "--host", host,
            "--port", str(port), "--port-end", str(port + 1)]
    return ServerProcess(f"TVM RPC tracker ({host}:{port})", argv, host, port, ready=r"bind to")
