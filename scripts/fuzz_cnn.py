"""Fuzz tvmq with random small CNNs through the public API.

``python scripts/fuzz_cnn.py --cases 50 --seed 0``

Each case is a random stack of conv (groups, dilation, stride, padding, bias), batch norm,
ReLU, residual adds, max/avg/global pools and linears on a small input. It goes through
``tvmq.prepare(model, "int-se") -> tvmq.calibrate -> tvmq.convert -> tvmq.build(x86)`` and
must end in one of two ways:

- ``exact``: the build's parity check found 0 mismatching elements, and ``art.run(x)``
  equals ``deploy(x)`` bit for bit on fresh inputs;
- ``refused``: one of ``tvmq.USER_ERRORS`` whose message names a layer or a node.

Anything else is a finding: ``MISMATCH`` (outputs differ), ``UNCLEAR`` (a user error that
names no layer/node), ``CRASH`` (any other exception). A case is reproducible from
``(seed, index)``: ``--only INDEX`` reruns one, ``--show`` prints its spec.
"""
from __future__ import annotations

import argparse
import json
import random
import re
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


# ------------------------------------------------------------------------------ the models
# ops whose forward is not just calling their layer
_FUNCTIONAL = {"view", "add_self", "bn_shared", "sigmoid", "cat"}
# ops tvmq should refuse, clearly (a wild case may hold one)
UNSUPPORTED = ("sigmoid", "cat", "maxpool_dil", "avgpool_pad", "adaptive2", "bn_shared")


class FuzzNet(nn.Module):
    """A CNN described by ``spec``: a list of ops (dicts), applied in order. ``res`` ops hold
    a body (a list of ops) whose output is added to their input."""

    def __init__(self, spec: dict):
        super().__init__()
        self.spec = spec
        self.layers = nn.ModuleList()
        self.plan = self._build(spec["ops"])

    def _build(self, ops):
        plan = []
        for op in ops:
            kind = op["op"]
            if kind == "res":
                plan.append(("res", self._build(op["body"]), op.get("relu", False)))
                continue
            if kind == "conv":
                m = nn.Conv2d(op["cin"], op["cout"], (op["k"], op.get("kw", op["k"])),
                              op["stride"], op["pad"], op["dil"], op["groups"], bias=op["bias"])
            elif kind == "bn":
                m = nn.BatchNorm2d(op["c"])
            elif kind == "relu":
                m = nn.ReLU()
            elif kind == "maxpool":
                m = nn.MaxPool2d(op["k"], op["stride"], op["pad"])
            elif kind == "avgpool":
                m = nn.AvgPool2d(op["k"], op["stride"])
            elif kind == "gap":
                m = nn.AdaptiveAvgPool2d(1)
            elif kind == "flatten":
                m = nn.Flatten()
            elif kind == "linear":
                m = nn.Linear(op["cin"], op["cout"], bias=op["bias"])
            elif kind == "dropout":
                m = nn.Dropout(0.5) if op.get("identity") is None else nn.Identity()
            elif kind in ("view", "add_self", "bn_shared", "sigmoid", "cat"):
                m = nn.BatchNorm2d(op["c"]) if kind == "bn_shared" else nn.Identity()
            elif kind == "maxpool_dil":
                m = nn.MaxPool2d(op["k"], 1, 0, dilation=2)
            elif kind == "avgpool_pad":
                m = nn.AvgPool2d(op["k"], 1, 1)
            elif kind == "adaptive2":
                m = nn.AdaptiveAvgPool2d(2)
            else:
                raise ValueError(f"unknown op {kind!r}")
            self.layers.append(m)
            plan.append((kind if kind in _FUNCTIONAL else "layer", len(self.layers) - 1))
        return plan

    def _run(self, plan, x):
        for step in plan:
            if step[0] == "res":
                y = x + self._run(step[1], x)
                x = torch.relu(y) if step[2] else y
            elif step[0] == "view":  # x.view(x.size(0), -1): a shape query, then a view
                x = x.view(x.size(0), -1)
            elif step[0] == "add_self":  # torch.add of a tensor and its ReLU
                x = torch.add(x, F.relu(x))
            elif step[0] == "bn_shared":  # BN on a tensor that is also used elsewhere
                x = self.layers[step[1]](x) + x
            elif step[0] == "sigmoid":
                x = torch.sigmoid(x)
            elif step[0] == "cat":
                x = torch.cat([x, x], 1)
            else:
                x = self.layers[step[1]](x)
        return x

    def forward(self, x):
        return self._run(self.plan, x)


CHANNELS = [4, 6, 8, 12, 16]  # conv widths (--channels)


def _out(n: int, k: int, stride: int, pad: int, dil: int = 1) -> int:
    return (n + 2 * pad - dil * (k - 1) - 1) // stride + 1


def _conv_op(rng: random.Random, cin: int, hw: tuple, *, same: bool = False) -> dict | None:
    """A random conv on ``cin`` channels of an ``hw`` = (h, w) map (``same``: keep channels
    and size); None when nothing fits."""
    for _ in range(20):
        k = rng.choice([1, 3, 3, 5])
        kw = k if same or rng.random() < 0.85 else rng.choice([1, 3])  # (3, 1) kernels
        dil = 1 if k == 1 and kw == 1 else rng.choice([1, 1, 2])
        stride = 1 if same else rng.choice([1, 1, 2, 3])
        pad = dil * (k // 2) if same or rng.random() < 0.6 else rng.choice([0, 1, 2])
        if kw != k and pad > dil * (kw // 2):
            pad = 0 if kw == 1 else pad
        cout = cin if same else rng.choice(CHANNELS)
        groups = 1
        if rng.random() < 0.35:
            common = [g for g in (2, 3, 4, cin) if cin % g == 0 and cout % g == 0]
            groups = rng.choice(common) if common else 1
        out = (_out(hw[0], k, stride, pad, dil), _out(hw[1], kw, stride, pad, dil))
        if min(out) >= 1 and (not same or out == hw):
            op = {"op": "conv", "cin": cin, "cout": cout, "k": k, "stride": stride,
                  "pad": pad, "dil": dil, "groups": groups, "bias": rng.random() < 0.5}
            if kw != k:
                op["kw"] = kw
            return op, out
    return None


def random_spec(rng: random.Random, size: int = 12, wild: float = 0.15) -> dict:
    """A random CNN spec on a 1x3x``size``x``size`` input (sometimes ``size`` x
    ``size - 3``). With probability ``wild`` per step, a rarer form: functional adds and
    views, dropout, or an op tvmq does not support (the case must then be refused)."""
    width = size if rng.random() < 0.75 else max(size - 3, 3)
    ops, c, hw = [], 3, (size, width)
    flat = None  # features once flattened
    for _ in range(rng.randint(2, 6)):
        r = rng.random()
        if rng.random() < wild:
            kind = rng.choice(["view_linear", "add_self", "dropout", *UNSUPPORTED])
            if kind == "view_linear":
                if c * hw[0] * hw[1] <= 1024:
                    flat = c * hw[0] * hw[1]
                    ops.append({"op": "view"})
                    break
            elif kind == "dropout":
                ops.append({"op": "dropout", **({"identity": 1} if rng.random() < .5 else {})})
            elif kind in ("bn_shared",):
                ops.append({"op": kind, "c": c})
            elif kind == "cat":
                ops.append({"op": kind})
                c *= 2
            elif kind in ("maxpool_dil", "avgpool_pad") and min(hw) >= 3:
                ops.append({"op": kind, "k": 2})
                hw = (hw[0] - 2, hw[1] - 2) if kind == "maxpool_dil" else (hw[0] + 1,
                                                                          hw[1] + 1)
            elif kind == "adaptive2" and min(hw) >= 2:
                ops.append({"op": kind})
                hw = (2, 2)
            elif kind in ("sigmoid", "add_self"):
                ops.append({"op": kind})
            continue
        if r < 0.5:  # conv [bn] [relu]
            got = _conv_op(rng, c, hw)
            if got is None:
                continue
            op, hw = got
            ops.append(op)
            c = op["cout"]
            if rng.random() < 0.6:
                ops.append({"op": "bn", "c": c})
            if rng.random() < 0.7:
                ops.append({"op": "relu"})
        elif r < 0.7:  # residual block: conv bn [relu] [conv bn] + input [relu]
            body = []
            if rng.random() < 0.15:  # the residual of a ReLU / a same-size max pool
                body.append(rng.choice([{"op": "relu"},
                                        {"op": "maxpool", "k": 3, "stride": 1, "pad": 1}]))
            for j in range(rng.choice([1, 2]) if not body else 0):
                got = _conv_op(rng, c, hw, same=True)
                if got is None:
                    break
                body.append(got[0])
                if rng.random() < 0.7:
                    body.append({"op": "bn", "c": c})
                if j == 0 and rng.random() < 0.6:
                    body.append({"op": "relu"})
            if body:
                ops.append({"op": "res", "body": body, "relu": rng.random() < 0.6})
        elif r < 0.8 and min(hw) >= 2:  # max pool
            k = rng.choice([2, 3])
            pad = rng.choice([0, 1]) if k == 3 or rng.random() < 0.3 else 0
            stride = rng.choice([1, 2])
            ops.append({"op": "maxpool", "k": k, "stride": stride, "pad": pad})
            hw = (_out(hw[0], k, stride, pad), _out(hw[1], k, stride, pad))
        elif r < 0.9 and min(hw) >= 3:  # average pool (3x3: the non-power-of-two multiplier)
            k = rng.choice([2, 3])
            stride = rng.choice([1, 2, k])
            ops.append({"op": "avgpool", "k": k, "stride": stride})
            hw = (_out(hw[0], k, stride, 0), _out(hw[1], k, stride, 0))
        else:
            ops.append({"op": "relu"})
    head = rng.random()
    if flat is not None:  # after x.view(x.size(0), -1)
        ops.append({"op": "linear", "cin": flat, "cout": rng.choice([3, 5, 10]),
                    "bias": rng.random() < 0.7})
    elif head < 0.45:  # global pool + linear
        ops += [{"op": "gap"}, {"op": "flatten"},
                {"op": "linear", "cin": c, "cout": rng.choice([3, 5, 10]),
                 "bias": rng.random() < 0.7}]
    elif head < 0.7 and c * hw[0] * hw[1] <= 1024:  # flatten + linear
        ops += [{"op": "flatten"},
                {"op": "linear", "cin": c * hw[0] * hw[1], "cout": rng.choice([3, 5, 10]),
                 "bias": rng.random() < 0.7}]
        if rng.random() < 0.3:
            ops += [{"op": "relu"}, {"op": "linear", "cin": ops[-1]["cout"], "cout": 4,
                                     "bias": True}]
    return {"input": [1, 3, size, width], "ops": ops}


def make_model(spec: dict, seed: int, extreme: bool = False) -> FuzzNet:
    """The model of ``spec`` with seeded random weights and batch-norm statistics;
    ``extreme``: weights scaled by 10^[-3, 2] per layer and BN variances 10^[-4, 2]."""
    torch.manual_seed(seed)
    model = FuzzNet(spec)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
                if extreme:
                    m.running_var.copy_(10 ** torch.empty_like(m.running_var).uniform_(-4, 2))
            elif extreme and isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.mul_(10 ** torch.empty(()).uniform_(-3, 2))
                if m.bias is not None:
                    m.bias.mul_(10 ** torch.empty(()).uniform_(-3, 2))
    return model.eval()


# ------------------------------------------------------------------------------ one case
@dataclass
class Outcome:
    index: int
    status: str  # exact | refused | MISMATCH | UNCLEAR | CRASH
    detail: str = ""
    spec: dict = field(default_factory=dict)
    seconds: float = 0.0
    elements: int = 0


def _names_a_place(message: str, model: nn.Module) -> bool:
    """A refusal must say where: a node, a layer, or one of the model's module names."""
    if re.search(r"\b(node|layer|kernel)\b", message):
        return True
    names = [n for n, _ in model.named_modules() if n]
    return any(re.search(rf"\b{re.escape(n)}\b", message) for n in names)


def case_seed(seed: int, index: int) -> int:
    return seed * 1_000_003 + index


SCHEMES = ["int-se", "int-se:7", "int-se:6", "int-se:5", "int-se:4", "int-se:3", "int-se:2"]
# fresh inputs: in range, tiny (most quantize to 0), far out of the calibrated range
SCALES = (2.0, 0.01, 40.0)


def run_case(index: int, seed: int = 0, out: str | Path | None = None, size: int = 12,
             fresh: int = 3, spec: dict | None = None, wild: float = 0.15,
             scheme: str = "int-se", extreme: bool = False, target: str = "x86") -> Outcome:
    """Generate case ``index`` of ``seed`` (or take ``spec``), push it through the public API
    and classify the result."""
    import tvmq

    s = case_seed(seed, index)
    rng = random.Random(s)
    spec = spec or random_spec(rng, size, wild)
    if scheme == "random":
        scheme = random.Random(s + 1).choice(SCHEMES)
    spec = {**spec, "scheme": scheme}
    start = time.perf_counter()
    model = make_model(spec, s, extreme)
    gen = torch.Generator().manual_seed(s)
    shape = spec["input"]
    batches = [torch.randn(2, *shape[1:], generator=gen) for _ in range(2)]
    example = torch.randn(*shape, generator=gen)
    tmp = None
    if out is None:
        tmp = tempfile.TemporaryDirectory(prefix="tvmq-fuzz-")
        out = tmp.name
    try:
        qat = tvmq.prepare(model, scheme)
        tvmq.calibrate(qat, batches)
        deploy = tvmq.convert(qat)
        art = tvmq.build(deploy, example, target=target, out=Path(out) / f"case{index}",
                         parity=8)
        parity = art.manifest["parity"]
        if parity["mismatches"] != 0:
            return Outcome(index, "MISMATCH", f"build parity: {parity['mismatches']} of"
                           f" {parity['elements']} elements differ", spec,
                           time.perf_counter() - start, parity["elements"])
        elements = parity["elements"]
        if not art.manifest["target"]["host"]:  # a board's library: parity ran on the host
            fresh = 0
        with torch.no_grad():
            for j in range(fresh):
                x = torch.randn(*shape, generator=gen) * SCALES[j % len(SCALES)]
                want, got = deploy(x), art.run(x)
                elements += want.numel()
                if want.dtype != got.dtype or want.shape != got.shape or \
                        not torch.equal(want, got):
                    diff = (want != got).sum().item() if want.shape == got.shape else "all"
                    return Outcome(index, "MISMATCH", f"art.run(x) != deploy(x): {diff} of"
                                   f" {want.numel()} elements differ ({want.dtype} vs"
                                   f" {got.dtype})", spec, time.perf_counter() - start,
                                   elements)
        return Outcome(index, "exact", "", spec, time.perf_counter() - start, elements)
    except tvmq.USER_ERRORS as err:
        message = f"{type(err).__name__}: {err}"
        status = "refused" if _names_a_place(str(err), model) else "UNCLEAR"
        return Outcome(index, status, message, spec, time.perf_counter() - start)
    except Exception as err:  # noqa: BLE001  any other exception is a finding
        tb = traceback.format_exc(limit=-4)
        return Outcome(index, "CRASH", f"{type(err).__name__}: {err}\n{tb}", spec,
                       time.perf_counter() - start)
    finally:
        if tmp is not None:
            tmp.cleanup()


def describe(spec: dict) -> str:
    """A one-line summary of a spec: conv3x3/s2/d2/g4 bn relu res(...) ..."""
    parts = [spec["scheme"]] if spec.get("scheme", "int-se") != "int-se" else []
    for op in spec["ops"]:
        kind = op["op"]
        if kind == "conv":
            text = f"conv{op['k']}x{op.get('kw', op['k'])}>{op['cout']}"
            text += "".join(f"/{t}{op[key]}" for t, key in (("s", "stride"), ("d", "dil"),
                                                             ("g", "groups"), ("p", "pad"))
                            if op[key] != (0 if key == "pad" else 1))
            parts.append(text)
        elif kind == "res":
            inner = describe({"ops": op["body"]})
            parts.append(f"res({inner}){'+relu' if op['relu'] else ''}")
        elif kind in ("maxpool", "avgpool") and "stride" in op:
            parts.append(f"{kind}{op['k']}/s{op['stride']}" + (f"/p{op['pad']}"
                                                              if op.get("pad") else ""))
        elif kind == "linear":
            parts.append(f"linear>{op['cout']}")
        else:
            parts.append(kind)
    return " ".join(parts)


# ------------------------------------------------------------------------------ the CLI
def main(argv=None) -> int:
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeElapsedColumn)
    from rich.table import Table

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=12, help="input height and width")
    p.add_argument("--wild", type=float, default=0.15,
                   help="chance per layer of a rarer form or an unsupported op")
    p.add_argument("--scheme", default="int-se",
                   help="int-se, int-se:N, or random (one of int-se:2..8 per case)")
    p.add_argument("--extreme", action="store_true",
                   help="weights scaled by 10^[-3, 2], BN variances 10^[-4, 2]")
    p.add_argument("--channels", default="4,6,8,12,16",
                   help="conv widths to draw from (comma separated)")
    p.add_argument("--batch", type=int, default=1, help="batch size of the example input")
    p.add_argument("--target", default="x86",
                   help="x86, or arm/rpi5 (cross-built; parity on this host's build)")
    p.add_argument("--only", type=int, action="append", help="run only this case index")
    p.add_argument("--show", action="store_true", help="print each case's spec (JSON)")
    p.add_argument("--json", help="write every outcome to this file")
    args = p.parse_args(argv)

    CHANNELS[:] = [int(c) for c in args.channels.split(",")]
    console = Console(stderr=True, width=None if sys.stderr.isatty() else 140)
    indices = args.only or list(range(args.cases))
    outcomes = []
    with Progress(TextColumn("[bold]fuzz"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), TextColumn("{task.description}"),
                  console=console) as progress:
        task = progress.add_task("", total=len(indices))
        for i in indices:
            spec = random_spec(random.Random(case_seed(args.seed, i)), args.size, args.wild)
            spec["input"][0] = args.batch
            progress.update(task, description=f"case {i}: {describe(spec)[:60]}")
            o = run_case(i, args.seed, size=args.size, spec=spec, scheme=args.scheme,
                         extreme=args.extreme, target=args.target)
            outcomes.append(o)
            if o.status not in ("exact", "refused"):
                progress.console.print(f"[red]case {i} {o.status}[/red]: {describe(spec)}\n"
                                       f"  {o.detail.splitlines()[0][:300]}")
            if args.show:
                progress.console.print(json.dumps(spec))
            progress.advance(task)

    table = Table(title=f"tvmq fuzz: {len(outcomes)} random CNNs, seed {args.seed}")
    for col in ("case", "model", "result", "elements", "s"):
        table.add_column(col)
    style = {"exact": "green", "refused": "yellow"}
    for o in outcomes:
        detail = o.detail.splitlines()[0][:70] if o.detail else ""
        table.add_row(str(o.index), describe(o.spec)[:70],
                      f"[{style.get(o.status, 'red')}]{o.status}[/] {detail}",
                      str(o.elements or ""), f"{o.seconds:.1f}")
    console.print(table)
    counts = {}
    for o in outcomes:
        counts[o.status] = counts.get(o.status, 0) + 1
    console.print("  ".join(f"{k}: {v}" for k, v in sorted(counts.items())))
    if args.json:
        Path(args.json).write_text(json.dumps([o.__dict__ for o in outcomes], indent=1))
    bad = [o for o in outcomes if o.status not in ("exact", "refused")]
    for o in bad:
        console.print(f"[red]case {o.index} ({o.status})[/red] rerun: python"
                      f" scripts/fuzz_cnn.py --seed {args.seed} --only {o.index} --show\n"
                      f"{o.detail}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
