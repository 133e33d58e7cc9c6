"""Test-side helpers: independent readers (a minimal safetensors parser and a big-integer GPTQ decoder, written
from docs/formats.md with Python integers, sharing no code with ``repack`` on purpose) and the one way tests run
the command line.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import struct
import subprocess
import sys
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


# --- running the command line -------------------------------------------------------------------------------


def w3repack(*args, env: dict | None = None, cwd=None, timeout: float = 120) -> "subprocess.CompletedProcess":
    """``python -m repack ARGS`` as a user runs it: a subprocess, text output captured."""
    return subprocess.run([sys.executable, "-m", "repack", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=timeout)


def w3repack_in_process(*args) -> tuple[int, str, str]:
    """``w3repack ARGS`` through the real entry point, in this process; returns (exit code, stdout, stderr)."""
    from repack.cli.app import main

    out, err = io.StringIO(), io.StringIO()
    argv = sys.argv
    sys.argv = ["w3repack", *map(str, args)]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    finally:
        sys.argv = argv
    return code, out.getvalue(), err.getvalue()


def tree_hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` (symlinks followed), keyed by relative path."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(Path(root).rglob("*"))
        if p.is_file()
    }


def assert_refused(r: "subprocess.CompletedProcess", *needles: str) -> str:
    """Exit 2, exactly one ``error:`` line on stderr, no traceback, every needle in it; returns the line."""
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-2000:]
    assert "Traceback" not in r.stderr and "--debug" not in r.stderr, r.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def assert_not_finished(dst: Path) -> None:
    """DST does not look like a loadable model: no config, manifest or index was written."""
    for name in ("config.json", "w3repack.json", "quantization_config.json", "model.safetensors.index.json"):
        assert not (dst / name).exists(), name
