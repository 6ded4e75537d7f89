"""tvmq.tune: MetaSchedule tunes a kernel into a database that resumes, that tvmq.build
applies (still bit-exact), and that is refused with a clear error when corrupt or foreign."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import tvmq
from schedules.tuning import TuningDatabaseError, open_database
from schedules.targets import resolve
from tvmq.build import _schedules_line, zoo_program
from tvmq.tune import tune

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def program():
    return zoo_program("resnet20", "int-se", None)


@pytest.fixture(scope="module")
def db(program, tmp_path_factory):
    path = tmp_path_factory.mktemp("tune") / "db"
    summary = tune(program, "x86", path, trials=4, max_tasks=1)
    assert len(summary["tasks"]) == 1 and summary["tasks"][0]["best_ms"] > 0
    return path


def records(db):
    return len((db / "database_tuning_record.json").read_text().splitlines())


def test_tuned_build_is_bit_exact(program, db, tmp_path):
    art = tvmq.build(program, target="x86", out=tmp_path / "tuned", parity=4, db=db)
    assert art.manifest["parity"]["mismatches"] == 0
    assert art.manifest["tuning_db"] == str(db)
    cov = art.manifest["tuned_kernels"]  # one task tuned, of ResNet-20's conv kernels
    assert cov["tuned"] == 1 and cov["kernels"] > 1, cov
    assert "tuned: 1 of" in _schedules_line(art.manifest)
    assert json.loads((db / "tvmq.json").read_text())["target"]["kind"] == "llvm"


def test_database_of_another_model_is_reported_as_matching_nothing(db, tmp_path):
    """A database that matches none of the kernels (another model, an older tvmq) builds
    with default schedules, and the build says so instead of "tuned"."""
    from tests.test_safety import tiny_deploy

    deploy, example = tiny_deploy()
    art = tvmq.build(deploy, example, target="x86", out=tmp_path / "tiny", parity=1, db=db)
    assert art.manifest["tuned_kernels"]["tuned"] == 0 and art.manifest["parity"]["mismatches"] == 0
    assert "matches none" in _schedules_line(art.manifest)


def test_candidates_are_measured_on_the_targets_threads():
    """MetaSchedule's measuring worker runs TVM on as many threads as the model will (the
    target's cores), not TVM's default (half the logical CPUs: 1 on a 2-vCPU machine), so
    the schedule it picks is the one that is fastest where it runs. Timing-free: the
    worker's runtime.NumThreads."""
    from schedules.tuning import runner_for

    def tvm_threads():
        import tvm
        return int(tvm.get_global_func("runtime.NumThreads")())

    for threads, want in ((1, 1), (None, len(os.sched_getaffinity(0)))):
        runner = runner_for(threads=threads)
        assert runner.pool.submit(tvm_threads).result() == want
        runner.pool.shutdown()


def test_rerun_resumes(program, tmp_path):
    """A rerun adds to the database, and measures the kernels without a record first (the
    scheduler's first pass goes task by task: a short rerun would re-measure the first)."""
    path = tmp_path / "db"
    tune(program, "x86", path, trials=2, max_tasks=1)
    before = records(path)
    summary = tune(program, "x86", path, trials=2, max_tasks=2)
    assert records(path) > before  # added to, not restarted
    assert all(t["best_ms"] for t in summary["tasks"]), summary


def test_a_resumed_database_counts_every_run(tmp_path):
    from tvmq.tune import record_run
    record_run(tmp_path, {"seconds": 200.0, "trials": 480})
    record_run(tmp_path, {"seconds": 31.5, "trials": 40})
    last = json.loads((tmp_path / "last_tune.json").read_text())
    assert (last["seconds"], last["trials"]) == (31.5, 40)  # this run
    assert (last["total_seconds"], last["total_trials"]) == (231.5, 520)  # the database's
    (tmp_path / "last_tune.json").write_text("{corrupt")
    record_run(tmp_path, {"seconds": 5.0, "trials": 4})  # an unreadable summary: counted anew
    assert json.loads((tmp_path / "last_tune.json").read_text())["total_trials"] == 4


def test_corrupt_database(db, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in db.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    rec = bad / "database_tuning_record.json"
    rec.write_text(rec.read_text()[:-40])  # an interrupted write
    with pytest.raises(TuningDatabaseError, match="database_tuning_record.json, line .* is not JSON"):
        open_database(bad, resolve("x86"))
    (bad / "tvmq.json").unlink()
    with pytest.raises(TuningDatabaseError, match="not a tvmq tuning database"):
        open_database(bad, resolve("x86"))


def test_database_of_another_target(program, db, tmp_path):
    with pytest.raises(TuningDatabaseError, match="was tuned for .*x86|was tuned for kind=llvm"):
        tvmq.build(program, target="arm", out=tmp_path / "arm", parity=1, db=db)
    assert not (tmp_path / "arm").exists()


def test_cli_errors_are_one_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "tvmq.build", "resnet20", "--db",
                           str(tmp_path / "nothing"), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 2, proc.stderr
    assert "not a tvmq tuning database" in proc.stderr and "Traceback" not in proc.stderr


def test_tune_on_the_emulated_pi_over_a_tracker(program, tmp_path):
    """The whole loop for a board: MetaSchedule builds aarch64 libraries here, measures them on
    the emulated Pi through a tracker (timings emulated), and the tuned arm build deployed to
    that board is bit-exact."""
    from deploy import boards
    from tvmq.default_model import cache_dir

    db = tmp_path / "db-arm"
    with boards.tracker() as trk, \
            boards.emulated_pi(cache_dir(), tracker=trk.address, key="rpi4-tune") as pi:
        from tests.test_deploy import _wait_free
        _wait_free(trk.address, "rpi4-tune", 1)
        summary = tune(program, "arm", db, trials=2, max_tasks=1, tracker=trk.address,
                       key="rpi4-tune")
        assert summary["errors"] == [] and summary["tasks"][0]["best_ms"] > 0
        art = tvmq.build(program, target="arm", out=tmp_path / "arm", parity=2, db=db)
        _wait_free(trk.address, "rpi4-tune", 1)
        report = tvmq.deploy.run(art, rpc=None, tracker=trk.address, key="rpi4-tune",
                                 repeat=2, min_repeat_ms=10, write=False)
    assert report["boards"][0]["parity"]["mismatches"] == 0


def test_shipped_database_is_found_only_for_its_cpu(db, tmp_path, monkeypatch):
    import shutil

    from schedules import tuning

    shipped = tmp_path / "tuned"
    shutil.copytree(db, shipped / "resnet20-x86-somecpu")
    monkeypatch.setattr(tuning, "SHIPPED", shipped)
    assert tuning.shipped_database("resnet20", resolve("x86")) == shipped / "resnet20-x86-somecpu"
    assert tuning.shipped_database("resnet20", resolve("arm")) is None  # tuned for this x86
    assert tuning.shipped_database("resnet18", resolve("x86")) is None


def test_tune_on_a_board_server_directly(program, emulated_pi, tmp_path):
    """--rpc: MetaSchedule measures on one server, no tracker (timings emulated)."""
    summary = tune(program, "arm", tmp_path / "db", trials=2, max_tasks=1,
                   rpc=emulated_pi.address)
    assert summary["errors"] == [] and summary["tasks"][0]["best_ms"] > 0
    assert summary["measured_on"] == f"the server at {emulated_pi.address}"
