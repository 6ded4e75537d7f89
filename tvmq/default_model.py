"""The built-in default model: ``digits_net`` trained float, then INT-SE QAT, on scikit-learn's
digits. Offline, about a minute on 2 cores, and cached under ``$TVMQ_CACHE`` (default
``~/.cache/tvmq``) by a hash of everything that decides the result: the training code, the
hyper-parameters and the library versions. A missing or damaged cache entry is rebuilt.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import sklearn
import torch

from tvmq import conversion as convert_mod, data, integer, qat as qat_mod, quantizers, schemes, training as train_mod, zoo
from tvmq.artifact import export, load_program

HYPER = {"float_epochs": 12, "qat_epochs": 8, "lr": 2e-3, "qat_lr": 1e-3, "seed": 0,
         "batch_size": 64}


def cache_dir() -> Path:
    return Path(os.environ.get("TVMQ_CACHE", Path.home() / ".cache" / "tvmq"))


def _key(scheme: str) -> str:
    h = hashlib.sha256()
    for module in (zoo, data, qat_mod, quantizers, train_mod, convert_mod, integer):
        h.update(Path(module.__file__).read_bytes())
    for path in sorted(Path(schemes.__file__).parent.glob("*.py")):  # every scheme
        h.update(path.read_bytes())
    h.update(json.dumps([HYPER, scheme, torch.__version__, sklearn.__version__]).encode())
    return h.hexdigest()[:16]


def train_default(scheme: str = "int-se", quiet: bool = False):
    """Train float then QAT; returns (float model, QAT model, deploy model, accuracies)."""
    torch.manual_seed(HYPER["seed"])
    model = zoo.digits_net()
    train_loader, test_loader = data.loader("train", HYPER["batch_size"]), data.loader("test")
    # the float baseline, trained with the same loop (plain modules have nothing to lock)
    train_mod.train(model, train_loader, HYPER["float_epochs"], HYPER["lr"], quiet=quiet,
                    description="float training")
    qat = qat_mod.prepare(model, scheme)
    train_mod.train(qat, train_loader, HYPER["qat_epochs"], HYPER["qat_lr"], quiet=quiet)
    deploy = convert_mod.convert(qat)
    acc = {"float": data.accuracy(model.eval(), test_loader),
           "fake_quant": data.accuracy(qat, test_loader),
           "deploy_torch": data.accuracy(deploy, test_loader)}
    return model, qat, deploy, acc


def default_program(scheme: str = "int-se", quiet: bool = False):
    """(ExportedProgram of the trained default deploy model, accuracies), cached."""
    entry = cache_dir() / f"digits-{re.sub(r'[^A-Za-z0-9_.-]', '_', scheme)}-{_key(scheme)}"
    try:
        info = json.loads((entry / "info.json").read_text())
        return load_program(entry / "model.pt2"), info["accuracy"]
    except Exception:  # missing or damaged: rebuild below
        pass
    _, _, deploy, acc = train_default(scheme, quiet)
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".digits.", dir=entry.parent))
    export(deploy, torch.zeros(1, 1, 8, 8), tmp / "model.pt2", name="digits")
    (tmp / "info.json").write_text(json.dumps({"accuracy": acc, "hyper": HYPER}))
    shutil.rmtree(entry, ignore_errors=True)
    os.replace(tmp, entry)
    return load_program(entry / "model.pt2"), acc
