"""python -m tvmq.bench's other runtimes (tvmq.peers) and its machine-load guard.

Fast: ResNet-20, few calls. No thresholds on the timings themselves (the machine is shared):
only that a peer produces a median, that the load guard tells a busy loop from its own
process tree, and that its policy (rerun, refuse, --allow-busy) does what it says.
"""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

from tvmq import bench, peers

HAVE_ORT = all(importlib.util.find_spec(m) for m in ("onnxruntime", "onnx", "onnxscript"))
SKIP_ALL_BUT = lambda *keep: [a for p in bench.PEERS if p not in keep  # noqa: E731
                               for a in ("--skip", p)]


@pytest.mark.skipif(not HAVE_ORT, reason="pip install -e .[peers]")
@pytest.mark.timeout(600)
def test_ort_int8_peer_runs_in_its_own_process(tmp_path):
    """The whole path: main -> own process -> export, quantize, time; a median comes back,
    with the foreign load measured over the timed calls. The guard is switched off (the
    machine this runs on is shared)."""
    out = tmp_path / "bench"
    assert bench.main(["--model", "resnet20", *SKIP_ALL_BUT("ort_int8"), "--allow-busy",
                       "--busy-cores", "1000", "--busy-window", "0.2", "--out", str(out)]) == 0
    report = json.loads((out / "bench.json").read_text())
    r = report["results"]["ort_int8"]
    assert r["median_ms"] > 0 and r["q1_ms"] <= r["median_ms"] <= r["q3_ms"]
    assert r["calls"] >= bench.CALLS
    assert r["load"]["cores"] >= 0 and r["load"]["window_s"] >= bench.MIN_TIMED_S * 0.9
    assert "QDQ per-channel" in r["note"] and "busy" not in r
    assert report["load_guard"]["warning"] is None


def test_bad_scheme_is_refused_before_any_peer(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--model", "resnet20", "--scheme", "bogus"])
    assert "--scheme" in capsys.readouterr().err


def test_an_equivalent_spelling_of_w8a8_is_w8a8(tmp_path):
    """``--scheme int-se:8`` is INT-SE W8A8: recorded by its canonical spec, goals judged."""
    assert bench.main(["--model", "resnet20", "--scheme", "int-se:8", *SKIP_ALL_BUT(),
                       "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["scheme"] == bench.W8A8 and report["goals"]


@pytest.mark.timeout(600)
def test_scheme_runs_in_tvmqs_rows(tmp_path):
    """``--scheme mxqn:4``: tvmq's row builds and times that scheme in its own process
    (parity checked), its label says so, and issue 11's W8A8 goals are not judged."""
    out = tmp_path / "bench"
    assert bench.main(["--model", "resnet20", "--scheme", "mxqn:4",
                       *SKIP_ALL_BUT("tvmq_w8a8", "tvmq_w8a8_tuned"),
                       "--allow-busy", "--busy-cores", "1000", "--busy-window", "0.2",
                       "--out", str(out)]) == 0
    report = json.loads((out / "bench.json").read_text())
    r = report["results"]["tvmq_w8a8"]
    assert r["scheme"] == "mxqn" and r["median_ms"] > 0 and r["parity_mismatches"] == 0
    # the shipped databases hold W8A8's kernels: the tuned row says how to tune this scheme
    tuned = report["results"]["tvmq_w8a8_tuned"]["unavailable"]
    assert "python -m tvmq.tune resnet20 --scheme mxqn:4" in tuned
    assert report["scheme"] == "mxqn:4" and report["goals"] == []
    assert bench.label("tvmq_w8a8", "mxqn:4") == "tvmq mxqn:4 default"


def _spin():
    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    time.sleep(0.3)  # past the interpreter's start
    return proc


def test_busy_loop_is_foreign_load():
    """A busy-loop process is seen and named; the same process counted as our own is not."""
    proc = _spin()
    try:
        a = peers.snapshot()
        time.sleep(1.0)
        b = peers.snapshot()
    finally:
        proc.kill()
        proc.wait()
    foreign = peers.foreign_load(a, b, own=peers.own_pids() - {proc.pid}, top=1000)
    mine = {pid: cores for pid, _, cores in foreign["top"]}
    # generous: the spinner shares 2 cores with whatever else runs here
    assert mine.get(proc.pid, 0) > 0.05, foreign
    assert foreign["cores"] > 0.05
    assert foreign["cores"] > peers.BUSY_CORES
    own = peers.foreign_load(a, b, own=peers.own_pids() | {proc.pid}, top=1000)
    assert proc.pid not in {pid for pid, _, _ in own["top"]}
    assert "machine busy: " in peers.busy_line(foreign, "rerunning in 10 s")


def _snap(t, busy_s, procs):
    return {"t": t, "busy_s": busy_s, "procs": procs}


def test_idle_machine_is_not_busy():
    """Only our own process tree used the CPU: no foreign load (synthetic snapshots: the
    real machine is shared, never idle on demand)."""
    a = _snap(0.0, 100.0, {1: ("init", 5.0), 10: ("python", 2.0), 11: ("peer", 3.0)})
    b = _snap(2.0, 103.99, {1: ("init", 5.0), 10: ("python", 2.0), 11: ("peer", 7.0)})
    load = peers.foreign_load(a, b, own={10, 11})
    assert load["cores"] < peers.BUSY_CORES and load["top"] == []
    # a foreign process using one core of the two seconds: 0.5 cores, named
    c = _snap(2.0, 105.0, {1: ("init", 5.0), 10: ("python", 2.0), 11: ("peer", 7.0),
                           42: ("make", 1.0)})
    load = peers.foreign_load(a, c, own={10, 11})
    assert load["cores"] == pytest.approx(0.5) and load["top"][0][:2] == [42, "make"]


def _args(**kw):
    return SimpleNamespace(**{"busy_cores": 0.1, "busy_tries": 3, "busy_wait": 0.0,
                              "busy_window": 0.0, "allow_busy": False, "scheme": bench.W8A8,
                              **kw})


def _guard(monkeypatch, before, during):
    """_run_peer with the load measurements and the peer process replaced."""
    spawned = []

    def spawn(peer, args):
        spawned.append(peer)
        return {"median_ms": 1.0, "iqr_ms": 0.1, "load": {"cores": during, "top": []}}

    monkeypatch.setattr(bench, "_spawn", spawn)
    monkeypatch.setattr(peers, "measure_load",
                        lambda *a, **k: {"cores": before, "window_s": 1.0,
                                         "top": [[7, "hog", before]]})
    return spawned


def test_guard_records_on_an_idle_machine(monkeypatch):
    spawned = _guard(monkeypatch, 0.0, 0.02)
    said = []
    r = bench._run_peer("ort_int8", _args(), say=said.append)
    assert r["median_ms"] == 1.0 and "busy" not in r and spawned == ["ort_int8"] and not said


@pytest.mark.parametrize("before, during", [(1.5, 0.0), (0.0, 1.5)])
def test_guard_refuses_a_busy_machine(monkeypatch, before, during):
    """Busy before the peer starts (it is not even started) or while it is timed: rerun,
    then "not recorded"; one line per busy attempt."""
    spawned = _guard(monkeypatch, before, during)
    said = []
    r = bench._run_peer("ort_int8", _args(busy_tries=2), say=said.append)
    assert "median_ms" not in r and r["not_recorded"] == "machine busy"
    assert r["busy"]["attempts"] == 2 and len(said) == 2
    assert said[0].startswith("ONNX Runtime int8 (QDQ): machine busy: 1.50 cores used by other")
    assert "rerunning in 0 s" in said[0] and "giving up" in said[1]
    assert len(spawned) == (0 if before else 2)


def test_allow_busy_records_with_a_warning(monkeypatch, tmp_path):
    spawned = _guard(monkeypatch, 1.5, 0.0)
    r = bench._run_peer("ort_int8", _args(allow_busy=True), say=lambda m: None)
    assert r["median_ms"] == 1.0 and r["busy"]["before"]["cores"] == 1.5 and spawned
    table = bench._table({"ort_int8": r}, {}, "t")
    from rich.console import Console

    console = Console(record=True, width=200)
    console.print(table)
    assert "BUSY (1.50 foreign cores)" in console.export_text()


def test_refused_run_is_not_recorded_in_the_json(tmp_path):
    """main end to end with a threshold nothing can meet: no peer process, the JSON says
    "not recorded", no plot."""
    out = tmp_path / "bench"
    assert bench.main(["--model", "resnet20", *SKIP_ALL_BUT("ort_fp32"), "--busy-cores", "-1",
                       "--busy-tries", "1", "--busy-wait", "0", "--busy-window", "0.1",
                       "--out", str(out)]) == 0
    report = json.loads((out / "bench.json").read_text())
    assert report["results"]["ort_fp32"]["not_recorded"] == "machine busy"
    assert not (out / "bench.png").exists()


def test_missing_package_is_reported_unavailable(monkeypatch):
    """A peer whose package is not installed says how to install it, and the run goes on."""
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import raises ImportError
    monkeypatch.setitem(sys.modules, "executorch", None)
    for peer in ("ort_fp32", "ort_int8", "et_fp32", "et_int8"):
        r = peers.PEERS[peer]("resnet20", 5)
        assert "median_ms" not in r
        assert r["unavailable"].startswith("pip install -e .[peers]"), r
    from rich.console import Console

    console = Console(record=True, width=200)
    console.print(bench._table({"ort_int8": r, "et_int8": r}, {}, "t"))
    assert "unavailable: pip install -e .[peers]" in console.export_text()


def test_rounds_alternate_the_order_of_the_peers():
    peers = ["a", "b", "c"]
    assert bench.round_order(peers, 0) == ["a", "b", "c"]
    assert bench.round_order(peers, 1) == ["c", "b", "a"]
    follows = {(o[i], o[i + 1]) for r in range(2) for o in [bench.round_order(peers, r)]
               for i in range(2)}
    assert ("a", "b") in follows and ("b", "a") in follows  # no fixed neighbour


def test_rounds_keep_the_median_round_and_drop_refused_ones():
    r = bench._rounds([{"median_ms": 3.0, "note": "a"}, {"not_recorded": "machine busy"},
                       {"median_ms": 1.0, "note": "b"}, {"median_ms": 2.0, "note": "c"}])
    assert r["median_ms"] == 2.0 and r["rounds_ms"] == [3.0, 1.0, 2.0]
    assert r["rounds_not_recorded"] == 1 and r["note"].startswith("rounds 1.00–3.00, c")
    assert bench._rounds([{"not_recorded": "machine busy"}])["not_recorded"]


def test_ratios_name_the_fastest_int8_peer_and_judge_the_goals():
    """The goals of issue 11 are judged against the fastest int8 runtime of the same run;
    the MAC bound says what no schedule can beat."""
    results = {p: {"median_ms": ms} for p, ms in (("torch_int8", 6.4), ("ort_int8", 5.8),
                                                   ("et_int8", 5.3), ("torch_fp32", 28.0),
                                                   ("tvmq_w8a8", 4.2), ("tvmq_w8a8_tuned", 3.9))}
    ratios = bench._ratios(results)
    assert ratios["et_int8/fastest_int8"] == 1.0
    assert abs(ratios["tvmq_w8a8/fastest_int8"] - 4.2 / 5.3) < 1e-12
    default, tuned = bench._goal_lines(ratios, "resnet18")
    assert "0.79×" in default and "PASS" in default
    assert "0.74×" in tuned and "FAIL" in tuned
    # ResNet-20's goal: ahead of every peer, default and tuned
    for line in bench._goal_lines(ratios, "resnet20"):
        assert "<= 1×" in line and "PASS" in line
    bound = {"conv_gmac": 1.82, "ms": 3.87}
    assert "0.73× the fastest int8 peer" in bench._bound_line(bound, results)
    assert bound["fastest_int8_peer_ms"] == 5.3
    without_peers = bench._ratios({"tvmq_w8a8": {"median_ms": 4.0}})
    assert "not measured" in bench._goal_lines(without_peers, "resnet18")[0]
