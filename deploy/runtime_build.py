"""Cross-build the board side: TVM's C++ runtime and tvmq's RPC server for aarch64.

The ``apache-tvm`` wheel ships the runtime's C++ sources (``tvm/src/runtime``) and headers;
the ``apache-tvm-ffi`` wheel for aarch64 (same version as the host's) ships ``libtvm_ffi.so``.
The few internal headers the wheel leaves out and the server program are tvmq's own
(``deploy/runtime/``). Debian's ``aarch64-linux-gnu-g++`` compiles it all. The result is the
same three files a real Raspberry Pi runs (copy the directory to the Pi) and the emulated Pi
runs under qemu::

    libtvm_ffi.so  libtvm_runtime.so  tvmq_rpc_server

It is cached under ``cache_dir/board-runtime/<hash of every input>``: a second call is free.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

CROSS_CXX = "aarch64-linux-gnu-g++"
OWN_SOURCES = Path(__file__).parent / "runtime"
FILES = ("libtvm_ffi.so", "libtvm_runtime.so", "tvmq_rpc_server")
# -mcpu=cortex-a72 (Pi 4) also runs on a Pi 5's Cortex-A76
CXXFLAGS = ["-O2", "-std=c++17", "-fPIC", "-mcpu=cortex-a72", "-DNDEBUG",
            "-DTVM_FFI_USE_LIBBACKTRACE=0", "-DTVM_LOG_CUSTOMIZE=0"]
# what a model needs on the board: core runtime, memory, the Relax VM, the RPC endpoint and
# the random fill tuning measures with. Left out: LLM-only VM parts (KV caches, attention),
# pipe/popen RPC sessions.
RUNTIME_SOURCES = [
    "*.cc", "memory/memory_manager.cc",
    "vm/builtin.cc", "vm/bytecode.cc", "vm/executable.cc", "vm/vm.cc",
    "rpc/rpc_channel.cc", "rpc/rpc_device_api.cc", "rpc/rpc_endpoint.cc", "rpc/rpc_event_impl.cc",
    "rpc/rpc_local_session.cc", "rpc/rpc_module.cc", "rpc/rpc_server_env.cc",
    "rpc/rpc_session.cc", "rpc/rpc_socket_impl.cc",
    "extra/contrib/random/random.cc",  # MetaSchedule's RPC runner fills inputs with it
]
EXCLUDED: set[str] = set()


class BoardBuildError(RuntimeError):
    """The board runtime could not be built (missing toolchain, sources or compile error)."""


def _tvm_dir() -> Path:
    import tvm
    return Path(tvm.__file__).parent


def _ffi_dir() -> Path:
    import tvm_ffi
    return Path(tvm_ffi.__file__).parent


def _runtime_sources() -> list[Path]:
    root = _tvm_dir() / "src" / "runtime"
    found: list[Path] = []
    for pattern in RUNTIME_SOURCES:
        found += sorted(p for p in root.glob(pattern) if p.name not in EXCLUDED)
    if not found:
        raise BoardBuildError(f"no TVM runtime sources in {root}: the apache-tvm wheel ships them")
    return found


def _own_sources() -> list[Path]:
    return sorted(p for p in OWN_SOURCES.rglob("*") if p.is_file())


def input_hash() -> str:
    """Hash of everything the build reads: sources, our headers, flags, compiler, versions."""
    h = hashlib.sha256()
    for path in _runtime_sources() + _own_sources():
        h.update(str(path.name).encode())
        h.update(path.read_bytes())
    h.update(" ".join(CXXFLAGS).encode())
    h.update(importlib.metadata.version("apache-tvm-ffi").encode())
    h.update(_compiler_version().encode())
    return h.hexdigest()[:16]


def _compiler_version() -> str:
    if shutil.which(CROSS_CXX) is None:
        raise BoardBuildError(
            f"cross compiler {CROSS_CXX!r} not found: install Debian's g++-aarch64-linux-gnu"
            " (./setup.sh does)")
    return subprocess.run([CROSS_CXX, "--version"], capture_output=True, text=True).stdout


def _fetch_aarch64_ffi(dest: Path) -> Path:
    """libtvm_ffi.so for aarch64 from the apache-tvm-ffi wheel of the host's version."""
    version = importlib.metadata.version("apache-tvm-ffi")
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
               "--platform", "manylinux_2_28_aarch64", "--python-version",
               f"{sys.version_info.major}.{sys.version_info.minor}",
               f"apache-tvm-ffi=={version}", "-d", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            raise BoardBuildError(
                f"could not download the aarch64 apache-tvm-ffi=={version} wheel (needed for "
                f"libtvm_ffi.so on the board): {done.stderr.strip()[-500:]}")
        with zipfile.ZipFile(wheels[0]) as whl:
            name = next(n for n in whl.namelist() if n.endswith("lib/libtvm_ffi.so"))
            (dest / "libtvm_ffi.so").write_bytes(whl.read(name))
    return dest / "libtvm_ffi.so"


def _compile(args: list[str], what: str) -> None:
    done = subprocess.run(args, capture_output=True, text=True)
    if done.returncode != 0:
        raise BoardBuildError(f"compiling {what} failed:\n{done.stderr[-3000:]}")


def build_board_runtime(cache_dir: str | Path, progress=None, jobs: int | None = None) -> Path:
    """The directory holding the board's runtime and server, built once per input hash.

    ``progress(done, total, what)`` is called as objects compile (for a progress bar)."""
    root = Path(cache_dir) / "board-runtime"
    out = root / input_hash()
    if all((out / f).exists() for f in FILES):
        return out
    root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="build-", dir=root))
    try:
        # the wheel's sources and ours side by side, as the sources' relative includes expect
        src = work / "src"
        shutil.copytree(_tvm_dir() / "src" / "runtime", src / "runtime")
        shutil.copytree(OWN_SOURCES / "src" / "support", src / "support")
        shutil.copytree(OWN_SOURCES / "src" / "server", src / "server")
        includes = [f"-I{OWN_SOURCES / 'include'}", f"-I{_tvm_dir() / 'include'}",
                    f"-I{_ffi_dir() / 'include'}", f"-I{src}"]
        sources = [src / "runtime" / p.relative_to(_tvm_dir() / "src" / "runtime")
                   for p in _runtime_sources()]
        lib = work / "lib"
        lib.mkdir()
        _fetch_aarch64_ffi(lib)

        objects = [work / "obj" / f"{i:03d}_{s.stem}.o" for i, s in enumerate(sources)]
        objects[0].parent.mkdir()
        total, done = len(sources) + 2, 0

        def compile_one(pair):
            s, o = pair
            _compile([CROSS_CXX, *CXXFLAGS, *includes, "-c", str(s), "-o", str(o)], s.name)
            return s.name

        with ThreadPoolExecutor(jobs or os.cpu_count() or 2) as pool:
            for name in pool.map(compile_one, zip(sources, objects)):
                done += 1
                if progress:
                    progress(done, total, name)
        rpath = "-Wl,-rpath,$ORIGIN"
        _compile([CROSS_CXX, "-shared", "-o", str(lib / "libtvm_runtime.so"), *map(str, objects),
                  f"-L{lib}", "-ltvm_ffi", "-lpthread", "-ldl", rpath], "libtvm_runtime.so")
        if progress:
            progress(total - 1, total, "libtvm_runtime.so")
        _compile([CROSS_CXX, *CXXFLAGS, *includes, str(src / "server" / "rpc_server.cc"),
                  "-o", str(lib / "tvmq_rpc_server"), f"-L{lib}",
                  # the runtime registers its functions from static initializers: keep it linked
                  "-Wl,--no-as-needed", "-ltvm_runtime", "-ltvm_ffi", "-lpthread", "-ldl", rpath],
                 "tvmq_rpc_server")
        if progress:
            progress(total, total, "tvmq_rpc_server")
        try:
            lib.rename(out)  # atomic: a half-built directory is never seen as the cache
        except OSError:
            if not all((out / f).exists() for f in FILES):  # not a concurrent builder's win
                raise
        return out
    finally:
        shutil.rmtree(work, ignore_errors=True)
