"""``tvmq.build``: deploy model -> compiled library + manifest.json, written atomically.

The output directory holds ``model.so`` (for the target), ``parity.npz`` (the inputs of the
parity check and the PyTorch integer reference's outputs, reused by deploy) and
``manifest.json``. It is assembled in a temporary sibling directory and renamed into
place, so a failed build leaves nothing behind and an old artifact is replaced whole.
"""
from __future__ import annotations

import hashlib
import logging
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import tvm
from tvm import relax

from schedules.targets import is_host, resolve
from schedules.tuning import open_database
from tvmq import frontend, lowering_plan
from tvmq.compile import compile_relax, export_library
from tvmq.errors import ArtifactError, ModelFileError

LIBRARY = "model.so"
MANIFEST = "manifest.json"
PARITY = "parity.npz"
TVMQ_JSON = "tvmq.json"  # extra file inside a .pt2: the recipe and model name


# ----------------------------------------------------------------------------- programs
def export(deploy: torch.nn.Module, example: torch.Tensor, path: str | None = None,
           name: str = "model") -> torch.export.ExportedProgram:
    """``torch.export`` of a deploy model (tvmq ops kept whole); saved to ``path`` (.pt2)
    atomically when given, with the recipe inside."""
    ep = torch.export.export(deploy.eval(), (example,))
    recipe = getattr(deploy, "tvmq_recipe", None)
    ep.tvmq_info = {"model": name, "recipe": recipe.to_json() if recipe else None,
                    "layers": getattr(deploy, "tvmq_layers", [])}
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".tmp-{path.name}")
        torch.export.save(ep, tmp, extra_files={TVMQ_JSON: json.dumps(ep.tvmq_info)})
        os.replace(tmp, path)
    return ep


def load_program(path: str | Path) -> torch.export.ExportedProgram:
    """Load a ``.pt2`` written by :func:`export`, with a clear error when it is not one."""
    import tvmq.ops  # noqa: F401  (the tvmq:: ops must be registered to deserialize)

    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"model file {str(path)!r} does not exist")
    extra = {TVMQ_JSON: ""}
    quiet = logging.getLogger("torch.export")
    level, quiet.level = quiet.level, logging.ERROR  # our error below says it once, clearly
    try:
        ep = torch.export.load(path, extra_files=extra)
    except Exception as err:  # torch raises many kinds for a damaged archive
        raise ModelFileError(f"model file {str(path)!r} is not a readable torch.export"
                             f" program (.pt2): {type(err).__name__}: {err}") from None
    finally:
        quiet.setLevel(level)
    ep.tvmq_info = json.loads(extra[TVMQ_JSON]) if extra[TVMQ_JSON] else {"model": path.stem}
    return ep


def _boundary(ep: torch.export.ExportedProgram, op: str) -> list[int]:
    return [n.args[1] for n in ep.graph.nodes
            if n.op == "call_function" and str(n.target) == f"tvmq.{op}.default"]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ----------------------------------------------------------------------------- artifact
@dataclass
class Artifact:
    """A built model: ``path/model.so`` + ``path/manifest.json``."""

    path: Path
    manifest: dict
    _vm: object = field(default=None, repr=False)

    @classmethod
    def open(cls, path: str | Path) -> "Artifact":
        path = Path(path)
        try:
            manifest = json.loads((path / MANIFEST).read_text())
        except (OSError, ValueError) as err:
            raise ArtifactError(f"{str(path)!r} is not a tvmq artifact: {err}") from None
        return cls(path, manifest)

    @property
    def library(self) -> Path:
        return self.path / LIBRARY

    def verify(self) -> None:
        """Every file the manifest lists is present and matches its checksum."""
        sums = self.manifest.get("checksums")
        if not sums:
            raise ArtifactError(f"{self.path / MANIFEST} lists no checksums: rebuild the artifact")
        for name, want in sums.items():
            path = self.path / name
            if not path.is_file():
                raise ArtifactError(f"artifact {self.path} is incomplete: {name} is missing")
            if _sha256(path) != want:
                raise ArtifactError(f"{path} does not match the checksum in {MANIFEST}: the"
                                    " file changed or is corrupt; rebuild the artifact")

    def parity_data(self) -> tuple[np.ndarray, np.ndarray]:
        """(inputs, PyTorch integer reference outputs) of the build's parity check."""
        with np.load(self.path / PARITY) as data:
            return data["inputs"], data["outputs"]

    def run(self, x: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Run locally (host targets only); same result as the deploy model, bit for bit."""
        if self._vm is None:
            if not self.manifest["target"]["host"]:
                raise ArtifactError(
                    f"{self.path}: built for {self.manifest['target']['name']}, not this"
                    " machine; run it on the board with tvmq.deploy")
            lib = tvm.runtime.load_module(str(self.library))
            self._vm = relax.VirtualMachine(lib, tvm.cpu())
        return _run_vm(self._vm, x)


def _run_vm(vm, x) -> torch.Tensor:
    x = x.numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    return torch.from_numpy(vm["main"](tvm.runtime.tensor(np.ascontiguousarray(x))).numpy())


def _plan_cache() -> Path:
    from tvmq.default_model import cache_dir

    return cache_dir() / "lowering-plan"


def _layer_rows(layers: list[dict], lowering: dict) -> list[dict]:
    """The export's per-layer table with the kernel each layer got and why."""
    by_module = {v["module"]: v for v in lowering.values()}
    return [{**row, **{k: by_module[row["module"]][k] for k in ("lowering", "reason", "op")}}
            if row.get("module") in by_module else row for row in layers]


def parity_inputs(example: torch.Tensor, count: int, inputs=None, seed: int = 0):
    """``count`` inputs shaped like ``example``: from ``inputs`` (e.g. test images) when
    given, else standard normal noise scaled to the example's spread."""
    if inputs is not None:
        xs = torch.as_tensor(inputs)[:count * example.shape[0]]
        return list(xs.reshape(-1, *example.shape).unbind(0))[:count]
    gen = torch.Generator().manual_seed(seed)
    scale = float(example.float().std()) or 1.0
    return [torch.randn(example.shape, generator=gen) * scale for _ in range(count)]


def build(model, example: torch.Tensor | None = None, target="x86", out: str | Path = "build",
          *, name: str | None = None, parity: int = 64, parity_data=None,
          accuracy_data=None, extra: dict | None = None, db: str | Path | None = None,
          lowerings: dict | None = None) -> Artifact:
    """Compile a deploy model (or an ExportedProgram, or a ``.pt2`` path) for ``target``.

    The graph is also built for this machine and run on ``parity`` inputs against the
    PyTorch integer reference; the counts go into the manifest. With ``accuracy_data``
    (images, labels) the compiled graph's top-1 accuracy is measured too. ``extra`` is
    merged into the manifest. ``db``: a tuning database directory (``tvmq.tune``) for
    ``target``; its kernels replace the default schedules. ``lowerings``: ``{layer module or
    node: lowering}`` forces a kernel where a scheme has several (default: the fastest,
    measured on this host or estimated for a board; the manifest's ``layers`` say which).
    """
    start = time.perf_counter()
    tgt = resolve(target)
    if isinstance(model, (str, Path)):
        ep = load_program(model)
    elif isinstance(model, torch.export.ExportedProgram):
        ep = model
    elif example is None:
        raise ValueError("tvmq.build(model, example, ...): an example input is needed to"
                         " export a torch module")
    else:
        ep = export(model, example, name=name or type(model).__name__)
    info = getattr(ep, "tvmq_info", {})
    name = name or info.get("model", "model")
    example = example if example is not None else ep.example_inputs[0][0]
    ep = frontend.rewrite_program(ep, example)  # PT2E int8 programs -> tvmq ops (tvmq.pt2e)

    mod = frontend.import_exported_program(ep)
    database = open_database(db, tgt) if db is not None else None
    lowering = lowering_plan.plan(mod, tgt, _plan_cache(), lowerings)
    ex = compile_relax(mod, tgt, database, lowering)
    # the parity check runs the same kernels (same lowerings) built for this host
    host_ex = ex if is_host(tgt) else compile_relax(mod, resolve("x86"), plan=lowering)

    reference = ep.module()
    vm = relax.VirtualMachine(host_ex, tvm.cpu())
    xs = parity_inputs(example, parity, parity_data)
    refs, mismatches, elements = [], 0, 0
    with torch.no_grad():
        for x in xs:
            want, got = reference(x), _run_vm(vm, x)
            refs.append(want.numpy())
            mismatches += int((want != got).sum())
            elements += want.numel()

    extra = dict(extra or {})
    if accuracy_data is not None:
        images, labels = accuracy_data
        hits = sum(int(_run_vm(vm, x[None]).argmax(1)[0] == y) for x, y in zip(images, labels))
        extra.setdefault("accuracy", {})["deploy_tvm"] = 100.0 * hits / len(labels)

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        export_library(ex, tgt, str(tmp / LIBRARY))
        np.savez(tmp / PARITY, inputs=np.stack([x.numpy() for x in xs]),
                 outputs=np.stack(refs))
        weights = sum(v.numel() for k, v in ep.state_dict.items() if "weight" in k)
        manifest = {
            "model": name,
            "scheme": (info.get("recipe") or {}).get("scheme"),
            "recipe": info.get("recipe"),
            "target": {"name": target if isinstance(target, str) else str(tgt),
                       "tvm": json.loads(str(tgt)), "host": is_host(tgt)},
            "tvm_version": tvm.__version__,
            "torch_version": torch.__version__,
            "inputs": [{"shape": list(example.shape), "dtype": str(example.dtype).split(".")[-1],
                        "exponent": _boundary(ep, "quantize")}],
            "outputs": [{"shape": list(refs[0].shape), "dtype": str(refs[0].dtype),
                         "exponent": _boundary(ep, "dequantize")}],
            "parity": {"inputs": len(xs), "elements": elements, "mismatches": mismatches},
            "sizes": {"library_bytes": (tmp / LIBRARY).stat().st_size,
                      "int_weight_bytes": weights, "float_weight_bytes": 4 * weights},
            "build_seconds": round(time.perf_counter() - start, 2),
            "tuning_db": str(db) if db is not None else None,
            "layers": _layer_rows(info.get("layers") or [], lowering),
            **extra,
        }
        manifest["checksums"] = {f: _sha256(tmp / f) for f in (LIBRARY, PARITY)}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    art = Artifact(out, manifest)
    if is_host(tgt):
        art._vm = vm
    return art
