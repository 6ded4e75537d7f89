"""Quantization-aware training: ``prepare`` turns a float CNN into a QAT model.

The model is traced with ``torch.fx``; every operation becomes a tvmq QAT module that
fake-quantizes its output with the quantizers the recipe's scheme gives that layer
(``tvmq.schemes``), and patterns are fused the way the integer graph will
run them: ``Conv2d -> BatchNorm2d -> ReLU`` is one :class:`QConv2d`, ``Linear -> ReLU`` one
:class:`QLinear`, ``add -> ReLU`` one :class:`QAdd`. Shape-only ops (flatten, view, reshape)
stay as they are. Anything else is refused with an error naming the node.

Batch norm follows IOIQ: first *learn* (normal BN on the quantized conv's output), then
*lock* (:func:`lock_batchnorm`): running statistics frozen and folded into the conv's weight
and bias, which are then what gets quantized -- exactly what ``convert`` deploys.
"""
from __future__ import annotations

import copy
import operator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from topi_ops.pool import avg_pool_multiplier
from tvmq.quantizers import round_half_up
from tvmq.schemes import LayerScheme, Recipe, get_recipe


class UnsupportedOpError(TypeError):
    """The model contains an operation tvmq cannot quantize or lower."""


# ----------------------------------------------------------------------------- QAT modules
class QuantInput(nn.Module):
    """Fake-quantizes the float model input (the graph's one explicit quantize)."""

    def __init__(self, out_quant: nn.Module):
        super().__init__()
        self.out_quant = out_quant

    def forward(self, x):
        return self.out_quant(x)


class _QWeighted(nn.Module):
    """Shared part of QConv2d/QLinear: weight quantizer, optional folded BN, fused ReLU.

    ``layer_name`` is the float model's module name (what recipe overrides and reports use);
    ``scheme`` the :class:`~tvmq.schemes.LayerScheme` of its weights and output."""

    def __init__(self, layer: nn.Module, bn: nn.Module | None, relu: bool,
                 scheme: LayerScheme, layer_name: str = ""):
        super().__init__()
        self.layer_name, self.scheme = layer_name, scheme
        self.weight = nn.Parameter(layer.weight.detach().clone())
        bias = layer.bias.detach().clone() if layer.bias is not None else None
        self.bias = nn.Parameter(bias) if bias is not None else None
        self.bn = bn
        self.bn_locked = False
        self.relu = relu
        self.weight_quant = scheme.weight.scheme.weight_quantizer(scheme.weight)
        self.out_quant = scheme.act.scheme.act_quantizer(scheme.act, nonneg=relu)
        self.out_quant.nonneg = self.out_quant.nonneg or relu
        self.out_quant.layer = layer_name
        self.input_quant: tuple[nn.Module, ...] = ()  # set by prepare; a tuple so that
        # the producer's quantizer is referenced, not registered twice as a submodule
        self.input_nonneg: tuple[bool, ...] = ()  # whether each input follows a ReLU

    def folded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Weight and bias with batch norm folded in when it is locked."""
        w = self.weight
        b = self.bias if self.bias is not None else torch.zeros(w.shape[0], device=w.device)
        if self.bn is None or not self.bn_locked:
            return w, b
        bn = self.bn
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        w = w * scale.reshape(-1, *([1] * (w.dim() - 1)))
        b = bn.bias + (b - bn.running_mean) * scale
        return w, b

    def _bias(self, b):
        """The bias as the deploy model adds it (its scheme's rounding)."""
        s_in = self.input_quant[0].last_exponent if self.input_quant else None
        return self.scheme.weight.scheme.fake_bias(self.scheme.weight, b, s_in,
                                                   self.weight_quant)

    def _finish(self, y):
        if self.bn is not None and not self.bn_locked:
            y = self.bn(y)
        if self.relu:
            y = F.relu(y)
        return self.out_quant(y)


class QConv2d(_QWeighted):
    """Conv2d (+ BatchNorm2d) (+ ReLU) with INT-SE weights and output."""

    def __init__(self, conv: nn.Conv2d, bn, relu, scheme, layer_name=""):
        super().__init__(conv, bn, relu, scheme, layer_name)
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise UnsupportedOpError(f"Conv2d padding={conv.padding!r} mode={conv.padding_mode}:"
                                     " tvmq takes explicit zero padding")
        self.stride, self.padding = conv.stride, conv.padding
        self.dilation, self.groups = conv.dilation, conv.groups

    def forward(self, x):
        w, b = self.folded()
        wq = self.weight_quant(w)
        y = F.conv2d(x, wq, self._bias(b), self.stride, self.padding, self.dilation,
                     self.groups)
        return self._finish(y)


class QLinear(_QWeighted):
    """Linear (+ ReLU) with INT-SE weights and output."""

    def forward(self, x):
        w, b = self.folded()
        wq = self.weight_quant(w)
        return self._finish(F.linear(x, wq, self._bias(b)))


class QAdd(nn.Module):
    """Residual add (+ ReLU), output requantized to its own exponent."""

    def __init__(self, relu: bool, out_quant: nn.Module):
        super().__init__()
        self.relu = relu
        self.out_quant = out_quant
        self.out_quant.nonneg = self.out_quant.nonneg or relu
        self.input_quant: tuple[nn.Module, ...] = ()

    def forward(self, a, b):
        """As the integer kernel: each input rounded (half up) onto the output's grid, then
        the integer sum saturated -- not the float sum rounded once."""
        y = a + b
        y = F.relu(y) if self.relu else y
        s = self.out_quant.step(y)
        if s is None:
            return y
        lo, hi = self.out_quant.qrange()
        scale = 2.0 ** s
        q = torch.clamp(round_half_up(a / scale) + round_half_up(b / scale),
                        0 if self.relu else lo, hi) * scale
        return y + (q - y).detach()


class QReLU(nn.Module):
    """ReLU on an already quantized tensor: stays on the grid, exponent unchanged."""

    def forward(self, x):
        return F.relu(x)


class QMaxPool2d(nn.Module):
    """Max pooling: exact on integers, exponent unchanged."""

    def __init__(self, kernel, stride, padding):
        super().__init__()
        self.kernel, self.stride, self.padding = kernel, stride, padding

    def forward(self, x):
        return F.max_pool2d(x, self.kernel, self.stride, self.padding)


class QAvgPool2d(nn.Module):
    """Average pooling (``kernel=None``: global) rounded back onto the input's grid, as the
    integer kernel does (the output keeps the input's exponent)."""

    def __init__(self, kernel=None, stride=None):
        super().__init__()
        self.kernel, self.stride = kernel, stride
        self.input_quant: tuple[nn.Module, ...] = ()
        self.input_hw: tuple[int, int] | None = None

    def window(self, hw) -> tuple[list[int], list[int]]:
        if self.kernel is None:
            return list(hw), [1, 1]
        return list(self.kernel), list(self.stride or self.kernel)

    def forward(self, x):
        """As the integer kernel: the window's integer sum times ``round(2^16 / n)``, shifted
        back with rounding half up (a plain shift when ``n`` is a power of two)."""
        self.input_hw = tuple(x.shape[-2:])
        kernel, stride = self.window(self.input_hw)
        y = F.avg_pool2d(x, kernel, stride)
        (q,) = self.input_quant
        s = q.last_exponent
        total = F.avg_pool2d(x.detach().double() / 2.0**s, kernel, stride, divisor_override=1)
        mult, shift = avg_pool_multiplier(kernel[0] * kernel[1])
        lo, hi = q.qrange()
        mean = torch.clamp(round_half_up(torch.round(total) * mult / 2.0**shift), lo, hi)
        return y + (mean.to(y.dtype) * 2.0**s - y).detach()


# ----------------------------------------------------------------------------- prepare
_RELU = {F.relu, torch.relu, nn.ReLU, "relu"}
_ADD = {operator.add, operator.iadd, torch.add, "add"}
_SHAPE = {torch.flatten, "flatten", "view", "reshape", nn.Flatten}
_IDENTITY = {nn.Identity, nn.Dropout, F.dropout}
_SHAPE_QUERY = {getattr, operator.getitem, "size", "dim"}  # x.shape[0] and friends: not tensors


def _kind(gm: fx.GraphModule, node: fx.Node):
    """What a node does: a module class, a function, or a method name."""
    if node.op == "call_module":
        return type(gm.get_submodule(node.target))
    if node.op in ("call_function", "call_method"):
        return node.target
    return node.op


def _sole_user(node: fx.Node) -> fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


class _Preparer:
    """Rewrites a traced float graph into QAT modules, node by node."""

    def __init__(self, model: nn.Module, recipe: Recipe):
        self.recipe = recipe
        self.gm = fx.symbolic_trace(model) if not isinstance(model, fx.GraphModule) else model
        self.quant_of: dict[fx.Node, nn.Module] = {}  # node -> quantizer of its value
        self.nonneg: set[fx.Node] = set()  # nodes whose value follows a ReLU (>= 0)
        weighted = [n for n in self.gm.graph.nodes
                    if _kind(self.gm, n) in (nn.Conv2d, nn.Linear)]
        self.roles = {n: set() for n in weighted}
        if weighted:
            self.roles[weighted[0]].add("first")
            self.roles[weighted[-1]].add("last")
        self.count = 0
        self.erased: set[fx.Node] = set()  # fused into a previous node's module

    def _add(self, module: nn.Module, stem: str) -> str:
        name = f"tvmq_{stem}_{self.count}"
        self.count += 1
        self.gm.add_submodule(name, module)
        return name

    def _fuse_relu(self, node: fx.Node) -> tuple[fx.Node, bool]:
        user = _sole_user(node)
        if user is not None and _kind(self.gm, user) in _RELU:
            return user, True
        return node, False

    def _replace(self, first: fx.Node, last: fx.Node, module: nn.Module, stem: str,
                 args: tuple) -> fx.Node:
        """Replace the chain ``first..last`` with one call of ``module``."""
        with self.gm.graph.inserting_before(first):
            new = self.gm.graph.call_module(self._add(module, stem), args)
        last.replace_all_uses_with(new)
        chain = [last]
        while chain[-1] is not first:
            chain.append(chain[-1].args[0])
        for n in chain:
            self.gm.graph.erase_node(n)
            self.erased.add(n)
        return new

    def _input_quant(self, node: fx.Node, arg) -> nn.Module:
        if not isinstance(arg, fx.Node) or arg not in self.quant_of:
            raise UnsupportedOpError(f"node {node.name!r}: input {arg!r} is not a quantized tensor")
        return self.quant_of[arg]

    def run(self) -> fx.GraphModule:
        gm, recipe = self.gm, self.recipe
        for node in list(gm.graph.nodes):
            if node in self.erased:
                continue
            kind = _kind(gm, node)
            if node.op == "placeholder":
                cfg = recipe.input_config()
                with gm.graph.inserting_after(node):
                    q = QuantInput(cfg.scheme.act_quantizer(cfg, nonneg=False))
                    q.out_quant.layer = "model input"
                    new = gm.graph.call_module(self._add(q, "input"), (node,))
                node.replace_all_uses_with(new, delete_user_cb=lambda u: u is not new)
                self.quant_of[node] = self.quant_of[new] = q.out_quant
            elif node.op == "output":
                continue
            elif kind is nn.Conv2d or kind is nn.Linear:
                layer = gm.get_submodule(node.target)
                last, bn = node, None
                user = _sole_user(node)
                if kind is nn.Conv2d and user is not None and _kind(gm, user) is nn.BatchNorm2d:
                    bn, last = copy.deepcopy(gm.get_submodule(user.target)), user
                last, relu = self._fuse_relu(last)
                qcls = QConv2d if kind is nn.Conv2d else QLinear
                q = qcls(layer, bn, relu, recipe.for_layer(node.target, self.roles[node]),
                         node.target)
                q.input_quant = (self._input_quant(node, node.args[0]),)
                q.input_nonneg = (node.args[0] in self.nonneg,)
                new = self._replace(node, last, q, "conv" if qcls is QConv2d else "linear",
                                    (node.args[0],))
                self.quant_of[new] = q.out_quant
                if relu:
                    self.nonneg.add(new)
            elif kind in _ADD and len(node.args) == 2 and all(
                    isinstance(a, fx.Node) for a in node.args):
                a, b = node.args
                last, relu = self._fuse_relu(node)
                cfg = recipe.spec_for(node.name)
                q = QAdd(relu, cfg.scheme.act_quantizer(cfg, nonneg=relu))
                q.out_quant.layer = node.name
                q.input_quant = (self._input_quant(node, a), self._input_quant(node, b))
                if last is not node:
                    last.replace_all_uses_with(node)
                    gm.graph.erase_node(last)
                    self.erased.add(last)
                new = self._replace(node, node, q, "add", (a, b))
                self.quant_of[new] = q.out_quant
                if relu:
                    self.nonneg.add(new)
            elif kind in _RELU or kind is nn.MaxPool2d or kind is F.max_pool2d:
                src = self._input_quant(node, node.args[0])
                if kind in _RELU:
                    q = QReLU()
                else:
                    q = self._maxpool(node)
                nonneg = kind in _RELU or node.args[0] in self.nonneg
                new = self._replace(node, node, q, "relu" if kind in _RELU else "maxpool",
                                    (node.args[0],))
                self.quant_of[new] = src
                if nonneg:
                    self.nonneg.add(new)
            elif kind in (nn.AdaptiveAvgPool2d, F.adaptive_avg_pool2d, nn.AvgPool2d):
                src = self._input_quant(node, node.args[0])
                q = self._avgpool(node)
                q.input_quant = (src,)
                nonneg = node.args[0] in self.nonneg
                new = self._replace(node, node, q, "avgpool", (node.args[0],))
                self.quant_of[new] = src
                if nonneg:
                    self.nonneg.add(new)
            elif kind in _SHAPE_QUERY and not (kind is operator.getitem
                                               and node.args[0] in self.quant_of):
                continue
            elif kind in _IDENTITY:  # no-ops at inference: drop them from the graph
                src = node.args[0]
                self._input_quant(node, src)
                node.replace_all_uses_with(src)
                gm.graph.erase_node(node)
                self.erased.add(node)
            elif kind in _SHAPE:
                self.quant_of[node] = self._input_quant(node, node.args[0])
                if node.args[0] in self.nonneg:
                    self.nonneg.add(node)
            else:
                raise UnsupportedOpError(
                    f"node {node.name!r} ({getattr(kind, '__name__', kind)}) is not supported by"
                    f" tvmq's {recipe.scheme} scheme; supported: Conv2d, BatchNorm2d after a"
                    " conv, Linear, ReLU, add, MaxPool2d, AvgPool2d, global average pool,"
                    " flatten/view/reshape"
                )
        gm.graph.lint()
        gm.delete_all_unused_submodules()  # the float layers now living inside QAT modules
        gm.recompile()
        gm.tvmq_recipe = recipe
        return gm

    def _maxpool(self, node):
        if node.op == "call_module":
            m = self.gm.get_submodule(node.target)
            if m.ceil_mode or _pair(m.dilation) != (1, 1):
                raise UnsupportedOpError(f"node {node.name!r}: MaxPool2d with ceil_mode/dilation")
            return QMaxPool2d(_pair(m.kernel_size), _pair(m.stride or m.kernel_size),
                              _pair(m.padding))
        kernel = node.args[1] if len(node.args) > 1 else node.kwargs["kernel_size"]
        stride = node.args[2] if len(node.args) > 2 else node.kwargs.get("stride") or kernel
        padding = node.args[3] if len(node.args) > 3 else node.kwargs.get("padding", 0)
        return QMaxPool2d(_pair(kernel), _pair(stride), _pair(padding))

    def _avgpool(self, node):
        if node.op == "call_module":
            m = self.gm.get_submodule(node.target)
            if isinstance(m, nn.AdaptiveAvgPool2d):
                size = m.output_size
            else:
                if _pair(m.padding) != (0, 0) or m.ceil_mode:
                    raise UnsupportedOpError(f"node {node.name!r}: AvgPool2d with padding/ceil")
                return QAvgPool2d(_pair(m.kernel_size), _pair(m.stride or m.kernel_size))
        else:
            size = node.args[1] if len(node.args) > 1 else node.kwargs["output_size"]
        if _pair(size) != (1, 1):
            raise UnsupportedOpError(f"node {node.name!r}: adaptive average pool to {size};"
                                     " tvmq supports the global one (output 1x1)")
        return QAvgPool2d()


def prepare(model: nn.Module, recipe: "str | dict | Recipe" = "int-se") -> fx.GraphModule:
    """A QAT copy of ``model`` for ``recipe``: a scheme spec such as ``"int-se:6"`` or
    ``"combined-ternary:2"``, a ``{layer: spec}`` mapping, a JSON file of one, or a
    :class:`~tvmq.schemes.Recipe` (``tvmq.schemes.get_recipe``).

    The original model is left untouched. Train the result with your own loop or
    :func:`tvmq.train`; then :func:`tvmq.convert` freezes it into the integer model.
    """
    recipe = get_recipe(recipe)
    model = copy.deepcopy(model).eval()
    return _Preparer(model, recipe).run()


def lock_batchnorm(model: nn.Module) -> None:
    """IOIQ's BN *lock*: freeze running statistics and fold them into conv weight/bias."""
    for m in model.modules():
        if isinstance(m, _QWeighted):
            m.bn_locked = True
