"""checkpoint: widths from shapes, the index against the shards, and pre-read headers (a hub snapshot)."""

from __future__ import annotations

import json
import shutil

import pytest

from repack import synth
from repack.checkpoint import INDEX_NAME, module_override, open_checkpoint, read_index
from repack.errors import FormatError, UserError
from repack.safetensors_io import read_header


def test_widths_come_from_shapes_not_the_config(traps_ckpt):
    ckpt = open_checkpoint(traps_ckpt)
    assert ckpt.quant_config["bits"] == 3
    widths = {m.bits for m in ckpt.modules.values()}
    assert widths == {2, 3, 4, 8}
    for m in ckpt.modules.values():
        assert m.qweight.info.shape == (m.k * m.bits // 32, m.n)
        assert m.scales.info.shape == (m.k // m.group_size, m.n)
    assert ckpt.module_of(next(iter(ckpt.modules)) + ".qweight") is not None
    assert all(ckpt.module_of(t) is None for t in ckpt.float_tensors())


def test_pre_read_headers_give_the_same_checkpoint_without_the_shards(traps_ckpt, tmp_path):
    """What a hub source does: headers read elsewhere, the shard files absent."""
    snap = tmp_path / "snap"
    shutil.copytree(traps_ckpt, snap)
    _, names = read_index(snap)
    headers = {n: read_header(snap / n) for n in names}
    for n in names:
        (snap / n).unlink()
    with pytest.raises(FormatError, match="which is missing"):
        open_checkpoint(snap)
    ckpt = open_checkpoint(snap, headers)
    ref = open_checkpoint(traps_ckpt)
    assert ckpt.tensor_shard == ref.tensor_shard and ckpt.modules.keys() == ref.modules.keys()
    assert [m.bits for m in ckpt.modules.values()] == [m.bits for m in ref.modules.values()]
    with pytest.raises(FormatError, match="headers read for shards"):
        open_checkpoint(snap, dict(list(headers.items())[1:]))


def test_index_mapping_a_tensor_to_the_wrong_shard_names_both(src_copy):
    ipath = src_copy / INDEX_NAME
    index = json.loads(ipath.read_text())
    names = sorted(set(index["weight_map"].values()))
    t = next(t for t, s in index["weight_map"].items() if s == names[0])
    index["weight_map"][t] = names[1]
    ipath.write_text(json.dumps(index))
    with pytest.raises(FormatError, match=f"tensor {t} is mapped to {names[1]} but stored in {names[0]}"):
        open_checkpoint(src_copy)


def test_single_file_without_index(tmp_path):
    root = synth.write_checkpoint(tmp_path / "one", synth.TinySpec.small(), single_file=True)
    assert read_index(root) == (None, ["model.safetensors"])
    assert open_checkpoint(root).index is None
    (root / "model.safetensors").unlink()
    with pytest.raises(UserError, match="not a safetensors checkpoint"):
        read_index(root)
    assert read_index(root, files_present=False) == (None, ["model.safetensors"])


def test_module_override_exact_name_before_regex():
    qc = {"extra_config": {r".*mlp.*": {"bits": 8}, "model.layers.0.mlp.up": {"bits": 4}, "[": {"bits": 2}}}
    assert module_override(qc, "model.layers.0.mlp.up") == {"bits": 4}
    assert module_override(qc, "model.layers.1.mlp.up") == {"bits": 8}
    assert module_override(qc, "model.layers.1.attn") == {}
    assert module_override({"extra_config": ["x"]}, "a") == {}
