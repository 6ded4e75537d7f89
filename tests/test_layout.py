"""The lowered integer graph keeps activations channels-last (NHWC) from the input quantize
to the last NCHW-only consumer, and a conv whose input is known to be >= 0 (a ReLU upstream)
takes its unsigned operand without the +128 offset -- exact either way."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import tvm
from tvm import relax

from relay_passes.pipeline import lowering_passes
from schedules.targets import has_feature, resolve
from tests.conftest import OpModule, assert_bit_exact, int8, run_tvm
from tvmq.build import zoo_program
from tvmq.frontend import import_exported_program

ops = torch.ops.tvmq
VNNI = {"kind": "llvm", "mcpu": "icelake-server", "num-cores": 2}  # compiled, not run
HOST = resolve("x86")


def lowered_main(module, *inputs, target=VNNI):
    mod = import_exported_program(torch.export.export(module, inputs))
    target = resolve(target)
    with target:
        return tvm.transform.Sequential(lowering_passes(target))(mod)


def calls(mod, prefix):
    """(kernel name, args) of every call_tir in main whose kernel starts with ``prefix``."""
    found = []
    for block in mod["main"].body.blocks:
        for binding in block.bindings:
            v = binding.value
            if isinstance(v, relax.Call) and v.op == tvm.ir.Op.get("relax.call_tir") \
                    and v.args[0].name_hint.startswith(prefix):
                found.append((v.args[0].name_hint, list(v.args[1].fields)))
    return found


def permutes(mod):
    return [b for blk in mod["main"].body.blocks for b in blk.bindings
            if isinstance(b.value, relax.Call) and b.value.op == tvm.ir.Op.get("relax.permute_dims")]


def test_resnet_activations_stay_channels_last():
    """One transpose in the whole ResNet: before the flatten of the classifier; every conv
    reads and writes NHWC (the quantize writes NHWC from the NCHW float input)."""
    mod = import_exported_program(zoo_program("resnet20", "int-se", None))
    with HOST:
        mod = tvm.transform.Sequential(lowering_passes(HOST))(mod)
    assert len(permutes(mod)) == 1
    convs = calls(mod, "tvmq_qconv2d")
    assert len(convs) == 21  # 19 3x3 + 2 downsampling 1x1
    for _, args in convs:
        x, packed_w = args[0], args[1]
        channels = int(packed_w.ty.shape[3]) * int(packed_w.ty.shape[5])  # C/G x G
        c = int(x.ty.shape[3])
        c = 3 * c if channels >= 3 * c else c  # the RGB stem's 3 taps folded into its groups
        assert c <= channels < c + 4, x.ty


def _relu_then_conv(relu: bool, gen):
    wt = int8(32, 16, 3, 3, gen=gen)
    wt[0] = -128  # the largest products
    b = torch.randint(-3000, 3000, (32,), generator=gen, dtype=torch.int32)

    def fn(x, w, b):
        if relu:
            x = ops.qrelu(x)
        return ops.qconv2d(x, w, b, [1, 1], [1, 1, 1, 1], [1, 1], 1, 0, 9, True, 8)

    return OpModule(fn, wt, b), wt, b


@pytest.mark.parametrize("relu", [True, False], ids=["input>=0", "signed-input"])
def test_u8_offset_only_where_the_input_can_be_negative(relu, gen):
    """On AVX-512 VNNI the u8 operand is x + 128 with 128·Σw taken out of the bias, unless
    the input is known >= 0: then the bias the kernel gets is the layer's own."""
    m, wt, b = _relu_then_conv(relu, gen)
    mod = lowered_main(m, int8(1, 16, 8, 8, gen=gen))
    [(_, args)] = calls(mod, "tvmq_qconv2d")
    bias = args[2].value.numpy()
    offset = 0 if relu else 128 * wt.to(torch.int64).sum((1, 2, 3)).numpy()
    np.testing.assert_array_equal(bias, b.numpy() - offset)


@pytest.mark.parametrize("target", ["host", "avx2"])
def test_conv_on_relu_output_exact_at_the_edges(target, gen):
    """Inputs of 0 and 127 after the ReLU against weights of -128 and 127: the unsigned
    paths' worst cases, bit-exact on this host's kernel and on the AVX2 one."""
    target = HOST if target == "host" else {"kind": "llvm", "mcpu": "haswell", "num-cores": 2}
    if not has_feature(resolve(target), "avx2"):
        pytest.skip("this host cannot run AVX2 code")
    m, _, _ = _relu_then_conv(True, gen)
    x = int8(1, 16, 8, 8, gen=gen)
    x[0, :, :4] = 127
    x[0, :, 4:6] = -128  # -> 0 after the ReLU
    assert_bit_exact(run_tvm(m, x, target=target), m(x))


def test_nchw_only_kernel_gets_its_layout():
    """A consumer that only runs NCHW (the dequantize) reads a transposed view; a chain of
    channels-last ops has no transpose inside."""
    m = OpModule(lambda x: ops.dequantize(ops.qrelu(ops.qmax_pool2d(x, [2, 2], [2, 2], [0, 0, 0, 0])), -3))
    mod = lowered_main(m, torch.zeros(1, 8, 6, 6, dtype=torch.int8))
    # in: NCHW int8 parameter -> NHWC; out: NHWC -> NCHW for the dequantize
    assert len(permutes(mod)) == 2


def test_range_survives_the_flatten():
    """pool -> flatten -> linear: the linear's input is known >= 0 through the reshape, so
    its bias has no u8 offset either."""
    gen = torch.Generator().manual_seed(0)
    wt, b = int8(10, 16, gen=gen), torch.randint(-99, 99, (10,), generator=gen, dtype=torch.int32)
    m = OpModule(lambda x, w, b: ops.qlinear(
        torch.flatten(ops.qavg_pool2d(ops.qrelu(x), [4, 4], [4, 4], 8), 1), w, b, 0, 5, False, 8),
        wt, b)
    mod = lowered_main(m, torch.zeros(1, 16, 4, 4, dtype=torch.int8))
    [(_, args)] = calls(mod, "tvmq_qdense")
    np.testing.assert_array_equal(args[2].value.numpy(), b.numpy())
