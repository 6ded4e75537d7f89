"""tvmq.deploy end to end: the digits model built for arm runs on the emulated Raspberry Pi,
for x86 on a local TVM RPC server, through a tracker (one board and a board farm), with
bit-exact outputs; and every way it can fail gives a clear error within a bounded time."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

import tvmq
from deploy import boards, remote
from deploy.remote import BoardError
from tvmq.default_model import default_program
from tvmq.errors import ArtifactError

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(300)  # no test may hang


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    ep, _accuracy = default_program(quiet=True)
    root = tmp_path_factory.mktemp("deploy")
    return {t: tvmq.build(ep, target=t, out=root / f"digits-{t}", parity=16).path
            for t in ("arm", "x86")}


def check_report(report, machine, emulated):
    (row,) = report["boards"]
    assert row["parity"] == {"inputs": 16, "elements": 160, "mismatches": 0}
    assert row["machine"] == machine and row["emulated"] is emulated
    assert len(row["times_ms"]) == 3 and row["median_ms"] > 0


def test_arm_build_on_emulated_pi_is_bit_exact(artifacts, emulated_pi):
    report = tvmq.deploy.run(artifacts["arm"], rpc=emulated_pi.address, repeat=3,
                             min_repeat_ms=20)
    check_report(report, "aarch64", emulated=True)
    art = artifacts["arm"]
    saved = json.loads((art / "deploy.json").read_text())
    assert saved["boards"][0]["label"].startswith("emulated")
    assert (art / "deploy.png").read_bytes()[:4] == b"\x89PNG"


def test_x86_build_on_local_server_is_bit_exact(artifacts):
    with boards.local_server() as server:
        report = tvmq.deploy.run(artifacts["x86"], rpc=server.address, repeat=3,
                                 min_repeat_ms=20, write=False)
    check_report(report, "unknown", emulated=False)  # TVM's own server does not say


def test_tracker_one_board_and_a_farm(artifacts, tmp_path):
    with boards.tracker() as trk, \
            boards.emulated_pi(_cache(), tracker=trk.address, key="rpi4-test"), \
            boards.emulated_pi(_cache(), tracker=trk.address, key="rpi4-test"):
        _wait_free(trk.address, "rpi4-test", 2)
        one = tvmq.deploy.run(artifacts["arm"], tracker=trk.address, key="rpi4-test", repeat=3,
                              min_repeat_ms=20, write=False)
        check_report(one, "aarch64", emulated=True)
        _wait_free(trk.address, "rpi4-test", 2)  # both boards back in the pool
        farm = tvmq.deploy.run(artifacts["arm"], tracker=trk.address, key="rpi4-test",
                               boards=0, repeat=3, min_repeat_ms=20, write=False)
        assert len(farm["boards"]) == 2
        assert all(b["parity"]["mismatches"] == 0 for b in farm["boards"])


def _cache():
    from tvmq.default_model import cache_dir
    return cache_dir()


def _wait_free(tracker, key, n, timeout=30):
    deadline = time.monotonic() + timeout
    while True:
        try:
            if remote.free_boards(tracker, key) >= n:
                return
        except BoardError:
            pass
        assert time.monotonic() < deadline, f"{n} {key} boards never registered"
        time.sleep(0.5)


# ----------------------------------------------------------------------------- failures
def test_nothing_listening(artifacts):
    port = boards.free_port()
    with pytest.raises(BoardError, match=f"no TVM RPC server at 127.0.0.1:{port}"):
        tvmq.deploy.run(artifacts["arm"], rpc=f"127.0.0.1:{port}")


def test_tracker_without_a_free_board_for_the_key(artifacts):
    with boards.tracker() as trk:
        with pytest.raises(BoardError, match="no free board for key 'rpi4'"):
            tvmq.deploy.run(artifacts["arm"], tracker=trk.address, key="rpi4")


def test_x86_library_on_the_aarch64_board(artifacts, emulated_pi):
    with pytest.raises(BoardError, match="x86_64.*aarch64"):
        tvmq.deploy.run(artifacts["x86"], rpc=emulated_pi.address, write=False)
    # the board survives and serves the next session
    check_report(tvmq.deploy.run(artifacts["arm"], rpc=emulated_pi.address, repeat=3,
                                 min_repeat_ms=20, write=False), "aarch64", emulated=True)


def test_rpi5_build_refused_by_a_pi4(artifacts, emulated_pi, tmp_path):
    from tvmq.default_model import default_program
    ep, _ = default_program(quiet=True)
    rpi5 = tvmq.build(ep, target="rpi5", out=tmp_path / "digits-rpi5", parity=4).path
    with pytest.raises(BoardError, match="needs CPU feature.*dotprod.*--target arm"):
        tvmq.deploy.run(rpi5, rpc=emulated_pi.address, write=False)
    # on a Pi 5 (emulated Cortex-A76, which has dotprod) it runs, bit-exact
    with boards.emulated_pi(_cache(), target="rpi5") as pi5:
        report = tvmq.deploy.run(rpi5, rpc=pi5.address, repeat=2, min_repeat_ms=10, write=False)
    assert report["boards"][0]["parity"]["mismatches"] == 0


def test_board_dies_mid_run(artifacts):
    with boards.emulated_pi(_cache()) as pi:
        board = remote.connect(pi.address)
        pi.stop()  # the board goes away with the session open
        start = time.monotonic()
        with pytest.raises(BoardError, match=f"board {pi.address} failed during upload: the"
                                             " board closed the session"):
            remote.run(board, artifacts["arm"] / "model.so", [])
        assert time.monotonic() - start < 60


def test_incomplete_or_corrupt_artifact(artifacts, tmp_path):
    missing = shutil.copytree(artifacts["arm"], tmp_path / "missing")
    (missing / "parity.npz").unlink()
    with pytest.raises(ArtifactError, match="incomplete: parity.npz is missing"):
        tvmq.deploy.run(missing, rpc="127.0.0.1:1")
    corrupt = shutil.copytree(artifacts["arm"], tmp_path / "corrupt")
    lib = bytearray((corrupt / "model.so").read_bytes())
    lib[len(lib) // 2] ^= 0xFF
    (corrupt / "model.so").write_bytes(bytes(lib))
    with pytest.raises(ArtifactError, match="model.so does not match the checksum"):
        tvmq.deploy.run(corrupt, rpc="127.0.0.1:1")


def test_cli_prints_one_line_errors(artifacts):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    port = boards.free_port()
    proc = subprocess.run([sys.executable, "-m", "tvmq.deploy", str(artifacts["arm"]),
                           "--rpc", f"127.0.0.1:{port}"], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 2
    assert "no TVM RPC server at" in proc.stderr and "Traceback" not in proc.stderr


def test_emulate_cli_serves_until_interrupted(artifacts):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    port = boards.free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tvmq.deploy.emulate", "--port", str(port)],
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = ""
        while "Ctrl-C" not in line:
            line += proc.stderr.readline()
            assert proc.poll() is None, line
        assert "emulated Raspberry Pi" in line and f"127.0.0.1:{port}" in line
        report = tvmq.deploy.run(artifacts["arm"], rpc=f"127.0.0.1:{port}", repeat=3,
                                 min_repeat_ms=20, write=False)
        check_report(report, "aarch64", emulated=True)
    finally:
        proc.terminate()
        proc.wait(30)
