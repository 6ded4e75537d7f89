"""Local dataset loaders (CIFAR-10 batches, ImageNet-style folders) on files the tests make."""
from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
from PIL import Image

from tests.test_build_cli import cli
from tvmq import data


def make_cifar(root, n=24):
    rng = np.random.default_rng(0)
    batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
             b"labels": list(rng.integers(0, 10, n))}
    root.mkdir(parents=True, exist_ok=True)
    (root / "test_batch").write_bytes(pickle.dumps(batch))
    return batch


def test_cifar10(tmp_path):
    batch = make_cifar(tmp_path)
    ds = data.cifar10(str(tmp_path), "test")
    x, y = ds.tensors
    assert x.shape == (24, 3, 32, 32) and y.tolist() == [int(v) for v in batch[b"labels"]]
    first = batch[b"data"][0].reshape(3, 32, 32)[0, 0, 0] / 255.0
    assert abs(float(x[0, 0, 0, 0]) - (first - data.CIFAR_MEAN[0]) / data.CIFAR_STD[0]) < 1e-5


def test_cifar10_errors(tmp_path):
    with pytest.raises(data.DatasetError, match="no CIFAR-10 batch files"):
        data.cifar10(str(tmp_path))
    (tmp_path / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(data.DatasetError, match="test_batch.*is not a CIFAR-10 batch"):
        data.cifar10(str(tmp_path))


def test_image_folder(tmp_path):
    rng = np.random.default_rng(0)
    for c, cls in enumerate(["cat", "dog"]):
        (tmp_path / cls).mkdir()
        for i, (w, h) in enumerate([(300, 260), (260, 400), (256, 256)]):
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / cls / f"{i}.png")
    (tmp_path / "dog" / "notes.txt").write_text("ignored")
    x, y = data.image_folder(str(tmp_path), size=64).tensors
    assert x.shape == (6, 3, 64, 64) and y.tolist() == [0, 0, 0, 1, 1, 1]
    (tmp_path / "dog" / "broken.png").write_bytes(b"nope")
    with pytest.raises(data.DatasetError, match="broken.png"):
        data.image_folder(str(tmp_path), size=64)


def test_cli_zoo_calibrated_on_cifar(tmp_path):
    make_cifar(tmp_path / "cifar", n=32)
    out = tmp_path / "r20"
    proc = cli("resnet20", "--data", str(tmp_path / "cifar"), "--out", str(out), "--parity", "16")
    assert proc.returncode == 0, proc.stderr
    m = json.loads((out / "manifest.json").read_text())
    assert m["parity"] == {"inputs": 16, "elements": 160, "mismatches": 0}
    assert "cifar10" in m["weights"]


def test_cli_bad_data_dir(tmp_path):
    proc = cli("resnet20", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "o"))
    assert proc.returncode == 2 and "no CIFAR-10 batch files" in proc.stderr
    assert not (tmp_path / "o").exists()
