"""The board's RPC server (deploy/runtime/src/server/rpc_server.cc) under attack from
127.0.0.1: idle and malformed clients, lying lengths, path traversal, killed sessions, a killed
launcher. Every test runs against the real aarch64 server under qemu (deploy/boards.py).

Deadlines below are the server's own (handshake, queue, session timeouts) with generous margins
for a loaded machine; nothing measures speed."""
from __future__ import annotations

import gc
import json
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import tvm
from tvm import rpc

from deploy import boards, runtime_build
from tvmq.default_model import cache_dir

RPC_MAGIC = 0xFF271
RPC_BUSY = RPC_MAGIC + 1
LABEL = 'Pi "4" \\ emulated'  # a quote and a backslash: must survive as JSON
MARGIN = 30.0  # s of slack on every server deadline (2 shared cores, qemu)


def _start(tmp: Path, *args: str) -> boards.ServerProcess:
    tmp.mkdir(parents=True, exist_ok=True)
    return boards.emulated_pi(cache_dir(), server_args=["--work-dir", str(tmp), *args])


@pytest.fixture(scope="module")
def board(tmp_path_factory):
    """Our own emulated Pi: short handshake deadline, small upload limit, its own work dir."""
    work = tmp_path_factory.mktemp("board-work")
    with _start(work, "--handshake-timeout", "3", "--queue-timeout", "60",
                "--session-timeout", "120", "--max-upload-mb", "8", "--label", LABEL) as b:
        b.work = work
        yield b


@pytest.fixture(scope="module")
def strict_board(tmp_path_factory):
    """An emulated Pi with short session and queue limits (5 s, 2 s)."""
    work = tmp_path_factory.mktemp("strict-work")
    with _start(work, "--handshake-timeout", "3", "--queue-timeout", "2",
                "--session-timeout", "5") as b:
        b.work = work
        yield b


def _in_thread(fn, timeout: float):
    """fn() in a thread; its result, or a failure if it has not returned within timeout."""
    box = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001  handed to the test
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), f"no answer within {timeout:.0f} s: the board is blocked"
    if "error" in box:
        raise box["error"]
    return box["value"]


def _real_session(board, timeout: float = 120.0) -> dict:
    """A real TVM RPC session: connect, call a board function; returns tvmq.board.info."""
    host, port = board.host, board.port

    def go():
        sess = rpc.connect(host, port, session_timeout=60)
        info = json.loads(sess.get_function("tvmq.board.info")())
        del sess
        gc.collect()  # the session ends when its last reference goes
        return info
    return _in_thread(go, timeout)


def _raw(board, payload: bytes = b"", timeout: float = 10.0) -> socket.socket:
    s = socket.create_connection((board.host, board.port), timeout=timeout)
    if payload:
        s.sendall(payload)
    return s


def _handshake(key: str = "client:") -> bytes:
    k = key.encode()
    return struct.pack("<ii", RPC_MAGIC, len(k)) + k


def _open_session(board) -> socket.socket:
    """A raw socket past the handshake: the next bytes are RPC packets."""
    s = _raw(board, _handshake(), timeout=MARGIN + 60)
    code, keylen = struct.unpack("<ii", _recv_exact(s, 8))
    assert code == RPC_MAGIC
    _recv_exact(s, keylen)
    return s


def _recv_exact(s: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = s.recv(n - len(data))
        if not chunk:
            raise ConnectionError(f"closed after {len(data)} of {n} bytes")
        data += chunk
    return data


def _closed_by_server(s: socket.socket, timeout: float) -> bool:
    """True once the server closes s (EOF or reset) within timeout."""
    s.settimeout(timeout)
    try:
        while s.recv(4096):
            pass
        return True
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


def _session_dirs(board) -> list[Path]:
    return sorted(p for p in board.work.glob("tvmq_rpc_*") if p.is_dir())


def _session_files(board) -> list[Path]:
    """Session directories and their owner records."""
    return sorted(board.work.glob("tvmq_rpc_*"))


def _wait(cond, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.2)
    return cond()


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


# ------------------------------------------------------------------ 1: nobody holds the board
@pytest.mark.parametrize("payload", [b"", b"\x71", struct.pack("<ii", RPC_MAGIC, 4096) + b"x" * 10],
                         ids=["nothing", "1-byte", "key-4096-sent-10"])
def test_idle_client_does_not_block_a_real_session(board, payload):
    idle = _raw(board, payload)
    try:
        assert _real_session(board)["machine"] == "aarch64"
    finally:
        idle.close()


def test_silent_client_is_dropped_at_the_handshake_deadline(board):
    idle = _raw(board, b"\x71\xf2")  # 2 bytes of the magic, then nothing
    assert _closed_by_server(idle, 3 + MARGIN)
    assert "no handshake within 3 s" in board.log()


def test_idle_session_is_killed_at_the_session_timeout(strict_board):
    s = _open_session(strict_board)  # a valid session that never sends a packet
    assert _closed_by_server(s, 5 + MARGIN)
    assert _wait(lambda: not _session_files(strict_board), MARGIN)
    assert "exceeded --session-timeout 5 s" in strict_board.log()
    assert _real_session(strict_board)["machine"] == "aarch64"


def test_clients_beyond_the_session_limit_queue_then_are_refused(strict_board):
    holder = _open_session(strict_board)  # holds the one slot until its 5 s session timeout
    try:
        waiting = _raw(strict_board, _handshake(), timeout=MARGIN)
        waiting.settimeout(2 + MARGIN)
        # queued (no reply yet), then refused with the "busy" code at the 2 s queue deadline,
        # before the holder's session ends
        assert struct.unpack("<i", _recv_exact(waiting, 4))[0] == RPC_BUSY
        assert _closed_by_server(waiting, MARGIN)
    finally:
        holder.close()
    assert "no free session slot within 2 s (--max-sessions 1)" in strict_board.log()
    assert _real_session(strict_board)["machine"] == "aarch64"


# ------------------------------------------------------------------ 2: lengths are bounded
@pytest.mark.parametrize("nbytes", [2 << 30, 6 << 30, (1 << 64) - 1], ids=["2GiB", "6GiB", "2^64-1"])
def test_oversize_packet_is_refused_without_allocating(board, nbytes):
    rss_before = _rss_kb(board.proc.pid)
    s = _open_session(board)
    s.sendall(struct.pack("<Q", nbytes) + b"\0" * 8)  # 16 bytes announcing gigabytes
    assert _closed_by_server(s, MARGIN)
    assert _wait(lambda: f"RPC message of {nbytes} bytes" in board.log(), MARGIN), board.log()[-2000:]
    assert _rss_kb(board.proc.pid) < rss_before + 64 * 1024  # the server itself did not grow
    assert _real_session(board)["machine"] == "aarch64"


def test_lying_string_length_inside_a_packet_is_refused(board):
    # kInitServer (2) whose protocol-version string claims 6 GiB inside a 12-byte packet
    s = _open_session(board)
    body = struct.pack("<iQ", 2, 6 << 30)
    s.sendall(struct.pack("<Q", len(body)) + body)
    assert _closed_by_server(s, MARGIN)
    assert _wait(lambda: "RPC version longer than its packet" in board.log(), MARGIN)
    assert _real_session(board)["machine"] == "aarch64"


def test_upload_beyond_the_limit_is_refused_and_the_board_serves_on(board):
    def go():
        sess = rpc.connect(board.host, board.port, session_timeout=60)
        sess.upload(bytearray(9 << 20), target="big.bin")  # --max-upload-mb 8
    with pytest.raises(Exception):
        _in_thread(go, 120)
    assert _wait(lambda: "exceeds the board's limit" in board.log(), MARGIN)
    assert _real_session(board)["machine"] == "aarch64"


# ------------------------------------------------------------------ 3: files stay in the session
def test_file_names_are_confined_to_the_session_directory(board, tmp_path):
    def go():
        sess = rpc.connect(board.host, board.port, session_timeout=60)
        sess.upload(bytearray(b"inside"), target="ok.txt")
        assert bytes(sess.download("ok.txt")) == b"inside"
        refused = []
        for call in (lambda: sess.upload(bytearray(b"x"), target="../../escaped.txt"),
                     lambda: sess.upload(bytearray(b"x"), target=str(tmp_path / "abs.txt")),
                     lambda: sess.download("../../etc/hostname"),
                     lambda: sess.download("/etc/hostname"),
                     lambda: sess.remove("../ok.txt"),
                     lambda: sess.load_module("../../lib/x.so"),
                     lambda: sess.download("a/../../etc/hostname")):
            with pytest.raises(Exception, match="not allowed"):
                call()
            refused.append(True)
        sess.remove("ok.txt")
        sess.remove("")  # the session directory itself, as MetaSchedule's runner cleans up
        return len(refused)
    assert _in_thread(go, 120) == 7
    assert not (board.work.parent / "escaped.txt").exists()
    assert not (tmp_path / "abs.txt").exists()


def test_session_directory_is_removed_after_a_killed_session(board):
    s = _open_session(board)  # an open session: its directory exists
    def children():
        return Path(f"/proc/{board.proc.pid}/task/{board.proc.pid}/children").read_text().split()
    assert _wait(lambda: len(_session_dirs(board)) == 1 and len(children()) == 1, MARGIN)
    children = children()
    os.kill(int(children[0]), signal.SIGKILL)
    assert _wait(lambda: not _session_files(board), MARGIN), _session_files(board)
    s.close()
    assert _real_session(board)["machine"] == "aarch64"
    assert _wait(lambda: not _session_files(board), MARGIN)


def _identity(pid: int) -> str:
    """What the server writes in a session's owner record: pid and start time (ticks)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return f"{pid} {stat[stat.rindex(')') + 2:].split()[19]}"


def test_a_new_server_removes_the_sessions_a_sigkilled_one_left(tmp_path):
    """A SIGKILLed server cannot clean up: the next server on its work dir removes the session
    directories whose owner is gone, and nothing else (no owner record: not a server's; owner
    alive: another server's)."""
    work = tmp_path / "work"
    (work / "tvmq_rpc_notours").mkdir(parents=True)  # named like ours, no owner record
    live = work / "tvmq_rpc_live"  # owned by a live process (this test)
    live.mkdir()
    Path(f"{live}.owner").write_text(_identity(os.getpid()) + "\n")
    with _start(work) as first:
        s = _open_session(first)
        assert _wait(lambda: len(list(work.glob("tvmq_rpc_*.owner"))) == 2, MARGIN)
        left = [p for p in work.glob("tvmq_rpc_*") if p.is_dir() and p not in (live,)
                and p.name != "tvmq_rpc_notours"]
        assert len(left) == 1
        os.killpg(first.proc.pid, signal.SIGKILL)  # the server and its session: no cleanup
        first.proc.wait(MARGIN)
        s.close()
        assert left[0].is_dir()  # left behind
    with _start(work) as second:
        assert _wait(lambda: not left[0].exists(), MARGIN), second.log()
        assert "which is gone" in second.log()
    assert (work / "tvmq_rpc_notours").is_dir() and live.is_dir()
    assert Path(f"{live}.owner").exists() and not Path(f"{left[0]}.owner").exists()


def test_label_with_a_quote_gives_valid_json(board):
    info = _real_session(board)
    assert info["label"] == LABEL and info["machine"] == "aarch64"


# ------------------------------------------------------------------ fuzz
def _fuzz_cases(seed: int, n: int):
    rng = random.Random(seed)
    for i in range(n):
        kind = rng.choice(["random", "magic+len", "truncated", "session"])
        if kind == "random":
            yield kind, rng.randbytes(rng.randrange(0, 64))
        elif kind == "magic+len":
            length = rng.choice([-1, -(1 << 31), 4097, 1 << 30, rng.randrange(0, 64)])
            yield kind, struct.pack("<ii", RPC_MAGIC, length) + rng.randbytes(rng.randrange(0, 16))
        elif kind == "truncated":
            whole = _handshake("client:") + struct.pack("<Q", rng.randrange(1 << 64))
            yield kind, whole[:rng.randrange(1, len(whole))]
        else:  # a valid handshake, then a packet header (often lying) and some body
            nbytes = rng.choice([0, 1, 4, 12, rng.randrange(1 << 64), 1 << 33,
                                 rng.randrange(1, 4096)])
            body = rng.randbytes(rng.randrange(0, 64))
            yield kind, _handshake("client:") + struct.pack("<Q", nbytes) + body


def test_fuzzed_handshakes_and_packets_leave_the_board_serving(board):
    rss_before = _rss_kb(board.proc.pid)
    for kind, payload in _fuzz_cases(seed=20240617, n=300):
        with socket.create_connection((board.host, board.port), timeout=MARGIN) as s:
            try:
                s.sendall(payload)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the server had heard enough
            if kind == "session":  # let its child read it before we go (not required)
                s.settimeout(0.05)
                try:
                    s.recv(64)
                except (socket.timeout, ConnectionResetError):
                    pass
    assert board.alive()
    assert _rss_kb(board.proc.pid) < rss_before + 64 * 1024
    assert _real_session(board)["machine"] == "aarch64"
    assert _wait(lambda: not _session_files(board), MARGIN), _session_files(board)


# ------------------------------------------------------------------ start-up and lifetime
def _server_argv(*args: str) -> list[str]:
    runtime = runtime_build.build_board_runtime(cache_dir())
    return [boards.QEMU, "-cpu", "cortex-a72", "-L", boards.AARCH64_SYSROOT,
            str(runtime / "tvmq_rpc_server"), *args]


@pytest.mark.parametrize("port", ["abc", "70000", "-1"])
def test_bad_port_is_one_clear_line(port):
    done = subprocess.run(_server_argv("--port", port), capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"tvmq_rpc_server: --port must be an integer in 0..65535, got '{port}'"]


def test_port_in_use_names_the_real_reason():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(_server_argv("--host", "127.0.0.1", "--port", str(port)),
                              capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in done.stderr


def test_server_dies_with_a_sigkilled_emulate(tmp_path):
    port = boards.free_port()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [
        str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH")])))
    launcher = subprocess.Popen([sys.executable, "-m", "tvmq.deploy.emulate", "--port", str(port)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                                start_new_session=True)
    try:
        def listening():
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return True
            except OSError:
                return False
        assert _wait(listening, 180), "the emulated board did not start"
        launcher.send_signal(signal.SIGKILL)
        launcher.wait(10)
        assert _wait(lambda: not listening(), MARGIN), "the board outlived its launcher"
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()


def test_wheel_hash_mismatch_is_one_clear_error(monkeypatch, tmp_path):
    version = runtime_build.importlib.metadata.version("apache-tvm-ffi")
    pytag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    assert (version, pytag) in runtime_build.AARCH64_FFI_WHEEL_SHA256  # the pin exists
    monkeypatch.setitem(runtime_build.AARCH64_FFI_WHEEL_SHA256, (version, pytag), "0" * 64)
    with pytest.raises(runtime_build.BoardBuildError, match="not the pinned 0000"):
        runtime_build._fetch_aarch64_ffi(tmp_path)
    assert not (tmp_path / "libtvm_ffi.so").exists()
