"""Bring your own QAT model: standard PyTorch int8 QAT/PTQ (PT2E, torchao) -> tvmq's integer ops.

A model quantized with torchao's PT2E flow (``prepare_qat_pt2e`` or ``prepare_pt2e`` with a
quantizer, training or calibration, ``convert_pt2e``) computes in float between
``quantized_decomposed.quantize_per_tensor`` / ``dequantize_per_tensor`` /
``dequantize_per_channel`` nodes. :func:`import_program` rewrites that graph into tvmq's
integer deploy ops (``tvmq.ops_affine``: zero points, a fixed-point multiplier per output
channel), a program the normal tvmq path (frontend, lowering, kernels) builds:

    dequantize(x) -> conv2d/linear(+ dequantized int8 weight, float bias) [-> relu] -> quantize
        => tvmq::qconv2d_affine / qlinear_affine  (bias rounded to int32 at s_x * s_w[o])
    dequantize(a) + dequantize(b) [-> relu] -> quantize   => tvmq::qadd_affine
    dequantize(x) -> avg_pool2d / adaptive_avg_pool2d / mean -> quantize  => qavg_pool2d_affine
    max_pool2d, relu, flatten/view/reshape on a dequantized tensor: done on the integers
    quantize(float input) / dequantize(output)   => tvmq::quantize_affine / dequantize_affine

Anything else is refused naming the node. ``tvmq.build`` calls this by itself for PT2E
programs (``tvmq.frontend.rewrite_program``); ``shift_only=True`` rounds every
requantization multiplier to a power of two (a pure rounding shift).

uint8 activations (x86 configurations) are carried as int8 ``q - 128`` with zero point
``z - 128``: the same real values, one int8 datapath.
"""
from __future__ import annotations

import argparse
import math
import operator
from dataclasses import dataclass

import torch
import torch.ao.quantization.fx._decomposed  # noqa: F401  registers quantized_decomposed ops
from torch import fx

from tvmq import ops_affine
from tvmq.integer import AccumulatorOverflowError
from tvmq.ops_affine import f32, multiplier, multipliers
from tvmq.qat import UnsupportedOpError

NAMESPACE = "quantized_decomposed"
INT32_MAX = (1 << 31) - 1
tvmq_ops = torch.ops.tvmq


class PT2EImportError(UnsupportedOpError):
    """A PT2E graph that tvmq's integer kernels cannot run, naming the node."""


# ----------------------------------------------------------------------------- values
@dataclass(frozen=True)
class QParams:
    """Scale and zero point of an int8 activation (uint8 ones shifted by -128), range."""

    scale: float
    zp: int
    lo: int
    hi: int

    @classmethod
    def of(cls, node: fx.Node) -> "QParams":
        _, scale, zp, qmin, qmax, dtype = node.args[:6]
        if isinstance(scale, fx.Node) or isinstance(zp, fx.Node):
            raise PT2EImportError(f"node {node.name!r}: scale and zero point must be constants")
        if dtype not in (torch.int8, torch.uint8):
            raise PT2EImportError(f"node {node.name!r}: {dtype} activations are not int8/uint8")
        off = 128 if dtype == torch.uint8 else 0
        return cls(float(scale), int(zp) - off, int(qmin) - off, int(qmax) - off)


@dataclass
class Int:
    """An int8 activation in the new graph (a PT2E ``quantize`` output)."""
    node: fx.Node
    q: QParams


@dataclass
class Deq:
    """A float tensor that is exactly ``dequantize(int node)`` (PT2E ``dequantize`` output,
    or a shape op / max pool / ReLU of one)."""
    node: fx.Node
    q: QParams


@dataclass
class Float:
    node: fx.Node


@dataclass
class Const:
    value: object


@dataclass
class Weight:
    """A dequantized constant int8 weight: ``w_int * scales[o]`` (zero points 0)."""
    w: torch.Tensor
    scales: torch.Tensor


SHAPE_OPS = {"view", "reshape", "flatten", "_unsafe_view", "squeeze", "unsqueeze", "permute",
             "contiguous", "clone", "alias", "transpose", "expand"}
IDENTITY_OPS = {"dropout", "identity"}
SKIP_OPS = {"_assert_tensor_metadata", "_assert_scalar", "sym_constrain_range_for_size"}
ANCHORS = {"conv2d", "linear", "add", "add_", "avg_pool2d", "adaptive_avg_pool2d", "mean"}
FUSED_ACT = {"relu", "relu_"}


def _name(node: fx.Node) -> str:
    return getattr(node.target, "__name__", str(node.target)).split(".")[0]


def _ns(node: fx.Node) -> str | None:
    return getattr(node.target, "namespace", None)


def is_pt2e(program) -> bool:
    """Does the program hold PT2E's ``quantized_decomposed`` ops?"""
    graph = program.graph
    return any(n.op == "call_function" and _ns(n) == NAMESPACE for n in graph.nodes)


# ----------------------------------------------------------------------------- importer
class _Importer:
    def __init__(self, gm: fx.GraphModule, shift_only: bool):
        self.gm, self.shift_only = gm, shift_only
        self.graph = fx.Graph()
        self.root = torch.nn.Module()
        self.env: dict[fx.Node, object] = {}
        self.done: set[fx.Node] = set()
        self.layers: list[dict] = []

    # -- helpers
    def refuse(self, node: fx.Node, why: str):
        where = node.meta.get("stack_trace", "").strip().splitlines()[-1:] or [""]
        raise PT2EImportError(f"node {node.name!r} ({node.target}): {why}. {where[0]}".strip())

    def const(self, tensor: torch.Tensor, hint: str) -> fx.Node:
        name = f"{hint}_{len(self.root._buffers)}".replace(".", "_")
        self.root.register_buffer(name, tensor.contiguous())
        return self.graph.get_attr(name)

    def call(self, op, *args) -> fx.Node:
        return self.graph.call_function(op, tuple(args))

    def value(self, arg):
        if isinstance(arg, fx.Node):
            return self.env[arg]
        return Const(arg)

    def deq(self, node: fx.Node, arg, what: str) -> Deq:
        v = self.value(arg)
        if not isinstance(v, Deq):
            self.refuse(node, f"its {what} is not a dequantized int8 tensor (quantize ->"
                              " dequantize); tvmq runs only quantized activations")
        return v

    def requantize(self, v: Deq, q: QParams, node: fx.Node) -> fx.Node:
        if v.q == q:
            return v.node
        mult, shift = multiplier(v.q.scale / q.scale, self.shift_only)
        return self.call(tvmq_ops.requantize_affine.default, v.node, v.q.zp, mult, shift, q.zp,
                         q.lo, q.hi)

    def out_chain(self, node: fx.Node) -> tuple[fx.Node, bool]:
        """The ``quantize`` after an anchor op, through an optional ReLU."""
        relu, cur = False, node
        while True:
            users = list(cur.users)
            if len(users) != 1:
                self.refuse(node, "its output is not quantized (no single quantize_per_tensor"
                                  " after it); tvmq's integer kernels need a quantized output")
            user = users[0]
            if user.op == "call_function" and _ns(user) == "aten" and _name(user) in FUSED_ACT:
                relu, cur = True, user
                self.done.add(user)
                continue
            if user.op == "call_function" and _ns(user) == NAMESPACE and \
                    _name(user) == "quantize_per_tensor":
                self.done.add(user)
                return user, relu
            self.refuse(node, f"its output goes to {user.name!r} ({user.target}), not to a"
                              " quantize_per_tensor")

    def weight(self, node: fx.Node, arg) -> Weight:
        v = self.value(arg)
        if not isinstance(v, Weight):
            self.refuse(node, "its weight is not a constant int8 tensor dequantized per tensor"
                              " or per channel (axis 0)")
        return v

    def bias_int(self, node, bias, s_x: float, w: Weight) -> torch.Tensor:
        o = w.w.shape[0]
        if bias is None:
            return torch.zeros(o, dtype=torch.int32)
        b = self.value(bias)
        if not isinstance(b, Const) or not isinstance(b.value, torch.Tensor):
            self.refuse(node, "its bias is not a constant")
        scaled = torch.round(b.value.double() / (s_x * w.scales.double()))
        if not torch.isfinite(scaled).all() or scaled.abs().max() > INT32_MAX:
            raise AccumulatorOverflowError(f"node {node.name!r}: its bias does not fit int32 at"
                                           " the accumulator's scale s_x * s_w")
        return scaled.to(torch.int32)

    @staticmethod
    def power_of_two_weight(s_x: float, w: Weight, s_y: float) -> Weight:
        """``--shift-only`` for conv/linear: each channel's weight scale rounded *up* so that
        ``s_x * s_w[o] / s_y`` is a power of two, and the int8 weights re-rounded onto it
        (``|w'| <= |w|``, so they stay int8): the layer keeps its real-valued weights to
        within half a new step instead of scaling each channel by up to sqrt(2)."""
        m = s_x * w.scales / s_y
        ratio = torch.pow(2.0, torch.ceil(torch.log2(m))) / m  # in [1, 2)
        view = (-1,) + (1,) * (w.w.dim() - 1)
        w_int = torch.round(w.w.double() / ratio.view(view)).clamp(-127, 127).to(torch.int8)
        return Weight(w_int, w.scales * ratio)

    def check_acc(self, node, w: torch.Tensor, b: torch.Tensor):
        worst = (255 * w.to(torch.int64).abs().flatten(1).sum(1) + b.to(torch.int64).abs())
        if int(worst.max()) >= INT32_MAX:
            ch = int(worst.argmax())
            raise AccumulatorOverflowError(
                f"node {node.name!r}: output channel {ch} can reach |{int(worst[ch])}| in its"
                " int32 accumulator (> 2^31 - 1)")

    # -- anchors
    def conv_or_linear(self, node: fx.Node, kind: str):
        args = list(node.args) + [None] * 7
        kw = node.kwargs
        x = self.deq(node, args[0], "input")
        w = self.weight(node, args[1])
        bias = kw.get("bias", args[2])
        q_node, relu = self.out_chain(node)
        qy = QParams.of(q_node)
        if self.shift_only:
            w = self.power_of_two_weight(x.q.scale, w, qy.scale)
        b = self.bias_int(node, bias, x.q.scale, w)
        self.check_acc(node, w.w, b)
        mult, shift = multipliers(x.q.scale * w.scales.double() / qy.scale, self.shift_only)
        lo = max(qy.lo, qy.zp) if relu else qy.lo
        consts = [self.const(w.w, f"{node.name}_weight"), self.const(b, f"{node.name}_bias"),
                  self.const(mult, f"{node.name}_mult"), self.const(shift, f"{node.name}_shift")]
        if kind == "conv2d":
            stride = list(kw.get("stride", args[3] or [1, 1]))
            padding = kw.get("padding", args[4] if args[4] is not None else [0, 0])
            dilation = list(kw.get("dilation", args[5] or [1, 1]))
            groups = int(kw.get("groups", args[6] or 1))
            if isinstance(padding, str):
                self.refuse(node, f"padding={padding!r}: give explicit padding")
            padding = list(padding) * (2 // len(padding))
            stride, dilation = stride * (2 // len(stride)), dilation * (2 // len(dilation))
            out = self.call(tvmq_ops.qconv2d_affine.default, x.node, *consts, stride,
                            [padding[0], padding[1], padding[0], padding[1]], dilation, groups,
                            x.q.zp, qy.zp, lo, qy.hi)
        else:
            if len(node.args[0].meta["val"].shape) != 2:
                self.refuse(node, "linear on a tensor that is not 2-D [N, K]")
            out = self.call(tvmq_ops.qlinear_affine.default, x.node, *consts, x.q.zp, qy.zp,
                            lo, qy.hi)
        self.env[q_node] = Int(out, qy)
        self.layers.append({"node": node.name, "op": kind, "relu": relu,
                            "per_channel": bool((w.scales != w.scales[0]).any()),
                            "multipliers": [float(m) for m in mult[:1]]})

    def add(self, node: fx.Node):
        if node.kwargs.get("alpha", 1) != 1:
            self.refuse(node, "add with alpha != 1")
        a, b = self.deq(node, node.args[0], "first input"), self.deq(node, node.args[1],
                                                                     "second input")
        shapes = [getattr(x.meta.get("val"), "shape", None) for x in node.args[:2]]
        if shapes[0] != shapes[1]:
            self.refuse(node, "add with broadcasting")
        q_node, relu = self.out_chain(node)
        qy = QParams.of(q_node)
        ma, mb = a.q.scale / qy.scale, b.q.scale / qy.scale
        if self.shift_only:
            pa, pb = round(math.log2(ma)), round(math.log2(mb))
            shift = min(max(1, -min(pa, pb)), 62)
            a_mult, b_mult = (1 << (shift + p) if shift + p >= 0 else 0 for p in (pa, pb))
        else:
            _, shift = multiplier(max(ma, mb))
            a_mult, b_mult = round(ma * 2.0 ** shift), round(mb * 2.0 ** shift)
        lo = max(qy.lo, qy.zp) if relu else qy.lo
        out = self.call(tvmq_ops.qadd_affine.default, a.node, b.node, a.q.zp, b.q.zp, a_mult,
                        b_mult, shift, qy.zp, lo, qy.hi)
        self.env[q_node] = Int(out, qy)
        self.layers.append({"node": node.name, "op": "add", "relu": relu})

    def avg_pool(self, node: fx.Node, kind: str):
        x = self.deq(node, node.args[0], "input")
        n, c, h, w = node.args[0].meta["val"].shape
        keep = True
        if kind == "adaptive_avg_pool2d":
            oh, ow = node.args[1]
            if h % oh or w % ow:
                self.refuse(node, "adaptive average pool with uneven windows")
            kernel = stride = [h // oh, w // ow]
        elif kind == "mean":
            dims = sorted(d % 4 for d in node.args[1])
            if dims != [2, 3]:
                self.refuse(node, "mean over other dims than H, W")
            kernel = stride = [h, w]
            keep = bool(node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False))
        else:
            args = list(node.args) + [None] * 6
            kernel = list(args[1]) * (2 // len(args[1]))
            stride = list(args[2] or kernel) * (2 // len(args[2] or kernel))
            pad = args[3] or [0]
            if any(pad) or args[4] or args[6] is not None:
                self.refuse(node, "average pool with padding, ceil_mode or divisor_override")
        q_node, relu = self.out_chain(node)
        qy = QParams.of(q_node)
        mult, shift = multiplier(x.q.scale / (kernel[0] * kernel[1] * qy.scale), self.shift_only)
        lo = max(qy.lo, qy.zp) if relu else qy.lo
        out = self.call(tvmq_ops.qavg_pool2d_affine.default, x.node, kernel, stride, x.q.zp,
                        mult, shift, qy.zp, lo, qy.hi)
        if not keep:
            out = self.call(torch.ops.aten.flatten.using_ints, out, 1)
        self.env[q_node] = Int(out, qy)

    # -- the walk
    def run(self) -> fx.GraphModule:
        for node in self.gm.graph.nodes:
            if node in self.done:
                continue
            if node.op == "placeholder":
                new = self.graph.placeholder(node.name)
                new.meta = dict(node.meta)
                self.env[node] = Float(new)
            elif node.op == "get_attr":
                value = self.gm
                for part in node.target.split("."):
                    value = getattr(value, part)
                self.env[node] = Const(value)
            elif node.op == "call_function":
                self.call_function(node)
            elif node.op == "call_module" and node.target == "_guards_fn":
                continue  # torch.export's input guards (ExportedProgram.module())
            elif node.op == "output":
                outs = node.args[0]
                outs = [outs] if not isinstance(outs, (tuple, list)) else outs
                results = []
                for o in outs:
                    v = self.env.get(o) if isinstance(o, fx.Node) else None
                    if not isinstance(v, Deq):
                        self.refuse(node, "the model's output is not a dequantized int8 tensor")
                    results.append(self.call(tvmq_ops.dequantize_affine.default, v.node,
                                             f32(v.q.scale), v.q.zp))
                self.graph.output(results[0] if len(results) == 1 else tuple(results))
            else:
                self.refuse(node, f"{node.op} nodes are not supported")
        self.graph.lint()
        return fx.GraphModule(self.root, self.graph)

    def call_function(self, node: fx.Node):
        ns, name = _ns(node), _name(node)
        if node.target is operator.getitem:
            self.refuse(node, "multi-output op")
        if ns == NAMESPACE:
            return self.quantized_decomposed(node, name)
        if ns != "aten":
            self.refuse(node, "not an aten op PT2E quantizes")
        if name in SKIP_OPS:
            return
        if name in ANCHORS:
            kind = "add" if name in ("add", "add_") else name
            if kind in ("conv2d", "linear"):
                return self.conv_or_linear(node, kind)
            if kind == "add":
                return self.add(node)
            return self.avg_pool(node, kind)
        if name in SHAPE_OPS | IDENTITY_OPS | FUSED_ACT | {"max_pool2d"}:
            x = self.value(node.args[0])
            if not isinstance(x, Deq):
                self.refuse(node, "its input is not a dequantized int8 tensor")
            if name in IDENTITY_OPS:
                out = x.node
            elif name in FUSED_ACT:  # relu(s (x - z)) = s (max(x, z) - z)
                out = self.call(tvmq_ops.requantize_affine.default, x.node, x.q.zp, 2, 1,
                                x.q.zp, max(x.q.lo, x.q.zp), x.q.hi)
            elif name == "max_pool2d":
                args = list(node.args) + [None] * 6
                kernel = list(args[1]) * (2 // len(args[1]))
                stride = list(args[2] or kernel) * (2 // len(args[2] or kernel))
                pad = list(args[3] or [0, 0]) * (2 // len(args[3] or [0, 0]))
                if (args[4] not in (None, 1, [1], [1, 1])) or args[5]:
                    self.refuse(node, "max pool with dilation or ceil_mode")
                out = self.call(tvmq_ops.qmax_pool2d.default, x.node, kernel, stride,
                                [pad[0], pad[1], pad[0], pad[1]])
            else:
                rest = [a for a in node.args[1:]]
                out = self.graph.call_function(node.target, (x.node, *rest), dict(node.kwargs))
            self.env[node] = Deq(out, x.q)
            return
        self.refuse(node, "no integer kernel in tvmq for this op")

    def quantized_decomposed(self, node: fx.Node, name: str):
        if name == "quantize_per_tensor":
            q = QParams.of(node)
            v = self.value(node.args[0])
            if isinstance(v, Float):
                out = self.call(tvmq_ops.quantize_affine.default, v.node, f32(1.0 / q.scale),
                                q.zp, q.lo, q.hi)
            elif isinstance(v, Deq):
                out = self.requantize(v, q, node)
            else:
                self.refuse(node, "quantizes a tensor that is neither the model input nor"
                                  " an integer op's result")
            self.env[node] = Int(out, q)
        elif name == "dequantize_per_tensor":
            v = self.value(node.args[0])
            if isinstance(v, Int):
                q = QParams.of(node)
                if q != v.q:
                    self.refuse(node, "dequantizes with other parameters than it was quantized")
                self.env[node] = Deq(v.node, q)
            elif isinstance(v, Const):  # a per-tensor weight
                _, scale, zp = node.args[:3]
                if int(zp) != 0 or v.value.dtype != torch.int8:
                    self.refuse(node, "weights must be int8 with zero point 0 (symmetric)")
                o = v.value.shape[0]
                self.env[node] = Weight(v.value, torch.full((o,), float(scale), dtype=torch.float64))
            else:
                self.refuse(node, "dequantizes a tensor that is not quantized")
        elif name == "dequantize_per_channel":
            w, scales, zps, axis = (self.value(a) for a in node.args[:4])
            if not all(isinstance(t, Const) for t in (w, scales, zps)):
                self.refuse(node, "per-channel dequantize of a non-constant (activations must"
                                  " be per tensor)")
            if axis.value != 0 or w.value.dtype != torch.int8:
                self.refuse(node, "per-channel weights must be int8 along axis 0")
            if zps.value is not None and bool((torch.as_tensor(zps.value) != 0).any()):
                self.refuse(node, "weights must have zero point 0 (symmetric)")
            self.env[node] = Weight(w.value, torch.as_tensor(scales.value).double())
        else:
            self.refuse(node, "this quantized_decomposed op has no tvmq kernel")


def import_program(program, example: torch.Tensor | None = None, *, shift_only: bool = False,
                   name: str | None = None) -> torch.export.ExportedProgram:
    """A PT2E-quantized model (``convert_pt2e``'s GraphModule or its ``torch.export``
    program) -> an ExportedProgram of tvmq's integer ops, ready for ``tvmq.build``.

    ``shift_only``: every requantization multiplier rounded to a power of two (a pure
    rounding shift; costs accuracy, see the README)."""
    if isinstance(program, torch.export.ExportedProgram):
        gm = program.module()
        if example is None:
            example = program.example_inputs[0][0]
    else:
        gm = program
    if example is None:
        raise ValueError("tvmq.pt2e.import_program: an example input is needed")
    importer = _Importer(gm, shift_only)
    deploy = importer.run()
    ep = torch.export.export(deploy, (example,))
    info = dict(getattr(program, "tvmq_info", None) or {})
    info.setdefault("model", name or "pt2e")
    # no tvmq recipe: the scheme is PyTorch's affine int8 (fixed-point or, shift_only,
    # power-of-two requantization)
    ep.tvmq_info = {**info, "recipe": None, "layers": [],
                    "scheme": "pt2e-shift" if shift_only else "pt2e",
                    "pt2e": {"shift_only": shift_only, "layers": importer.layers}}
    return ep


def quantizer(kind: str = "xnnpack", *, qat: bool = True, per_channel: bool = True):
    """A torchao PT2E quantizer (needs ``torchao``, the ``pt2e`` extra).

    - ``xnnpack``: XNNPACK's configuration (torchao's copy of XNNPACKQuantizer): int8
      asymmetric activations, symmetric int8 weights [-127, 127], per channel or per tensor;
    - ``x86``: X86InductorQuantizer's configuration (uint8 asymmetric activations, symmetric
      per-channel int8 weights) on XNNPACKQuantizer's annotator (torchao 0.18's
      X86InductorQuantizer fails to annotate conv+add patterns under torch 2.13);
    - ``symmetric``: int8 symmetric activations (zero point 0) and weights.
    """
    from torchao.quantization.pt2e.quantizer import QuantizationConfig, QuantizationSpec
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        get_default_x86_inductor_quantization_config)
    from torchao.testing.pt2e._xnnpack_quantizer import (XNNPACKQuantizer,
                                                         get_symmetric_quantization_config)

    if kind == "xnnpack":
        config = get_symmetric_quantization_config(is_per_channel=per_channel, is_qat=qat)
    elif kind == "x86":
        config = get_default_x86_inductor_quantization_config(is_qat=qat)
    elif kind == "symmetric":
        base = get_symmetric_quantization_config(is_per_channel=per_channel, is_qat=qat)
        act = base.input_activation
        act = QuantizationSpec(dtype=torch.int8, quant_min=-127, quant_max=127,
                               qscheme=torch.per_tensor_symmetric, is_dynamic=False,
                               observer_or_fake_quant_ctr=act.observer_or_fake_quant_ctr)
        config = QuantizationConfig(act, act, base.weight, None, qat)
    else:
        raise ValueError(f"quantizer kind {kind!r}: use xnnpack, x86 or symmetric")
    return XNNPACKQuantizer().set_global(config)


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m tvmq.pt2e",
        description="Rewrite a PT2E-quantized .pt2 into tvmq's integer ops (then: python -m"
                    " tvmq.build OUT.pt2). tvmq.build does this by itself; use this for"
                    " --shift-only.")
    parser.add_argument("model", help="torch.export program (.pt2) of a convert_pt2e model")
    parser.add_argument("out", help="output .pt2 of tvmq ops")
    parser.add_argument("--shift-only", action="store_true",
                        help="round every requantization multiplier to a power of two")
    args = parser.parse_args(argv)
    import json
    import os
    from pathlib import Path

    from tvmq.artifact import TVMQ_JSON, load_program

    program = load_program(args.model)
    ep = import_program(program, shift_only=args.shift_only)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".tmp-{out.name}")
    torch.export.save(ep, tmp, extra_files={TVMQ_JSON: json.dumps(ep.tvmq_info)})
    os.replace(tmp, out)
    print(out)


if __name__ == "__main__":
    main()
