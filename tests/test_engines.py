"""MTP float emission, the native (3-bit) target and the V3.2 dense-attention fallback.

Float weights are judged by the independent big-integer decoder (tests/helpers.py); configs against literals written
here from vLLM's rules (0.33 ``inc/config_parser.py``: exact name, then the first regex key with a special character,
``re.search``; ``gptq_utils.get_dynamic_override``: first ``re.match`` in order).
"""

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from repack import synth
from repack.convert import convert
from repack.plan import Options
from repack.verify import verify
from tests.helpers import decode_bigint, floats, read_dir, read_raw
from tests.helpers import w3repack as _cli

SPEC = synth.TinySpec.small()  # 2 layers + MTP layer 2 (4-bit under bits: 3)
MTP_FLOAT = ["model.layers.2.eh_proj", "model.layers.2.shared_head.head"]
MTP_FLOAT_KEY = r"model\.layers\.2\.(eh_proj|shared_head\.head|head|embed_tokens)$"
MTP_LAYER_KEY = r"model\.layers\.2\."
REGEX_CHARS = set(r"*+?^$()[]{}|\\")


def inc_bits(extra: dict, base: int, name: str) -> int:
    """vLLM 0.33 INC: the bits an ``extra_config`` gives the module vLLM calls ``name``."""
    if name in extra:
        return extra[name].get("bits", base)
    for key, cfg in extra.items():
        if any(c in REGEX_CHARS for c in key) and re.search(key, name):
            return cfg.get("bits", base)
    return base


def gptq_rule(dynamic: dict, name: str):
    """vLLM GPTQ ``dynamic``: False (unquantized), the ``+:`` rule, or None."""
    for key, cfg in dynamic.items():
        if key.startswith("-:") and re.match(key[2:], name):
            return False
        if key.startswith("+:") and re.match(key[2:], name):
            return cfg
    return None


def exact_float(sh, sraw, prefix) -> np.ndarray:
    """Dequantized ``[N, K]`` from the independent decoder, in float64 (exact for these values)."""
    qw = sh[prefix + ".qweight"]
    bits = 32 * sh[prefix + ".qzeros"]["shape"][1] // sh[prefix + ".scales"]["shape"][1]
    q = decode_bigint(sraw[prefix + ".qweight"], qw["shape"], bits)
    s = floats(sraw[prefix + ".scales"], sh[prefix + ".scales"]["dtype"]).reshape(sh[prefix + ".scales"]["shape"])
    g = q.shape[0] // s.shape[0]
    return ((q - (1 << (bits - 1))) * s[np.arange(q.shape[0]) // g]).T


@pytest.fixture(scope="module")
def mtp_src(tmp_path_factory) -> Path:
    return synth.write_checkpoint(tmp_path_factory.mktemp("mtp") / "src", SPEC)


@pytest.fixture(scope="module")
def v32_src(tmp_path_factory) -> Path:
    return synth.write_checkpoint(tmp_path_factory.mktemp("v32") / "src", synth.TinySpec.small(v32=True))




def _flip(dst: Path, tensor: str, tmp: Path) -> Path:
    """Copy of ``dst`` with one bit flipped in the middle of ``tensor``."""
    copy = tmp / ("flip-" + tensor)
    shutil.copytree(dst, copy)
    index = json.loads((copy / "model.safetensors.index.json").read_text())
    shard = copy / index["weight_map"][tensor]
    hdr, _ = read_raw(shard)
    n = int.from_bytes(shard.read_bytes()[:8], "little")
    b, e = hdr[tensor]["data_offsets"]
    data = bytearray(shard.read_bytes())
    data[8 + n + (b + e) // 2] ^= 0x04
    shard.write_bytes(data)
    return copy


# ---------------------------------------------------------------- MTP


def test_mtp_float_modules_are_the_exact_dequantization(mtp_src, tmp_path):
    dst = tmp_path / "o"
    r = _cli("convert", mtp_src, dst, "--json")
    assert r.returncode == 0, r.stderr
    sh, sraw = read_dir(mtp_src)
    dh, draw = read_dir(dst)
    for p in MTP_FLOAT:
        assert p + ".qweight" not in dh and p + ".scales" not in dh
        assert dh[p + ".weight"]["dtype"] == "F32"
        got = np.frombuffer(draw[p + ".weight"], "<f4").reshape(dh[p + ".weight"]["shape"])
        assert np.array_equal(got.astype(np.float64), exact_float(sh, sraw, p)), p
    # the rest of the MTP layer: 4-bit in the source, passed through byte for byte
    for p in ("model.layers.2.self_attn.q_a_proj", "model.layers.2.mlp.experts.0.down_proj"):
        for part in ("qweight", "qzeros", "scales"):
            assert draw[f"{p}.{part}"] == sraw[f"{p}.{part}"]
    for t in ("model.layers.2.enorm.weight", "model.layers.2.hnorm.weight", "model.layers.2.shared_head.norm.weight"):
        assert draw[t] == sraw[t]
    man = json.loads((dst / "w3repack.json").read_text())
    assert man["options"]["mtp_float"] is True and man["target"] == "repack"
    mtp_bytes = sum(len(v) for k, v in draw.items() if k.startswith("model.layers.2."))
    assert man["mtp"] == {"layers": [2], "float_modules": {"2": ["eh_proj", "shared_head.head"]}, "bits": {"2": 4},
                          "bytes": {"2": mtp_bytes}}
    assert set(MTP_FLOAT) <= set(man["float_modules"])
    assert verify(mtp_src, dst).ok


def test_mtp_config_states_every_width_vllm_needs(mtp_src, tmp_path):
    convert(mtp_src, tmp_path / "a", Options())
    convert(mtp_src, tmp_path / "g", Options(quant_method="gptq"))
    qc = json.loads((tmp_path / "a" / "config.json").read_text())["quantization_config"]
    assert qc["bits"] == 4
    assert qc["extra_config"] == {
        "model.layers.1.mlp.gate": {"bits": 16, "data_type": "float"},
        ".*kv_b_proj.*": {"bits": 16, "data_type": "float"},
        MTP_FLOAT_KEY: {"bits": 16, "data_type": "float"},
    }  # the MTP layer is 4-bit like the base: no rule of its own
    extra = qc["extra_config"]
    # vLLM's names for the MTP layer (deepseek_mtp: head is "model.layers.2.head", experts fused)
    want = {"model.layers.2.head": 16, "model.layers.2.mlp.experts": 4, "model.layers.2.self_attn.q_a_proj": 4,
            "model.layers.2.self_attn.kv_b_proj": 16, "model.layers.2.mlp.shared_experts.gate_up_proj": 4,
            "model.layers.2.eh_proj": 16, "model.layers.1.mlp.experts": 4, "model.layers.12.eh_proj": 4}
    assert {n: inc_bits(extra, 4, n) for n in want} == want
    dyn = json.loads((tmp_path / "g" / "config.json").read_text())["quantization_config"]["dynamic"]
    assert dyn == {
        r"-:model\.layers\.1\.mlp\.gate$": {},
        "-:.*kv_b_proj.*": {},
        "-:" + MTP_FLOAT_KEY: {},
    }
    assert gptq_rule(dyn, "model.layers.2.head") is False and gptq_rule(dyn, "model.layers.2.eh_proj") is False
    assert gptq_rule(dyn, "model.layers.2.mlp.experts") is None  # base bits 4
    assert gptq_rule(dyn, "model.layers.2.self_attn.kv_b_proj") is False
    assert gptq_rule(dyn, "model.layers.1.mlp.experts") is None
    assert verify(mtp_src, tmp_path / "g").ok


def test_mtp_float_can_be_switched_off(mtp_src, tmp_path):
    r = _cli("convert", mtp_src, tmp_path / "q", "--no-mtp-float")
    assert r.returncode == 0, r.stderr
    dh, _ = read_dir(tmp_path / "q")
    assert dh["model.layers.2.eh_proj.qweight"]["dtype"] == "I32"
    man = json.loads((tmp_path / "q" / "w3repack.json").read_text())
    assert man["options"]["mtp_float"] is False and man["mtp"]["float_modules"] == {}
    extra = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["extra_config"]
    assert MTP_FLOAT_KEY not in extra and MTP_LAYER_KEY not in extra
    assert verify(mtp_src, tmp_path / "q").ok


def test_verify_catches_a_flipped_bit_in_the_mtp_float_weight(mtp_src, tmp_path):
    dst = tmp_path / "o"
    convert(mtp_src, dst, Options())
    for t in ("model.layers.2.eh_proj.weight", "model.layers.2.shared_head.head.weight"):
        rep = verify(mtp_src, _flip(dst, t, tmp_path))
        assert not rep.ok and rep.differences[0].tensor == t
        assert "exact dequantization" in rep.differences[0].message


def test_manifest_without_the_new_options_verifies_as_written_before_them(mtp_src, tmp_path):
    """Outputs of earlier versions: their manifest has no mtp_float/target/dense_attention and no MTP float."""
    dst = tmp_path / "old"
    convert(mtp_src, dst, Options(mtp_float=False))
    man = json.loads((dst / "w3repack.json").read_text())
    for d in (man["options"], man["fingerprint"]["options"]):
        for k in ("mtp_float", "dense_attention", "target"):
            del d[k]
    for k in ("mtp", "dense_attention", "target"):
        del man[k]
    (dst / "w3repack.json").write_text(json.dumps(man, indent=2) + "\n")
    assert verify(mtp_src, dst).ok


def test_verify_catches_an_edited_manifest_record(mtp_src, tmp_path):
    dst = tmp_path / "o"
    convert(mtp_src, dst, Options())
    man = json.loads((dst / "w3repack.json").read_text())
    man["mtp"]["bits"]["2"] = 3
    (dst / "w3repack.json").write_text(json.dumps(man))
    rep = verify(mtp_src, dst)
    assert not rep.ok and any("manifest record mtp" in d.line() for d in rep.differences)


# ---------------------------------------------------------------- native target


def test_native_target_keeps_3bit_bytes_and_fixes_what_vllm_cannot_load(mtp_src, tmp_path):
    dst = tmp_path / "n"
    r = _cli("convert", mtp_src, dst, "--target", "native")
    assert r.returncode == 0, r.stderr
    sh, sraw = read_dir(mtp_src)
    dh, draw = read_dir(dst)
    for name in sh:
        if not any(name.startswith(p + ".") for p in MTP_FLOAT):
            assert draw[name] == sraw[name] and dh[name] == {**sh[name], "data_offsets": dh[name]["data_offsets"]}, name
    assert "model.layers.0.self_attn.kv_b_proj.qweight" in dh  # kv_b_proj stays quantized by default (vLLM >= 0.28)
    for p in MTP_FLOAT:
        got = np.frombuffer(draw[p + ".weight"], "<f4").reshape(dh[p + ".weight"]["shape"])
        assert np.array_equal(got.astype(np.float64), exact_float(sh, sraw, p)), p
    s_cfg = json.loads((mtp_src / "config.json").read_text())
    d_cfg = json.loads((dst / "config.json").read_text())
    assert {k: v for k, v in d_cfg.items() if k != "quantization_config"} == {k: v for k, v in s_cfg.items() if k != "quantization_config"}
    qc = d_cfg["quantization_config"]
    assert {k: v for k, v in qc.items() if k != "extra_config"} == {k: v for k, v in s_cfg["quantization_config"].items() if k != "extra_config"}
    assert qc["bits"] == 3
    assert qc["extra_config"] == {
        "model.layers.1.mlp.gate": {"bits": 16, "data_type": "float"},
        MTP_FLOAT_KEY: {"bits": 16, "data_type": "float"},
        MTP_LAYER_KEY: {"bits": 4},
    }
    # what vLLM's native path reads: base layers 3-bit, the whole MTP layer (fused experts too) 4-bit
    assert inc_bits(qc["extra_config"], 3, "model.layers.1.mlp.experts") == 3
    assert inc_bits(qc["extra_config"], 3, "model.layers.2.mlp.experts") == 4
    assert inc_bits(qc["extra_config"], 3, "model.layers.2.self_attn.fused_qkv_a_proj".replace("fused_qkv_a_proj", "q_a_proj")) == 4
    assert json.loads((dst / "quantization_config.json").read_text()) == qc
    man = json.loads((dst / "w3repack.json").read_text())
    assert man["target"] == "native" and man["options"]["target"] == "native" and man["options"]["kv_b_float"] is False
    assert man["counts"]["3-bit passthrough"] > 0 and "3-bit -> 4-bit" not in man["counts"]
    assert verify(mtp_src, dst).ok
    rep = verify(mtp_src, _flip(dst, "model.layers.1.mlp.experts.0.up_proj.qweight", tmp_path))
    assert not rep.ok and rep.differences[0].tensor == "model.layers.1.mlp.experts.0.up_proj.qweight"


def test_native_target_keeps_v32_indexer_fix(v32_src, tmp_path):
    dst = tmp_path / "n"
    convert(v32_src, dst, Options(target="native", kv_b_float=False))
    dh, _ = read_dir(dst)
    assert dh["model.layers.0.self_attn.indexer.wk.weight"]["dtype"] == "F32"
    assert dh["model.layers.0.self_attn.indexer.wq_b.qweight"]["shape"][0] == 128 * 3 // 32  # still 3-bit
    extra = json.loads((dst / "config.json").read_text())["quantization_config"]["extra_config"]
    assert extra[r".*indexer\.(wk|weights_proj).*"] == {"bits": 16, "data_type": "float"}
    assert verify(v32_src, dst).ok


def test_native_target_refuses_a_gptq_config(mtp_src, tmp_path):
    r = _cli("convert", mtp_src, tmp_path / "x", "--target", "native", "--quant-method", "gptq")
    assert r.returncode == 2 and r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1
    assert "native" in r.stderr and not (tmp_path / "x").exists()


# ---------------------------------------------------------------- dense attention


def _dense_config_by_hand(src_cfg: dict) -> dict:
    cfg = dict(src_cfg)
    for k in ("index_topk", "index_head_dim", "index_n_heads"):
        del cfg[k]
    cfg["architectures"] = ["DeepseekV3ForCausalLM"]
    cfg["model_type"] = "deepseek_v3"
    return cfg


@pytest.mark.parametrize("target", ["repack", "native"])
def test_dense_attention_writes_a_v3_config_and_leaves_the_indexer_out(v32_src, tmp_path, target):
    dst = tmp_path / target
    r = _cli("convert", v32_src, dst, "--dense-attention", "--target", target, "--json")
    assert r.returncode == 0, r.stderr
    s_cfg = json.loads((v32_src / "config.json").read_text())
    d_cfg = json.loads((dst / "config.json").read_text())
    want = _dense_config_by_hand(s_cfg)
    assert {k: v for k, v in d_cfg.items() if k != "quantization_config"} == {k: v for k, v in want.items() if k != "quantization_config"}
    assert not any(k.startswith("index") for k in d_cfg)
    assert not any("indexer" in k for k in d_cfg["quantization_config"].get("extra_config", {}))
    sh, sraw = read_dir(v32_src)
    dh, draw = read_dir(dst)
    assert not any(".indexer." in n for n in dh)
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    assert not any(".indexer." in n for n in index["weight_map"]) and set(index["weight_map"]) == set(dh)
    for name in sh:  # everything else as without the option: float tensors byte for byte
        if ".indexer." not in name and sh[name]["dtype"] == "BF16":
            assert draw[name] == sraw[name], name
    man = json.loads((dst / "w3repack.json").read_text())
    n_indexer = sum(".indexer." in n for n in sh)
    assert man["dense_attention"] == {
        "architectures": {"from": ["DeepseekV32ForCausalLM"], "to": ["DeepseekV3ForCausalLM"]},
        "model_type": {"from": "deepseek_v32", "to": "deepseek_v3"},
        "removed_config_keys": {"index_head_dim": 128, "index_n_heads": 8, "index_topk": 64},
        "index_topk": 64,
        "exact_up_to_tokens": 64,
        "meaning": man["dense_attention"]["meaning"],
        "dropped_tensors": n_indexer,
        "dropped_bytes": sum(len(sraw[n]) for n in sh if ".indexer." in n),
    }
    assert "index_topk" in man["dense_attention"]["meaning"] and "approximation" in man["dense_attention"]["meaning"]
    assert man["options"]["dense_attention"] is True and man["counts"]["tensors left out"] == n_indexer
    assert verify(v32_src, dst).ok


def test_verify_checks_the_dense_rewrite_exactly(v32_src, tmp_path):
    dst = tmp_path / "d"
    convert(v32_src, dst, Options(dense_attention=True))
    bad = tmp_path / "bad"
    shutil.copytree(dst, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["index_topk"] = 64
    (bad / "config.json").write_text(json.dumps(cfg))
    rep = verify(v32_src, bad)
    assert not rep.ok and any("unexpected key index_topk" in d.line() for d in rep.differences)
    cfg.pop("index_topk")
    cfg["architectures"] = ["DeepseekV32ForCausalLM"]
    (bad / "config.json").write_text(json.dumps(cfg))
    assert not verify(v32_src, bad).ok
    # an output made without the option does not pass for one made with it
    plain = tmp_path / "plain"
    convert(v32_src, plain, Options())
    man = json.loads((plain / "w3repack.json").read_text())
    man["options"]["dense_attention"] = man["fingerprint"]["options"]["dense_attention"] = True
    (plain / "w3repack.json").write_text(json.dumps(man))
    assert not verify(v32_src, plain).ok
    rep = verify(v32_src, _flip(dst, "model.layers.1.mlp.experts.0.gate_proj.qweight", tmp_path))
    assert not rep.ok and rep.differences[0].tensor == "model.layers.1.mlp.experts.0.gate_proj.qweight"


def test_dense_attention_refuses_a_v3_checkpoint(mtp_src, tmp_path):
    r = _cli("convert", mtp_src, tmp_path / "x", "--dense-attention")
    assert r.returncode == 2 and r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1
    assert str(mtp_src / "config.json") in r.stderr and "DeepseekV3ForCausalLM" in r.stderr


def test_card_states_the_dense_rewrite_and_the_native_target(v32_src, tmp_path):
    from repack.card import build_card

    dst = tmp_path / "d"
    convert(v32_src, dst, Options(dense_attention=True, target="native", kv_b_float=False))
    card = build_card(dst, "me/x")
    assert "`DeepseekV3ForCausalLM` / `deepseek_v3` instead of `DeepseekV32ForCausalLM` / `deepseek_v32`" in card
    assert "up to 64 tokens" in card and "approximation" in card and "`index_topk: 64`" in card
    assert "Fix-up of" in card and "4-bit GPTQ repack" not in card
    assert "Multi-token prediction: MTP layer(s) 2" in card and "layer 2: 4-bit" in card
