"""Run a compiled library on a board over TVM RPC: connect (a server, or every free board of
a tracker key), upload, load, run on given inputs, time with ``time_evaluator``.

Every failure a user can cause or meet (nothing listening, no free board, a library for the
wrong CPU, a board that dies mid-run) is a :class:`BoardError` naming the board and the stage,
raised within a bounded time.
"""
from __future__ import annotations

import gc
import json
from contextlib import suppress as _suppress_ctx
import socket
import statistics
import struct
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tvm
from tvm import relax, rpc

CONNECT_TIMEOUT = 10.0  # s to open a TCP connection to a server or tracker
ELF_MACHINES = {0x3E: "x86_64", 0xB7: "aarch64", 0x28: "arm (32-bit)", 0xF3: "riscv"}


class BoardError(RuntimeError):
    """A board or tracker that cannot be reached or used, or that failed mid-run."""


def parse_address(address: str, what: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise BoardError(f"{what} address {address!r} is not HOST:PORT")
    return host or "127.0.0.1", int(port)


def library_machine(path: str | Path) -> str:
    """The CPU architecture a shared library is built for, from its ELF header."""
    head = Path(path).read_bytes()[:20]
    if head[:4] != b"\x7fELF":
        return "not an ELF library"
    return ELF_MACHINES.get(struct.unpack_from("<H", head, 18)[0], "unknown")


def _reachable(host: str, port: int, what: str) -> None:
    """Fail fast (not after TCP's minutes-long retry) when nothing listens at host:port."""
    try:
        socket.create_connection((host, port), timeout=CONNECT_TIMEOUT).close()
    except OSError as err:
        raise BoardError(f"no {what} at {host}:{port}: {err.strerror or err}") from None


def _with_timeout(fn, seconds: float, what: str):
    """Run fn() in a thread; a BoardError if it does not return in time (e.g. a tracker that
    queues a request forever)."""
    box: dict = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as err:  # re-raised in the caller's thread
            box["error"] = err

    worker = threading.Thread(target=target, daemon=True)
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        raise BoardError(f"{what}: no answer within {seconds:.0f} s")
    if "error" in box:
        raise box["error"]
    return box["value"]


@dataclass
class Board:
    """An open RPC session with a board."""

    name: str  # where it is: "127.0.0.1:9190" or "rpi4 #2 via tracker 10.0.0.2:9190"
    session: rpc.RPCSession
    machine: str = "unknown"  # aarch64, x86_64
    label: str = "board"  # "emulated Raspberry Pi (...)" for the emulated one
    features: list[str] | None = None  # CPU features (dotprod, i8mm, sve); None: unknown

    @property
    def emulated(self) -> bool:
        return self.label.startswith("emulated")

    def close(self) -> None:
        """End the session now (the board goes back to its tracker's pool); TVM closes it only
        when the last reference to it is collected, and VM objects hold reference cycles."""
        self.session = None
        gc.collect()


def _describe(name: str, session: rpc.RPCSession) -> Board:
    try:  # tvmq's board server describes itself; TVM's Python server does not
        info = json.loads(session.get_function("tvmq.board.info")())
        return Board(name, session, info.get("machine", "unknown"), info.get("label", "board"),
                     info.get("features"))
    except Exception:  # noqa: BLE001  a stock TVM server: no tvmq.board.info
        return Board(name, session, "unknown", "TVM RPC server")


def is_tracker(host: str, port: int) -> bool:
    """Whether a TVM RPC tracker answers at host:port (its handshake: it echoes the tracker
    magic number; a server closes the connection)."""
    from tvm.rpc.base import RPC_TRACKER_MAGIC

    try:
        with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT) as sock:
            sock.sendall(struct.pack("<i", RPC_TRACKER_MAGIC))
            answer = sock.recv(4)
        return len(answer) == 4 and struct.unpack("<i", answer)[0] == RPC_TRACKER_MAGIC
    except OSError:
        return False


def connect(address: str, session_timeout: float = 600) -> Board:
    """A session with the server at ``HOST:PORT``."""
    host, port = parse_address(address, "RPC server")
    _reachable(host, port, "TVM RPC server")
    try:
        session = _with_timeout(lambda: rpc.connect(host, port, session_timeout=session_timeout),
                                CONNECT_TIMEOUT * 3, f"RPC server {address}")
    except BoardError:
        raise
    except Exception as err:  # noqa: BLE001  TVM reports handshake failures as TVMError
        if is_tracker(host, port):
            raise BoardError(f"{address} is a TVM RPC tracker, not a server: that address is a"
                             " tracker; use --tracker HOST:PORT --key K (Python:"
                             " tracker=..., key=...)") from None
        raise BoardError(f"{address} did not accept an RPC session: {_last_line(err)}") from None
    return _describe(address, session)


def free_boards(tracker: str, key: str) -> int:
    """How many boards registered under ``key`` are free at ``tracker``."""
    host, port = parse_address(tracker, "tracker")
    _reachable(host, port, "TVM RPC tracker")
    try:
        summary = _with_timeout(lambda: rpc.connect_tracker(host, port).summary(),
                                CONNECT_TIMEOUT * 3, f"tracker {tracker}")
    except BoardError:
        raise
    except Exception as err:  # noqa: BLE001
        raise BoardError(f"{tracker} is not a TVM RPC tracker: {_last_line(err)}") from None
    queue = summary.get("queue_info", {})
    free = int(queue.get(key, {}).get("free", 0))
    if free == 0:
        known = ", ".join(f"{k} ({v.get('free', 0)} free)" for k, v in sorted(queue.items()))
        raise BoardError(f"tracker {tracker} has no free board for key {key!r}"
                         f" (keys: {known or 'none registered'})")
    return free


def request(tracker: str, key: str, count: int = 1, session_timeout: float = 600) -> list[Board]:
    """``count`` boards of ``key`` from the tracker (``count=0``: every free one)."""
    free = free_boards(tracker, key)
    count = free if count == 0 else count
    if count > free:
        raise BoardError(f"tracker {tracker} has {free} free board(s) for key {key!r},"
                         f" {count} asked")
    host, port = parse_address(tracker, "tracker")
    boards = []
    for i in range(count):
        try:
            session = _with_timeout(
                lambda: rpc.connect_tracker(host, port).request(
                    key, session_timeout=session_timeout, max_retry=2),
                CONNECT_TIMEOUT * 3, f"tracker {tracker}, key {key!r}")
        except BoardError:
            raise
        except Exception as err:  # noqa: BLE001
            raise BoardError(f"tracker {tracker} could not give a {key!r} board:"
                             f" {_last_line(err)}") from None
        boards.append(_describe(f"{key} #{i + 1} via tracker {tracker}", session))
    return boards


def _suppress():
    return _suppress_ctx(Exception)


def _last_line(err: BaseException) -> str:
    lines = [ln.strip() for ln in str(err).strip().splitlines() if ln.strip()]
    return lines[-1] if lines else type(err).__name__


@dataclass
class RemoteRun:
    """Outputs of each input, the latency samples (ms, one per repeat), and the TVM worker
    threads the board ran with (None: the board could not say)."""

    outputs: list[np.ndarray]
    times_ms: list[float] = field(default_factory=list)
    threads: int | None = None

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times_ms)


def check_features(board: Board, needed: list[str], built_for: str) -> None:
    """Refuse, before running, a library compiled for CPU features the board lacks (it would
    die on an illegal instruction): e.g. an rpi5 (+dotprod) build on a Pi 4."""
    if board.features is None:
        return  # a stock TVM server does not say
    missing = [f for f in needed if f not in board.features]
    if missing:
        raise BoardError(
            f"{built_for} needs CPU feature(s) {', '.join(missing)} that board {board.name}"
            f" lacks (it has: {', '.join(board.features) or 'none'}): build for the board's"
            " target (a Raspberry Pi 4 is --target arm)")


def set_threads(board: Board, threads: int) -> int | None:
    """Size the board's TVM thread pool to ``threads`` workers (before its first run: TVM's
    pool cannot grow once it exists) through the session's ``runtime.config_threadpool``;
    returns the board's ``runtime.NumThreads`` (None if the board has neither function)."""
    try:
        config = board.session.get_function("runtime.config_threadpool")
        count = board.session.get_function("runtime.NumThreads")
    except Exception:  # noqa: BLE001  a runtime built without them
        return None
    n = int(threads)
    try:
        # the CPU list (its length sets the pool's size) cannot cross RPC as a Python list:
        # build the ffi.Array on the board. Mode -3 = kSpecifyThreadShareAllCore: n workers,
        # none pinned to one core.
        cpus = board.session.get_function("ffi.Array")(*[str(i) for i in range(n)])
        config(-3, n, cpus)
    except Exception:  # noqa: BLE001  no ffi.Array on the board: can only lower the count
        config(1, n)
    return int(count())


def run(board: Board, library: str | Path, inputs: list[np.ndarray], *, repeat: int = 10,
        number: int = 0, min_repeat_ms: float = 200, warmup: int = 3,
        threads: int | None = None) -> RemoteRun:
    """Upload and load ``library`` (a Relax VM executable), run it on each input, then time
    ``repeat`` batches of ``number`` runs (``number=0``: as many as fill ``min_repeat_ms``).
    ``threads``: the board's TVM worker threads (None: the board runtime's default)."""
    stage = "upload"
    used = None
    try:
        if threads:
            stage = "thread setup"
            used = set_threads(board, threads)
            stage = "upload"
        board.session.upload(str(library))
        stage = "load"
        try:
            lib = board.session.load_module(Path(library).name)
        except Exception as err:  # noqa: BLE001
            raise BoardError(
                f"board {board.name} ({board.machine}) could not load {Path(library).name}, "
                f"built for {library_machine(library)}: {_last_line(err)}") from None
        dev = board.session.cpu()
        vm = relax.VirtualMachine(lib, dev)
        stage = "run"
        outputs = []
        for x in inputs:  # a remote VM returns no tuple; go through set_input/get_outputs
            vm.set_input("main", tvm.runtime.tensor(np.ascontiguousarray(x), dev))
            vm.invoke_stateful("main")
            outputs.append(vm.get_outputs("main").numpy())
        stage = "timing"
        for _ in range(warmup):
            vm.invoke_stateful("main")
        # TVM's time_evaluator takes integers only (a float is "Expected int but got float")
        timer = vm.time_evaluator("invoke_stateful", dev, number=max(int(number), 1),
                                  repeat=int(repeat),
                                  min_repeat_ms=0 if number else int(round(min_repeat_ms)))
        times = [t * 1e3 for t in timer("main").results]
        if used is None:
            with _suppress():
                used = int(board.session.get_function("runtime.NumThreads")())
        return RemoteRun(outputs, times, used)
    except BoardError:
        raise
    except Exception as err:  # noqa: BLE001  a dead board surfaces as a socket/TVM error
        why = _last_line(err)
        # the endpoint saw the connection end (kShutdown, printed as a name or a number)
        if any(sign in why for sign in ("RPCCode", "kShutdown", "Socket", "closed", "pipe")):
            why = ("the board closed the session (its process died: a crash, an illegal"
                   " instruction, or it was stopped; see the board's log)")
        raise BoardError(f"board {board.name} failed during {stage}: {why}") from None
