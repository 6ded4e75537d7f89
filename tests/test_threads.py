"""An artifact runs with the threads its target says (the x86 preset: this host's cores; the
Pi presets: 4), not TVM's default (half the logical CPUs: 1 on a 2-vCPU VM): locally
(Artifact.run), in the build's parity check, and on a board (tvmq.deploy). TVM_NUM_THREADS
and an explicit count override it. Timing-free: the count is TVM's runtime.NumThreads in the
thread that runs the model."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tvm

import tvmq
from deploy import boards
from tests.test_safety import ENV, tiny_deploy
from tvmq.artifact import Artifact

pytestmark = pytest.mark.timeout(600)
CORES = len(os.sched_getaffinity(0))


def num_threads_in(art: Artifact) -> int:
    """runtime.NumThreads in the thread Artifact.run runs the model on."""
    return art._runner.call(lambda: int(tvm.get_global_func("runtime.NumThreads")()))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    deploy, example = tiny_deploy()
    root = tmp_path_factory.mktemp("threads")
    x86 = tvmq.build(deploy, example, target="x86", out=root / "x86", parity=4)
    arm = tvmq.build(deploy, example, target="arm", out=root / "arm", parity=4)
    return x86, arm


def test_manifest_records_the_targets_threads(built):
    x86, arm = built
    assert x86.manifest["target"]["tvm"]["num-cores"] == CORES
    assert x86.manifest["threads"] == CORES
    assert arm.manifest["threads"] == 4  # a Raspberry Pi's four cores
    # the parity check ran on this host with the host's cores
    assert x86.manifest["parity_threads"] == CORES
    assert arm.manifest["parity_threads"] == CORES


def test_artifact_run_uses_the_targets_core_count(built):
    x86, _ = built
    art = Artifact.open(x86.path)
    x = np.load(x86.path / "parity.npz")["inputs"][0]
    art.run(x)
    assert art.threads == CORES == art.manifest["threads"]
    assert num_threads_in(art) == CORES
    art.run(x, threads=1)
    assert art.threads == 1 and num_threads_in(art) == 1
    art.run(x, threads=3)
    assert art.threads == 3 and num_threads_in(art) == 3


def test_tvm_num_threads_overrides(built, monkeypatch):
    x86, _ = built
    monkeypatch.setenv("TVM_NUM_THREADS", "3")
    art = Artifact.open(x86.path)
    art.run(np.load(x86.path / "parity.npz")["inputs"][0])
    assert art.threads == 3 and num_threads_in(art) == 3


def test_fresh_process_uses_the_host_cores():
    """The bug as a user met it: a new process, no TVM_NUM_THREADS."""
    code = ("import numpy as np, tvm, tvmq, torch; from tests.test_safety import tiny_deploy;"
            "import tempfile, os; d, x = tiny_deploy();"
            "a = tvmq.build(d, x, target='x86', out=os.path.join(tempfile.mkdtemp(), 'a'),"
            " parity=2); b = tvmq.Artifact.open(a.path); b.run(x);"
            "print(b.threads, a.manifest['parity_threads'])")
    env = {k: v for k, v in ENV.items() if k not in ("TVM_NUM_THREADS", "OMP_NUM_THREADS")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=300, cwd=str(ENV["PYTHONPATH"]))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[-2:] == [str(CORES), str(CORES)]


def test_deploy_sets_the_boards_threads(built):
    x86, _ = built
    with boards.local_server() as server:
        report = tvmq.deploy.run(x86.path, rpc=server.address, repeat=2, min_repeat_ms=5,
                                 write=False)
        assert report["threads"] == CORES and report["boards"][0]["threads"] == CORES
        one = tvmq.deploy.run(x86.path, rpc=server.address, repeat=2, min_repeat_ms=5,
                              write=False, threads=1)
        assert one["boards"][0]["threads"] == 1


def test_emulated_pi_runs_four_threads(built, emulated_pi):
    _, arm = built
    report = tvmq.deploy.run(arm.path, rpc=emulated_pi.address, repeat=2, min_repeat_ms=5,
                             write=False)
    row = report["boards"][0]
    assert report["threads"] == 4 and row["threads"] == 4
    assert row["parity"]["mismatches"] == 0
    saved = json.dumps(report)
    assert '"threads": 4' in saved
