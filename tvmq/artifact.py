"""``tvmq.build``: deploy model -> compiled library + manifest.json, written atomically.

The output directory holds ``model.so`` (for the target), ``parity.npz`` (the inputs of the
parity check and the PyTorch integer reference's outputs, reused by deploy) and
``manifest.json``. It is assembled in a temporary sibling directory and renamed into
place, so a failed build leaves nothing behind and an old artifact is replaced whole.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import json
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
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
# every file tvmq writes into an artifact directory (build: the first three; deploy: reports)
ARTIFACT_FILES = (LIBRARY, MANIFEST, PARITY, "deploy.json", "deploy.png")
# the manifest fields tvmq reads, and the ones inside "target"
REQUIRED = ("model", "target", "tvm_version", "inputs", "outputs", "parity", "checksums")
REQUIRED_TARGET = ("name", "tvm", "host")


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
    if path.is_dir():
        hint = (": it is a tvmq artifact; run it with python -m tvmq.deploy"
                if (path / MANIFEST).is_file() else "")
        raise ModelFileError(f"model file {str(path)!r} is a directory, not a .pt2 file{hint}")
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
def check_manifest(manifest, where) -> dict:
    """``manifest`` (parsed JSON) has every field tvmq reads, else an ArtifactError naming
    the first missing one."""
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{where} is not a tvmq manifest (not a JSON object)")
    for key in REQUIRED:
        if key not in manifest:
            raise ArtifactError(f"{where} has no {key!r} field: not a tvmq manifest, or"
                                " written by another version; rebuild the artifact")
    target = manifest["target"]
    for key in REQUIRED_TARGET:
        if not isinstance(target, dict) or key not in target:
            raise ArtifactError(f"{where} has no 'target.{key}' field: rebuild the artifact")
    if not isinstance(manifest["checksums"], dict) or LIBRARY not in manifest["checksums"]:
        raise ArtifactError(f"{where} has no 'checksums.{LIBRARY}' field: rebuild the artifact")
    return manifest


def default_threads(manifest: dict) -> int:
    """Threads an artifact runs with unless told: ``TVM_NUM_THREADS`` when set, else its
    target's core count (``num-cores``: the host's for x86, 4 for the Pi presets)."""
    env = os.environ.get("TVM_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    cores = manifest.get("threads") or (manifest["target"].get("tvm") or {}).get("num-cores")
    return int(cores) if cores else max(1, len(os.sched_getaffinity(0)))


# x86 "features" LLVM lists that are tuning hints, not instructions a CPU may lack
_TUNING_FEATURES = ("fast-", "slow-", "false-deps", "prefer-", "tuning-", "no-bypass",
                    "allow-light", "branchfusion", "macrofusion", "idivq", "idivl", "sbb-dep",
                    "lea-", "pad-short", "use-", "ermsb", "fsrm", "64bit-mode", "vzeroupper",
                    "nopl", "harden", "retpoline", "lvi-", "seses", "soft-float", "x87")


def cpu_features(target_json: dict) -> list[str]:
    """The instruction-set features LLVM enables for a target (mcpu + mattr)."""
    feats = tvm.target.codegen.llvm_get_cpu_features(tvm.target.Target(target_json))
    return sorted(f for f in feats if not f.startswith(_TUNING_FEATURES))


def check_host_cpu(manifest: dict, where) -> None:
    """Refuse, before loading, a host library built for CPU features this machine lacks
    (it would die on an illegal instruction)."""
    from schedules.targets import host_target

    target = manifest["target"]
    wanted = target.get("cpu_features")
    if wanted is None:
        try:
            wanted = cpu_features(target["tvm"])
        except Exception:  # noqa: BLE001  a target LLVM cannot describe: let loading say
            return
    have = set(tvm.target.codegen.llvm_get_cpu_features(host_target()))
    missing = sorted(set(wanted) - have)
    if missing:
        mcpu = target["tvm"].get("mcpu", "?")
        raise ArtifactError(
            f"{where} was built for CPU {mcpu} with feature(s) {', '.join(missing)} that this"
            f" machine ({tvm.target.codegen.llvm_get_system_cpu()}) lacks: it would die on an"
            " illegal instruction; rebuild it here (--target x86)")


class _Runner:
    """Runs TVM calls on one thread of its own whose TVM thread pool has ``threads`` workers.

    TVM's pool is per calling thread and sized once, when the thread first launches parallel
    work, from TVM_NUM_THREADS or half the logical CPUs (it assumes hyper-threading: 1 thread
    on a 2-vCPU machine); ``runtime.config_threadpool`` cannot grow a pool that exists. A
    fresh thread configured before its first launch gets exactly the count asked for."""

    def __init__(self, threads: int):
        self.requested = max(1, int(threads))
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="tvmq-run")
        self.threads = self.call(_configure_threads, self.requested)

    def call(self, fn, *args):
        return self._pool.submit(fn, *args).result()

    def close(self):
        self._pool.shutdown(wait=False)

    def __del__(self):
        with contextlib.suppress(Exception):
            self._pool.shutdown(wait=False)


def _configure_threads(n: int, session=None) -> int:
    """Size the calling thread's TVM pool to ``n`` workers sharing all cores (on a board:
    through the RPC ``session``'s functions, before its first run); returns what
    ``runtime.NumThreads`` then reports."""
    get = session.get_function if session is not None else tvm.get_global_func
    cpus = list(range(n)) if session is not None else sorted(os.sched_getaffinity(0))
    # mode -3 = kSpecifyThreadShareAllCore: n workers, none pinned to one core
    get("runtime.config_threadpool")(-3, n, [str(cpus[i % len(cpus)]) for i in range(n)])
    return int(get("runtime.NumThreads")())


@contextlib.contextmanager
def quiet_tvm_log(drop=("Scope Loaded:", "Scope Saving:")):
    """Drop TVM runtime log lines containing ``drop`` (written to fd 2 by C++, so Python's
    logging cannot filter them): saving or loading a Relax executable logs one warning per
    constant ("Scope Saving:", "Scope Loaded:", src/runtime/vm/executable.cc). Every other
    line is passed through."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        yield
        return
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            keep = [ln for ln in tmp.read().decode(errors="replace").splitlines(True)
                    if not any(d in ln for d in drop)]
            if keep:
                sys.stderr.write("".join(keep))
                sys.stderr.flush()


@dataclass
class Artifact:
    """A built model: ``path/model.so`` + ``path/manifest.json``."""

    path: Path
    manifest: dict
    _vm: object = field(default=None, repr=False)
    _runner: object = field(default=None, repr=False)

    @classmethod
    def open(cls, path: str | Path) -> "Artifact":
        path = Path(path)
        if not path.is_dir():
            raise ArtifactError(f"{str(path)!r} is not a tvmq artifact: "
                                + ("it is a file, not a directory" if path.exists()
                                   else "no such directory"))
        try:
            manifest = json.loads((path / MANIFEST).read_text())
        except (OSError, ValueError) as err:
            raise ArtifactError(f"{str(path)!r} is not a tvmq artifact: {err}") from None
        return cls(path, check_manifest(manifest, path / MANIFEST))

    @property
    def library(self) -> Path:
        return self.path / LIBRARY

    @property
    def threads(self) -> int | None:
        """Threads the last local run used (TVM's ``runtime.NumThreads`` in the thread that
        ran it), None before the first run."""
        return self._runner.threads if self._runner is not None else None

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

    def run(self, x: torch.Tensor | np.ndarray, threads: int | None = None) -> torch.Tensor:
        """Run locally (host targets only); same result as the deploy model, bit for bit.

        ``threads``: TVM worker threads; default ``TVM_NUM_THREADS`` if set, else the target's
        core count. ``self.threads`` says how many ran."""
        if self._vm is None:
            if not self.manifest["target"]["host"]:
                raise ArtifactError(
                    f"{self.path}: built for {self.manifest['target']['name']}, not this"
                    " machine; run it on the board with tvmq.deploy")
            check_host_cpu(self.manifest, self.path)
            with quiet_tvm_log():
                lib = tvm.runtime.load_module(str(self.library))
            self._vm = relax.VirtualMachine(lib, tvm.cpu())
        if threads is not None and int(threads) < 1:
            raise ValueError(f"threads={threads}: must be at least 1")
        want = threads or default_threads(self.manifest)
        if self._runner is None or self._runner.requested != want:
            if self._runner is not None:
                self._runner.close()
            self._runner = _Runner(want)
        return self._runner.call(_run_vm, self._vm, x)


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


# ----------------------------------------------------------------------------- output dir
def check_out(out: Path) -> None:
    """``out`` may be written: it does not exist, is an empty directory, or holds a previous
    tvmq artifact and nothing else. Anything else is the user's and is refused, untouched."""
    if out.is_symlink():
        raise ArtifactError(f"output {str(out)!r} is a symbolic link; tvmq writes only a new"
                            " directory or replaces a previous tvmq artifact: choose another --out")
    if not out.exists():
        if out.parent.exists() and not out.parent.is_dir():
            raise ArtifactError(f"output {str(out)!r}: {str(out.parent)!r} is a file, not a directory")
        return
    if not out.is_dir():
        raise ArtifactError(f"output {str(out)!r} is an existing file, not a tvmq artifact;"
                            " tvmq does not overwrite it: choose another --out")
    names = sorted(p.name for p in out.iterdir())
    if not names:
        return
    if MANIFEST not in names:
        raise ArtifactError(f"output {str(out)!r} is a directory that is not a tvmq artifact"
                            f" (no {MANIFEST}; it holds {', '.join(names[:3])}"
                            f"{', ...' if len(names) > 3 else ''}); tvmq replaces only a previous"
                            " artifact: choose another --out")
    try:
        check_manifest(json.loads((out / MANIFEST).read_text()), out / MANIFEST)
    except (OSError, ValueError) as err:
        raise ArtifactError(f"output {str(out)!r} is not a tvmq artifact ({err}); tvmq replaces"
                            " only a previous artifact: choose another --out") from None
    foreign = [n for n in names if n not in ARTIFACT_FILES]
    if foreign:
        raise ArtifactError(f"output {str(out)!r} is a tvmq artifact that also holds files tvmq"
                            f" did not write ({', '.join(foreign[:3])}); move them, or choose"
                            " another --out")


def default_out(name: str, target) -> Path:
    """``build/<model>-<target>``, as the CLI names it."""
    label = target if isinstance(target, str) else "custom"
    return Path("build") / f"{name}-{label}"


def parity_inputs(example: torch.Tensor, count: int, inputs=None, seed: int = 0):
    """``count`` inputs shaped like ``example``: from ``inputs`` (e.g. test images) when
    given, else standard normal noise scaled to the example's spread."""
    if inputs is not None:
        xs = torch.as_tensor(inputs)[:count * example.shape[0]]
        return list(xs.reshape(-1, *example.shape).unbind(0))[:count]
    gen = torch.Generator().manual_seed(seed)
    scale = float(example.float().std()) or 1.0
    return [torch.randn(example.shape, generator=gen) * scale for _ in range(count)]


def build(model, example: torch.Tensor | None = None, target="x86", out: str | Path | None = None,
          *, name: str | None = None, parity: int = 64, parity_data=None,
          accuracy_data=None, extra: dict | None = None, db: str | Path | None = None,
          lowerings: dict | None = None, shift_only: bool = False) -> Artifact:
    """Compile a deploy model (or an ExportedProgram, or a ``.pt2`` path) for ``target``.

    The graph is also built for this machine and run on ``parity`` inputs against the
    PyTorch integer reference; the counts go into the manifest. With ``accuracy_data``
    (images, labels) the compiled graph's top-1 accuracy is measured too. ``extra`` is
    merged into the manifest. ``db``: a tuning database directory (``tvmq.tune``) for
    ``target``; its kernels replace the default schedules. ``lowerings``: ``{layer module or
    node: lowering}`` forces a kernel where a scheme has several (default: the fastest,
    measured on this host or estimated for a board; the manifest's ``layers`` say which).
    ``shift_only``: a PT2E int8 program's scales rounded to powers of two, so that every
    requantization is a shift (``tvmq.pt2e``).

    ``out`` (default ``build/<name>-<target>``) must not exist, be empty, or hold a previous
    tvmq artifact, which is replaced whole; anything else is an :class:`ArtifactError` and
    is left untouched. The parity check runs with the target's core count as TVM threads
    (``TVM_NUM_THREADS`` overrides); the manifest records both.
    """
    start = time.perf_counter()
    if parity < 1:  # the manifest's parity record is what deploy checks the board against
        raise ValueError(f"tvmq.build(parity={parity}): at least 1 parity input is needed")
    tgt = resolve(target)
    if out is not None:
        check_out(Path(out))  # before minutes of work, not after
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
    out = Path(out) if out is not None else default_out(name, target)
    check_out(out)
    # PT2E int8 programs -> tvmq ops (tvmq.pt2e); shift_only: power-of-two requantization
    ep = frontend.rewrite_program(ep, example, shift_only=shift_only)
    info = getattr(ep, "tvmq_info", info)  # an imported PT2E program says so ("scheme")

    mod = frontend.import_exported_program(ep)
    database = open_database(db, tgt) if db is not None else None
    lowering = lowering_plan.plan(mod, tgt, _plan_cache(), lowerings)
    coverage: dict = {}
    ex = compile_relax(mod, tgt, database, lowering, coverage)
    # the parity check runs the same kernels (same lowerings) built for this host
    host_ex = ex if is_host(tgt) else compile_relax(mod, resolve("x86"), plan=lowering)

    reference = ep.module()
    vm = relax.VirtualMachine(host_ex, tvm.cpu())
    host_threads = int(resolve("x86").attrs.get("num-cores", 0) or 0) if not is_host(tgt) \
        else int(tgt.attrs.get("num-cores", 0) or 0)
    runner = _Runner(default_threads({"threads": host_threads, "target": {}}))
    xs = parity_inputs(example, parity, parity_data)
    refs, mismatches, elements = [], 0, 0
    with torch.no_grad():
        for x in xs:
            want, got = reference(x), runner.call(_run_vm, vm, x)
            refs.append(want.numpy())
            mismatches += int((want != got).sum())
            elements += want.numel()

    extra = dict(extra or {})
    if accuracy_data is not None:
        images, labels = accuracy_data
        hits = sum(int(runner.call(_run_vm, vm, x[None]).argmax(1)[0] == y)
                   for x, y in zip(images, labels))
        extra.setdefault("accuracy", {})["deploy_tvm"] = 100.0 * hits / len(labels)

    tvm_json = json.loads(str(tgt))
    target_info = {"name": target if isinstance(target, str) else str(tgt), "tvm": tvm_json,
                   "host": is_host(tgt)}
    if is_host(tgt):  # checked against the CPU that loads it (Artifact.run)
        target_info["cpu_features"] = cpu_features(tvm_json)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        with quiet_tvm_log():
            export_library(ex, tgt, str(tmp / LIBRARY))
        np.savez(tmp / PARITY, inputs=np.stack([x.numpy() for x in xs]),
                 outputs=np.stack(refs))
        weights = sum(v.numel() for k, v in ep.state_dict.items() if "weight" in k)
        manifest = {
            "model": name,
            "scheme": (info.get("recipe") or {}).get("scheme") or info.get("scheme"),
            "recipe": info.get("recipe"),
            "target": target_info,
            # TVM worker threads a run uses by default (TVM_NUM_THREADS overrides)
            "threads": int(tvm_json.get("num-cores") or runner.threads),
            "tvm_version": tvm.__version__,
            "torch_version": torch.__version__,
            "inputs": [{"shape": list(example.shape), "dtype": str(example.dtype).split(".")[-1],
                        "exponent": _boundary(ep, "quantize")}],
            "outputs": [{"shape": list(refs[0].shape), "dtype": str(refs[0].dtype),
                         "exponent": _boundary(ep, "dequantize")}],
            "parity": {"inputs": len(xs), "elements": elements, "mismatches": mismatches},
            "parity_threads": runner.threads,  # TVM threads the parity check ran with
            "sizes": {"library_bytes": (tmp / LIBRARY).stat().st_size,
                      "int_weight_bytes": weights, "float_weight_bytes": 4 * weights},
            "build_seconds": round(time.perf_counter() - start, 2),
            "tuning_db": str(db) if db is not None else None,
            # tunable kernels, and how many of them the database held a schedule for
            "tuned_kernels": coverage if database is not None else None,
            "layers": _layer_rows(info.get("layers") or [], lowering),
            **extra,
        }
        manifest["checksums"] = {f: _sha256(tmp / f) for f in (LIBRARY, PARITY)}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        check_out(out)  # again: it may have changed while we compiled
        if out.exists():
            # a previous artifact (checked above): moved aside, replaced, then deleted
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    art = Artifact(out, manifest)
    if is_host(tgt):
        art._vm, art._runner = vm, runner
    else:
        runner.close()
    return art
