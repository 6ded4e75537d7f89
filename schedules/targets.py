"""Target presets: the edge CPUs tvmq builds for.

A preset is a TVM target dict (TVM 0.27 refuses the old string form). ``x86`` is this host,
detected through LLVM so that the generated code uses exactly the vector extensions the
machine has; ``arm`` and ``rpi5`` are the Raspberry Pi 4 / 5 cores, cross-compiled.
"""
from __future__ import annotations

import os

import tvm

# Raspberry Pi 4: Cortex-A72, NEON, no dot product.  Pi 5: Cortex-A76 with sdot/udot.
_BOARDS = {
    "arm": {"mcpu": "cortex-a72", "mattr": ["+neon"], "num-cores": 4},
    "rpi5": {"mcpu": "cortex-a76", "mattr": ["+neon", "+dotprod"], "num-cores": 4},
}
AARCH64_TRIPLE = "aarch64-linux-gnu"
TARGETS = ("x86", "arm", "rpi5")


class UnknownTargetError(ValueError):
    """A target name or dict tvmq does not know."""


def host_target(num_cores: int | None = None) -> tvm.target.Target:
    """The CPU this process runs on, with the exact ``mcpu`` LLVM detects (e.g. znver3) and
    its core count (schedules split parallel work by it)."""
    cpu = tvm.target.codegen.llvm_get_system_cpu()
    cores = num_cores or len(os.sched_getaffinity(0))
    return tvm.target.Target({"kind": "llvm", "mcpu": cpu, "num-cores": cores})


def is_aarch64(target) -> bool:
    """A 64-bit ARM target (the Pi presets; cross-compiled)."""
    return target is not None and str(target.attrs.get("mtriple", "")).startswith("aarch64")


def cores_of(target) -> int:
    """The cores a target's parallel loops are shared over (1 when it does not say)."""
    return int(target.attrs.get("num-cores", 1) or 1) if target is not None else 1


def resolve(target: "str | dict | tvm.target.Target") -> tvm.target.Target:
    """Turn a preset name, a target dict or a Target into a ``tvm.target.Target``."""
    if isinstance(target, tvm.target.Target):
        return target
    if isinstance(target, dict):
        return tvm.target.Target(target)
    if target == "x86":
        return host_target()
    if target in _BOARDS:
        return tvm.target.Target(
            {"kind": "llvm", "mtriple": AARCH64_TRIPLE, **_BOARDS[target]}
        )
    raise UnknownTargetError(
        f"unknown target {target!r}: choose one of {', '.join(TARGETS)} or pass a TVM target dict"
    )


def is_host(target: tvm.target.Target) -> bool:
    """True when code for ``target`` runs on this machine (no cross-compilation)."""
    triple = str(target.attrs.get("mtriple", "") or "")
    return not triple or triple.startswith(tvm.target.codegen.llvm_get_system_triple().split("-")[0])


def has_feature(target: tvm.target.Target, feature: str) -> bool:
    """Whether LLVM says ``target`` has a CPU feature (``avx512vnni``, ``avx2``, ``dotprod``)."""
    return bool(tvm.target.codegen.llvm_cpu_has_features(feature, target))
