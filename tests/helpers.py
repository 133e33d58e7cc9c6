"""Independent test-side readers: a minimal safetensors parser and a big-integer GPTQ decoder.

Written from FORMATS.md with Python integers, sharing no code with ``repack`` on purpose.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

SIZES = {"BF16": 2, "F16": 2, "F32": 4, "I32": 4, "I64": 8, "U8": 1}


def read_raw(path: Path) -> tuple[dict, dict[str, bytes]]:
    """Header entries and raw bytes of every tensor of a safetensors file."""
    data = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    header.pop("__metadata__", None)
    base = 8 + n
    raw = {k: data[base + v["data_offsets"][0] : base + v["data_offsets"][1]] for k, v in header.items()}
    return header, raw


def read_dir(root: Path) -> tuple[dict, dict[str, bytes]]:
    headers, raws = {}, {}
    for p in sorted(Path(root).glob("*.safetensors")):
        h, r = read_raw(p)
        headers.update(h)
        raws.update(r)
    return headers, raws


def decode_bigint(raw: bytes, shape: list[int], bits: int) -> np.ndarray:
    """Codes ``[K, N]`` of an int32 qweight ``[K*bits/32, N]``: per column, the words of a block form
    ``S = w0 | w1 << 32 | ...`` and code ``i`` is ``(S >> bits*i) & (2**bits - 1)``."""
    words = np.frombuffer(raw, dtype="<u4").reshape(shape).astype(object)
    per_block = 3 if bits == 3 else 1
    codes_per_block = 32 if bits == 3 else 32 // bits
    rows, n = shape
    out = np.zeros((rows // per_block * codes_per_block, n), dtype=np.int64)
    mask = (1 << bits) - 1
    for b in range(rows // per_block):
        s = np.zeros(n, dtype=object)
        for j in range(per_block):
            s = s | (words[b * per_block + j] << (32 * j))
        for i in range(codes_per_block):
            out[b * codes_per_block + i] = ((s >> (bits * i)) & mask).astype(np.int64)
    return out


def floats(raw: bytes, dtype: str) -> np.ndarray:
    """Values as float64 (BF16 expanded by hand: the high 16 bits of a float32)."""
    if dtype == "BF16":
        u = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
        return u.view(np.float32).astype(np.float64)
    return np.frombuffer(raw, dtype={"F16": "<f2", "F32": "<f4"}[dtype]).astype(np.float64)
