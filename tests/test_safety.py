"""What tvmq refuses to do to a user's files, and the one-line errors of bad input that used
to be tracebacks, raw TVM failures or minutes of wasted work."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import tvmq
from deploy import boards
from deploy.remote import BoardError
from tvmq.artifact import Artifact
from tvmq.errors import ArtifactError

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
pytestmark = pytest.mark.timeout(600)


def run_module(module, *args, cwd=None, env=None):
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, env=env or ENV, timeout=600)


def tiny_deploy():
    """A small integer deploy model (seconds to build) and an example input."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 8 * 8, 5))
    qat = tvmq.prepare(model, "int-se")
    tvmq.calibrate(qat, [torch.randn(2, 3, 8, 8)])
    return tvmq.convert(qat), torch.randn(1, 3, 8, 8)


@pytest.fixture(scope="module")
def tiny():
    return tiny_deploy()


@pytest.fixture(scope="module")
def x86_art(tiny, tmp_path_factory):
    deploy, example = tiny
    return tvmq.build(deploy, example, target="x86", out=tmp_path_factory.mktemp("a") / "tiny",
                      name="tiny", parity=4).path


def leftovers(parent: Path, name: str) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(f".{name}")]


# ----------------------------------------------------------------------------- item 1: --out
def test_cli_refuses_a_directory_of_user_files(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    (mine / "sub").mkdir()
    (mine / "sub" / "data.csv").write_text("1,2")
    proc = run_module("tvmq.build", "resnet20", "--target", "x86", "--out", mine)
    assert proc.returncode == 2, proc.stderr
    assert f"'{mine}'" in proc.stderr and "not a tvmq artifact" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert (mine / "thesis.tex").read_text() == "years of work"
    assert (mine / "sub" / "data.csv").read_text() == "1,2"
    assert leftovers(tmp_path, "mine") == []


def test_cli_refuses_an_existing_file_twice(tmp_path):
    target = tmp_path / "notes.txt"
    target.write_text("keep me")
    for _ in range(2):  # used to be renamed to .notes.txt.old, then a traceback
        proc = run_module("tvmq.build", "resnet20", "--out", target)
        assert proc.returncode == 2
        assert "is an existing file" in proc.stderr and str(target) in proc.stderr
        assert "Traceback" not in proc.stderr
    assert target.read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_api_refuses_a_user_directory(tiny, tmp_path):
    deploy, example = tiny
    out = tmp_path / "results"
    out.mkdir()
    (out / "notes.md").write_text("mine")
    with pytest.raises(ArtifactError, match="results.*not a tvmq artifact.*notes.md"):
        tvmq.build(deploy, example, target="x86", out=out, parity=2)
    assert (out / "notes.md").read_text() == "mine"
    assert leftovers(tmp_path, "results") == []


def test_api_default_out_never_clobbers_build(tiny, tmp_path, monkeypatch):
    """``tvmq.build(deploy, example)`` used to write ``build/`` itself, wiping everything."""
    deploy, example = tiny
    monkeypatch.chdir(tmp_path)
    build = tmp_path / "build"
    (build / "other-x86").mkdir(parents=True)
    (build / "other-x86" / "model.so").write_bytes(b"another artifact")
    (build / "notes.txt").write_text("my notes")
    art = tvmq.build(deploy, example, name="tiny", parity=2)
    assert Path(art.path) == Path("build/tiny-x86")
    assert (build / "notes.txt").read_text() == "my notes"
    assert (build / "other-x86" / "model.so").read_bytes() == b"another artifact"
    assert (build / "tiny-x86" / "manifest.json").is_file()


def test_previous_artifact_is_replaced_but_not_with_foreign_files(tiny, tmp_path):
    deploy, example = tiny
    out = tmp_path / "art"
    tvmq.build(deploy, example, target="x86", out=out, parity=2)
    (out / "deploy.json").write_text("{}")  # tvmq's own report: part of the artifact
    art = tvmq.build(deploy, example, target="x86", out=out, parity=3)
    assert art.manifest["parity"]["inputs"] == 3 and not (out / "deploy.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]
    (out / "my-plot.png").write_bytes(b"user's")
    with pytest.raises(ArtifactError, match="also holds files tvmq did not write.*my-plot.png"):
        tvmq.build(deploy, example, target="x86", out=out, parity=2)
    assert (out / "my-plot.png").read_bytes() == b"user's"


def test_directory_with_a_foreign_manifest_is_not_an_artifact(tiny, tmp_path):
    deploy, example = tiny
    out = tmp_path / "webapp"
    out.mkdir()
    (out / "manifest.json").write_text('{"name": "my web app", "icons": []}')
    with pytest.raises(ArtifactError, match="webapp.*no 'model' field"):
        tvmq.build(deploy, example, target="x86", out=out, parity=2)
    assert (out / "manifest.json").read_text().startswith('{"name": "my web app"')


# ----------------------------------------------------------------------------- item 2: logs
def test_building_and_loading_print_no_scope_warnings(tmp_path):
    """TVM logs "Scope Saving:" / "Scope Loaded:" once per constant (dozens of lines)."""
    code = ("import numpy as np; import tvmq; from tests.test_safety import tiny_deploy;"
            "from tvmq.artifact import Artifact; d, x = tiny_deploy();"
            f"a = tvmq.build(d, x, target='x86', out={str(tmp_path / 'a')!r}, parity=2);"
            f"tvmq.build(d, x, target='arm', out={str(tmp_path / 'b')!r}, parity=2);"
            "b = Artifact.open(a.path); b.run(x); print('ran')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=ENV, timeout=300, cwd=str(ROOT))
    assert proc.returncode == 0 and "ran" in proc.stdout, proc.stderr
    assert "Scope Loaded" not in proc.stderr and "Scope Saving" not in proc.stderr, proc.stderr


# ----------------------------------------------------------------------------- item 3
def test_unknown_scheme_is_refused_before_any_training(tmp_path, monkeypatch, capsys):
    import tvmq.build as cli

    def no_training(*_a, **_k):
        raise AssertionError("the model was loaded/trained before the scheme was checked")
    monkeypatch.setattr(cli, "load_model", no_training)
    assert cli.main(["--scheme", "int-ze", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "unknown scheme 'int-ze'" in err and "int-se" in err


def test_model_that_is_a_directory(tmp_path, capsys):
    from tvmq.build import main

    folder = tmp_path / "models"
    folder.mkdir()
    assert main([str(folder), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "is a directory" in err and "does not exist" not in err


def test_model_that_is_an_artifact_directory_says_so(x86_art, tmp_path, capsys):
    from tvmq.build import main

    assert main([str(x86_art), "--out", str(tmp_path / "o")]) == 2
    assert "is a directory" in capsys.readouterr().err


def test_rpc_pointed_at_a_tracker(x86_art):
    with boards.tracker() as trk:
        with pytest.raises(BoardError, match="is a tracker; use --tracker HOST:PORT --key K"):
            tvmq.deploy.run(x86_art, rpc=trk.address, write=False)


def test_deploy_cli_min_repeat_ms_and_threads(x86_art):
    """--min-repeat-ms used to fail always ("Expected int but got float")."""
    with boards.local_server() as server:
        proc = run_module("tvmq.deploy", x86_art, "--rpc", server.address, "--repeat", "2",
                          "--min-repeat-ms", "5")
    assert proc.returncode == 0, proc.stderr + proc.stdout
    report = json.loads((x86_art / "deploy.json").read_text())
    want = json.loads((x86_art / "manifest.json").read_text())["threads"]
    assert report["threads"] == want and report["boards"][0]["threads"] == want
    assert f"TVM threads (asked {want})" in proc.stdout


def test_tune_refuses_a_foreign_directory_and_a_file(tmp_path, capsys):
    from tvmq.tune import main

    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "cat.jpg").write_bytes(b"\xff\xd8")
    assert main(["resnet20", "--trials", "1", "--tasks", "1", "--db", str(folder)]) == 2
    err = capsys.readouterr().err
    assert "photos is not a tvmq tuning database" in err and "cat.jpg" in err
    assert sorted(p.name for p in folder.iterdir()) == ["cat.jpg"]
    file = tmp_path / "db.json"
    file.write_text("{}")
    assert main(["resnet20", "--trials", "1", "--db", str(file)]) == 2
    err = capsys.readouterr().err
    assert "db.json is a file, not a tuning database directory" in err
    assert "Traceback" not in err


def test_open_database_adopts_only_new_or_empty_directories(tmp_path):
    from schedules.targets import resolve
    from schedules.tuning import TuningDatabaseError, open_database

    tgt = resolve("x86")
    empty = tmp_path / "empty"
    empty.mkdir()
    open_database(empty, tgt, create=True)
    open_database(tmp_path / "new", tgt, create=True)
    assert (empty / "tvmq.json").is_file() and (tmp_path / "new" / "tvmq.json").is_file()
    open_database(empty, tgt, create=True)  # an existing database: resumed
    other = tmp_path / "other"
    other.mkdir()
    (other / "x.txt").write_text("")
    with pytest.raises(TuningDatabaseError, match="not empty"):
        open_database(other, tgt, create=True)
    assert not (other / "tvmq.json").exists()


@pytest.mark.parametrize("field", ["target", "checksums", "parity", "model"])
def test_manifest_with_a_missing_field(x86_art, tmp_path, field):
    art = shutil.copytree(x86_art, tmp_path / "art")
    manifest = json.loads((art / "manifest.json").read_text())
    del manifest[field]
    (art / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=f"has no '{field}' field"):
        Artifact.open(art)
    proc = run_module("tvmq.deploy", art, "--rpc", "127.0.0.1:1")
    assert proc.returncode == 2 and f"no '{field}' field" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_manifest_target_without_host(x86_art, tmp_path):
    art = shutil.copytree(x86_art, tmp_path / "art")
    manifest = json.loads((art / "manifest.json").read_text())
    del manifest["target"]["host"]
    (art / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="'target.host'"):
        Artifact.open(art)


def _foreign_cpu() -> tuple[str, str]:
    """An x86 CPU LLVM knows with an instruction-set feature this host lacks."""
    import tvm

    from schedules.targets import host_target
    from tvmq.artifact import cpu_features

    have = set(tvm.target.codegen.llvm_get_cpu_features(host_target()))
    for mcpu in ("sapphirerapids", "znver4", "graniterapids", "znver5", "diamondrapids"):
        try:
            missing = set(cpu_features({"kind": "llvm", "mcpu": mcpu})) - have
        except Exception:  # noqa: BLE001
            continue
        if missing:
            return mcpu, sorted(missing)[0]
    pytest.fail("no x86 CPU with a feature this host lacks (impossible on real hardware)")


def test_x86_artifact_for_a_cpu_feature_the_host_lacks(x86_art, tmp_path):
    mcpu, feature = _foreign_cpu()
    art = shutil.copytree(x86_art, tmp_path / "art")
    manifest = json.loads((art / "manifest.json").read_text())
    x = np.load(art / "parity.npz")["inputs"][0]
    # as recorded by a build on that CPU
    manifest["target"]["tvm"]["mcpu"] = mcpu
    manifest["target"].pop("cpu_features")  # older manifests: derived from mcpu/mattr
    (art / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=f"built for CPU {mcpu}.*{feature}.*lacks"):
        Artifact.open(art).run(x)
    manifest["target"]["tvm"]["mcpu"] = json.loads(
        (x86_art / "manifest.json").read_text())["target"]["tvm"]["mcpu"]
    manifest["target"]["cpu_features"] = [feature, "avx"]
    (art / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=f"feature\\(s\\) {feature} that this machine"):
        Artifact.open(art).run(x)


# ----------------------------------------------------------------------------- item 2: wheel
def test_wheel_holds_every_package_and_the_board_runtime_sources(tmp_path):
    """A wheel (what ``pip install .`` builds) used to miss ``tvmq.deploy`` (``import tvmq``
    failed) and ``deploy/runtime/**`` (the board runtime's C++ sources). .ci/run also
    installs it into a fresh venv and builds for arm from outside the repository."""
    import zipfile

    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", "build", "__pycache__", "*.egg-info", ".pytest_cache", "bench", "out"))
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                           "--no-build-isolation", "-w", str(tmp_path / "dist"), str(src)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    (wheel,) = (tmp_path / "dist").glob("tvmq-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for need in ("tvmq/deploy/__init__.py", "tvmq/deploy/__main__.py", "tvmq/deploy/emulate.py",
                 "deploy/runtime/src/server/rpc_server.cc",
                 "deploy/runtime/include/tvm/support/serializer.h",
                 "schedules/tuned/resnet20-x86-znver4/tvmq.json"):
        assert need in names, f"{need} is not in the wheel"
    assert not [n for n in names if n.startswith("tests/")]
    # installed from the wheel alone (no repository on the path), tvmq imports
    site = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                           "--no-index", "--target", str(site), str(wheel)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    env = {**os.environ, "PYTHONPATH": str(site)}
    code = ("import tvmq, tvmq.deploy, deploy.runtime_build as rb;"
            "print(tvmq.__file__); print(rb.OWN_SOURCES / 'src/server/rpc_server.cc')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    tvmq_file, server_cc = proc.stdout.split()[-2:]
    assert tvmq_file.startswith(str(site)) and Path(server_cc).is_file()
