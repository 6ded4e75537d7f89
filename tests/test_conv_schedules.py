"""The conv schedule's tuning space: every choice (register tile, reduction order, parallel
loop) fits the target's registers and computes the same integers as the default."""
from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import s_tir, te

from schedules.default import (SERIAL_MACS, SERIAL_WEIGHTS, ConvSchedule, conv_loop_extents,
                               conv_macs, conv_rows, conv_schedules, register_tile,
                               register_tiles, schedule_conv_pairs, weight_bytes)
from schedules.targets import resolve
from topi_ops.conv2d import Conv2dParams, conv_layout, pack_conv2d, qconv2d

HOST = resolve("x86")


def test_tiles_fit_the_registers():
    avx2 = resolve({"kind": "llvm", "mcpu": "haswell"})
    avx512 = resolve({"kind": "llvm", "mcpu": "icelake-server"})
    a72 = resolve("arm")
    # 16 ymm: b x c accumulators + b weights + 1 broadcast
    assert max(b * c + b + 1 for b, c in register_tiles(8, 56, avx2)) <= 16
    assert (4, 4) in register_tiles(8, 56, avx512, 16)  # 32 zmm hold a 4 x 4 tile
    assert (4, 4) not in register_tiles(8, 56, avx2)
    # NEON: 8 int32 lanes take 2 q registers
    assert max(2 * b * (c + 1) + 1 for b, c in register_tiles(8, 56, a72)) <= 32
    assert register_tiles(3, 7, avx2) == [(1, 1), (1, 7)]


def test_default_tile_uses_the_register_file():
    """16 registers: 2 blocks x up to 6 columns (1 x 7 on 7-pixel rows); AVX-512's 32 zmm
    take 2 x 7 on those rows; every default tile is one that tuning measures too."""
    avx2 = resolve({"kind": "llvm", "mcpu": "haswell"})
    avx512 = resolve({"kind": "llvm", "mcpu": "icelake-server"})
    assert [register_tile(8, w, avx2) for w in (56, 14, 7)] == [(2, 4), (1, 7), (1, 7)]
    assert [register_tile(8, w, avx512) for w in (56, 14, 7)] == [(2, 4), (2, 7), (2, 7)]
    assert register_tile(3, 7, avx512) == (1, 7)  # an odd number of blocks: one at a time
    for blocks, width in ((8, 56), (32, 7), (4, 112), (3, 12)):
        assert register_tile(blocks, width, avx512) in register_tiles(blocks, width, avx512, 16)


@tvm.instrument.pass_instrument
class _BeforeBuiltins:
    """Keeps the TIR that LowerTVMBuiltin (which places allocations) receives."""

    def __init__(self, into: list):
        self.into = into

    def run_before_pass(self, mod, info):
        if info.name.endswith("LowerTVMBuiltin"):
            self.into.append(mod.script())


def _kernel(choice, nonneg=True, c=32, o=64, hw=14, k=3, stride=1, script=None, lowered=None):
    pad = k // 2
    params = Conv2dParams((stride, stride), (pad,) * 4, (1, 1), 1, 9, True, nonneg=nonneg)
    rng = np.random.default_rng(0)
    w = rng.integers(-128, 128, (o, c, k, k)).astype(np.int8)
    wp, bp = pack_conv2d(w, rng.integers(-999, 999, o).astype(np.int32), params, HOST)
    data = te.placeholder((1, hw, hw, c), "int8", "data")
    wt, bt = te.placeholder(wp.shape, str(wp.dtype), "w"), te.placeholder(bp.shape, "int32", "b")
    out = qconv2d(data, wt, bt, weight_shape=w.shape, params=params, target=HOST, layout="NHWC")
    sch = s_tir.Schedule(te.create_prim_func([data, wt, bt, out]))
    conv = sch.get_sblock("tvmq_conv_acc")
    oh = int(out.shape[1])
    if choice == "space":
        return conv_schedules(*conv_loop_extents(sch, conv), HOST, int(wp.shape[4]),
                              conv_macs(sch, conv), conv_rows(sch, conv))
    small = conv_macs(sch, conv) < SERIAL_MACS and weight_bytes(sch, conv) <= SERIAL_WEIGHTS
    schedule_conv_pairs(sch, conv, HOST, choice)
    if choice is None:  # the default: parallel unless the conv is small
        assert ("T.parallel" in sch.mod["main"].script()) != small
    if script is not None:
        script.append(sch.mod["main"].script())
    with tvm.transform.PassContext(instruments=[_BeforeBuiltins(lowered)] if lowered is not None
                                   else []):
        lib = tvm.compile(tvm.IRModule({"main": sch.mod["main"]}), target=HOST)
    x = rng.integers(0 if nonneg else -128, 128, (1, hw, hw, c)).astype(np.int8)
    result = tvm.runtime.tensor(np.zeros((1, oh, oh, o), np.int8))
    lib(tvm.runtime.tensor(x), tvm.runtime.tensor(wp), tvm.runtime.tensor(bp), result)
    return result.numpy()


def test_every_choice_computes_the_default_result():
    space = _kernel("space")
    assert {c.reduce_order for c in space} == {"taps", "channels"}
    assert {c.parallel for c in space} == {"channels", "rows", "bands"}
    assert {c.pack_per_row for c in space} == {False, True}
    want = _kernel(None)
    assert (want == 0).any() and (want == 127).any()  # ReLU floor and saturation both hit
    rng = np.random.default_rng(1)
    for choice in [space[0], space[-1], *rng.choice(space, 4, replace=False)]:
        np.testing.assert_array_equal(_kernel(choice), want, err_msg=str(choice))


def test_folded_stem_every_choice_exact():
    """An RGB 7x7 stride-2 stem (taps folded into quads, each padded row packed flat): every
    choice computes the reference, and the flat pack copies whole vectors (its padding test
    is per 32-byte chunk, not per byte, which kept it scalar)."""
    stem = dict(nonneg=False, c=3, o=32, hw=32, k=7, stride=2)
    script = []
    got = _kernel(None, script=script, **stem)
    pack = script[0][script[0].index("tvmq_conv_data_pack\")") - 300:]
    assert "T.vectorized(32)" in pack.split("with T.sblock")[0]
    np.testing.assert_array_equal(got, _reference(**stem))
    space = _kernel("space", **stem)
    assert {c.pack_per_row for c in space} == {False, True}
    per_row = next(c for c in space if c.pack_per_row)
    for choice in space[::max(1, len(space) // 6)] + [per_row, space[-1]]:
        np.testing.assert_array_equal(_kernel(choice, **stem), got, err_msg=str(choice))


def _reference(nonneg, c, o, hw, k, stride):
    """The PyTorch integer reference of ``_kernel``'s conv (the same weights and input)."""
    import torch
    from tvmq.ops import qconv2d as reference
    pad = k // 2
    rng = np.random.default_rng(0)
    w = rng.integers(-128, 128, (o, c, k, k)).astype(np.int8)
    bias = rng.integers(-999, 999, o).astype(np.int32)
    x = rng.integers(0 if nonneg else -128, 128, (1, hw, hw, c)).astype(np.int8)
    out = reference(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(w),
                    torch.from_numpy(bias), [stride] * 2, [pad] * 4, [1, 1], 1, 0, 9, True, 8)
    return out.permute(0, 2, 3, 1).numpy()


def test_unknown_choice_is_refused():
    with pytest.raises(ValueError, match="unknown conv schedule"):
        ConvSchedule((1, 1), reduce_order="sideways")


def _grouped(choice, groups=16, c=16, o=32, hw=10):
    from schedules.grouped import grouped_extents, grouped_schedules, schedule_conv_grouped

    params = Conv2dParams((1, 1), (1, 1, 1, 1), (1, 1), groups, 6, False)
    rng = np.random.default_rng(2)
    w = rng.integers(-128, 128, (o, c // groups, 3, 3)).astype(np.int8)
    w[0] = -128
    wp, bp = pack_conv2d(w, rng.integers(-999, 999, o).astype(np.int32), params, HOST)
    data = te.placeholder((1, hw, hw, c), "int8", "data")
    wt, bt = te.placeholder(wp.shape, "int8", "w"), te.placeholder(bp.shape, "int32", "b")
    out = qconv2d(data, wt, bt, weight_shape=w.shape, params=params, target=HOST, layout="NHWC")
    sch = s_tir.Schedule(te.create_prim_func([data, wt, bt, out]))
    conv = sch.get_sblock("tvmq_conv_grouped_acc")
    if choice == "space":
        return grouped_schedules(*grouped_extents(sch, conv))
    schedule_conv_grouped(sch, conv, HOST, choice)
    lib = tvm.compile(tvm.IRModule({"main": sch.mod["main"]}), target=HOST)
    x = rng.integers(-128, 128, (1, hw, hw, c)).astype(np.int8)
    x[0, :3] = -128  # with w[0] = -128: the largest products
    result = tvm.runtime.tensor(np.zeros((1, hw, hw, o), np.int8))
    lib(tvm.runtime.tensor(x), tvm.runtime.tensor(wp), tvm.runtime.tensor(bp), result)
    return result.numpy()


@pytest.mark.parametrize("groups", [16, 4], ids=["depthwise-x2", "grouped"])
def test_every_grouped_choice_computes_the_default_result(groups):
    space = _grouped("space", groups)
    assert len({c.lanes for c in space}) >= 2 and len({c.cols for c in space}) >= 2
    want = _grouped(None, groups)
    assert (want == 127).any() and (want == -128).any()
    for choice in space:
        np.testing.assert_array_equal(_grouped(choice, groups), want, err_msg=str(choice))


def test_depthwise_conv_is_tuned(tmp_path):
    """MetaSchedule tunes a depthwise conv through tvmq's grouped space (a task, records)."""
    import torch

    from tests.conftest import OpModule
    from tvmq.tune import tune

    gen = torch.Generator().manual_seed(0)
    w = torch.randint(-128, 128, (32, 1, 3, 3), generator=gen, dtype=torch.int8)
    b = torch.zeros(32, dtype=torch.int32)
    m = OpModule(lambda x, w, b: torch.ops.tvmq.qconv2d(x, w, b, [1, 1], [1, 1, 1, 1], [1, 1],
                                                        32, 0, 7, True, 8), w, b)
    program = torch.export.export(m, (torch.zeros(1, 32, 16, 16, dtype=torch.int8),))
    summary = tune(program, "x86", tmp_path / "db", trials=4)
    assert len(summary["tasks"]) == 1 and summary["tasks"][0]["best_ms"] > 0


def _default_choice(channels: int, out_channels: int, hw: int, params, kernel: int = 3):
    """The default ConvSchedule of a ``kernel`` x ``kernel`` NHWC conv on a 2-core AVX-512
    VNNI target."""
    from schedules.default import default_conv_schedule

    two_cores = resolve({"kind": "llvm", "mcpu": "icelake-server", "num-cores": 2})
    w = np.zeros((out_channels, channels, kernel, kernel), np.int8)
    wp, bp = pack_conv2d(w, np.zeros(out_channels, np.int32), params, two_cores)
    data = te.placeholder((1, hw, hw, channels), "int8", "data")
    wt, bt = te.placeholder(wp.shape, str(wp.dtype), "w"), te.placeholder(bp.shape, "int32", "b")
    out = qconv2d(data, wt, bt, weight_shape=w.shape, params=params, target=two_cores,
                  layout="NHWC")
    sch = s_tir.Schedule(te.create_prim_func([data, wt, bt, out]))
    conv = sch.get_sblock("tvmq_conv_acc")
    return default_conv_schedule(sch, conv, two_cores, conv_loop_extents(sch, conv))


@pytest.mark.parametrize("channels,hw,parallel", [(64, 14, "bands"), (64, 7, "rows"),
                                                  (512, 7, "channels")])
def test_default_makes_bands_only_when_every_core_gets_several_rows(channels, hw, parallel):
    params = Conv2dParams((1, 1), (1, 1, 1, 1), (1, 1), 1, 9, True, nonneg=True)
    assert _default_choice(channels, channels, hw, params).parallel == parallel


@pytest.mark.parametrize("kernel,parallel", [(1, "rows"), (3, "channels")])
def test_few_rows_are_shared_out_only_when_each_core_can_hold_the_weights(kernel, parallel):
    """7 output rows on 2 cores: a 1x1 downsample's 128 KB of weights are streamed by both
    cores, row by row (44 -> 77 % of the peak); a 3x3's 1.2 MB are split, each core keeping
    its channel tiles for every row (91 % against 85 % by rows)."""
    pad = kernel // 2
    params = Conv2dParams((2, 2), (pad,) * 4, (1, 1), 1, 9, True, nonneg=True)
    assert _default_choice(256, 512, 14, params, kernel).parallel == parallel
    assert _default_choice(1024, 2048, 1, Conv2dParams((1, 1), (0,) * 4, (1, 1), 1, 9, True),
                           1).parallel == "channels"  # one row (a dense layer): channel tiles


@pytest.mark.parametrize("outputs,parallel", [(1000, "channels"), (100, "none")])
def test_few_macs_run_on_one_core_unless_the_weights_are_big(outputs, parallel):
    """A dense layer of 512 inputs: 1000 outputs (ResNet-18's, 0.5 M MACs but 512 KB of
    weights streamed each inference) on both cores, 100 outputs (51 KB) on one."""
    dense = Conv2dParams((1, 1), (0,) * 4, (1, 1), 1, 9)
    assert _default_choice(512, outputs, 1, dense, 1).parallel == parallel


@pytest.mark.parametrize("channels", [16, 3])
def test_bands_pack_their_own_rows(channels):
    """A band of rows per core packs the input rows it reads (no pass, no barrier; each row
    once but at a band's edge), an RGB input gathered pixel by pixel too."""
    params = Conv2dParams((1, 1), (1, 1, 1, 1), (1, 1), 1, 9, True)
    choice = _default_choice(channels, 16, 32, params)
    assert choice.parallel == "bands" and choice.pack_per_row


@pytest.mark.parametrize("channels,per_row", [(16, True), (3, False)])
def test_small_rows_on_one_core_pack_per_row_unless_the_pack_gathers_channels(channels, per_row):
    """On one core, small rows pack their own input inside each row task, but an RGB input
    (3 channels padded to a quad) is gathered pixel by pixel: repeated for every output row
    that reads it, that costs more than the pass it saves (ResNet-20's stem 9.6 -> 6.3 us)."""
    params = Conv2dParams((1, 1), (1, 1, 1, 1), (1, 1), 1, 9, True)
    choice = _default_choice(channels, 16, 8, params)
    assert choice.parallel == "none" and choice.pack_per_row == per_row


@pytest.mark.parametrize("hw,stride", [(16, 1), (15, 2), (12, 2)])
def test_bands_compute_the_reference(hw, stride):
    """Each band packs exactly the input rows it reads (strided too, its input rows odd),
    and rows that do not split evenly over the cores are refused, clearly (TVM's tensorize
    fails on the predicate such a split adds)."""
    conv = dict(nonneg=True, c=32, o=64, hw=hw, k=3, stride=stride)
    oh = (hw - 1) // stride + 1
    for tile in {register_tile(2, oh, HOST), (1, 1)}:
        got = _kernel(ConvSchedule(tile, parallel="bands"), **conv)
        np.testing.assert_array_equal(got, _reference(**conv), err_msg=str(tile))
    with pytest.raises(ValueError, match="do not split evenly"):
        _kernel(ConvSchedule((1, 1), parallel="bands"), hw=15)


@pytest.mark.parametrize("hw,parallel", [(16, "bands"), (15, "rows")])
def test_only_rows_that_split_evenly_make_bands(hw, parallel):
    params = Conv2dParams((1, 1), (1, 1, 1, 1), (1, 1), 1, 9, True, nonneg=True)
    assert _default_choice(64, 64, hw, params).parallel == parallel
    space = {c.parallel for c in _kernel("space", hw=hw)}
    assert ("bands" in space) == (parallel == "bands")


def test_small_conv_runs_on_one_core():
    """A conv under SERIAL_MACS (ResNet-20's strided 1x1s) runs on one core by default; the
    one-core choices are in its tuning space, and every one computes the default's integers."""
    small = {"c": 8, "o": 16, "hw": 6}
    space = _kernel("space", **small)
    assert {c.parallel for c in space} == {"channels", "rows", "bands", "none"}
    want = _kernel(None, **small)
    for choice in [c for c in space if c.parallel == "none"][:4]:
        np.testing.assert_array_equal(_kernel(choice, **small), want, err_msg=str(choice))


def test_folded_stem_design_spaces_print():
    """MetaSchedule logs every design space as Python (``Trace.as_python``) before tuning;
    a schedule instruction whose printer fails (TVM 0.27's ``decompose_padding``) crashes the
    tuner. Every space of a folded stem, packed ahead or per row, prints."""
    from schedules.tuning import SPACES
    params = Conv2dParams((2, 2), (3, 3, 3, 3), (1, 1), 1, 9, True)
    w = np.zeros((32, 3, 7, 7), np.int8)
    wp, bp = pack_conv2d(w, np.zeros(32, np.int32), params, HOST)
    data = te.placeholder((1, 32, 32, 3), "int8", "data")
    # the stem's input is signed: int16 pairs on AVX2 hosts, u8 quads with VNNI
    wt, bt = te.placeholder(wp.shape, str(wp.dtype), "w"), te.placeholder(bp.shape, "int32", "b")
    out = qconv2d(data, wt, bt, weight_shape=w.shape, params=params, target=HOST, layout="NHWC")
    sch = s_tir.Schedule(te.create_prim_func([data, wt, bt, out]))
    choices, schedule = SPACES["tvmq_qconv2d_pairs"]
    conv = sch.get_sblock("tvmq_conv_acc")
    space = choices(sch, conv, HOST)
    assert {c.pack_per_row for c in space} == {False, True}
    for choice in space:
        copy = sch.copy()
        schedule(copy, conv, HOST, choice)
        assert "tvmq_conv_data_pack" in "\n".join(copy.trace.as_python()), choice


@pytest.mark.parametrize("parallel", ["bands", "channels"])
def test_accumulator_tile_is_on_each_threads_stack(parallel):
    """The register tile's buffer is allocated inside the parallel task (one per thread) in
    "global" scope and under 1 KB, which TVM 0.27 keeps on the stack: as "local" it was a
    heap workspace that every tile was stored to and reloaded from."""
    lowered = []
    got = _kernel(ConvSchedule((2, 7), parallel=parallel), lowered=lowered)
    np.testing.assert_array_equal(got, _kernel(None))
    body = lowered[0].split("T.parallel", 1)[1]
    tile = [line for line in body.splitlines() if "tvmq_conv_acc" in line and "alloc" in line]
    lanes = conv_layout(HOST, nonneg=True).block  # 16 with VNNI, 8 on AVX2
    assert len(tile) == 1 and f"T.alloc_buffer(({2 * 7 * lanes},), \"int32\")" in tile[0], \
        lowered[0]
    # and the tensor intrinsic names no temporaries: each would be an alloc_local, a heap
    # workspace allocated and freed in every task (schedules.intrinsics._broadcast)
    assert "alloc_local" not in body, lowered[0]
