"""Malformed input: the real CLI refuses with exit 2 and one line naming file, tensor and fault.

Every case starts from a small valid multi-shard checkpoint, breaks one thing, and checks that the source
is unchanged afterwards and that DST never looks like a finished model.
"""

from __future__ import annotations

import json
import shutil
import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from repack import synth
from tests.helpers import assert_not_finished, assert_refused, tree_hashes
from tests.helpers import w3repack as cli

INDEX = "model.safetensors.index.json"
MTP = "model.layers.2.mlp.experts.0.gate_proj"  # 4-bit passthrough under bits=3
DENSE = "model.layers.0.mlp.gate_proj"  # 3-bit, converted
MOE = "model.layers.1.mlp.experts.1.up_proj"  # 3-bit, converted
EIGHT = "model.layers.0.mlp.down_proj"  # 8-bit passthrough
KVB = "model.layers.0.self_attn.kv_b_proj"  # has g_idx; dequantized by default


def shard_of(root: Path, tensor: str) -> Path:
    return root / json.loads((root / INDEX).read_text())["weight_map"][tensor]


def read_shard(path: Path) -> tuple[int, dict, bytes]:
    """(header length, header JSON object, data bytes)."""
    raw = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return n, json.loads(raw[8 : 8 + n]), raw[8 + n :]


def write_shard(path: Path, header: dict, data: bytes) -> None:
    h = json.dumps(header).encode()
    Path(path).write_bytes(struct.pack("<Q", len(h)) + h + data)


def shard_items(path: Path) -> tuple[list[list], dict | None]:
    """Tensors as ``[name, dtype, shape, raw]`` in file order, and the ``__metadata__``."""
    _, header, data = read_shard(path)
    meta = header.pop("__metadata__", None)
    items = sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0])
    return [[k, v["dtype"], list(v["shape"]), data[v["data_offsets"][0] : v["data_offsets"][1]]] for k, v in items], meta


def rebuild_shard(path: Path, items: list[list], meta: dict | None) -> None:
    """Write ``items`` back to back (offsets consistent), as a valid container."""
    header: dict = {} if meta is None else {"__metadata__": meta}
    pos, data = 0, b""
    for name, dtype, shape, raw in items:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [pos, pos + len(raw)]}
        pos += len(raw)
        data += raw
    write_shard(path, header, data)


def edit_header(path: Path, fn) -> None:
    _, header, data = read_shard(path)
    fn(header)
    write_shard(path, header, data)


def edit_json(path: Path, fn) -> None:
    obj = json.loads(path.read_text())
    fn(obj)
    path.write_text(json.dumps(obj, indent=2))


def edit_items(path: Path, fn) -> None:
    items, meta = shard_items(path)
    fn(items)
    rebuild_shard(path, items, meta)


def find(items: list[list], name: str) -> list:
    return next(it for it in items if it[0] == name)


def drop_tensor(root: Path, tensor: str) -> Path:
    path = shard_of(root, tensor)
    edit_items(path, lambda items: items.remove(find(items, tensor)))
    edit_json(root / INDEX, lambda ix: ix["weight_map"].pop(tensor))
    return path


# --- mutations: each breaks ``root`` and returns the strings the error line must contain -------------


def m_truncated(root):
    p = root / "model-00003-of-00007.safetensors"
    p.write_bytes(p.read_bytes()[:-1000])
    _, header, _ = read_shard(p)
    last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
    return [p.name, last, "truncated"]


def m_header_len_past_eof(root):
    p = root / "model-00002-of-00007.safetensors"
    raw = bytearray(p.read_bytes())
    raw[:8] = struct.pack("<Q", len(raw) + 10)
    p.write_bytes(bytes(raw))
    return [p.name, "header length", "past the end"]


def m_header_not_json(root):
    p = root / "model-00002-of-00007.safetensors"
    raw = bytearray(p.read_bytes())
    raw[8:10] = b"{{"
    p.write_bytes(bytes(raw))
    return [p.name, "not valid JSON"]


def m_tiny_file(root):
    p = root / "model-00004-of-00007.safetensors"
    p.write_bytes(b"\x01\x02\x03")
    return [p.name, "truncated"]


def m_offsets_outside(root):
    p = shard_of(root, DENSE + ".scales")

    def f(h):
        b, e = h[DENSE + ".scales"]["data_offsets"]
        size = len(read_shard(p)[2])
        h[DENSE + ".scales"]["data_offsets"] = [size + 64, size + 64 + e - b]

    edit_header(p, f)
    return [p.name, DENSE + ".scales", "past the data region"]


def m_overlap(root):
    p = shard_of(root, DENSE + ".qzeros")
    t = DENSE + ".qzeros"

    def f(h):
        b, e = h[t]["data_offsets"]
        h[t]["data_offsets"] = [b - 4, e - 4]

    edit_header(p, f)
    return [p.name, "overlaps", t]


def m_gap(root):
    p = shard_of(root, DENSE + ".scales")
    items, meta = shard_items(p)
    header: dict = {"__metadata__": meta}
    pos, data = 0, b""
    for name, dtype, shape, raw in items:
        if name == DENSE + ".scales":
            pos += 16
            data += b"\0" * 16
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [pos, pos + len(raw)]}
        pos += len(raw)
        data += raw
    write_shard(p, header, data)
    return [p.name, "gap of 16 bytes", DENSE + ".scales"]


def m_trailing_bytes(root):
    p = root / "model-00005-of-00007.safetensors"
    p.write_bytes(p.read_bytes() + b"\0" * 8)
    return [p.name, "after the last tensor"]


def m_size_mismatch(root):
    t = MOE + ".scales"
    p = shard_of(root, t)
    edit_header(p, lambda h: h[t].update(shape=[h[t]["shape"][0], h[t]["shape"][1] + 1]))
    return [p.name, t, "needs"]


def m_unknown_dtype(root):
    t = "model.norm.weight"
    p = shard_of(root, t)
    edit_header(p, lambda h: h[t].update(dtype="Q7"))
    return [p.name, t, "dtype"]


def m_dtype_not_string(root):
    t = "model.norm.weight"
    p = shard_of(root, t)
    edit_header(p, lambda h: h[t].update(dtype={"F16": 2}))
    return [p.name, t, "unknown dtype"]


def _retype(tensor, dtype):
    def m(root):
        p = shard_of(root, tensor)
        edit_header(p, lambda h: h[tensor].update(dtype=dtype))
        return [p.name, tensor, dtype, "I32"]

    return m


def _missing(part):
    def m(root):
        shard = shard_of(root, MOE + ".qzeros").name
        drop_tensor(root, MOE + "." + part)
        return [shard, MOE, f"no {part}"]

    return m


def m_columns_disagree(root):
    t = MOE + ".scales"
    p = shard_of(root, t)
    edit_header(p, lambda h: h[t].update(shape=[h[t]["shape"][0] * 2, h[t]["shape"][1] // 2]))
    return [p.name, t, "columns"]


def m_groups_disagree(root):
    t = MOE + ".qzeros"
    p = shard_of(root, t)

    def f(items):
        it = find(items, t)
        it[2] = [it[2][0] * 2, it[2][1]]
        it[3] = it[3] * 2

    edit_items(p, f)
    return [p.name, t, "groups"]


def m_group_size_config(root):
    def f(cfg):
        cfg["quantization_config"]["group_size"] = 64

    edit_json(root / "config.json", f)
    return ["group size 128", "64", shard_of(root, "model.layers.0.self_attn.q_a_proj.scales").name]


def m_qweight_rows(root):
    t = MOE + ".qweight"
    p = shard_of(root, t)

    def f(items):
        it = find(items, t)
        it[2] = [it[2][0] - 1, it[2][1]]
        it[3] = it[3][: it[2][0] * it[2][1] * 4]

    edit_items(p, f)
    return [p.name, t]


def _width(bits):
    def m(root):
        t = MOE + ".qzeros"
        p = shard_of(root, t)

        def f(items):
            it = find(items, t)
            n = find(items, MOE + ".scales")[2][1] if any(x[0] == MOE + ".scales" for x in items) else 256
            it[2] = [it[2][0], n * bits // 32]
            it[3] = bytes(it[2][0] * it[2][1] * 4)

        edit_items(p, f)
        return [p.name, t, f"{bits}-bit"]

    return m


def _asym(module, word=0):
    def m(root):
        t = module + ".qzeros"
        p = shard_of(root, t)

        def f(items):
            it = find(items, t)
            z = bytearray(it[3])
            z[4 * word] ^= 0x01
            it[3] = bytes(z)

        edit_items(p, f)
        return [p.name, t, "asymmetric", "Marlin"]

    return m


def m_g_idx(root):
    """kv_b_proj (one group) with a g_idx entry pointing at group 1."""
    t = KVB + ".g_idx"
    p = shard_of(root, t)

    def f(items):
        it = find(items, t)
        g = np.frombuffer(it[3], dtype=np.int32).copy()
        g[0] = 1
        it[3] = g.tobytes()

    edit_items(p, f)
    return [p.name, t, "g_idx", "act-order"]


def m_g_idx_act_order(root):
    """A desc_act export: g_idx is a permutation of arange(K)//group on a converted 3-bit module."""
    t = MOE + ".g_idx"
    p = shard_of(root, MOE + ".qweight")

    def f(items):
        qw = find(items, MOE + ".qweight")
        k = qw[2][0] * 32 // 3
        g = (np.random.default_rng(1).permutation(k) // 128).astype(np.int32)
        items.insert(items.index(qw) + 1, [t, "I32", [k], g.tobytes()])

    edit_items(p, f)
    edit_json(root / INDEX, lambda ix: ix["weight_map"].update({t: p.name}))
    return [p.name, t, "g_idx", "act-order"]


def m_index_missing_shard(root):
    edit_json(root / INDEX, lambda ix: ix["weight_map"].update({"extra.weight": "model-00099-of-00099.safetensors"}))
    return [INDEX, "model-00099-of-00099.safetensors", "missing"]


def m_shard_deleted(root):
    (root / "model-00004-of-00007.safetensors").unlink()
    return [INDEX, "model-00004-of-00007.safetensors", "missing"]


def m_index_phantom_tensor(root):
    edit_json(root / INDEX, lambda ix: ix["weight_map"].update({"model.phantom.weight": "model-00001-of-00007.safetensors"}))
    return [INDEX, "model.phantom.weight", "does not hold it"]


def m_index_wrong_shard(root):
    edit_json(root / INDEX, lambda ix: ix["weight_map"].update({"model.norm.weight": "model-00001-of-00007.safetensors"}))
    return [INDEX, "model.norm.weight", "stored in"]


def m_unlisted_tensor(root):
    edit_json(root / INDEX, lambda ix: ix["weight_map"].pop("model.norm.weight"))
    return ["model.norm.weight", "not listed"]


def m_duplicate_tensor(root):
    t = "model.embed_tokens.weight"
    src = shard_of(root, t)
    dup = find(shard_items(src)[0], t)
    other = root / "model-00007-of-00007.safetensors"
    edit_items(other, lambda items: items.append(list(dup)))
    return [t, "also in shard", src.name, other.name]


def m_control_chars_in_name(root):
    edit_json(root / INDEX, lambda ix: ix["weight_map"].update({"model.norm.weight": "a\nb\x85c.safetensors"}))
    return [INDEX, "a\\nb\\x85c.safetensors", "not a plain relative file name"]


def m_index_not_json(root):
    (root / INDEX).write_text('{"weight_map": {')
    return [INDEX, "not valid JSON"]


def m_index_no_weight_map(root):
    (root / INDEX).write_text('{"metadata": {}}')
    return [INDEX, "weight_map"]


def m_index_traversal(root):
    edit_json(root / INDEX, lambda ix: ix["weight_map"].update({"model.norm.weight": "../outside.safetensors"}))
    return [INDEX, "../outside.safetensors"]


def m_config_not_json(root):
    (root / "config.json").write_text("{'not': json}")
    return ["config.json", "not valid JSON"]


def m_config_missing(root):
    (root / "config.json").unlink()
    return ["config.json", "not found"]


def m_config_list(root):
    (root / "config.json").write_text("[1, 2]")
    return ["config.json", "not a JSON object"]


def m_no_quant_config(root):
    edit_json(root / "config.json", lambda c: c.pop("quantization_config"))
    (root / "quantization_config.json").unlink()
    return ["config.json", "quantization_config"]


def m_qconfig_file_not_json(root):
    (root / "quantization_config.json").write_text("nope")
    return ["quantization_config.json", "not valid JSON"]


def m_sym_false(root):
    edit_json(root / "config.json", lambda c: c["quantization_config"].update(sym=False))
    return ["config.json", "sym", "Marlin"]


def m_planar(root):
    edit_json(root / "config.json", lambda c: c["quantization_config"].update(packing_format="auto_round:gptqmodel"))
    return ["config.json", "packing_format"]


def m_no_weights(root):
    for p in root.glob("model-*.safetensors"):
        p.unlink()
    (root / INDEX).unlink()
    return ["not a safetensors checkpoint"]


def m_source_missing(root):
    shutil.rmtree(root)
    return [str(root), "not found"]


CASES = {
    "truncated-shard": m_truncated,
    "header-length-past-eof": m_header_len_past_eof,
    "header-not-json": m_header_not_json,
    "shard-shorter-than-8-bytes": m_tiny_file,
    "offsets-outside-data": m_offsets_outside,
    "overlapping-tensors": m_overlap,
    "gap-between-tensors": m_gap,
    "trailing-bytes": m_trailing_bytes,
    "shape-disagrees-with-offsets": m_size_mismatch,
    "unknown-dtype": m_unknown_dtype,
    "dtype-not-a-string": m_dtype_not_string,
    "qweight-dtype-f32": _retype(MOE + ".qweight", "F32"),
    "qzeros-dtype-f32": _retype(MOE + ".qzeros", "F32"),
    "qzeros-dtype-u32": _retype(DENSE + ".qzeros", "U32"),
    "missing-qzeros": _missing("qzeros"),
    "missing-scales": _missing("scales"),
    "missing-qweight": _missing("qweight"),
    "scales-qweight-columns-disagree": m_columns_disagree,
    "qzeros-scales-groups-disagree": m_groups_disagree,
    "group-size-disagrees-with-config": m_group_size_config,
    "qweight-rows-not-3-word-blocks": m_qweight_rows,
    "width-5": _width(5),
    "width-6": _width(6),
    "width-7": _width(7),
    "asymmetric-3bit": _asym(MOE, 7),
    "asymmetric-4bit-passthrough": _asym(MTP),
    "asymmetric-8bit-passthrough": _asym(EIGHT, 3),
    "asymmetric-dequantized": _asym(KVB),
    "g_idx-out-of-range": m_g_idx,
    "g_idx-act-order": m_g_idx_act_order,
    "index-names-missing-shard": m_index_missing_shard,
    "shard-deleted": m_shard_deleted,
    "index-names-tensor-no-shard-holds": m_index_phantom_tensor,
    "index-names-wrong-shard": m_index_wrong_shard,
    "tensor-not-in-index": m_unlisted_tensor,
    "same-tensor-in-two-shards": m_duplicate_tensor,
    "control-characters-in-names": m_control_chars_in_name,
    "index-not-json": m_index_not_json,
    "index-without-weight-map": m_index_no_weight_map,
    "index-path-traversal": m_index_traversal,
    "config-not-json": m_config_not_json,
    "config-missing": m_config_missing,
    "config-not-object": m_config_list,
    "config-without-quantization-config": m_no_quant_config,
    "quantization-config-file-not-json": m_qconfig_file_not_json,
    "sym-false": m_sym_false,
    "planar-packing-format": m_planar,
    "no-weights": m_no_weights,
    "source-missing": m_source_missing,
}


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    root = synth.write_checkpoint(tmp_path_factory.mktemp("malformed") / "src", synth.TinySpec.small(traps=True))
    assert len(list(root.glob("model-*-of-00007.safetensors"))) == 7
    return root


@pytest.fixture(scope="module")
def outcomes(pristine, tmp_path_factory) -> dict:
    """Every case broken in its own copy and run through ``convert`` (a few processes at a time)."""
    base = tmp_path_factory.mktemp("cases")

    def one(case):
        src, dst = base / case / "src", base / case / "dst"
        shutil.copytree(pristine, src)
        needles = CASES[case](src)
        before = tree_hashes(src) if src.exists() else None
        return src, dst, needles, before, cli("convert", src, dst, "--workers", "2")

    with ThreadPoolExecutor(max_workers=4) as ex:
        return dict(zip(CASES, ex.map(one, CASES)))


@pytest.mark.parametrize("case", list(CASES))
def test_malformed_input_is_refused(case, pristine, outcomes):
    src, dst, needles, before, r = outcomes[case]
    assert before != tree_hashes(pristine)
    assert_refused(r, *needles)
    assert (tree_hashes(src) if src.exists() else None) == before
    assert_not_finished(dst)
    if dst.exists():
        assert not list(dst.rglob("*.partial")) and not list(dst.rglob("*.w3repack-tmp"))


def test_g_idx_checked_when_copied(pristine, tmp_path):
    """With kv_b_proj kept quantized the g_idx is copied, and still checked."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    shutil.copytree(pristine, src)
    needles = m_g_idx(src)
    before = tree_hashes(src)
    assert_refused(cli("convert", src, dst, "--no-kv-b-float"), *needles)
    assert tree_hashes(src) == before
    assert_not_finished(dst)


@pytest.mark.parametrize("case", ["truncated-shard", "index-not-json", "width-6"])
def test_inspect_and_verify_refuse_too(case, pristine, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(pristine, src)
    needles = CASES[case](src)
    before = tree_hashes(src)
    assert_refused(cli("inspect", src), *needles)
    assert_refused(cli("verify", src, tmp_path / "nothing"), *needles)
    assert tree_hashes(src) == before


def test_valid_source_converts(pristine, tmp_path):
    """The fixture the cases start from is itself accepted (so each refusal is caused by its mutation)."""
    before = tree_hashes(pristine)
    dst = tmp_path / "dst"
    r = cli("convert", pristine, dst)
    assert r.returncode == 0, r.stderr
    assert cli("verify", pristine, dst).returncode == 0
    assert tree_hashes(pristine) == before
