"""safetensors_io: the one header parser. Headers are built by hand here (struct + json), not by the writer."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from repack.errors import FormatError
from repack.safetensors_io import MAX_HEADER, build_header, parse_header, read_header, read_prefix


def prefix_of(obj: dict, pad: int = 0) -> bytes:
    raw = json.dumps(obj).encode() + b" " * pad
    return struct.pack("<Q", len(raw)) + raw


TWO = {"a": {"dtype": "I32", "shape": [2, 3], "data_offsets": [0, 24]},
       "b": {"dtype": "BF16", "shape": [4], "data_offsets": [24, 32]}, "__metadata__": {"format": "pt"}}


def test_parse_header_without_file_size_takes_the_size_from_the_tiling():
    p = prefix_of(TWO, pad=5)
    h = parse_header(p, Path("x.safetensors"))
    assert h.data_offset == len(p) and h.file_size == len(p) + 32
    assert [t.name for t in h.ordered()] == ["a", "b"] and h.tensors["a"].nbytes == 24
    assert h.metadata == {"format": "pt"} and h.tensors["b"].shape == (4,)


def test_parse_header_with_file_size_refuses_trailing_bytes():
    p = prefix_of(TWO)
    assert parse_header(p, Path("x"), len(p) + 32).file_size == len(p) + 32
    with pytest.raises(FormatError, match="8 bytes after the last tensor"):
        parse_header(p, Path("x"), len(p) + 40)
    with pytest.raises(FormatError, match="past the data region"):
        parse_header(p, Path("x"), len(p) + 30)


@pytest.mark.parametrize("prefix,says", [
    (b"\x01\x00", "truncated header"),
    (struct.pack("<Q", MAX_HEADER + 1), "exceeds"),
    (struct.pack("<Q", 10) + b"{}", "does not match the 2 bytes read"),
    (prefix_of({"a": {"dtype": "Q9", "shape": [1], "data_offsets": [0, 1]}}), "unknown dtype"),
    (prefix_of({"a": {"dtype": "I32", "shape": [2], "data_offsets": [0, 4]}}), "needs 8 bytes"),
    (prefix_of({"a": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]},
                "b": {"dtype": "U8", "shape": [2], "data_offsets": [1, 3]}}), "overlaps"),
    (prefix_of({"a": {"dtype": "U8", "shape": [2], "data_offsets": [2, 4]}}), "gap of 2 bytes"),
    (prefix_of({"__metadata__": {"k": 1}}), "__metadata__ must map strings"),
    (struct.pack("<Q", 3) + b"[1]", "not a JSON object"),
    (struct.pack("<Q", 2) + b"\xff{", "not valid JSON"),
])
def test_parse_header_refuses_naming_the_file(prefix, says):
    with pytest.raises(FormatError, match=says) as e:
        parse_header(prefix, Path("shard-7.safetensors"))
    assert str(e.value).startswith("shard-7.safetensors: ")


def test_read_header_and_prefix_agree_with_the_writer(tmp_path):
    prefix, offs = build_header([("w", "F32", (3, 2)), ("z", "I32", (1,))], {"m": "v"})
    assert len(prefix) % 8 == 0 and offs == [0, 24, 28]
    f = tmp_path / "s.safetensors"
    f.write_bytes(prefix + bytes(28))
    assert read_prefix(f) == (prefix, len(prefix) + 28)
    h = read_header(f)
    assert h == parse_header(prefix, f, len(prefix) + 28)
    assert (h.tensors["z"].begin, h.tensors["z"].end, h.metadata) == (24, 28, {"m": "v"})


def test_read_header_says_truncated_before_anything_else(tmp_path):
    f = tmp_path / "t.safetensors"
    f.write_bytes(struct.pack("<Q", 1000) + b"{}")
    with pytest.raises(FormatError, match="runs past the end of the file"):
        read_header(f)
    f.write_bytes(b"abc")
    with pytest.raises(FormatError, match="shorter than the 8-byte header length"):
        read_header(f)
