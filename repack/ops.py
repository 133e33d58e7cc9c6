"""What happens to each source tensor: one entry per :class:`Op` with its output shape, its convert and verify
functions and the checks it makes on the source.

Bit layouts (docs/formats.md): a ``b``-bit qweight row holds ``32/b`` codes per int32 column; 3-bit rows come in
blocks of 3 words holding 32 codes. So ``r`` source rows of a 2/3-bit module are ``r * 4 / b`` rows at 4 bits,
and the codec works on whole blocks (``codec.words_per_block`` rows). Convert functions stream from a
``SeqReader`` into a ``Sink``; verify functions read the source and the output side by side and raise
:class:`Found` at the first difference, naming the output byte offset.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from enum import Enum
from typing import Callable, Iterator

import numpy as np

from repack import codec
from repack.checkpoint import Checkpoint, Loc, QuantModule
from repack.errors import FormatError
from repack.safetensors_io import DTYPE_SIZES, NUMPY_DTYPES, TensorInfo, read_array, to_float32
from repack.stream import CHUNK, SeqReader, Sink

Progress = Callable[[int], None]


class Op(str, Enum):
    COPY = "copy"  # bytes unchanged
    TRANSCODE = "transcode"  # 2/3-bit qweight -> 4-bit qweight
    ZEROS = "zeros"  # symmetric qzeros -> symmetric 4-bit qzeros
    DEQUANT = "dequant"  # qweight -> exact float32 weight [N, K]
    DROP = "drop"  # read (and checked) but not emitted


@dataclass(frozen=True)
class TensorOp:
    op: Op
    src: TensorInfo
    module: QuantModule | None = None
    out_name: str | None = None
    out_dtype: str | None = None
    out_shape: tuple[int, ...] | None = None

    @property
    def out_nbytes(self) -> int:
        if self.out_dtype is None:
            return 0
        n = DTYPE_SIZES[self.out_dtype]
        for d in self.out_shape or ():
            n *= d
        return n

    def out_entry(self) -> tuple[str, str, tuple[int, ...]] | None:
        """``(name, dtype, shape)`` of the emitted tensor; None for an op that emits nothing."""
        if self.out_name is None or self.out_dtype is None or self.out_shape is None:
            return None
        return self.out_name, self.out_dtype, self.out_shape

    @property
    def qmodule(self) -> QuantModule:
        """The module of an op that only quantized-module parts get (TRANSCODE, ZEROS, DEQUANT, DROP)."""
        assert self.module is not None, self
        return self.module


@dataclass
class Difference:
    file: str
    tensor: str | None
    offset: int | None
    message: str

    def line(self) -> str:
        where = self.file
        if self.tensor:
            where += f": tensor {self.tensor}"
        if self.offset is not None:
            where += f" at byte {self.offset}"
        return f"{where}: {self.message}"


class Found(Exception):
    """The first difference in a shard, raised out of the per-tensor loop."""

    def __init__(self, diff: Difference):
        self.diff = diff


@dataclass(frozen=True)
class Place:
    """Where a verify looks: the output shard (``file``) and the byte offset of the tensor in it, the source shard."""

    file: str
    base: int
    source: str


# --- row arithmetic ---------------------------------------------------------------------------------------


def rows4(rows: int, bits: int) -> int:
    """4-bit qweight rows holding the codes of ``rows`` rows at ``bits`` (whole blocks)."""
    return rows * 4 // bits


def dequant_cols(k: int) -> int:
    """Output columns per dequantization step: about CHUNK bytes of float32 ``[K, cols]``, a multiple of 32."""
    return max(32, (CHUNK // (k * 4)) // 32 * 32)


def first_diff(a: np.ndarray, b: np.ndarray) -> int:
    a, b = a.reshape(-1).view(np.uint8), b.reshape(-1).view(np.uint8)
    n = min(a.size, b.size)
    idx = np.flatnonzero(a[:n] != b[:n])
    return int(idx[0]) if idx.size else n


# --- source checks ----------------------------------------------------------------------------------------


def read_tensor(ckpt: Checkpoint, loc: Loc) -> np.ndarray:
    """One source tensor, read whole (small ones: zeros, scales, g_idx)."""
    fd = os.open(ckpt.root / loc.shard, os.O_RDONLY)
    try:
        return read_array(fd, ckpt.shards[loc.shard], loc.info)
    finally:
        os.close(fd)


def check_sym_zeros(ckpt: Checkpoint, m: QuantModule, zeros: np.ndarray) -> None:
    """Zero points must be the symmetric pattern (``2**(b-1)`` stored minus one): Marlin serves nothing else."""
    want = codec.sym_qzeros(zeros.shape[0], m.n, m.bits)
    if zeros.shape != want.shape or not np.array_equal(zeros.view(np.uint32), want.view(np.uint32)):
        codes = codec.unpack(zeros, m.bits, axis=1).astype(int) + 1
        raise FormatError(
            f"{ckpt.root / m.qzeros.shard}: tensor {m.qzeros.info.name}: zero points are asymmetric "
            f"(found {sorted(set(np.unique(codes).tolist()))[:6]}, symmetric is {1 << (m.bits - 1)}); "
            "vLLM's Marlin kernels serve only symmetric 4/8-bit weights, so the 4-bit output would not load"
        )


def check_g_idx(ckpt: Checkpoint, m: QuantModule, name: str, g: np.ndarray) -> None:
    """``g_idx`` must be ``arange(K) // group_size``: act-order is refused."""
    want = np.arange(m.k) // m.group_size
    if g.shape != want.shape or not np.array_equal(g.astype(np.int64), want):
        shard = m.g_idx.shard if m.g_idx is not None else m.qweight.shard
        raise FormatError(
            f"{ckpt.root / shard}: tensor {name}: g_idx is not arange(K)//group_size "
            "(act-order / desc_act): Marlin rejects act-order with groups, so this is not supported"
        )


def _check_read(ckpt: Checkpoint, op: TensorOp, data: bytearray) -> None:
    """The checks on a module part read whole: qzeros symmetric, g_idx trivial."""
    t, m = op.src, op.qmodule
    if t.name.endswith(".g_idx"):
        check_g_idx(ckpt, m, t.name, np.frombuffer(data, dtype=NUMPY_DTYPES[t.dtype]))
    else:
        check_sym_zeros(ckpt, m, np.frombuffer(data, dtype=np.int32).reshape(t.shape))


def _checked(op: TensorOp) -> bool:
    return op.module is not None and op.src.name.endswith((".g_idx", ".qzeros"))


# --- COPY -------------------------------------------------------------------------------------------------


def _copy_convert(ckpt: Checkpoint, op: TensorOp, reader: SeqReader, sink: Sink, progress: Progress) -> None:
    """Passthrough bytes go straight into the sink's staging buffers; a module's qzeros and g_idx are checked."""
    t = op.src
    if _checked(op):
        data = reader.read(t.nbytes)
        _check_read(ckpt, op, data)
        sink.write(data)
        progress(t.nbytes)
        return
    left = t.nbytes
    while left:
        space = sink.space()
        n = min(left, len(space), CHUNK)
        reader.read_into(space[:n])
        sink.commit(n)
        progress(n)
        left -= n


def _copy_verify(ckpt: Checkpoint, op: TensorOp, sr: SeqReader, dr: SeqReader, at: Place) -> None:
    t = op.src
    done = 0
    while done < t.nbytes:
        a = np.frombuffer(sr.view(min(CHUNK, t.nbytes - done)), dtype=np.uint8)
        b = np.frombuffer(dr.take(len(a)), dtype=np.uint8)
        if not np.array_equal(a, b):
            raise Found(Difference(at.file, op.out_name, at.base + done + first_diff(a, b), "passthrough bytes differ from the source"))
        done += len(a)


# --- DROP -------------------------------------------------------------------------------------------------


def _drop_convert(ckpt: Checkpoint, op: TensorOp, reader: SeqReader, sink: Sink, progress: Progress) -> None:
    t = op.src
    if t.name.endswith(".qzeros") and op.module is not None:  # a tensor left out has no module to check
        _check_read(ckpt, op, reader.read(t.nbytes))
    else:
        reader.skip(t.nbytes)
    progress(t.nbytes)


def _drop_verify(ckpt: Checkpoint, op: TensorOp, sr: SeqReader, dr: SeqReader, at: Place) -> None:
    sr.skip(op.src.nbytes)


# --- ZEROS ------------------------------------------------------------------------------------------------


def _zeros_convert(ckpt: Checkpoint, op: TensorOp, reader: SeqReader, sink: Sink, progress: Progress) -> None:
    t, m = op.src, op.qmodule
    _check_read(ckpt, op, reader.read(t.nbytes))
    sink.write(codec.sym_qzeros(t.shape[0], m.n, 4))
    progress(t.nbytes)


def _zeros_verify(ckpt: Checkpoint, op: TensorOp, sr: SeqReader, dr: SeqReader, at: Place) -> None:
    t, m = op.src, op.qmodule
    src_z = np.frombuffer(sr.read(t.nbytes), dtype=np.uint32)
    out_z = np.frombuffer(dr.read(op.out_nbytes), dtype=np.uint8)
    if not np.array_equal(src_z, codec.sym_qzeros(t.shape[0], m.n, m.bits).view(np.uint32).reshape(-1)):
        raise Found(Difference(at.source, t.name, None, "source zero points are not symmetric"))
    want = codec.sym_qzeros(t.shape[0], m.n, 4).view(np.uint8).reshape(-1)
    if not np.array_equal(out_z, want):
        raise Found(Difference(at.file, op.out_name, at.base + first_diff(want, out_z), "4-bit zero points are not symmetric 0x77777777"))


# --- TRANSCODE --------------------------------------------------------------------------------------------


def _transcode_convert(ckpt: Checkpoint, op: TensorOp, reader: SeqReader, sink: Sink, progress: Progress) -> None:
    """The codec reads the reader's block and writes into the sink's staging buffer; a block that does not fit
    in what is left of a staging buffer goes through a small array and ``Sink.write``."""
    m = op.qmodule
    row_bytes = m.n * 4
    in_rows = codec.words_per_block(m.bits)
    out_block = rows4(in_rows, m.bits) * row_bytes
    left = op.src.shape[0]
    while left:
        space = sink.space()
        fit = len(space) // out_block * in_rows
        r = min(left, fit or in_rows)
        chunk = reader.view(r * row_bytes, in_rows * row_bytes)
        r = len(chunk) // row_bytes
        words = np.frombuffer(chunk, dtype=np.int32).reshape(r, m.n)
        out = np.frombuffer(space, dtype=np.uint8) if fit else None
        res = codec.transcode_to4(words, m.bits, out=out)
        if out is not None and np.shares_memory(res, out):
            sink.commit(res.nbytes)
        else:
            sink.write(res)
        progress(r * row_bytes)
        left -= r


def _transcode_verify(ckpt: Checkpoint, op: TensorOp, sr: SeqReader, dr: SeqReader, at: Place) -> None:
    """Output rows taken back to the source width must equal the source bytes."""
    t, m = op.src, op.qmodule
    row = m.n * 4
    per = codec.words_per_block(m.bits)
    rows = max(per, (CHUNK // row) // per * per)
    done = 0
    while done < t.shape[0]:
        a = np.frombuffer(sr.view(min(rows, t.shape[0] - done) * row, per * row), dtype=np.int32).reshape(-1, m.n)
        r = a.shape[0]
        r4 = rows4(r, m.bits)
        b = np.frombuffer(dr.take(r4 * row), dtype=np.int32).reshape(r4, m.n)
        back, ok = codec.transcode_from4(b, m.bits)
        if not ok or not np.array_equal(back, a):
            expect = codec.transcode_to4(a, m.bits)
            off = at.base + rows4(done, m.bits) * row + first_diff(expect, b)
            why = "4-bit codes outside the source range" if not ok else f"codes minus {8 - (1 << (m.bits - 1))} differ from the source"
            raise Found(Difference(at.file, op.out_name, off, why))
        done += r


# --- DEQUANT ----------------------------------------------------------------------------------------------


def dequant_blocks(qweight: np.ndarray, scales: np.ndarray, bits: int, group: int) -> Iterator[np.ndarray]:
    """Yield the float32 weight ``[N, K]`` in row blocks: ``scales[k//g, n] * (q[k, n] - 2**(bits-1))``."""
    n = qweight.shape[1]
    k = scales.shape[0] * group
    cols = dequant_cols(k)
    groups = np.arange(k) // group
    for c0 in range(0, n, cols):
        q = codec.decode(np.ascontiguousarray(qweight[:, c0 : c0 + cols]), bits)
        w = (q.astype(np.int16) - (1 << (bits - 1))).astype(np.float32) * scales[groups, c0 : c0 + cols]
        yield np.ascontiguousarray(w.T)


def _dequant_convert(ckpt: Checkpoint, op: TensorOp, reader: SeqReader, sink: Sink, progress: Progress) -> None:
    """The whole module in memory (a few tens of MB in DeepSeek); its zeros and g_idx are checked first."""
    t, m = op.src, op.qmodule
    qweight = np.frombuffer(reader.read(t.nbytes), dtype=np.int32).reshape(t.shape)
    progress(t.nbytes)
    check_sym_zeros(ckpt, m, read_tensor(ckpt, m.qzeros))
    if m.g_idx is not None:
        check_g_idx(ckpt, m, m.g_idx.info.name, read_tensor(ckpt, m.g_idx))
    scales = to_float32(read_tensor(ckpt, m.scales), m.scales.info.dtype)
    for block in dequant_blocks(qweight, scales, m.bits, m.group_size):
        sink.write(block)


def _dequant_verify(ckpt: Checkpoint, op: TensorOp, sr: SeqReader, dr: SeqReader, at: Place) -> None:
    """Against ``codec.dequantize`` (the generic unpacker), bit for bit."""
    t, m = op.src, op.qmodule
    qweight = np.frombuffer(sr.read(t.nbytes), dtype=np.int32).reshape(t.shape)
    qzeros = read_tensor(ckpt, m.qzeros)
    scales = to_float32(read_tensor(ckpt, m.scales), m.scales.info.dtype)
    cols = dequant_cols(m.k)
    for c0 in range(0, m.n, cols):
        c1 = min(m.n, c0 + cols)
        z0, z1 = c0 * m.bits // 32, c1 * m.bits // 32
        want = codec.dequantize(qweight[:, c0:c1], qzeros[:, z0:z1], scales[:, c0:c1], m.bits, m.group_size)
        have = np.frombuffer(dr.read(want.nbytes), dtype=np.float32).reshape(want.shape)
        if not np.array_equal(want.view(np.uint32), have.view(np.uint32)):
            off = at.base + c0 * m.k * 4 + first_diff(want, have)
            raise Found(Difference(at.file, op.out_name, off, "float weight differs from the exact dequantization"))


# --- the table --------------------------------------------------------------------------------------------

ConvertFn = Callable[[Checkpoint, TensorOp, SeqReader, Sink, Progress], None]
VerifyFn = Callable[[Checkpoint, TensorOp, SeqReader, SeqReader, Place], None]
OutFn = Callable[[TensorInfo, "QuantModule | None"], "tuple[str, str, tuple[int, ...]] | None"]


@dataclass(frozen=True)
class OpSpec:
    """``out(t, m)``: the output ``(name, dtype, shape)`` of source tensor ``t`` (None: not emitted)."""

    out: OutFn
    convert: ConvertFn
    verify: VerifyFn


def _q(m: QuantModule | None) -> QuantModule:
    assert m is not None
    return m


OPS: dict[Op, OpSpec] = {
    Op.COPY: OpSpec(lambda t, m: (t.name, t.dtype, t.shape), _copy_convert, _copy_verify),
    Op.DROP: OpSpec(lambda t, m: None, _drop_convert, _drop_verify),
    Op.ZEROS: OpSpec(lambda t, m: (t.name, "I32", (t.shape[0], _q(m).n // 8)), _zeros_convert, _zeros_verify),
    Op.TRANSCODE: OpSpec(lambda t, m: (t.name, "I32", (_q(m).k // 8, _q(m).n)), _transcode_convert, _transcode_verify),
    Op.DEQUANT: OpSpec(lambda t, m: (_q(m).prefix + ".weight", "F32", (_q(m).n, _q(m).k)), _dequant_convert,
                       _dequant_verify),
}


def tensor_op(op: Op, t: TensorInfo, m: QuantModule | None) -> TensorOp:
    """``op`` on source tensor ``t`` (of module ``m``), with its output name, dtype and shape."""
    out = OPS[op].out(t, m)
    return TensorOp(op, t, m) if out is None else TensorOp(op, t, m, *out)
