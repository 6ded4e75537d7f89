"""The int8 runtimes a user would pick instead of tvmq, and the machine-load guard.

Peers for ``python -m tvmq.bench`` (each run in its own process by the benchmark):

- ``ort_fp32`` / ``ort_int8``  ONNX Runtime, CPU execution provider: the float model exported
  by ``torch.onnx.export`` (opset 18), and the same graph quantized statically
  (``quant_pre_process`` then ``quantize_static``: QDQ, per-channel, QUInt8 activations,
  QInt8 weights, calibrated on the same batches as the other int8 peers)
- ``et_fp32`` / ``et_int8``  ExecuTorch with the XNNPACK delegate: ``torch.export`` then
  ``to_edge_transform_and_lower`` with ``XnnpackPartitioner``; int8 by PT2E with
  ``XNNPACKQuantizer`` (symmetric, per-channel)

Both are optional: ``pip install -e .[peers]`` brings ONNX Runtime (with ``onnx`` and
``onnxscript`` for the exporter); ExecuTorch 1.5 declares no torch version and is installed
beside torch 2.13 without its dependencies::

    pip install -e .[peers]
    pip install --no-deps "executorch==1.5.*" "torchao==0.18.*"
    pip install ruamel.yaml tabulate  # what executorch imports, of its declared dependencies

A peer whose package is missing returns ``{"unavailable": "pip install -e .[peers] (...)"}``.

The load guard: :func:`snapshot` / :func:`foreign_load` measure how many cores *other*
processes used over a window (``/proc/stat``'s busy time minus this process tree's, and per
process by ``psutil`` to name the top ones). Timing under load measures the load: the
benchmark refuses to record a peer timed while other processes used more than
``BUSY_CORES``.
"""
from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

BUSY_CORES = 0.1     # other processes may use at most this many cores while a peer is timed
INSTALL = "pip install -e .[peers]"
INSTALL_ET = ('pip install --no-deps "executorch==1.5.*" "torchao==0.18.*"'
              " && pip install ruamel.yaml tabulate")


# ----------------------------------------------------------------------------- load guard
def _stat_busy_s() -> float:
    """Seconds of CPU time all CPUs have spent busy since boot (``/proc/stat``'s first line:
    user, nice, system, irq, softirq, steal; guest time is already inside user)."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def snapshot() -> dict:
    """The CPU time of the whole machine and of every process, now.

    Returns
    -------
    dict
        ``t`` (monotonic s), ``busy_s`` (all CPUs, from ``/proc/stat``) and ``procs``:
        ``{pid: (name, user + system s)}``.
    """
    import psutil

    procs = {}
    for p in psutil.process_iter(["name", "cpu_times"]):
        ct = p.info["cpu_times"]
        if ct is not None:
            procs[p.pid] = (p.info["name"] or "?", ct.user + ct.system)
    return {"t": time.monotonic(), "busy_s": _stat_busy_s(), "procs": procs}


def own_pids(extra=()) -> set[int]:
    """This process, its descendants, its parent (the benchmark runner waiting for it) and
    ``extra``: the processes whose CPU time is not foreign load."""
    import psutil

    me = psutil.Process()
    pids = {me.pid, os.getppid(), *extra}
    try:
        pids |= {c.pid for c in me.children(recursive=True)}
    except psutil.Error:
        pass
    return pids


def foreign_load(before: dict, after: dict, own=None, top: int = 3) -> dict:
    """Cores used by processes other than ``own`` between two :func:`snapshot`.

    The machine's busy time (which also sees processes that started and ended inside the
    window, and kernel threads) minus the CPU time of ``own`` processes, per second of the
    window; the per-process deltas name the ``top`` foreign ones.

    Returns
    -------
    dict
        ``cores`` (float, >= 0), ``window_s``, ``top``: ``[[pid, name, cores], ...]``.
    """
    own = own_pids() if own is None else set(own)
    wall = max(after["t"] - before["t"], 1e-6)
    own_s, per = 0.0, []
    for pid, (name, cpu) in after["procs"].items():
        prev = before["procs"].get(pid)
        # a pid reused by another process in the window: count its time from its start
        delta = cpu - prev[1] if prev is not None and prev[1] <= cpu else cpu * (prev is None)
        if pid in own:
            own_s += delta
        elif delta > 0:
            per.append((delta, pid, name))
    total = after["busy_s"] - before["busy_s"]
    attributed = sum(d for d, _, _ in per)
    # tick-based /proc/stat and exact per-task times disagree by a few ms: never report
    # less than what the named processes alone used
    cores = max(total - own_s, attributed, 0.0) / wall
    per.sort(reverse=True)
    return {"cores": round(cores, 3), "window_s": round(wall, 3),
            "top": [[pid, name, round(d / wall, 3)] for d, pid, name in per[:top]]}


def measure_load(window_s: float = 1.0, own=None) -> dict:
    """:func:`foreign_load` over the next ``window_s`` seconds (this process sleeps)."""
    a = snapshot()
    time.sleep(window_s)
    return foreign_load(a, snapshot(), own)


def busy_line(load: dict, then: str = "") -> str:
    """One line: how many cores other processes use and the top one."""
    top = load.get("top") or []
    who = f" (top: {top[0][0]} {top[0][1]})" if top else ""
    return f"machine busy: {load['cores']:.2f} cores used by other processes{who}" + (
        f"; {then}" if then else "")


# ----------------------------------------------------------------------------- helpers
def _unavailable(what: str, err: BaseException, how: str = INSTALL) -> dict:
    return {"unavailable": f"{how} ({what} not installed: {type(err).__name__}: {err})"}


def _setup(model: str):
    """The float model, its input and the int8 peers' calibration batches (as the benchmark's
    other peers get them)."""
    from tvmq import bench

    net, x = bench._float_model(model)
    return net, x, bench._calib_batches(x)


# ----------------------------------------------------------------------------- ONNX Runtime
def _ort(model: str, calls: int, threads: int, int8: bool) -> dict:
    try:
        import onnx  # noqa: F401  (the exporter's and the quantizer's)
        import onnxruntime as ort
        import onnxscript  # noqa: F401  (torch.onnx's dynamo exporter)
    except ImportError as err:
        return _unavailable("onnxruntime / onnx / onnxscript", err)
    import torch

    from tvmq.bench import _time_python

    net, x, calib = _setup(model)
    t = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{model}.onnx"
        torch.onnx.export(net, (x,), str(path), opset_version=18, input_names=["x"],
                          output_names=["y"])
        if int8:
            from onnxruntime.quantization import (CalibrationDataReader, QuantFormat,
                                                  QuantType, quantize_static)
            from onnxruntime.quantization.shape_inference import quant_pre_process

            class Reader(CalibrationDataReader):
                def __init__(self):
                    self.it = iter([{"x": b.numpy()} for b in calib])

                def get_next(self):
                    return next(self.it, None)

            pre, q = Path(tmp) / "pre.onnx", Path(tmp) / "int8.onnx"
            quant_pre_process(str(path), str(pre))
            quantize_static(str(pre), str(q), Reader(), quant_format=QuantFormat.QDQ,
                            per_channel=True, activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8)
            path = q
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    build_s = time.perf_counter() - t
    feed = {"x": x.numpy()}
    r = _time_python(lambda: sess.run(None, feed), calls)
    kind = "static QDQ per-channel, u8 act / s8 wt" if int8 else "fp32"
    return {**r, "build_s": build_s,
            "note": f"onnxruntime {ort.__version__}, {kind}, {threads} intra-op threads"}


def ort_fp32(model: str, calls: int, threads: int = 2) -> dict:
    """ONNX Runtime fp32 (CPU execution provider, graph optimizations on)."""
    return _ort(model, calls, threads, int8=False)


def ort_int8(model: str, calls: int, threads: int = 2) -> dict:
    """ONNX Runtime int8: static quantization, QDQ, per-channel, QUInt8 activations, QInt8
    weights."""
    return _ort(model, calls, threads, int8=True)


# ----------------------------------------------------------------------------- ExecuTorch
def _et(model: str, calls: int, threads: int, int8: bool) -> dict:
    try:
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import (
            XnnpackPartitioner)
        from executorch.exir import to_edge_transform_and_lower
        from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool
        from executorch.runtime import Runtime
    except Exception as err:  # noqa: BLE001  a half-installed package fails in many ways
        return _unavailable("executorch", err, f"{INSTALL}; {INSTALL_ET}")
    import torch

    from tvmq.bench import _time_python

    net, x, calib = _setup(model)
    t = time.perf_counter()
    ep = torch.export.export(net, (x,))
    if int8:
        try:
            from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
                XNNPACKQuantizer, get_symmetric_quantization_config)
            from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
        except ImportError as err:
            return _unavailable("torchao's PT2E / XNNPACKQuantizer", err,
                                f"{INSTALL}; {INSTALL_ET}")
        quantizer = XNNPACKQuantizer().set_global(
            get_symmetric_quantization_config(is_per_channel=True))
        prepared = prepare_pt2e(ep.module(), quantizer)
        for b in calib:
            prepared(b)
        ep = torch.export.export(convert_pt2e(prepared), (x,))
    prog = to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()]).to_executorch()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{model}.pte"
        path.write_bytes(prog.buffer)
        method = Runtime.get().load_program(path).load_method("forward")
    _unsafe_reset_threadpool(threads)
    build_s = time.perf_counter() - t
    r = _time_python(lambda: method.execute([x]), calls)
    from importlib.metadata import version

    kind = "PT2E symmetric per-channel" if int8 else "fp32"
    return {**r, "build_s": build_s,
            "note": f"executorch {version('executorch')} + XNNPACK, {kind}, {threads} threads"}


def et_fp32(model: str, calls: int, threads: int = 2) -> dict:
    """ExecuTorch with the XNNPACK delegate, fp32."""
    return _et(model, calls, threads, int8=False)


def et_int8(model: str, calls: int, threads: int = 2) -> dict:
    """ExecuTorch with the XNNPACK delegate, int8 by PT2E (XNNPACKQuantizer, symmetric,
    per-channel)."""
    return _et(model, calls, threads, int8=True)


PEERS = {fn.__name__: fn for fn in (ort_fp32, ort_int8, et_fp32, et_int8)}
LABELS = {"ort_fp32": "ONNX Runtime fp32", "ort_int8": "ONNX Runtime int8 (QDQ)",
          "et_fp32": "ExecuTorch XNNPACK fp32", "et_int8": "ExecuTorch XNNPACK int8"}
