"""Small safetensors reader/writer with strict validation and byte-range access.

File layout: ``u64 little-endian N`` · ``N bytes of JSON header`` · data. The header maps tensor names to
``{"dtype", "shape", "data_offsets": [begin, end]}`` relative to the data start (``8 + N``), plus an
optional ``"__metadata__"`` dict of strings. Valid files have tensors that tile the data region exactly:
no overlaps, no gaps, nothing past the end. The writer pads the header with spaces to a multiple of 8.
"""

from __future__ import annotations

import json
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from repack.errors import FormatError

DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}
NUMPY_DTYPES = {
    "U8": np.uint8, "I8": np.int8, "I16": np.int16, "U16": np.uint16, "F16": np.float16,
    "I32": np.int32, "U32": np.uint32, "F32": np.float32, "I64": np.int64, "U64": np.uint64, "F64": np.float64,
    "BF16": np.uint16,
}
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin



@dataclass(frozen=True)
class Header:
    path: Path
    data_offset: int
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str] | None
    file_size: int

    def ordered(self) -> list[TensorInfo]:
        return sorted(self.tensors.values(), key=lambda t: t.begin)


def read_prefix(path: str | os.PathLike) -> tuple[bytes, int]:
    """The first ``8 + N`` bytes of a shard (length word and JSON header) and the file's size."""
    path = Path(path)
    try:
        with open(os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC), "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise FormatError(f"{path}: not a regular file (a FIFO, device or folder); refused")
            size = st.st_size
            head = f.read(8)
            if len(head) < 8:
                raise FormatError(f"{path}: truncated: {size} bytes, shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise FormatError(f"{path}: header length {n} runs past the end of the file ({size} bytes): truncated or not safetensors")
            header_length(path, head)
            return head + f.read(n), size
    except OSError as e:
        raise FormatError(f"{path}: cannot read: {e.strerror or e}") from e


def header_length(path: str | os.PathLike, head: bytes) -> int:
    """``N`` from a shard's first 8 bytes (u64 little-endian), bounded by MAX_HEADER."""
    if len(head) < 8:
        raise FormatError(f"{path}: truncated header: {len(head)} bytes, shorter than the 8-byte header length")
    (n,) = struct.unpack("<Q", head[:8])
    if n > MAX_HEADER:
        raise FormatError(f"{path}: header length {n} exceeds {MAX_HEADER} bytes")
    return n


def read_header(path: str | os.PathLike) -> Header:
    """Parse and validate a local shard's header; raises FormatError naming the file and tensor."""
    prefix, size = read_prefix(path)
    return parse_header(prefix, Path(path), size)


def parse_header(prefix: bytes, path: Path, file_size: int | None = None) -> Header:
    """Parse a shard header from its first ``8 + N`` bytes; ``path`` names the file in errors.

    With ``file_size`` the tensors must tile the data region up to it; without (a header read over HTTP)
    the file size follows from the tiling.
    """
    n = header_length(path, prefix)
    if len(prefix) != 8 + n:
        raise FormatError(f"{path}: header length {n} does not match the {len(prefix) - 8} bytes read")
    try:
        obj = json.loads(prefix[8:].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{path}: header is not valid JSON ({e})") from e
    except RecursionError as e:
        raise FormatError(f"{path}: header is nested too deeply") from e
    if not isinstance(obj, dict):
        raise FormatError(f"{path}: header is not a JSON object")
    meta = obj.pop("__metadata__", None)
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise FormatError(f"{path}: __metadata__ must map strings to strings")
    limit = file_size - 8 - n if file_size is not None else 1 << 62
    tensors = {name: _parse_entry(path, name, spec, limit) for name, spec in obj.items()}
    data_size = limit if file_size is not None else max((t.end for t in tensors.values()), default=0)
    _check_tiling(path, tensors, data_size)
    return Header(path=path, data_offset=8 + n, tensors=tensors, metadata=meta, file_size=8 + n + data_size)


def _parse_entry(path: Path, name: str, spec: object, data_size: int) -> TensorInfo:
    if not isinstance(spec, dict):
        raise FormatError(f"{path}: tensor {name}: entry is not an object")
    dtype, shape, offs = spec.get("dtype"), spec.get("shape"), spec.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
        raise FormatError(f"{path}: tensor {name}: unknown dtype {dtype!r}")
    if not (isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        raise FormatError(f"{path}: tensor {name}: shape {shape!r} is not a list of non-negative integers")
    if not (isinstance(offs, list) and len(offs) == 2 and all(isinstance(o, int) and not isinstance(o, bool) for o in offs)):
        raise FormatError(f"{path}: tensor {name}: data_offsets {offs!r} is not [begin, end]")
    begin, end = offs
    if not 0 <= begin <= end:
        raise FormatError(f"{path}: tensor {name}: data_offsets {offs} are not ordered")
    if end > data_size:
        raise FormatError(
            f"{path}: tensor {name}: data_offsets end {end} is past the data region ({data_size} bytes): truncated file?"
        )
    numel = 1
    for d in shape:
        numel *= d
    if numel * DTYPE_SIZES[dtype] != end - begin:
        raise FormatError(
            f"{path}: tensor {name}: {dtype}{shape} needs {numel * DTYPE_SIZES[dtype]} bytes, data_offsets span {end - begin}"
        )
    return TensorInfo(name, dtype, tuple(shape), begin, end)


def _check_tiling(path: Path, tensors: dict[str, TensorInfo], data_size: int) -> None:
    pos = 0
    prev = None
    for t in sorted(tensors.values(), key=lambda t: (t.begin, t.end)):
        if t.begin < pos:
            raise FormatError(f"{path}: tensor {t.name} overlaps tensor {prev} (bytes {t.begin} < {pos})")
        if t.begin > pos:
            raise FormatError(f"{path}: gap of {t.begin - pos} bytes before tensor {t.name} at data byte {pos}")
        pos, prev = t.end, t.name
    if pos != data_size:
        raise FormatError(f"{path}: {data_size - pos} bytes after the last tensor: not a valid safetensors file")


def build_header(entries: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str] | None) -> tuple[bytes, list[int]]:
    """Serialize a header for tensors laid out back to back in ``entries`` order.

    Returns ``(prefix, offsets)``: ``prefix`` is the 8-byte length plus the space-padded JSON (its length
    is a multiple of 8) and ``offsets[i]`` is the data offset of entry ``i`` (``offsets[-1]`` = data size).
    """
    obj: dict[str, object] = {}
    if metadata is not None:
        obj["__metadata__"] = metadata
    offsets = [0]
    for name, dtype, shape in entries:
        n = DTYPE_SIZES[dtype]
        for d in shape:
            n *= d
        obj[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offsets[-1], offsets[-1] + n]}
        offsets.append(offsets[-1] + n)
    raw = json.dumps(obj, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-(8 + len(raw)) % 8)
    return struct.pack("<Q", len(raw)) + raw, offsets


def pread_exact(fd: int, size: int, offset: int, out: memoryview | None = None) -> memoryview:
    """Read exactly ``size`` bytes at ``offset`` into ``out`` (or a new buffer)."""
    buf = out if out is not None else memoryview(bytearray(size))
    got = 0
    while got < size:
        n = os.preadv(fd, [buf[got:size]], offset + got)
        if n == 0:
            raise FormatError(f"unexpected end of file at byte {offset + got}")
        got += n
    return buf[:size]


def read_array(fd: int, header: Header, t: TensorInfo) -> np.ndarray:
    """Whole tensor as a numpy array (BF16 as uint16 bit patterns). For small tensors only."""
    buf = bytearray(t.nbytes)
    pread_exact(fd, t.nbytes, header.data_offset + t.begin, memoryview(buf))
    return np.frombuffer(buf, dtype=NUMPY_DTYPES[t.dtype]).reshape(t.shape)


def to_float32(arr: np.ndarray, dtype: str) -> np.ndarray:
    """Exact widening of F16/BF16/F32 values to float32."""
    if dtype == "BF16":
        return (arr.astype(np.uint32) << 16).view(np.float32)
    return arr.astype(np.float32)
