"""The planner's inputs under hostile values: config.json and the index read through the converter's bounded
strict readers, every config value it uses checked for type and range (one ``error:`` line naming the key, exit 2),
no allocation proportional to a config number, and one verdict for plan and launch."""

import json
import os
import time

import pytest

from repack import synth
from repack.convert import convert
from repack.plan import Options
from repack.run import RunConfig
from tests.helpers import w3repack as run

ARGS = ["--gpus", "2", "--gpu-memory", "80", "--compute-capability", "9.0"]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    src = synth.write_checkpoint(root / "w3", synth.TinySpec.small())
    convert(src, root / "w4", Options(), RunConfig(workers=1))
    return root / "w4"


@pytest.fixture()
def model(converted, tmp_path):
    """A copy of the converted tiny model whose config.json and index each test may change."""
    dst = tmp_path / "m"
    dst.mkdir()
    for p in converted.iterdir():
        if p.is_file():
            (dst / p.name).write_bytes(p.read_bytes())
    return dst


def _refused(r, *needles):
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1, r.stderr
    for n in needles:
        assert n in r.stderr, r.stderr
    assert "internal error" not in r.stderr


def _config(model, **change):
    cfg = json.loads((model / "config.json").read_text())
    cfg.update(change)
    (model / "config.json").write_text(json.dumps(cfg))


def test_huge_sparse_config_is_refused_without_reading_it(model):
    with open(model / "config.json", "r+b") as f:
        f.truncate(2 << 30)  # a 2 GiB file of holes
    t = time.monotonic()
    _refused(run("plan", model, *ARGS), "config.json", "bytes allowed")
    assert time.monotonic() - t < 30


def test_config_that_is_a_fifo_does_not_hang(model):
    (model / "config.json").unlink()
    os.mkfifo(model / "config.json")
    _refused(run("plan", model, *ARGS, timeout=60), "config.json", "not a regular file")


def test_duplicate_keys_and_nan_are_refused(model):
    text = (model / "config.json").read_text()
    (model / "config.json").write_text(text.replace("{", '{"num_hidden_layers": 2, ', 1))
    _refused(run("plan", model, *ARGS), "config.json", "duplicate key 'num_hidden_layers'")
    (model / "config.json").write_text(text.replace('"hidden_size": ', '"hidden_size": NaN, "x": ', 1))
    _refused(run("plan", model, *ARGS), "config.json", "NaN is not a JSON number")


@pytest.mark.parametrize("key, value, needle", [
    ("num_hidden_layers", 10**12, "num_hidden_layers is 1000000000000, more than 10000"),
    ("num_hidden_layers", "2", "num_hidden_layers is '2', expected a positive integer"),
    ("num_attention_heads", -8, "num_attention_heads is -8, expected a positive integer"),
    ("hidden_size", 0, "hidden_size is 0, expected a positive integer"),
    ("kv_lora_rank", 1.5, "kv_lora_rank is 1.5, expected a positive integer"),
    ("vocab_size", True, "vocab_size is True, expected a positive integer"),
    ("max_position_embeddings", None, None),  # absent values are allowed (the model's limit is then unknown)
    ("num_nextn_predict_layers", -1, "num_nextn_predict_layers is -1, expected an integer from 0 to 10000"),
    ("torch_dtype", 16, "torch_dtype is 16, expected a string"),
])
def test_config_values_are_checked_for_type_and_range(model, key, value, needle):
    _config(model, **{key: value})
    t = time.monotonic()
    r = run("plan", model, *ARGS)
    assert time.monotonic() - t < 30  # no allocation or loop proportional to a config number
    if needle is None:
        assert r.returncode == 0, r.stderr
    else:
        _refused(r, "config.json", needle)


def test_index_shard_outside_the_folder_is_refused(model):
    idx = json.loads((model / "model.safetensors.index.json").read_text())
    first = next(iter(idx["weight_map"]))
    idx["weight_map"][first] = "/etc/passwd"
    (model / "model.safetensors.index.json").write_text(json.dumps(idx))
    _refused(run("plan", model, *ARGS), "model.safetensors.index.json", "is not a plain relative file name")


def test_plan_and_launch_give_one_verdict(model, tmp_path):
    """TP 3 does not split 2 heads: plan says so in every section, and launch refuses for the same reason."""
    r = run("plan", model, "--gpus", "3", "--gpu-memory", "80", "--compute-capability", "9.0", "--json")
    p = json.loads(r.stdout)
    assert p["fits"] is False and p["paths"][0]["fits"] is False
    assert "num_attention_heads 2 is not divisible by TP 3" in p["reason"]
    text = run("plan", model, "--gpus", "3", "--gpu-memory", "80", "--compute-capability", "9.0").stdout
    assert "fits: yes" not in text and "fits              yes" not in text and "fits              NO" in text
    out = tmp_path / "serve.sh"
    r = run("launch", model, "--gpus", "3", "--gpu-memory", "80", "--compute-capability", "9.0", "-o", out)
    _refused(r, "num_attention_heads 2 is not divisible by TP 3")
    assert not out.exists()
