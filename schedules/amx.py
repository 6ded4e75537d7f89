"""AMX-INT8 schedule of the int8 conv (``topi_ops.conv2d.AMX_QUADS``): one output row of the
conv is a matrix product on the eight tile registers of a Sapphire Rapids core.

``tdpbusd C, A, B``: ``C[16 pixels, 16 channels] (int32) += A[16 pixels, 64 input channels]
(u8) . B[16 input quads, 16 channels x 4] (s8)``, each int32 the sum of u8 x s8 products,
the arithmetic of ``vpdpbusd`` on the same operands (the u8 offset and its bias correction
of ``pack_conv2d`` stay as they are): exact, like the VNNI kernel.

Tiles as the conv's buffers hold them, no copy:

- A: 16 output pixels of a row x 64 input channels, from the packed data
  ``[N, Hp, Wp, C/4, 4]``: pixel x at tap (ry, rx) is the 64 bytes at ``[y*sh + ry*dh,
  x*sw + rx*dw, 16 k : 16 k + 16]``, rows ``sw * C`` bytes apart;
- B: the packed weights ``[O/16, KH, KW, C/4, 16, 4]`` at ``[ob, ry, rx, 16 k : 16 k + 16]``:
  16 quads x (16 channels x 4 bytes), 64-byte rows, as they lie;
- C: 16 pixels x 16 output channels of the int32 accumulator row ``[OW', O']``.

Register blocking: 2 pixel blocks x 2 channel blocks of C (tmm0-3) stay in tiles over the
whole reduction (KH x KW x C/64 steps, each 2 A loads (tmm4-5), 2 B loads (tmm6-7), 4
``tdpbusd``) and are stored once; the requantize epilogue then runs on the row, in the
same parallel task. A row too narrow or channels too few for 2 blocks take 1. (The row's
block keeps the conv's init, a zero fill of the accumulator row before the tiles overwrite
it: tensorize replaces a block's body, not its init.)

The row is one tensor intrinsic (``conv_row_intrin``), made for each conv's geometry: its
implementation is the tile loop nest with LLVM's AMX intrinsics (immediate tile numbers),
which load the tile configuration themselves (``ldtilecfg`` is per thread: each row task
loads it before its first tile operation) and release the tiles at the end of the row.
"""
from __future__ import annotations

import tvm
from tvm import s_tir, tirx
from tvm.s_tir import TensorIntrin
from tvm.script.ir_builder import IRBuilder
from tvm.tirx.script.builder import ir as tb

from schedules.elementwise import schedule_loop_nest
from topi_ops.conv2d import AMX_ATTR, AMX_DEPTH, AMX_ROWS

QUADS = AMX_DEPTH // 4  # input-channel quads per tile row
TILE_CONFIG = [  # ldtilecfg's 64 bytes as 16 int32 words (little endian)
    1, 0, 0, 0,  # byte 0: palette 1, byte 1: start row 0, bytes 2-15 reserved
    *[64 | 64 << 16] * 4,  # bytes 16-31: bytes per row of tmm0-7, uint16 each: 64
    0, 0, 0, 0,  # bytes 32-47: tmm8-15 (none)
    0x10101010, 0x10101010, 0, 0,  # bytes 48-55: rows of tmm0-7, one byte each: 16
]
A_TILES, B_TILES = 4, 6  # tmm4-5 hold A tiles, tmm6-7 B tiles, tmm0-3 the C tiles

# Linux grants a process the AMX tile data state only on request (without it the first
# tile instruction faults: SIGILL): arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA),
# process wide and idempotent. TVM's runtime.amx_init is not in every runtime (not in the
# wheel here, not on a board's RPC server), so the kernel asks itself, once per process:
# a static flag of the kernel (tvm_static_handle, zero at load) skips the syscall after.
SYS_ARCH_PRCTL, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA = 158, 0x1023, 18


def _tile(op: str, *args) -> None:
    """Emit one AMX instruction (``llvm.x86.<op>``); tile numbers are immediates."""
    args = [tirx.const(a, "uint8") if isinstance(a, int) else a for a in args]
    tb.evaluate(tirx.call_llvm_intrin("void", f"llvm.x86.{op}", *args))


class _Tiles:
    """The tile operations of the row kernel, as AMX instructions. A load reads 16 rows of
    64 bytes from ``buffer[index]`` on, ``step`` elements apart; a store writes 16 rows of
    16 int32."""

    def prologue(self):
        _request_tile_permission()
        config = tb.decl_buffer((16,), "int32", scope="local")
        for i, word in enumerate(TILE_CONFIG):
            tb.buffer_store(config, word, [i])
        _tile("ldtilecfg", tb.address_of(config[0]))

    def zero(self, t):
        _tile("tilezero", t)

    def load(self, t, buffer, index, step):
        _tile("tileloadd64", t, tb.address_of(buffer[index]),
              tirx.Cast("int64", step * (tvm.DataType(buffer.dtype).bits // 8)))

    def dot(self, c, a, b):
        _tile("tdpbusd", c, a, b)

    def store(self, t, buffer, index, step):
        _tile("tilestored64", t, tb.address_of(buffer[index]), tirx.Cast("int64", step * 4))

    def epilogue(self):
        _tile("tilerelease")


class EmulatedTiles(_Tiles):
    """The same operations as TIR loops on 8 int32 "tiles" [16, 64] in memory, for testing
    the kernel's tile addressing on hosts without AMX (``EMULATE``): loads read through a
    flat view of the buffer at base + row * step, as ``tileloadd`` does."""

    def prologue(self):
        self.tiles = tb.decl_buffer((8, 16, 64), "int32", scope="local")

    def zero(self, t):
        with tb.grid(16, 16) as (m, n):
            tb.buffer_store(self.tiles, 0, [t, m, n])

    def load(self, t, buffer, index, step):
        flat = tb.decl_buffer((1 << 30,), buffer.dtype, data=buffer.data,
                              elem_offset=buffer.elem_offset)
        base = sum(i * s for i, s in zip(index, buffer.strides))
        with tb.grid(16, 64) as (m, j):
            tb.buffer_store(self.tiles, flat[base + m * step + j].astype("int32"), [t, m, j])

    def dot(self, c, a, b):  # tdpbusd: C[m, n] += sum over k, j of A[m, 4k + j] B[k, 4n + j]
        with tb.grid(16, 16, 16, 4) as (m, n, k, j):
            tb.buffer_store(self.tiles, self.tiles[c, m, n]
                            + self.tiles[a, m, 4 * k + j] * self.tiles[b, k, 4 * n + j], [c, m, n])

    def store(self, t, buffer, index, step):
        *outer, x, oc = index  # C rows are pixels (the last but one axis)
        with tb.grid(16, 16) as (m, n):
            tb.buffer_store(buffer, self.tiles[t, m, n], [*outer, x + m, oc + n])

    def epilogue(self):
        pass


EMULATE = False  # tests: build the row kernel on EmulatedTiles (runs without AMX)


def conv_row_intrin(width: int, channels: int, kh: int, kw: int, quads: int,
                    sw: int, dh: int, dw: int) -> str:
    """Register (once) and name the tensor intrinsic of one conv output row: ``C[0, 0, x, oc]
    = sum over (ry, rx, rc, j) of A[0, ry*dh, x*sw + rx*dw, rc, j] . B[oc / 16, ry, rx, rc,
    oc % 16, j]`` for ``width`` pixels x ``channels`` channels, on AMX tiles."""
    name = (f"tvmq_amx_conv_row_{width}x{channels}_k{kh}x{kw}_q{quads}_s{sw}_d{dh}x{dw}"
            + ("_emulated" if EMULATE else ""))
    if TensorIntrin.get(name, allow_missing=True) is None:
        TensorIntrin.register(name, _row_desc(width, channels, kh, kw, quads, sw, dh, dw),
                              _row_impl(width, channels, kh, kw, quads, sw, dh, dw))
    return name


def _row_shapes(width, channels, kh, kw, quads, sw, dh, dw):
    """Shapes of the row's A (packed input rows), B (all packed weights) and C (acc row)."""
    return ((1, (kh - 1) * dh + 1, (width - 1) * sw + (kw - 1) * dw + 1, quads, 4),
            (channels // 16, kh, kw, quads, 16, 4), (1, 1, width, channels))


def _row_desc(width, channels, kh, kw, quads, sw, dh, dw):
    """The row as ``topi_ops.conv2d`` computes it, for tensorize to match the conv block (a
    reduction axis of extent 1, a 1x1 conv's taps, is a loop there but no block axis)."""
    a_shape, b_shape, c_shape = _row_shapes(width, channels, kh, kw, quads, sw, dh, dw)
    axes = (("x", width, "S"), ("oc", channels, "S"), ("ry", kh, "R"), ("rx", kw, "R"),
            ("rc", quads, "R"), ("rj", 4, "R"))
    with IRBuilder() as builder:
        with tb.prim_func(s_tir=True):
            tb.func_name("desc")
            a, b, c = (tb.arg(n, tb.handle()) for n in "abc")
            A = tb.match_buffer(a, a_shape, "uint8", offset_factor=1)
            B = tb.match_buffer(b, b_shape, "int8", offset_factor=1)
            C = tb.match_buffer(c, c_shape, "int32", offset_factor=1)
            with tb.sblock("root"):
                tb.reads(A[tuple(slice(0, e) for e in a_shape)],
                         B[tuple(slice(0, e) for e in b_shape)])
                tb.writes(C[0:1, 0:1, 0:width, 0:channels])
                with tb.init():  # C = the sum, not C += (the row's block keeps the init)
                    with tb.grid(width, channels) as (x, oc):
                        with tb.sblock("init"):
                            vx, voc = tb.axis.remap("SS", [x, oc])
                            tb.buffer_store(C, 0, [0, 0, vx, voc])
                with tb.grid(*[e for _, e, _ in axes]) as loops:
                    with tb.sblock("update"):
                        kept = [(n, k, lp) for (n, e, k), lp in zip(axes, loops) if e > 1]
                        v = dict(zip([n for n, _, _ in kept], tb.axis.remap(
                            "".join(k for _, k, _ in kept), [lp for _, _, lp in kept])))
                        x, oc, ry, rx = (v.get(n, 0) for n in ("x", "oc", "ry", "rx"))
                        rc, rj = v.get("rc", 0), v["rj"]
                        tb.buffer_store(C, C[0, 0, x, oc] + A[0, ry * dh, x * sw + rx * dw, rc, rj]
                                        .astype("int32") * B[oc // 16, ry, rx, rc, oc % 16, rj]
                                        .astype("int32"), [0, 0, x, oc])
    return builder.get()


def _row_impl(width, channels, kh, kw, quads, sw, dh, dw):
    """The row on tiles: per 2 x 2 (or fewer) C tiles, zero them, run the whole reduction
    (taps x 64-channel steps: load A and B tiles, ``tdpbusd`` each pair), store them."""
    a_shape, b_shape, c_shape = _row_shapes(width, channels, kh, kw, quads, sw, dh, dw)
    pixel_blocks = 2 if width % (2 * AMX_ROWS) == 0 else 1
    channel_blocks = 2 if channels % 32 == 0 else 1
    tiles = [(p, q) for p in range(pixel_blocks) for q in range(channel_blocks)]

    def strides(prefix, rank):
        return [tirx.Var(f"{prefix}{i}", "int32") for i in range(rank)]

    with IRBuilder() as builder:
        with tb.prim_func(s_tir=True):
            tb.func_name("impl")
            a, b, c = (tb.arg(n, tb.handle()) for n in "abc")
            A = tb.match_buffer(a, a_shape, "uint8", strides=[*strides("sa", 4), 1],
                               offset_factor=1)
            B = tb.match_buffer(b, b_shape, "int8", strides=[*strides("sb", 4), 4, 1],
                               offset_factor=1)
            C = tb.match_buffer(c, c_shape, "int32", strides=[*strides("sc", 3), 1],
                               offset_factor=1)
            with tb.sblock("root"):
                tb.reads(A[0:a_shape[0], 0:a_shape[1], 0:a_shape[2], 0:a_shape[3], 0:4],
                        B[0:b_shape[0], 0:kh, 0:kw, 0:quads, 0:16, 0:4])
                tb.writes(C[0:1, 0:1, 0:width, 0:channels])
                ops = EmulatedTiles() if EMULATE else _Tiles()
                ops.prologue()
                with tb.grid(width // (AMX_ROWS * pixel_blocks),
                             channels // (16 * channel_blocks)) as (xb, cb):
                    x0 = [(xb * pixel_blocks + p) * AMX_ROWS for p in range(pixel_blocks)]
                    b0 = [cb * channel_blocks + q for q in range(channel_blocks)]
                    for t in range(len(tiles)):
                        ops.zero(t)
                    with tb.grid(kh, kw, quads // QUADS) as (ry, rx, k):
                        for p in range(pixel_blocks):  # 16 pixels, sw * C bytes apart
                            ops.load(A_TILES + p, A, [0, ry * dh, x0[p] * sw + rx * dw,
                                                      k * QUADS, 0], A.strides[2] * sw)
                        for q in range(channel_blocks):  # 16 quads of 16 channels
                            ops.load(B_TILES + q, B, [b0[q], ry, rx, k * QUADS, 0, 0],
                                     B.strides[3])
                        for t, (p, q) in enumerate(tiles):
                            ops.dot(t, A_TILES + p, B_TILES + q)
                    for t, (p, q) in enumerate(tiles):
                        ops.store(t, C, [0, 0, x0[p], b0[q] * 16], C.strides[2])
                ops.epilogue()
    return builder.get()


def _request_tile_permission() -> None:
    """Emit: if this kernel's static flag is 0, arch_prctl(ARCH_REQ_XCOMP_PERM,
    XFEATURE_XTILEDATA), then set the flag."""
    flag = tb.bind(tirx.call_intrin("handle", "tirx.tvm_static_handle"))
    granted = tb.decl_buffer((1,), "int8", data=flag)
    with tb.If(granted[0] == 0):
        with tb.Then():
            tb.evaluate(tb.call_extern("int64", "syscall", SYS_ARCH_PRCTL, ARCH_REQ_XCOMP_PERM,
                                       XFEATURE_XTILEDATA))
            # a store the block's signature cannot declare (the flag is no tensor)
            tb.evaluate(tirx.call_llvm_intrin("void", "llvm.memset", tb.address_of(granted[0]),
                                              tirx.const(1, "int8"), tirx.const(1, "int64"),
                                              tirx.const(0, "bool")))


def schedule_conv_amx(sch: s_tir.Schedule, conv, target) -> None:
    """``tvmq_conv_acc`` of an AMX conv (its ``AMX_ATTR``): rows (n, y) shared out, each row
    one ``conv_row_intrin`` into the accumulator row, then its requantize epilogue;
    parallel data (un)packing."""
    blocks = {sch.get(b).name_hint for b in sch.get_child_blocks(sch.get_sblock("root"))}
    sw, dh, dw = (int(v) for v in sch.get(conv).annotations[AMX_ATTR])
    n, y, x, oc, ry, rx, rc, _rj = sch.get_loops(conv)
    width, channels, kh, kw, quads = (int(sch.get(lp).extent) for lp in (x, oc, ry, rx, rc))
    row = sch.fuse(n, y)
    sch.parallel(row)
    requant = sch.get_sblock("tvmq_conv_requant")
    sch.reverse_compute_at(requant, row)  # the row's epilogue, while the row is hot
    sch.vectorize(sch.get_loops(requant)[-1])
    sch.tensorize(x, conv_row_intrin(width, channels, kh, kw, quads, sw, dh, dw))
    for name in ("tvmq_conv_data_pack", "tvmq_conv_unpack"):
        if name in blocks:
            schedule_loop_nest(sch, sch.get_sblock(name), target)
