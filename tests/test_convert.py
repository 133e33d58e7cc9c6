"""End-to-end convert + verify on generated checkpoints, judged by the independent decoder in helpers."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open

from repack import synth
from repack.convert import convert
from repack.plan import Options
from repack.run import RunConfig
from repack.verify import verify
from tests.helpers import decode_bigint, floats, read_dir

# the traps checkpoint has 2 layers and one MTP layer (index 2); vLLM's deepseek_mtp builds these unquantized
MTP_FLOAT = {"model.layers.2.eh_proj", "model.layers.2.shared_head.head"}


def _width(h: dict, prefix: str) -> int:
    return 32 * h[prefix + ".qzeros"]["shape"][1] // h[prefix + ".scales"]["shape"][1]


def test_every_tensor_is_lossless(converted):
    src, dst = converted
    sh, sraw = read_dir(src)
    dh, draw = read_dir(dst)
    prefixes = {k.rsplit(".", 1)[0] for k in sh if k.endswith(".qweight")}
    seen_widths = set()
    for p in prefixes:
        b = _width(sh, p)
        seen_widths.add(b)
        if p.endswith("kv_b_proj") or p in MTP_FLOAT:
            assert p + ".qweight" not in dh and dh[p + ".weight"]["dtype"] == "F32"
            q = decode_bigint(sraw[p + ".qweight"], sh[p + ".qweight"]["shape"], b)
            s = floats(sraw[p + ".scales"], sh[p + ".scales"]["dtype"]).reshape(sh[p + ".scales"]["shape"])
            g = q.shape[0] // s.shape[0]
            ref = (q - (1 << (b - 1))) * s[np.arange(q.shape[0]) // g]
            got = np.frombuffer(draw[p + ".weight"], "<f4").reshape(dh[p + ".weight"]["shape"])
            assert np.array_equal(got.astype(np.float64), ref.T), p
            continue
        if b in (2, 3):
            q = decode_bigint(sraw[p + ".qweight"], sh[p + ".qweight"]["shape"], b)
            q4 = decode_bigint(draw[p + ".qweight"], dh[p + ".qweight"]["shape"], 4)
            assert np.array_equal(q4, q + 8 - (1 << (b - 1))), p
            assert set(np.frombuffer(draw[p + ".qzeros"], "<u4").tolist()) == {0x77777777}, p
            assert dh[p + ".qzeros"]["shape"] == [sh[p + ".scales"]["shape"][0], sh[p + ".scales"]["shape"][1] // 8]
            assert draw[p + ".scales"] == sraw[p + ".scales"], p
        else:
            for part in ("qweight", "qzeros", "scales"):
                assert draw[f"{p}.{part}"] == sraw[f"{p}.{part}"], p
    assert seen_widths == {2, 3, 4, 8}
    converted_names = {p + s for p in prefixes for s in (".qweight", ".qzeros", ".scales", ".g_idx")}
    for name in sh:
        if name not in converted_names:
            assert draw[name] == sraw[name], name
            assert dh[name]["dtype"] == sh[name]["dtype"] and dh[name]["shape"] == sh[name]["shape"]


def test_shard_placement_index_and_configs(converted):
    src, dst = converted
    s_index = json.loads((src / "model.safetensors.index.json").read_text())
    d_index = json.loads((dst / "model.safetensors.index.json").read_text())
    assert sorted(set(s_index["weight_map"].values())) == sorted(set(d_index["weight_map"].values()))
    for name, shard in d_index["weight_map"].items():
        src_name = name if name in s_index["weight_map"] else name.replace(".weight", ".qweight")
        assert s_index["weight_map"][src_name] == shard, name
    _, draw = read_dir(dst)
    assert d_index["metadata"]["total_size"] == sum(len(v) for v in draw.values())
    s_cfg = json.loads((src / "config.json").read_text())
    d_cfg = json.loads((dst / "config.json").read_text())
    assert {k: v for k, v in s_cfg.items() if k != "quantization_config"} == {k: v for k, v in d_cfg.items() if k != "quantization_config"}
    qc, sqc = d_cfg["quantization_config"], s_cfg["quantization_config"]
    assert qc["bits"] == 4 and sqc["bits"] == 3
    assert {k: v for k, v in qc.items() if k not in ("bits", "extra_config")} == {k: v for k, v in sqc.items() if k not in ("bits", "extra_config")}
    assert qc["extra_config"]["model.layers.1.mlp.gate"] == {"bits": 16, "data_type": "float"}
    assert qc["extra_config"][".*kv_b_proj.*"] == {"bits": 16, "data_type": "float"}
    assert qc["extra_config"]["model.layers.0.mlp.down_proj"] == {"bits": 8}
    assert json.loads((dst / "quantization_config.json").read_text()) == qc
    for rel in ("generation_config.json", "tokenizer_config.json", "extra/notes.txt", "README.md"):
        assert (dst / rel).read_bytes() == (src / rel).read_bytes()


def test_safetensors_library_reads_output(converted):
    _, dst = converted
    for shard in dst.glob("*.safetensors"):
        with safe_open(str(shard), framework="numpy") as f:
            names = list(f.keys())
            assert f.metadata() == {"format": "pt"}
            for n in names:
                if n.endswith(".qweight"):
                    arr = f.get_tensor(n)
                    assert arr.dtype == np.int32
    assert names


def test_manifest_hashes_and_counts(converted):
    src, dst = converted
    m = json.loads((dst / "w3repack.json").read_text())
    assert m["complete"] is True and m["tool"] == "w3repack"
    for f in m["source"]["files"]:
        assert hashlib.sha256((src / f["name"]).read_bytes()).hexdigest() == f["sha256"]
        assert (src / f["name"]).stat().st_size == f["size"]
    for f in m["output_shards"]:
        assert hashlib.sha256((dst / f["name"]).read_bytes()).hexdigest() == f["sha256"]
    assert m["counts"]["2-bit -> 4-bit"] == 1 and m["counts"]["8-bit passthrough"] == 1
    assert m["counts"]["dequantized to float32"] == 5  # kv_b_proj of layers 0, 1, 2 + MTP eh_proj, shared_head.head
    assert not (dst / ".w3repack").exists()


def test_verify_passes_then_catches_each_flipped_bit(converted, tmp_path):
    src, dst = converted
    assert verify(src, dst).ok
    shards = sorted(dst.glob("*.safetensors"))
    targets = []
    import struct

    from tests.helpers import read_raw
    for shard in shards:
        hdr, _ = read_raw(shard)
        (n,) = struct.unpack("<Q", shard.read_bytes()[:8])
        for name, e in hdr.items():
            kind = name.rsplit(".", 1)[1]
            if kind in ("qweight", "qzeros", "scales", "weight") and e["data_offsets"][1] > e["data_offsets"][0]:
                targets.append((shard.name, name, 8 + n + (e["data_offsets"][0] + e["data_offsets"][1]) // 2))
        targets.append((shard.name, None, 20))
    rng = np.random.default_rng(0)
    picks = [targets[i] for i in rng.choice(len(targets), size=12, replace=False)]
    for kind in ("qweight", "qzeros", "kv_b_proj.weight", "lm_head"):
        picks += [t for t in targets if t[1] and kind in t[1]][:1]
    for shard_name, tensor, offset in picks:
        copy = tmp_path / f"flip{offset}{shard_name}"
        shutil.copytree(dst, copy)
        p = copy / shard_name
        data = bytearray(p.read_bytes())
        data[offset] ^= 0x01
        p.write_bytes(data)
        rep = verify(src, copy)
        assert not rep.ok, (shard_name, tensor)
        if tensor is not None:
            assert rep.differences[0].tensor == tensor and rep.differences[0].offset == offset
        shutil.rmtree(copy)


def test_verify_catches_config_and_missing_files(converted, tmp_path):
    src, dst = converted
    copy = tmp_path / "c"
    shutil.copytree(dst, copy)
    cfg = json.loads((copy / "config.json").read_text())
    cfg["quantization_config"]["bits"] = 3
    (copy / "config.json").write_text(json.dumps(cfg))
    (copy / "extra" / "notes.txt").write_text("changed")
    rep = verify(src, copy)
    lines = [d.line() for d in rep.differences]
    assert not rep.ok and any("quantization_config.bits" in line for line in lines)
    assert any("notes.txt" in line for line in lines)
    os.remove(copy / "w3repack.json")
    assert not verify(src, copy).ok


def test_single_file_and_symlinked_shards(tmp_path):
    single = synth.write_checkpoint(tmp_path / "single", synth.TinySpec.small(), single_file=True)
    convert(single, tmp_path / "single4", Options())
    assert (tmp_path / "single4" / "model.safetensors").exists()
    assert not (tmp_path / "single4" / "model.safetensors.index.json").exists()
    assert verify(single, tmp_path / "single4").ok

    real = synth.write_checkpoint(tmp_path / "blobs", synth.TinySpec.small(seed=3))
    snap = tmp_path / "snapshot"
    snap.mkdir()
    for f in real.iterdir():
        if f.suffix == ".safetensors" or f.name in ("config.json", "model.safetensors.index.json"):
            (snap / f.name).symlink_to(f)  # shards and configs may be links; a copied file must lie inside SRC
        else:
            shutil.copy(f, snap / f.name)
    convert(snap, tmp_path / "snap4", Options())
    assert all(not p.is_symlink() for p in (tmp_path / "snap4").iterdir())
    assert verify(snap, tmp_path / "snap4").ok


def test_gptq_style_config(traps_ckpt, tmp_path):
    convert(traps_ckpt, tmp_path / "g", Options(quant_method="gptq"))
    qc = json.loads((tmp_path / "g" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "gptq" and qc["bits"] == 4 and qc["sym"] is True
    assert qc["desc_act"] is False and qc["checkpoint_format"] == "gptq" and qc["group_size"] == 128
    assert "-:.*kv_b_proj.*" in qc["dynamic"]
    assert any(k.startswith("-:") and "mlp\\.gate" in k for k in qc["dynamic"])
    assert qc["dynamic"]["+:model\\.layers\\.0\\.mlp\\.down_proj$"] == {"bits": 8}
    assert verify(traps_ckpt, tmp_path / "g").ok


def test_kv_b_fix_can_be_switched_off(traps_ckpt, tmp_path):
    convert(traps_ckpt, tmp_path / "q", Options(kv_b_float=False))
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert ".*kv_b_proj.*" not in cfg["extra_config"]
    _, draw = read_dir(tmp_path / "q")
    assert "model.layers.0.self_attn.kv_b_proj.qweight" in draw
    assert json.loads((tmp_path / "q" / "w3repack.json").read_text())["options"]["kv_b_float"] is False
    assert verify(traps_ckpt, tmp_path / "q").ok


def test_v32_indexer_modules_become_float(tmp_path):
    src = synth.write_checkpoint(tmp_path / "v32", synth.TinySpec.small(v32=True))
    convert(src, tmp_path / "v32w4", Options())
    dh, _ = read_dir(tmp_path / "v32w4")
    assert dh["model.layers.0.self_attn.indexer.wk.weight"]["dtype"] == "F32"
    assert dh["model.layers.0.self_attn.indexer.weights_proj.weight"]["dtype"] == "F32"
    assert dh["model.layers.0.self_attn.indexer.wq_b.qweight"]["dtype"] == "I32"
    assert verify(src, tmp_path / "v32w4").ok
    extra = json.loads((tmp_path / "v32w4" / "config.json").read_text())["quantization_config"]["extra_config"]
    assert extra[r".*indexer\.(wk|weights_proj).*"] == {"bits": 16, "data_type": "float"}


def test_v32_indexer_fix_can_be_switched_off_and_the_planner_warns(tmp_path):
    from repack.serve import launcher, planner

    src = synth.write_checkpoint(tmp_path / "v32", synth.TinySpec.small(v32=True))
    for opts, name in ((Options(), "fixed"), (Options(indexer_float=False), "raw")):
        convert(src, tmp_path / name, opts)
        assert verify(src, tmp_path / name).ok
    dh, _ = read_dir(tmp_path / "raw")
    assert dh["model.layers.0.self_attn.indexer.wk.qweight"]["dtype"] == "I32"
    assert "model.layers.0.self_attn.indexer.wk.weight" not in dh
    extra = json.loads((tmp_path / "raw" / "config.json").read_text())["quantization_config"].get("extra_config", {})
    assert not any("indexer" in k for k in extra)
    layers = synth.TinySpec.small(v32=True).layers
    warned = {}
    for name in ("fixed", "raw"):
        m, req, _ = launcher.prepare(str(tmp_path / name), gpus=1, gpu_memory=80, cc="9.0", probe=False)
        warned[name] = [w for w in planner.plan(m, req).warnings if "indexer wk/weights_proj" in w]
    assert warned["fixed"] == []
    assert len(warned["raw"]) == 1 and warned["raw"][0].startswith(f"{2 * layers} quantized indexer")


def test_source_is_untouched(src_copy, tmp_path):
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in src_copy.rglob("*") if p.is_file()}
    mtimes = {p: p.stat().st_mtime_ns for p in before}
    convert(src_copy, tmp_path / "o", Options())
    verify(src_copy, tmp_path / "o")
    after = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in src_copy.rglob("*") if p.is_file()}
    assert before == after and mtimes == {p: p.stat().st_mtime_ns for p in before}


def _shard_bytes(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.glob("*.safetensors"))}


def test_no_hash_writes_the_same_bytes_and_still_verifies(converted, tmp_path):
    src, ref = converted
    dst = tmp_path / "nohash"
    r = subprocess.run([sys.executable, "-m", "repack", "convert", str(src), str(dst), "--no-hash", "--json"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert _shard_bytes(dst) == _shard_bytes(ref)
    man = json.loads((dst / "w3repack.json").read_text())
    assert man["shard_hashes"] is False
    assert all(s["sha256"] is None for s in man["output_shards"] + man["source"]["files"])
    rep = verify(src, dst)
    assert rep.ok and rep.hashes_checked == 0 and rep.to_json()["shard_hashes_checked"] == 0
    assert verify(src, ref).hashes_checked == len(man["output_shards"])

    shard = max(dst.glob("*.safetensors"), key=lambda p: p.stat().st_size)
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(data)
    bad = verify(src, dst)
    assert not bad.ok and shard.name in bad.differences[0].line()


def test_hashing_rerun_redoes_unhashed_shards_and_no_hash_rerun_keeps_them(converted, tmp_path):
    src, ref = converted
    dst = tmp_path / "o"
    convert(src, dst, Options(), RunConfig(hashes=False))
    res = convert(src, dst, Options())
    assert res.shards_kept == [] and len(res.shards_written) == len(res.plan.shards)
    man = json.loads((dst / "w3repack.json").read_text())
    ref_man = json.loads((ref / "w3repack.json").read_text())
    assert man["shard_hashes"] is True and man["output_shards"] == ref_man["output_shards"]
    assert man["source"]["files"] == ref_man["source"]["files"]
    res = convert(src, dst, Options(), RunConfig(hashes=False))
    assert res.shards_written == [] and len(res.shards_kept) == len(res.plan.shards)
    assert json.loads((dst / "w3repack.json").read_text())["output_shards"] == ref_man["output_shards"]
    assert verify(src, dst).ok


def test_verify_flags_a_hashed_manifest_that_lost_a_hash(converted, tmp_path):
    src, ref = converted
    dst = tmp_path / "copy"
    shutil.copytree(ref, dst)
    man = json.loads((dst / "w3repack.json").read_text())
    victim = man["output_shards"][0]["name"]
    man["output_shards"][0]["sha256"] = None
    (dst / "w3repack.json").write_text(json.dumps(man))
    rep = verify(src, dst)
    assert not rep.ok and any(f"no sha256 recorded for {victim}" in d.line() for d in rep.differences)


@pytest.fixture(scope="module")
def wide_ckpt(tmp_path_factory) -> Path:
    """Experts with qweights of several MiB: tensors cross read blocks and write buffers at odd offsets."""
    spec = synth.TinySpec(hidden=2048, moe_intermediate=1536, intermediate=3072, experts=4, layers=2, mtp=False,
                          shard_bytes=16 << 20)
    return synth.write_checkpoint(tmp_path_factory.mktemp("wide") / "src", spec)


@pytest.fixture(scope="module")
def wide_ref(wide_ckpt, tmp_path_factory) -> Path:
    """The wide checkpoint converted with buffered I/O, checked against the independent decoder (a sample)."""
    dst = tmp_path_factory.mktemp("wide_ref") / "o"
    mp = pytest.MonkeyPatch()
    mp.setenv("W3REPACK_DIRECT_IO", "0")
    try:
        convert(wide_ckpt, dst, Options(), RunConfig(workers=2))
    finally:
        mp.undo()
    sh, sraw = read_dir(wide_ckpt)
    dh, draw = read_dir(dst)
    q3 = sorted((n for n in sh if n.endswith(".qweight") and "kv_b_proj" not in n
                 and _width(sh, n[: -len(".qweight")]) == 3), key=lambda n: -len(sraw[n]))
    for name in q3[:2] + q3[-1:]:
        q = decode_bigint(sraw[name], sh[name]["shape"], 3)
        assert np.array_equal(decode_bigint(draw[name], dh[name]["shape"], 4), q + 4), name
    for name in sh:
        if not name.endswith((".qweight", ".qzeros")) and "kv_b_proj" not in name:
            assert draw[name] == sraw[name], name
    return dst


@pytest.mark.parametrize("direct", ["1", "0"], ids=["direct-io", "buffered-io"])
@pytest.mark.parametrize("spread", [False, True], ids=["hash-in-worker", "output-hash-on-own-thread"])
def test_io_mode_and_hash_placement_do_not_change_a_byte(wide_ckpt, wide_ref, tmp_path, monkeypatch, direct, spread):
    import repack.convert as conv
    import repack.verify as ver

    monkeypatch.setenv("W3REPACK_DIRECT_IO", direct)
    monkeypatch.setattr(conv, "cores", lambda: 64 if spread else 1)
    monkeypatch.setattr(ver, "cores", lambda: 64 if spread else 1)
    dst = tmp_path / "o"
    res = convert(wide_ckpt, dst, Options(), RunConfig(workers=2))
    assert len(res.plan.shards) >= 3 and max(s.out_size for s in res.plan.shards) > 3 * (4 << 20)
    assert _shard_bytes(dst) == _shard_bytes(wide_ref)
    for s in res.manifest.to_json()["output_shards"]:
        assert s["sha256"] == hashlib.sha256((dst / s["name"]).read_bytes()).hexdigest()
    for s in res.manifest.to_json()["source"]["files"]:
        assert s["sha256"] == hashlib.sha256((wide_ckpt / s["name"]).read_bytes()).hexdigest()
    rep = verify(wide_ckpt, dst)
    assert rep.ok and rep.hashes_checked == len(res.plan.shards)
    data = bytearray((dst / res.plan.shards[0].name).read_bytes())
    data[-3] ^= 0x10
    (dst / res.plan.shards[0].name).write_bytes(data)
    assert not verify(wide_ckpt, dst).ok
