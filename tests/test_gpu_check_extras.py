"""The CPU parts of scripts/gpu_check_extras.py: the dense float reference, the engine plan and the judgement."""

import json

import numpy as np

from repack import synth
from repack.convert import convert
from repack.plan import Options
from scripts import gpu_check_extras as gx
from tests.helpers import decode_bigint, floats, read_dir


def test_dense_reference_is_the_exact_float_model_with_a_v3_config(tmp_path):
    src = synth.write_checkpoint(tmp_path / "src", synth.TinySpec.small(v32=True))
    ref = tmp_path / "ref"
    gx.write_dense_reference(src, ref)
    cfg = json.loads((ref / "config.json").read_text())
    s_cfg = json.loads((src / "config.json").read_text())
    assert cfg["architectures"] == ["DeepseekV3ForCausalLM"] and cfg["model_type"] == "deepseek_v3"
    assert "quantization_config" not in cfg and not any(k.startswith("index") for k in cfg)
    assert {k: v for k, v in cfg.items() if k not in ("architectures", "model_type")} == {
        k: v for k, v in s_cfg.items() if k not in ("architectures", "model_type", "quantization_config", "index_topk",
                                                    "index_head_dim", "index_n_heads")}
    sh, sraw = read_dir(src)
    rh, rraw = read_dir(ref)
    index = json.loads((ref / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(rh) and not any(".indexer." in n for n in rh)
    assert index["metadata"]["total_size"] == sum(len(v) for v in rraw.values())
    for p in ("model.layers.1.mlp.experts.3.down_proj", "model.layers.2.eh_proj", "model.layers.0.self_attn.kv_b_proj"):
        bits = 32 * sh[p + ".qzeros"]["shape"][1] // sh[p + ".scales"]["shape"][1]
        q = decode_bigint(sraw[p + ".qweight"], sh[p + ".qweight"]["shape"], bits)
        s = floats(sraw[p + ".scales"], "F16").reshape(sh[p + ".scales"]["shape"])
        want = ((q - (1 << (bits - 1))) * s[np.arange(q.shape[0]) // 128]).T
        got = np.frombuffer(rraw[p + ".weight"], "<f4").reshape(rh[p + ".weight"]["shape"])
        assert np.array_equal(got.astype(np.float64), want), p
    assert rraw["model.layers.1.mlp.gate.weight"] == sraw["model.layers.1.mlp.gate.weight"]
    # the dense conversion carries the same non-indexer float tensors as the reference
    convert(src, tmp_path / "d", Options(dense_attention=True))
    dh, draw = read_dir(tmp_path / "d")
    assert {n for n in dh if n.endswith(("norm.weight", "gate.weight", "embed_tokens.weight"))} == \
        {n for n in rh if n.endswith(("norm.weight", "gate.weight", "embed_tokens.weight"))}


def _rec(tokens, lp=None, **kw):
    return dict({"rc": 0, "info": {"load_seconds": 1}, "seconds": 2,
                 "results": {"short_4": {"tokens": tokens, "logprobs": lp or []}}}, **kw)


def test_evaluate_fails_on_split_tokens_and_passes_a_near_tie():
    speed = {"decode": {"1": {"tokens_per_s": 100.0}, "8": {"tokens_per_s": 400.0}},
             "decode_tokens": {"1": [[1, 2]], "8": [[1, 2]] * 8}}
    eng = {"mtp-w4": _rec([5, 6, 7], **speed), "mtp-w4-spec": _rec([5, 6, 7], **speed, acceptance_rate=0.5),
           "v32-dense-ref": _rec([1, 2]), "v32-dense-w4": _rec([1, 2]),
           "v32-dense-native": _rec([1, 3]), "mtp-src-spec": {"rc": 1, "error_line": "RuntimeError: The size of tensor a (96)"}}
    rows = {r["check"]: r["status"] for r in gx.evaluate(eng)}
    assert rows["mtp-w4-spec vs mtp-w4: greedy short_4"] == "PASS"
    assert rows["v32-dense-w4 vs float dense reference: greedy short_4"] == "PASS"
    assert rows["v32-dense-native vs float dense reference: greedy short_4"] == "WARN"  # native kernels: not strict
    assert rows["3-bit source with deepseek_mtp"] == "INFO" and rows["mtp-native-spec serves"] == "SKIP"
    eng["mtp-w4-spec"] = _rec([5, 9, 7], **speed)
    assert {r["check"]: r["status"] for r in gx.evaluate(eng)}["mtp-w4-spec vs mtp-w4: greedy short_4"] == "FAIL"
    # with log-probs: a split where the reference's own margin is within tolerance is a near tie
    lp_a = [{"5": -0.1}, {"9": -0.70, "6": -0.71}, {"7": -0.2}]
    lp_b = [{"5": -0.1}, {"6": -0.70, "9": -0.71}, {"7": -0.2}]
    eng["mtp-w4-spec"], eng["mtp-w4"] = _rec([5, 9, 7], lp_a, **speed), _rec([5, 6, 7], lp_b, **speed)
    assert {r["check"]: r["status"] for r in gx.evaluate(eng)}["mtp-w4-spec vs mtp-w4: greedy short_4"] == "PASS"
    eng["mtp-w4-spec"] = {"rc": 1, "error_line": "KeyError: 'model.layers.2.eh_proj.qweight'"}
    rows = {r["check"]: (r["status"], r["detail"]) for r in gx.evaluate(eng)}
    assert rows["mtp-w4-spec serves"] == ("FAIL", "rc=1: KeyError: 'model.layers.2.eh_proj.qweight'")


def test_engine_plan_and_error_line():
    names = [n for n, _ in gx.engines_plan({k: k for k in ("mtp_w4", "mtp_src", "mtp_native", "v32_dense_ref", "v32_dense_w4",
                                                            "v32_dense_native", "v32_w4")}, gx.prompts())]
    assert names[:2] == ["mtp-w4", "mtp-w4-spec"] and len(names) == len(set(names))
    log = "INFO x\nTraceback (most recent call last):\n  File x\nKeyError: 'model.layers.2.eh_proj.qweight'\nINFO shutdown\n"
    assert gx.error_line(log) == "KeyError: 'model.layers.2.eh_proj.qweight'"
    log += "RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {}\n"
    assert gx.error_line(log) == "KeyError: 'model.layers.2.eh_proj.qweight'"
    pr = gx.prompts()
    assert len(pr["decode"]) == 8 and all(len(p) + 24 <= 64 for p in pr["short"].values())
