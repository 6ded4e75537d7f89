"""int8 dense ``[N, K] x [O, K] -> [N, O]``: a 1x1 convolution on a 1x1 image, so it shares
the conv kernel, its weight packing and its schedule."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tvm import te

from topi_ops.conv2d import Conv2dParams, pack_conv2d, qconv2d


@dataclass(frozen=True)
class DenseParams:
    """As :class:`~topi_ops.conv2d.Conv2dParams`: one ``out_shift``, or None and a tensor of
    shifts per output channel with the output range ``[lo, hi]``."""

    out_shift: int | None
    relu: bool = False
    bits: int = 8
    lo: int = -128
    hi: int = 127
    nonneg: bool = False

    def as_conv(self) -> Conv2dParams:
        return Conv2dParams((1, 1), (0, 0, 0, 0), (1, 1), 1, self.out_shift, self.relu,
                            self.bits, self.lo, self.hi, self.nonneg)


def pack_dense(weight: np.ndarray, bias: np.ndarray, params: DenseParams, target=None,
               layout=None):
    return pack_conv2d(weight[:, :, None, None], bias, params.as_conv(), target, layout)


def qdense(data: te.Tensor, weight: te.Tensor, bias: te.Tensor, shift: te.Tensor | None = None,
           *, weight_shape, params: DenseParams, target=None, epilogue=None) -> te.Tensor:
    """data [N, K] int8, packed weight, bias [O] int32 (shift [O] int32) -> [N, O] int8;
    ``epilogue``: as :func:`~topi_ops.conv2d.qconv2d`'s."""
    n, k = (int(v) for v in data.shape)
    image = te.compute((n, 1, 1, k), lambda b, y, x, c: data[b, c], name="tvmq_dense_as_image")
    out = qconv2d(image, weight, bias, shift, weight_shape=(*weight_shape, 1, 1),
                  params=params.as_conv(), target=target, layout="NHWC", epilogue=epilogue)
    return te.compute((n, int(weight_shape[0])), lambda b, o: out[b, 0, 0, o],
                      name="tvmq_dense_out")
