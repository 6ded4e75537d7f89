"""Per-layer benchmark: the convolutions of a zoo model, tvmq's kernel vs PyTorch int8 on the
same layer, and the fraction of this CPU's peak int8 multiply-accumulate rate each reaches.

Used by ``python -m tvmq.bench --layers``. Each side runs in its own process (PyTorch's and
TVM's thread pools both spin). The peak (``tvmq.peak``) is measured, not looked up: a loop of
independent ``vpdpbusd`` (AVX-512 VNNI) or ``vpmaddwd`` (AVX2) chains on registers, on every
thread, its assembly checked, cross-checked by llvm-mca's throughput at the measured clock.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter

LAYERS_RESULT = "TVMQ-LAYERS-RESULT "


def _nonneg(node) -> bool:
    """Is a deploy-graph value known to be >= 0 (a ReLU fused upstream)? The lowering knows
    the same (``relay_passes.lower_composites.OUTPUT_RANGES``) and picks the kernel by it."""
    import torch

    ops = torch.ops.tvmq
    relu_arg = {ops.qconv2d.default: 9, ops.qadd.default: 4}
    if node.target in relu_arg:
        return bool(node.args[relu_arg[node.target]])
    if node.target == ops.qrelu.default:
        return True
    if node.target in (ops.qmax_pool2d.default, ops.qavg_pool2d.default):
        return _nonneg(node.args[0])
    return False


def conv_layers(model: str) -> list[dict]:
    """Distinct conv layers of the zoo model's deploy graph, with how often each occurs."""
    import torch

    from tvmq.build import zoo_program

    ep = zoo_program(model, "int-se", None)
    seen: Counter = Counter()
    for node in ep.graph.nodes:
        if node.op == "call_function" and node.target == torch.ops.tvmq.qconv2d.default:
            x, wshape = node.args[0].meta["val"], tuple(node.args[1].meta["val"].shape)
            stride, padding, dilation, groups = node.args[3:7]
            seen[(tuple(x.shape), wshape, tuple(stride), tuple(padding), tuple(dilation),
                  groups, _nonneg(node.args[0]))] += 1
    layers = []
    for (xs, ws, stride, padding, dilation, groups, nonneg), count in seen.items():
        n, c, h, w = xs
        o, cg, kh, kw = ws
        oh = (h + padding[0] + padding[2] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
        ow = (w + padding[1] + padding[3] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
        layers.append({"input": list(xs), "weight": list(ws), "stride": list(stride),
                       "padding": list(padding), "dilation": list(dilation), "groups": groups,
                       "nonneg": nonneg, "count": count, "output_hw": [oh, ow],
                       "macs": n * o * oh * ow * cg * kh * kw})
    return layers


def _layer_conv(layer: dict):
    """(random int8 weights, Conv2dParams, input range) of a layer, as tvmq's side runs it."""
    import numpy as np

    from relay_passes.lower_composites import INT8
    from topi_ops.conv2d import Conv2dParams

    weight = np.random.default_rng(0).integers(-128, 128, layer["weight"]).astype(np.int8)
    params = Conv2dParams(tuple(layer["stride"]), tuple(layer["padding"]),
                          tuple(layer["dilation"]), layer["groups"], 8, True)
    return weight, params, (0, 127) if layer.get("nonneg") else INT8


def kernel_products(layer: dict, target) -> tuple[int, str]:
    """(multiplies tvmq's kernel executes for the layer, the kernel): the direct conv's MACs,
    or integer Winograd's 16 int16 products per 2 x 2 tile, input and output channel
    (``topi_ops.winograd``, where ``int8_conv`` takes it): what the peak share divides."""
    from topi_ops import winograd

    weight, params, input_range = _layer_conv(layer)
    if winograd.applies(target, weight.shape, params) and winograd.fits_int32(weight, input_range):
        n, o, (oh, ow) = layer["input"][0], layer["weight"][0], layer["output_hw"]
        tiles = -(-oh // 2) * -(-ow // 2)
        return n * tiles * winograd.POSITIONS * layer["weight"][1] * o, "Winograd"
    return layer["macs"], "direct"


def layer_module(layer: dict, target):
    """One conv layer as the lowered model runs it: NHWC int8 in and out, on an input known
    to be >= 0 where the graph knows it (``nonneg``), random int8 weights."""
    import numpy as np
    from tvm import relax

    from relay_passes.lower_composites import int8_conv

    n, c, h, w = layer["input"]
    weight, params, input_range = _layer_conv(layer)
    x = relax.Var("x", relax.TensorType((n, h, w, c), "int8"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(int8_conv(bb, x, weight, np.zeros(weight.shape[0], np.int32),
                                           None, params, target, input_range))
        bb.emit_func_output(out)
    return bb.get()


def _tvmq_side(layers: list[dict], repeats: int, db: str | None) -> list[float]:
    """Median ms of tvmq's compiled conv kernel for each layer."""
    import numpy as np
    import tvm
    from tvm import relax

    from schedules.targets import resolve
    from schedules.tuning import open_database
    from tvmq.compile import compile_relax

    target = resolve("x86")
    database = open_database(db, target) if db else None
    out = []
    for layer in layers:
        ex = compile_relax(layer_module(layer, target), target, database)
        vm = relax.VirtualMachine(ex, tvm.cpu())
        n, c, h, w = layer["input"]
        lo = 0 if layer.get("nonneg") else -128
        x = np.random.default_rng(1).integers(lo, 128, (n, h, w, c)).astype(np.int8)
        data = tvm.runtime.tensor(x)
        vm["main"](data)
        timer = vm.time_evaluator("main", tvm.cpu(), number=1, repeat=repeats, min_repeat_ms=100)
        out.append(1e3 * sorted(timer(data).results)[repeats // 2])
    return out


def _torch_side(layers: list[dict], repeats: int) -> list[float]:
    """Median ms of PyTorch's quantized conv (x86 engine, channels_last) on each layer."""
    import time

    import torch
    from torch.ao.nn.quantized import Conv2d

    torch.backends.quantized.engine = "x86"
    out = []
    for layer in layers:
        o, cg, kh, kw = layer["weight"]
        c = cg * layer["groups"]
        pt, pl, pb, pr = layer["padding"]
        conv = Conv2d(c, o, (kh, kw), layer["stride"], (pt, pl), layer["dilation"],
                      layer["groups"])
        conv.set_weight_bias(torch.quantize_per_tensor(torch.randn(o, cg, kh, kw), 0.05, 0,
                                                       torch.qint8), None)
        x = torch.quantize_per_tensor(torch.randn(layer["input"]), 0.05, 128, torch.quint8)
        x = x.contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            for _ in range(3):
                conv(x)
            number = max(1, int(0.1 / max(_once(conv, x), 1e-6)))
            samples = []
            for _ in range(repeats):
                t = time.perf_counter()
                for _ in range(number):
                    conv(x)
                samples.append((time.perf_counter() - t) / number)
        out.append(1e3 * sorted(samples)[repeats // 2])
    return out


def _once(conv, x) -> float:
    import time

    t = time.perf_counter()
    conv(x)
    return time.perf_counter() - t


def peak_gmacs(threads: int, target=None) -> dict:
    """This CPU's int8 multiply-accumulate peak on ``threads`` threads (``tvmq.peak``): the
    larger of a measured loop of independent multiply-add chains and threads x measured
    clock x llvm-mca's instructions per cycle x MACs per instruction (the measured rate
    alone when llvm-mca has no model of this CPU). Keys: ``gmacs`` (the peak), ``threads``,
    ``instruction``, ``measured_gmacs``, ``estimated_gmacs``, ``clock_ghz``, ``ipc``,
    ``method``."""
    from tvmq.peak import peak_gmacs as peak

    return peak(threads, target)


def measure(model: str, threads: int, repeats: int, db: str | None, top: int = 10,
            timeout: float = 1800) -> dict:
    """The ``top`` slowest distinct conv layers of ``model`` (by tvmq time x occurrences)."""
    from schedules.targets import resolve

    layers = conv_layers(model)
    sides = {}
    for side in ("tvmq", "torch", "peak"):
        sides[side] = _spawn(side, model, threads, repeats, db, timeout)
    peak = sides["peak"]["gmacs"]
    target = resolve("x86")
    for layer, t_tvmq, t_torch in zip(layers, sides["tvmq"], sides["torch"]):
        products, kernel = kernel_products(layer, target)
        layer.update(tvmq_ms=t_tvmq, torch_int8_ms=t_torch, ratio=t_tvmq / t_torch,
                     kernel=kernel, products=products,
                     tvmq_peak_fraction=products / (t_tvmq * 1e-3) / 1e9 / peak,
                     torch_peak_fraction=layer["macs"] / (t_torch * 1e-3) / 1e9 / peak)
    layers.sort(key=lambda r: -r["tvmq_ms"] * r["count"])
    gmac = sum(r["macs"] * r["count"] for r in layers) / 1e9
    products = sum(r["products"] * r["count"] for r in layers) / 1e9
    # the model's convolutions at the peak: no direct schedule of these MACs runs faster;
    # tvmq's kernels execute ``products`` multiplies (fewer where Winograd runs)
    return {"peak": sides["peak"], "layers": layers[:top], "all_layers": len(layers),
            "bound": {"conv_gmac": gmac, "ms": gmac / peak * 1e3,
                      "tvmq_products_g": products, "tvmq_ms": products / peak * 1e3}}


def _spawn(side, model, threads, repeats, db, timeout):
    env = {**os.environ, "TVM_NUM_THREADS": str(threads), "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-m", "tvmq.bench_layers", side, model, str(threads), str(repeats),
           db or ""]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    lines = [ln[len(LAYERS_RESULT):] for ln in proc.stdout.splitlines()
             if ln.startswith(LAYERS_RESULT)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"per-layer {side} side failed: "
                           f"{(proc.stderr.strip().splitlines() or ['?'])[-1]}")
    return json.loads(lines[-1])


def peak_caption(peak: dict) -> str:
    """How the peak the % columns divide by was derived, in one caption."""
    head = (f"peak: {peak['gmacs']:.0f} GMAC/s int8 ({peak['instruction']}, "
            f"{peak['threads']} thread(s)) = ")
    if "estimated_gmacs" not in peak:  # a result saved before the estimate existed
        return head + "measured; % = share of that peak"
    measured = f"measured {peak['measured_gmacs']:.0f}"
    estimated = (f"llvm-mca {peak['mca_model']} {peak['ipc']:.2f} instr/cycle x "
                 f"{peak['clock_ghz']:.2f} GHz measured clock = {peak['estimated_gmacs']:.0f}")
    if peak["mca_model"] == peak.get("mcpu"):
        how = f"max({measured}, {estimated})"
    else:
        how = f"{measured} (llvm-mca knows no {peak.get('mcpu')}; {estimated}, not used)"
    return head + how + ("; % = share of that peak (Winograd layers: of the int16 products"
                         " they execute, 16 per 2x2 outputs instead of 36)")


def table(result: dict, title: str):
    from rich.table import Table

    peak = result["peak"]
    t = Table(title=title, caption=peak_caption(peak))
    for col in ("layer (N,C,H,W) -> O, k, stride", "×", "GMAC", "tvmq ms", "PyTorch int8 ms",
                "tvmq ÷ PyTorch", "tvmq % peak", "PyTorch % peak"):
        t.add_column(col, justify="left" if col.startswith("layer") else "right")
    for r in result["layers"]:
        o, _, kh, _ = r["weight"]
        desc = f"{tuple(r['input'])} -> {o}, {kh}x{kh}, s{r['stride'][0]}" + (
            f", g{r['groups']}" if r["groups"] != 1 else "") + (
            ", Winograd" if r.get("kernel") == "Winograd" else "")
        t.add_row(desc, str(r["count"]), f"{r['macs'] / 1e9:.3f}", f"{r['tvmq_ms']:.3f}",
                  f"{r['torch_int8_ms']:.3f}", f"{r['ratio']:.2f}×",
                  f"{100 * r['tvmq_peak_fraction']:.0f} %", f"{100 * r['torch_peak_fraction']:.0f} %")
    return t


def main(argv=None) -> int:  # child process: one side of the per-layer benchmark
    side, model, threads, repeats, db = (argv or sys.argv[1:])[:5]
    threads, repeats = int(threads), int(repeats)
    import torch

    torch.set_num_threads(threads)
    if side == "peak":
        result = peak_gmacs(threads)
    else:
        layers = conv_layers(model)
        result = (_tvmq_side(layers, repeats, db or None) if side == "tvmq"
                  else _torch_side(layers, repeats))
    print(LAYERS_RESULT + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
