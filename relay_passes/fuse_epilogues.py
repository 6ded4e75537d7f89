"""FuseConvEpilogues: a conv whose one consumer is a residual add computes that add in its
epilogue, so the conv's int8 output never goes to memory and one kernel launch (with its
parallel barrier) disappears per residual block.

Pattern in (after ``LowerTvmqComposites``)::

    c = R.call_tir(tvmq_qconv2dK, (x, w, b))      # c used by nothing else
    z = R.call_tir(tvmq_qaddJ, (c, r))            # or (r, c)

out: ``z = fused(x, w, b, r)``, a Relax function marked ``Primitive`` whose body is the two
calls; TVM's ``FuseTIR`` (phase 2) merges them into one PrimFunc, and the conv schedule
inlines the add into its requantize epilogue (``schedules.default.inline_epilogue``). The
integers are the same: the add reads the conv's requantized int8 value from a register
instead of from memory.
"""
from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

PRODUCERS = ("tvmq_qconv2d",)  # kernels whose schedule computes an epilogue on its tile
EPILOGUES = ("tvmq_qadd",)  # elementwise integer kernels a producer may take in


def _call_tir_of(expr, prefixes) -> bool:
    return (isinstance(expr, relax.Call) and expr.op == tvm.ir.Op.get("relax.call_tir")
            and expr.args[0].name_hint.startswith(prefixes))


@mutator
class _EpilogueFuser(PyExprMutator):
    def __init__(self, mod: tvm.IRModule):
        super().__init__(mod)
        self.mod_ = mod

    def transform(self) -> tvm.IRModule:
        for gv, func in list(self.mod_.functions_items()):
            if isinstance(func, relax.Function) and "Primitive" not in (func.attrs or {}):
                self.builder_.update_func(gv, self.visit_expr(func))
        return self.builder_.get()

    def visit_dataflow_block_(self, block):
        users = relax.analysis.udchain(block)
        values = {b.var: b.value for b in block.bindings}
        absorbed = {}  # conv var -> the add binding that takes it in
        for b in block.bindings:
            if not _call_tir_of(b.value, EPILOGUES):
                continue
            for arg in b.value.args[1].fields:
                if (isinstance(arg, relax.DataflowVar) and _call_tir_of(values.get(arg), PRODUCERS)
                        and list(users.get(arg, [])) == [b.var] and arg not in absorbed):
                    absorbed[arg] = b.var
                    break
        adds = {add: conv for conv, add in absorbed.items()}
        bindings = []
        for b in block.bindings:
            if b.var in absorbed:
                continue
            if b.var in adds:
                bindings.append(relax.VarBinding(b.var, self._fused(values[adds[b.var]],
                                                                    adds[b.var], b.value)))
            else:
                bindings.append(b)
        return super().visit_dataflow_block_(relax.DataflowBlock(bindings, block.span))

    def _fused(self, conv: relax.Call, conv_var: relax.Var, add: relax.Call) -> relax.Call:
        """A Primitive function ``(conv args..., the add's other args...) -> add(conv(...))``
        and the call of it."""
        conv_args = list(conv.args[1].fields)
        others = [a for a in add.args[1].fields if not a.same_as(conv_var)]
        params = [relax.Var(f"p{i}", a.ty) for i, a in enumerate(conv_args + others)]
        name = f"{conv.args[0].name_hint}_{add.args[0].name_hint}"
        bb = relax.BlockBuilder()
        with bb.function(name, params, {"Primitive": True}, private=True):
            with bb.dataflow():
                conv_out = bb.emit(relax.call_tir(
                    conv.args[0], relax.Tuple(params[:len(conv_args)]), conv.ty))
                rest = iter(params[len(conv_args):])
                out = bb.emit_output(relax.call_tir(add.args[0], relax.Tuple(
                    [conv_out if a.same_as(conv_var) else next(rest)
                     for a in add.args[1].fields]), add.ty))
            bb.emit_func_output(out)
        return relax.Call(self.builder_.add_func(bb.get()[name], name), conv_args + others)


@tvm.transform.module_pass(opt_level=0, name="FuseConvEpilogues")
class FuseConvEpilogues:
    """Each conv whose one consumer is a residual add takes the add into its epilogue."""

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        return _EpilogueFuser(mod).transform()
