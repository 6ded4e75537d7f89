"""Integer elementwise kernels: the model-boundary quantize/dequantize, residual add, ReLU.

Each function takes and returns ``te.Tensor``; shapes are unchanged. Names, tags and the
``tvmq.ops`` reference functions share one name.
"""
from __future__ import annotations

from tvm import te, tirx

from topi_ops.requantize import round_shift, saturate, select_not_nan


def quantize(data: te.Tensor, exponent: int, bits: int, layout: str = "NCHW") -> te.Tensor:
    """float32 -> int8: ``saturate(floor(x * 2^-e + 0.5))`` (the graph's one float input);
    NaN -> 0, ±inf saturate (as ``tvmq.ops.quantize``). ``layout="NHWC"``: a 4-D NCHW input
    is stored channels-last (the layout the integer graph keeps), in the same pass."""
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1

    def f(*i):
        x = data(*i)
        v = tirx.floor(x * tirx.const(2.0 ** -exponent, "float32") + tirx.const(0.5, "float32"))
        v = tirx.max(tirx.min(v, tirx.const(hi, "float32")), tirx.const(lo, "float32"))
        return select_not_nan(x, v, 0.0).astype("int8")

    if layout == "NHWC" and len(data.shape) == 4:
        n, c, h, w = data.shape
        return te.compute((n, h, w, c), lambda b, y, x, ch: f(b, ch, y, x), name="tvmq_quantize",
                          tag="elemwise")
    return te.compute(data.shape, f, name="tvmq_quantize", tag="elemwise")


def dequantize(data: te.Tensor, exponent: int) -> te.Tensor:
    """int8 -> float32 ``x * 2^e`` (the graph's one float output)."""
    return te.compute(data.shape, lambda *i: data(*i).astype("float32")
                      * tirx.const(2.0 ** exponent, "float32"),
                      name="tvmq_dequantize", tag="elemwise")


def qadd(a: te.Tensor, b: te.Tensor, a_shift: int, b_shift: int, relu: bool,
         bits: int) -> te.Tensor:
    """Residual add: both inputs ``round_shift``-ed to the output exponent, int32 sum,
    saturated to ``bits`` (ReLU fused as the lower bound)."""
    def f(*i):
        acc = (round_shift(a(*i).astype("int32"), a_shift)
               + round_shift(b(*i).astype("int32"), b_shift))
        return saturate(acc, "int8", relu, bits)

    return te.compute(a.shape, f, name="tvmq_qadd", tag="elemwise")


def qrelu(data: te.Tensor) -> te.Tensor:
    """``max(x, 0)`` on integers."""
    return te.compute(data.shape, lambda *i: tirx.max(data(*i), tirx.const(0, data.dtype)),
                      name="tvmq_qrelu", tag="elemwise")
