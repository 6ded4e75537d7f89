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

# sha256 of the aarch64 apache-tvm-ffi wheel per (version, python tag): the wheel's
# libtvm_ffi.so runs on the board, so it is checked like any other code we ship. Add a row
# (from a download you trust) when the host's tvm-ffi pin changes.
AARCH64_FFI_WHEEL_SHA256 = {
    ("0.1.14.post0", "cp311"):
        "d1a011a0743acb88ffc650c70bfb1376fa90cb7196b042598c6d0c1e690ce185",
}

# Bounds the board needs in TVM's own RPC endpoint (rpc_endpoint.cc, shipped in the wheel):
# it sizes strings from lengths in the packet *before* checking them against the packet, so a
# short message announcing gigabytes would allocate them. Each patch adds the check in front;
# a TVM upgrade that changes these lines fails the build loudly instead of losing the check.
SOURCE_PATCHES = {
    "rpc/rpc_endpoint.cc": [
        ("      std::string data(size, '\\0');\n",
         "      TVM_FFI_ICHECK_LE(size, pending_request_bytes_) << \"RPC string longer than its packet\";\n"
         "      std::string data(size, '\\0');\n", 2),
        ("      remote_key_->resize(len);\n",
         "      TVM_FFI_ICHECK(len >= 0 && static_cast<uint64_t>(len) <= support::max_message_bytes)\n"
         "          << \"RPC key length \" << len << \" out of bounds\";\n"
         "      remote_key_->resize(len);\n", 1),
        ("    client_protocol_ver.resize(len);\n",
         "    TVM_FFI_ICHECK_LE(len, pending_request_bytes_) << \"RPC version longer than its packet\";\n"
         "    client_protocol_ver.resize(len);\n", 1),
    ],
}


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
    h.update(repr(SOURCE_PATCHES).encode())
    return h.hexdigest()[:16]


def _object_key(rel: str, patched: str) -> str:
    """Cache key of one runtime object: its (patched) source and every header it may include
    (ours, the wheel's via the versions), flags and compiler. The server is not an input."""
    h = hashlib.sha256(patched.encode(errors="surrogateescape"))
    h.update(rel.encode())
    for path in _own_sources():
        if "server" not in path.relative_to(OWN_SOURCES).parts:
            h.update(path.name.encode())
            h.update(path.read_bytes())
    h.update(" ".join(CXXFLAGS).encode())
    h.update(importlib.metadata.version("apache-tvm").encode())
    h.update(importlib.metadata.version("apache-tvm-ffi").encode())
    h.update(_compiler_version().encode())
    return h.hexdigest()[:24]


def _apply_patches(src_runtime: Path) -> None:
    for rel, patches in SOURCE_PATCHES.items():
        path = src_runtime / rel
        text = path.read_text()
        for old, new, count in patches:
            if text.count(old) != count:
                raise BoardBuildError(
                    f"{rel} of this TVM no longer has the line tvmq bounds ({old.strip()!r}, "
                    f"expected {count}x): update SOURCE_PATCHES in deploy/runtime_build.py")
            text = text.replace(old, new)
        path.write_text(text)


def _compiler_version() -> str:
    if shutil.which(CROSS_CXX) is None:
        raise BoardBuildError(
            f"cross compiler {CROSS_CXX!r} not found: install Debian's g++-aarch64-linux-gnu"
            " (./setup.sh does)")
    return subprocess.run([CROSS_CXX, "--version"], capture_output=True, text=True).stdout


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fetch_aarch64_ffi(dest: Path) -> Path:
    """libtvm_ffi.so for aarch64 from the apache-tvm-ffi wheel of the host's version, checked
    against the pinned sha256 (pip --require-hashes, then again here)."""
    version = importlib.metadata.version("apache-tvm-ffi")
    pytag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    expected = AARCH64_FFI_WHEEL_SHA256.get((version, pytag))
    if expected is None:
        raise BoardBuildError(
            f"no pinned sha256 for the aarch64 apache-tvm-ffi=={version} wheel ({pytag}): add it "
            "to AARCH64_FFI_WHEEL_SHA256 in deploy/runtime_build.py (tvmq pins "
            f"{', '.join(v for v, _ in AARCH64_FFI_WHEEL_SHA256)})")
    with tempfile.TemporaryDirectory() as tmp:
        req = Path(tmp) / "requirements.txt"
        req.write_text(f"apache-tvm-ffi=={version} --hash=sha256:{expected}\n")
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
               "--require-hashes", "--platform", "manylinux_2_28_aarch64", "--python-version",
               f"{sys.version_info.major}.{sys.version_info.minor}", "-r", str(req),
               "-d", str(Path(tmp) / "wheel")]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if "DO NOT MATCH THE HASHES" in done.stderr:
            got = next((line.split("Got")[-1].strip() for line in done.stderr.splitlines()
                        if "Got" in line), "?")
            raise BoardBuildError(
                f"the downloaded aarch64 apache-tvm-ffi=={version} wheel has sha256 {got}, not the "
                f"pinned {expected}: refusing to put it on the board")
        wheels = list((Path(tmp) / "wheel").glob("*.whl"))
        if done.returncode != 0 or not wheels:
            raise BoardBuildError(
                f"could not download the aarch64 apache-tvm-ffi=={version} wheel (needed for "
                f"libtvm_ffi.so on the board): {done.stderr.strip()[-500:]}")
        got = _sha256(wheels[0])
        if got != expected:
            raise BoardBuildError(
                f"the downloaded aarch64 apache-tvm-ffi=={version} wheel has sha256 {got}, not the "
                f"pinned {expected}: refusing to put it on the board")
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
        _apply_patches(src / "runtime")
        shutil.copytree(OWN_SOURCES / "src" / "support", src / "support")
        shutil.copytree(OWN_SOURCES / "src" / "server", src / "server")
        includes = [f"-I{OWN_SOURCES / 'include'}", f"-I{_tvm_dir() / 'include'}",
                    f"-I{_ffi_dir() / 'include'}", f"-I{src}"]
        sources = [src / "runtime" / p.relative_to(_tvm_dir() / "src" / "runtime")
                   for p in _runtime_sources()]
        lib = work / "lib"
        lib.mkdir()
        _fetch_aarch64_ffi(lib)

        # objects are cached by their inputs: editing the server relinks, it does not recompile
        # the runtime
        obj_cache = root / "objects"
        obj_cache.mkdir(exist_ok=True)
        objects = [obj_cache / (f"{s.stem}-" + _object_key(
                       str(s.relative_to(src / "runtime")), s.read_text(errors="surrogateescape"))
                       + ".o") for s in sources]
        total, done = len(sources) + 2, 0

        def compile_one(pair):
            s, o = pair
            if not o.exists():
                tmp_o = work / f"{o.name}.tmp"
                _compile([CROSS_CXX, *CXXFLAGS, *includes, "-c", str(s), "-o", str(tmp_o)], s.name)
                tmp_o.replace(o)  # atomic: a concurrent build never links half an object
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
