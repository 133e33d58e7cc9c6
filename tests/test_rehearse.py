"""Rehearsal: rank models from the planner's sharding rules, vLLM's own reports, the plan calibrated and checked
against them, and the child runner.

Hand computations come from docs/formats.md §3-4 (tests/replica.py); measured figures from the GPU rehearsals kept
in docs/rehearsals/ and the engine logs kept in tests/data/ (stock vLLM 0.33.0 on an H200, 2026-12-02).
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from repack import synth
from repack.errors import UserError
from repack.serve import child, planner, sharding, vllm_log
from repack.serve import rehearse as rh
from repack.serve.arch import Layout, Split, spec_for
from tests import fakevllm
from tests.helpers import w3repack as run
from tests.replica import HIDDEN, LAYERS, VOCAB, hand_native_weights_per_gpu, quant, write_source_replica, write_sparse
from tests.test_paths import hand_repacked_dense_per_gpu

GIB = 1 << 30
DATA = Path(__file__).parent / "data"
REHEARSALS = Path(__file__).parents[1] / "docs" / "rehearsals"
SM86_8X24 = ["--gpus", "8", "--gpu-memory", "24", "--compute-capability", "8.6"]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return write_source_replica(tmp_path_factory.mktemp("src345") / "DeepSeek-V3.2-REAP-345B-W3A16")


def _dry(source, tmp_path, *args):
    r = run("rehearse", source, *args, "--dry-run", "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


# ---------------------------------------------------------------- rank models


def test_dry_run_345b_tp8_both_paths_writes_nothing(source, tmp_path):
    d = _dry(source, tmp_path, *SM86_8X24)
    assert d["schema_version"] == 1 and d["tensor_parallel"] == 8
    by = {p["name"]: p for p in d["paths"]}
    assert list(by) == ["native-3bit", "repacked-4bit"]
    for name, hand in (("native-3bit", hand_native_weights_per_gpu(8)), ("repacked-4bit", hand_repacked_dense_per_gpu(8))):
        p = by[name]
        assert abs(p["rank_weights_gib"] - p["plan_weights_gib"]) / p["plan_weights_gib"] < 0.01
        assert abs(p["plan_weights_gib"] - hand / GIB) < 0.01
        c = p["rank_config"]
        # one rank of TP 8: 16 of 128 heads, dense MLP 18432/8, experts 2048/8, vocabulary 129280/8, every layer;
        # below sm90 the dense-attention form (a DeepSeek-V3 config without the indexer)
        assert (c["num_attention_heads"], c["num_key_value_heads"], c["intermediate_size"], c["moe_intermediate_size"],
                c["vocab_size"], c["num_hidden_layers"]) == (16, 16, 2304, 256, 16160, LAYERS)
        assert c["architectures"] == ["DeepseekV3ForCausalLM"] and "index_topk" not in c
        assert c["n_routed_experts"] == 128 and c["kv_lora_rank"] == 512 and c["q_lora_rank"] == 1536
        assert c["quantization_config"]["bits"] == (3 if name == "native-3bit" else 4)
    # the 4-bit rank needs more disk than the 3-bit one (float32 kv_b_proj, wider codes)
    assert by["repacked-4bit"]["scratch_bytes"] > by["native-3bit"]["scratch_bytes"] > 16 * GIB
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def model(source):
    return planner.load_model(source)


@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_rank_weights_at_each_tp_match_the_hand_computation(model, tp):
    req = planner.Request(tp, planner.Gpu(tp, 80.0, "8.0"))
    (p,) = rh.dry_run(req, rh.prepare(model, req, "native", "0.33.0")[1])["paths"]
    c = p["rank_config"]
    assert c["num_attention_heads"] == 128 // tp and c["moe_intermediate_size"] == 2048 // tp
    assert c["vocab_size"] == VOCAB // tp and c["hidden_size"] == HIDDEN
    # the rank model, planned as a one-GPU model, holds what one GPU of TP tp holds (vLLM pads the rank's
    # vocabulary to 64 rows: 16160 -> 16192 at TP 8, under 1 MiB)
    assert abs(p["rank_weights_gib"] - hand_native_weights_per_gpu(tp) / GIB) < 0.002


def test_sparse_form_on_sm90_keeps_the_indexer(source, tmp_path):
    d = _dry(source, tmp_path, "--gpus", "8", "--gpu-memory", "140.4", "--compute-capability", "9.0", "--path", "native")
    c = d["paths"][0]["rank_config"]
    assert c["architectures"] == ["DeepseekV32ForCausalLM"] and c["index_n_heads"] == 64  # indexer: replicated
    assert abs(d["paths"][0]["rank_weights_gib"] - hand_native_weights_per_gpu(8, dense=False) / GIB) < 0.002
    d = _dry(source, tmp_path, "--gpus", "8", "--gpu-memory", "140.4", "--compute-capability", "9.0", "--dense-attention")
    assert all("index_topk" not in p["rank_config"] for p in d["paths"])
    # the target's vllm serve defaults: a 140.4 GiB card gets 8192 batched tokens and 1024 sequences
    assert (d["target"]["max_num_batched_tokens"], d["target"]["max_num_seqs"], d["target"]["cuda_memory_gib"]) == (8192, 1024, 139.8)


def gqa_moe(root: Path, moe_i: int = 2048, heads: int = 32, kv: int = 4) -> Path:
    """A header-only Qwen3-MoE-shaped 4-bit model: GQA with 4 KV heads, 8 experts, qk-norm."""
    h, hd, layers, vocab, experts = 2048, 128, 2, 1000, 8
    root.mkdir(parents=True)
    t = [("model.embed_tokens.weight", "BF16", [vocab, h]), ("model.norm.weight", "BF16", [h]),
         ("lm_head.weight", "BF16", [vocab, h])]
    for i in range(layers):
        p = f"model.layers.{i}"
        t += [(f"{p}.input_layernorm.weight", "BF16", [h]), (f"{p}.post_attention_layernorm.weight", "BF16", [h]),
              (f"{p}.self_attn.q_norm.weight", "BF16", [hd]), (f"{p}.self_attn.k_norm.weight", "BF16", [hd]),
              (f"{p}.mlp.gate.weight", "BF16", [experts, h])]
        t += quant(f"{p}.self_attn.q_proj", h, heads * hd) + quant(f"{p}.self_attn.k_proj", h, kv * hd)
        t += quant(f"{p}.self_attn.v_proj", h, kv * hd) + quant(f"{p}.self_attn.o_proj", heads * hd, h)
        for e in range(experts):
            q = f"{p}.mlp.experts.{e}"
            t += quant(f"{q}.gate_proj", h, moe_i) + quant(f"{q}.up_proj", h, moe_i) + quant(f"{q}.down_proj", moe_i, h)
    write_sparse(root / "model.safetensors", t)
    (root / "config.json").write_text(json.dumps({
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": h, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv, "head_dim": hd, "moe_intermediate_size": moe_i,
        "num_experts": experts, "num_experts_per_tok": 2, "vocab_size": vocab, "max_position_embeddings": 4096,
        "torch_dtype": "bfloat16",
        "quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": 128, "sym": True, "desc_act": False}}))
    return root


def test_gqa_moe_with_fewer_kv_heads_than_ranks(tmp_path):
    root = gqa_moe(tmp_path / "qwen3moe")
    d = _dry(root, tmp_path, "--gpus", "8", "--gpu-memory", "80", "--compute-capability", "8.0")
    (p,) = d["paths"]
    c = p["rank_config"]
    # 4 KV heads over 8 ranks: each rank holds one, replicated over 2 ranks
    assert (c["num_attention_heads"], c["num_key_value_heads"], c["moe_intermediate_size"]) == (4, 1, 256)
    full = planner.load_model(root)
    rank = sharding.rank_model(full.spec, full.tensors, Layout(8))
    shapes = {n: s for n, _, s in rank.tensors}
    assert shapes["model.layers.0.self_attn.k_proj.qweight"] == (256, 128)   # [K/8, one head of 128]
    assert shapes["model.layers.0.self_attn.k_proj.qzeros"] == (16, 16)
    assert shapes["model.layers.0.self_attn.o_proj.qweight"] == (64, 2048)   # K = 4 heads x 128, /8 per int32
    assert shapes["model.layers.0.mlp.experts.3.down_proj.scales"] == (2, 2048)
    m = planner.load_model(root)
    plan = planner.plan(m, planner.Request(8, planner.Gpu(8, 80.0, "8.0")))
    assert plan.kv_bytes_per_token == 2 * 1 * 128 * 2 * 2  # K and V of one head, bf16, 2 layers
    assert not any(w.startswith("architecture ") for w in plan.warnings)  # Qwen3 MoE has a spec
    cfg = json.loads((root / "config.json").read_text())
    other = planner.Model(root, {**cfg, "architectures": ["SomeNewMoeForCausalLM"]}, m.tensors)
    assert planner.plan(other, planner.Request(8, planner.Gpu(8, 80.0, "8.0"))).warnings[0].startswith(
        "architecture SomeNewMoeForCausalLM has no spec in w3repack (known: ")


def test_tp_that_does_not_split_the_model_is_refused(source, tmp_path):
    r = run("rehearse", source, "--gpus", "3", "--gpu-memory", "80", "--compute-capability", "8.0", "--dry-run",
            cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.startswith("error: TP 3 does not split this model into whole ranks: ")
    assert "num_attention_heads 128 is not divisible by TP 3" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    # experts 768 wide: 96 per rank at TP 8, not whole groups of 128 (the down projection's scales rows)
    root = gqa_moe(tmp_path / "narrow", moe_i=768)
    r = run("rehearse", root, "--gpus", "8", "--gpu-memory", "80", "--compute-capability", "8.0", "--dry-run", cwd=tmp_path)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "moe_intermediate_size 768 / TP 8 = 96 per rank is not a multiple of the quantization group size 128" in r.stderr
    assert "down_proj.qzeros [6, 256]: dim 0 (6) split row gives 0.75 per rank" in r.stderr


def test_row_and_column_splits_of_a_3bit_module():
    spec = spec_for({"architectures": ["DeepseekV3ForCausalLM"], "num_attention_heads": 8, "num_hidden_layers": 1})
    t = [("m.layers.0.mlp.experts.0.down_proj.qweight", "I32", (24, 64), 0),
         ("m.layers.0.mlp.experts.0.down_proj.qzeros", "I32", (2, 6), 0),
         ("m.layers.0.mlp.experts.0.down_proj.scales", "F16", (2, 64), 0),
         ("m.layers.0.mlp.experts.0.up_proj.qweight", "I32", (24, 256), 0),
         ("m.layers.0.mlp.experts.0.up_proj.qzeros", "I32", (2, 24), 0),
         ("m.layers.0.mlp.experts.0.up_proj.scales", "F16", (2, 256), 0),
         ("m.layers.0.self_attn.kv_a_proj_with_mqa.qweight", "I32", (24, 96), 0)]
    r = {".".join(x.name.split(".")[-2:]): x for x in sharding.shard(spec, t, Layout(2))}
    assert r["down_proj.qweight"].split is Split.ROW and r["down_proj.qweight"].rank_shape == (12, 64)
    assert r["down_proj.scales"].rank_shape == (1, 64) and r["down_proj.qzeros"].rank_shape == (1, 6)
    assert r["up_proj.qweight"].rank_shape == (24, 128) and r["up_proj.qzeros"].rank_shape == (2, 12)
    assert r["kv_a_proj_with_mqa.qweight"].rank_shape == (24, 96)  # replicated in MLA
    odd = sharding.shard(spec, t[:3], Layout(4))
    assert odd[2].problem == "m.layers.0.mlp.experts.0.down_proj.scales [2, 64]: dim 0 (2) split row gives 0.5 per rank"


# ---------------------------------------------------------------- what vLLM reported (real logs)


def test_vllm_memory_lines_from_real_logs():
    r = vllm_log.parse((DATA / "vllm-0.33.0-345b-tp8-rank-3090-native.log").read_text())
    # "Model loading took 16.74 GiB"; "Total non KV cache memory: 19.59GiB; ... total consumed (from mem_get_info):
    # 19.05GiB; weights memory: 16.74GiB"; utilization 0.1517 "is equivalent to" 0.1443 on 139.8 GiB
    assert (r.weights_gib, r.non_kv_cache_gib, r.total_consumed_gib) == (16.74, 19.59, 19.05)
    assert (r.peak_activation_gib, r.non_torch_gib, r.kv_cache_gib) == (0.54, 2.31, 0.59)
    assert r.cuda_graphs_estimate_gib == pytest.approx((0.1517 - 0.1443) * 139.8, abs=1e-3)
    assert (r.kv_cache_tokens, r.max_model_len, r.init_cuda_gib, r.total_gib) == (8992, 8976, 0.7, 139.8)
    assert (r.cuda_graphs_profiled_gib, r.cuda_graphs_captured_gib, r.summary_peak_activation_gib) == (0.96, 0.56, 1.57)
    assert "Using HummingIndexedExperts Humming MoE backend." in r.kernels
    assert "Using AttentionBackendEnum.TRITON_MLA backend." in r.kernels
    h = vllm_log.parse((DATA / "vllm-0.33.0-345b-tp8-rank-h200-native.log").read_text())
    assert (h.kv_cache_gib, h.kv_cache_tokens, h.max_model_len, h.non_torch_gib, h.peak_activation_gib) == (
        104.53, 1597184, 163840, 1.3, 0.8)
    assert any(k.startswith("Using FLASH_ATTN_MLA attention backend") for k in h.kernels)


def test_vllm_refusals_name_the_root_cause():
    r = vllm_log.parse((DATA / "vllm-0.33.0-345b-tp8-rank-3090-repacked-refused.log").read_text())
    assert r.weights_gib == 21.85 and r.kv_cache_gib is None and r.non_torch_gib == 2.43
    assert r.error.startswith("ValueError: Cannot auto-fit max_model_len: not enough GPU memory available")
    r = vllm_log.parse((DATA / "vllm-0.33.0-345b-rank-incomplete-config.log").read_text())
    assert r.error == "KeyError: 'layers.3.mlp.gate.e_score_correction_bias'"
    r = vllm_log.parse((DATA / "vllm-0.33.0-tiny-3090-repacked-api-missing.log").read_text())
    assert r.error == "ModuleNotFoundError: No module named 'model_hosting_container_standards'"


def test_cache_config_labels():
    text = ('# HELP vllm:cache_config_info x\nvllm:cache_config_info{block_size="16",engine="0",'
            'num_gpu_blocks="562",prefix="a\\"b"} 1.0\n')
    assert vllm_log.cache_config_info(text) == {"block_size": "16", "engine": "0", "num_gpu_blocks": "562", "prefix": 'a\\"b'}


# ---------------------------------------------------------------- the plan against the measurement


def _measured(name: str, path: str) -> dict:
    d = json.loads((REHEARSALS / name).read_text())
    return next(p for p in d["paths"] if p["name"] == path)["measured"]


@pytest.mark.parametrize("target, rehearsal", [
    (SM86_8X24, "345b-8x3090-vllm-0.33.0.json"),
    (["--gpus", "8", "--gpu-memory", "140.4", "--compute-capability", "9.0"], "345b-8xh200-dense-vllm-0.33.0.json"),
])
def test_calibrated_plan_holds_against_the_rehearsal(source, tmp_path, target, rehearsal):
    """Without a rehearsal the plan's KV cache for the rank is at most what vLLM allocated and within 15% of it
    (before the stated NCCL allowance, which one GPU cannot show), and its context is one vLLM accepts."""
    m = _measured(rehearsal, "native-3bit")
    r = run("plan", source, *target, "--vllm-version", "0.33.0", "--json", cwd=tmp_path)
    p = next(x for x in json.loads(r.stdout)["paths"] if x["name"] == "native-3bit")
    rank_kv = p["kv_cache_gib"] + 0.25  # the plan less its TP > 1 allowance: what one GPU shows
    assert 0.85 * m["engine"]["kv_cache_gib"] <= rank_kv <= m["engine"]["kv_cache_gib"]
    assert p["capacity_tokens"] <= m["kv_cache_tokens"] and p["max_model_len"] <= m["max_model_len"]
    assert p["fits"]


def test_plan_and_launch_take_the_rehearsal(source, tmp_path):
    reh = REHEARSALS / "345b-8x3090-vllm-0.33.0.json"
    r = run("plan", source, *SM86_8X24, "--vllm-version", "0.33.0", "--rehearsal", reh, "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["recommended"] == "native-3bit" and d["kv_measured"] == "rehearsal on NVIDIA H200, vLLM 0.33.0, 2026-12-02"
    # vLLM allocated 0.59 GiB (8992 tokens in 16-token blocks); less 0.25 GiB for NCCL at TP 8: whole 64-token
    # blocks of 70272 bytes, one kept back, and the longest context 1024-rounded
    blocks = int((0.59 - 0.25) * GIB // (70272 * 64)) - 1
    assert d["capacity_tokens"] == min(blocks * 64, 8992 - 16 - -(-int(0.25 * GIB) // 70272))
    assert d["max_model_len"] == d["capacity_tokens"] // 1024 * 1024 == 5120
    text = run("plan", source, *SM86_8X24, "--rehearsal", reh, cwd=tmp_path).stdout
    assert "KV measured       rehearsal on NVIDIA H200, vLLM 0.33.0, 2026-12-02" in text
    out = tmp_path / "serve.sh"
    r = run("launch", source, *SM86_8X24, "--rehearsal", reh, "--path", "native", "-o", out, cwd=tmp_path)
    assert r.returncode == 2 and "convert SRC DST --target native --dense-attention" in r.stderr  # the source needs its fix-up
    r = run("plan", source, *SM86_8X24, "--gpu-memory-utilization", "0.95", "--rehearsal", reh, cwd=tmp_path)
    assert r.returncode == 2 and "it rehearsed gpu_memory_utilization 0.9, this plan has 0.95" in r.stderr
    bad = tmp_path / "bad.json"
    bad.write_text('{"schema_version": 1}')
    r = run("plan", source, *SM86_8X24, "--rehearsal", bad, cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.startswith(f"error: {bad}: not a w3repack rehearsal")


def test_launch_of_the_converted_folder_takes_the_rehearsal_of_its_source(model, tmp_path):
    """The rehearsal of the source for 8 x 3090 served the native path's dense-attention conversion: launching that
    conversion (a header-only replica of what `convert --target native --dense-attention` writes) uses it."""
    from repack.serve.paths import virtual_output

    out, _ = virtual_output(model, target="native", kv_b_float=False, dense_attention=True)
    dst = tmp_path / "DeepSeek-V3.2-REAP-345B-native"
    dst.mkdir()
    write_sparse(dst / "model.safetensors", [(n, d, list(s)) for n, d, s, _ in out.tensors])
    (dst / "config.json").write_text(json.dumps(out.config))
    script = tmp_path / "serve.sh"
    r = run("launch", dst, *SM86_8X24, "--vllm-version", "0.33.0", "--rehearsal", REHEARSALS / "345b-8x3090-vllm-0.33.0.json",
            "-o", script, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "native-3bit path" in r.stdout and "--max-model-len 5120" in script.read_text()


def test_speed_ratio_from_a_rehearsal_drives_the_recommendation():
    d = json.loads((REHEARSALS / "345b-8xh200-dense-vllm-0.33.0.json").read_text())
    nat = d["paths"][0]
    rep = json.loads(json.dumps(nat))
    rep["name"] = "repacked-4bit"
    for b, s in rep["measured"]["decode_tokens_per_s"].items():
        s["median"] = nat["measured"]["decode_tokens_per_s"][b]["median"] * 1.25
    d["paths"] = [nat, rep]
    m = rh.Rehearsal(d).speed_ratio()
    assert m.gpu_family == "sm90" and m.tp == 8 and m.decode == {1: 1.25, 8: 1.25, 32: 1.25, 128: 1.25}
    assert m.decode_geomean > 1.10 and "rehearsal on NVIDIA H200" in m.source


def test_measured_speed_from_a_rehearsal_recommends_the_repack(source, tmp_path):
    d = json.loads((REHEARSALS / "345b-8xh200-dense-native-only-vllm-0.33.0.json").read_text())
    rep = json.loads(json.dumps(d["paths"][0]))
    rep["name"] = "repacked-4bit"
    for b, s in rep["measured"]["decode_tokens_per_s"].items():
        s["median"] = d["paths"][0]["measured"]["decode_tokens_per_s"][b]["median"] * 1.25
    d["paths"].append(rep)
    f = tmp_path / "both.json"
    f.write_text(json.dumps(d))
    h200 = ["--gpus", "8", "--gpu-memory", "140.4", "--compute-capability", "9.0", "--vllm-version", "0.33.0"]
    r = run("plan", source, *h200, "--rehearsal", f, cwd=tmp_path)
    # the rehearsal served the dense-attention form: a plan of the sparse form (sm90's default) cannot use it
    assert r.returncode == 2 and "it served native-3bit as DeepseekV3ForCausalLM, this plan serves DeepseekV32ForCausalLM" in r.stderr
    r = run("plan", source, *h200, "--dense-attention", "--rehearsal", f, "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    p = json.loads(r.stdout)
    m = p["paths"][1]["measured_speed"]
    assert m["decode_ratio_by_batch"] == {"1": 1.25, "8": 1.25, "32": 1.25, "128": 1.25} and m["tensor_parallel"] == 8
    assert p["recommended"] == "repacked-4bit" and "measured 1.25x the native decode speed on sm90 at TP 8" in p["recommendation_reason"]
    # the real rehearsal of both paths (docs/benchmarks.md): its ratios, the medians' quotients, keep the native path
    r = run("plan", source, *h200, "--dense-attention", "--rehearsal", REHEARSALS / "345b-8xh200-dense-vllm-0.33.0.json",
            "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    p = json.loads(r.stdout)
    assert p["paths"][1]["measured_speed"]["decode_ratio_by_batch"] == {"1": round(131.4 / 147.4, 3), "8": round(922.9 / 1079.7, 3),
                                                                       "32": round(3225.0 / 2903.5, 3), "128": round(9024.9 / 10964.9, 3)}
    assert p["recommended"] == "native-3bit"
    assert p["paths"][1]["kv_cache_gib"] < 99.33  # below what vLLM allocated for the repack's rank


# ---------------------------------------------------------------- the child runner


def test_child_runner_kills_the_grandchild_on_timeout(tmp_path):
    pidfile = tmp_path / "grand.pid"
    code = ("import subprocess, sys, time; g = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']);"
            f"open({str(pidfile)!r}, 'w').write(str(g.pid)); time.sleep(600)")
    t = time.monotonic()
    r = child.run([sys.executable, "-c", code], tmp_path / "log", timeout=2)
    assert r.timed_out and r.rc is None and time.monotonic() - t < 30
    assert not _alive(int(pidfile.read_text()))


def test_child_runner_result_file(tmp_path):
    out = tmp_path / "r.json"
    r = child.run([sys.executable, "-c", f"import json; print('hello'); json.dump({{'x': 1}}, open({str(out)!r}, 'w'))"],
                  tmp_path / "log", timeout=60, result_file=out)
    assert (r.rc, r.timed_out, r.result) == (0, False, {"x": 1}) and "hello" in r.log_tail


def _alive(pid: int) -> bool:
    for _ in range(50):
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return False
        if state == "Z":
            return False
        time.sleep(0.1)
    return True


# ---------------------------------------------------------------- a whole rehearsal, against a stand-in engine


@pytest.fixture()
def fake(tmp_path):
    src = synth.write_checkpoint(tmp_path / "tiny", synth.TinySpec())
    site = fakevllm.install(tmp_path / "site")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(Path(__file__).parents[1])]),
           "FAKE_VLLM_RECORD": str(tmp_path / "record.jsonl")}
    return src, env, tmp_path


def test_rehearsal_runs_the_engine_with_the_targets_budget_and_reads_it(fake):
    src, env, tmp = fake
    r = subprocess.run([sys.executable, "-m", "repack", "rehearse", str(src), "--gpus", "1", "--gpu-memory", "24",
                        "--compute-capability", "8.6", "--work", str(tmp / "w"), "--timeout", "120"],
                       capture_output=True, text=True, env=env, cwd=tmp, timeout=300)
    assert r.returncode == 0, r.stderr
    recs = fakevllm.records(tmp / "record.jsonl")
    assert len(recs) == 2
    for rec, path in zip(recs, ("native-3bit", "repacked-4bit"), strict=True):
        a = rec["argv"]
        assert a[1:3] == ["serve", str(tmp / "w" / f"rank-{path}")]
        # the 3090's budget on the local card: 0.9 x 23.56 GiB of 139.8 (the fake's total)
        assert a[a.index("--gpu-memory-utilization") + 1] == f"{0.9 * 23.56 / 139.8:.6f}"
        assert [a[a.index(f) + 1] for f in ("--max-model-len", "--max-num-batched-tokens", "--max-num-seqs",
                                             "--attention-backend")] == ["auto", "2048", "256", "TRITON_MLA"]
        assert "--tensor-parallel-size" not in a and "--skip-tokenizer-init" in a
        assert ("--moe-backend" in a) == (path == "repacked-4bit")
        assert rec["disabled"].split(",") == ["MacheteLinearKernel", "CutlassW4A8LinearKernel"] + (
            ["HummingLinearKernel"] if path == "repacked-4bit" else [])
        assert json.loads(Path(rec["logging"]).read_text()) == vllm_log.LOGGING_CONFIG
        assert not _alive(rec["grandchild"])  # the engine's own child went with its process group
    d = json.loads((tmp / "rehearsal.json").read_text())
    assert d["schema_version"] == 1 and d["local"]["gpu"] == "NVIDIA H200" and d["target"]["budget_gib"] == 21.204
    for p in d["paths"]:
        m = p["measured"]
        assert m["served"] and m["error"] is None and m["max_model_len"] == 4096
        assert m["kv_cache_tokens"] == m["num_gpu_blocks"] * 16 == m["engine"]["kv_cache_tokens"]
        assert sorted(m["decode_tokens_per_s"], key=int) == ["1", "8", "32", "128"] and m["prefill_tokens_per_s"]
        assert all(s["median"] > 0 and len(s["runs"]) == 3 for s in m["decode_tokens_per_s"].values())
    assert not (tmp / "w" / "rank-native-3bit").exists() and "repacked ÷ native decode" in r.stdout
    again = subprocess.run([sys.executable, "-m", "repack", "rehearse", str(src), "--gpus", "1", "--gpu-memory", "24",
                            "--compute-capability", "8.6", "--work", str(tmp / "w")],
                           capture_output=True, text=True, env=env, cwd=tmp, timeout=120)
    assert again.returncode == 2 and "rehearsal.json: exists" in again.stderr


def test_rank_model_kept_is_a_checkpoint_inspect_accepts(fake):
    src, env, tmp = fake
    r = subprocess.run([sys.executable, "-m", "repack", "rehearse", str(src), "--gpus", "1", "--gpu-memory", "24",
                        "--compute-capability", "8.6", "--path", "native", "--work", str(tmp / "w"), "--keep",
                        "--timeout", "120"], capture_output=True, text=True, env=env, cwd=tmp, timeout=300)
    assert r.returncode == 0, r.stderr
    i = run("inspect", tmp / "w" / "rank-native-3bit", "--json")
    assert i.returncode == 0, i.stderr
    assert json.loads(i.stdout)["module_widths"]["3"] > 0


def test_engine_that_never_serves_is_stopped_at_the_deadline(fake):
    src, env, tmp = fake
    t = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "repack", "rehearse", str(src), "--gpus", "1", "--gpu-memory", "24",
                        "--compute-capability", "8.6", "--path", "native", "--work", str(tmp / "w"), "--timeout", "3"],
                       capture_output=True, text=True, env={**env, "FAKE_VLLM_MODE": "hang"}, cwd=tmp, timeout=120)
    assert r.returncode == 0 and time.monotonic() - t < 60
    (rec,) = fakevllm.records(tmp / "record.jsonl")
    assert not _alive(rec["grandchild"])
    m = json.loads((tmp / "rehearsal.json").read_text())["paths"][0]["measured"]
    assert not m["served"] and m["error"] == "not serving after 3 s (--timeout)" and m["exit"]["stopped_by_rehearse"]


@pytest.mark.parametrize("mode, needle", [
    ("nogpu", "error: no usable GPU here (torch sees no CUDA GPU)"),
    ("busy", "error: the local NVIDIA H200 has 4.00 GiB free; the target's budget is 21.20 GiB"),
    ("novllm", "error: vLLM is not installed in this Python"),
])
def test_no_gpu_no_vllm_not_enough_memory(fake, mode, needle):
    src, env, tmp = fake
    if mode == "novllm":
        env["PYTHONPATH"] = os.pathsep.join([str(fakevllm.install(tmp / "bare", vllm=False)), str(Path(__file__).parents[1])])
    r = subprocess.run([sys.executable, "-m", "repack", "rehearse", str(src), "--gpus", "1", "--gpu-memory", "24",
                        "--compute-capability", "8.6", "--work", str(tmp / "w")],
                       capture_output=True, text=True, env={**env, "FAKE_TORCH_MODE": mode}, cwd=tmp, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith(needle) and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp / "rehearsal.json").exists()


def test_prepare_refuses_pipeline_parallel(model):
    with pytest.raises(UserError, match="no pipeline stages, no expert parallelism"):
        rh.prepare(model, planner.Request(8, planner.Gpu(8, 24.0, "8.6"), pp=2), "both", "0.33.0")


def test_output_and_work_are_never_written_through_a_link(fake):
    src, env, tmp = fake
    victim = tmp / "victim"
    victim.write_text("keep")
    (tmp / "out.json").symlink_to(victim)
    (tmp / "dangling.json").symlink_to(tmp / "nowhere")
    (tmp / "wlink").symlink_to(tmp)
    base = [sys.executable, "-m", "repack", "rehearse", str(src), "--gpus", "1", "--gpu-memory", "24",
            "--compute-capability", "8.6", "--path", "native"]
    for extra, needle in (([ "--output", str(tmp / "out.json"), "--work", str(tmp / "w")], "a link is there"),
                          (["--output", str(tmp / "dangling.json"), "--work", str(tmp / "w")], "a link is there"),
                          (["--output", str(tmp / "r.json"), "--work", str(tmp / "wlink")], "--work")):
        r = subprocess.run(base + extra, capture_output=True, text=True, env=env, cwd=tmp, timeout=120)
        assert r.returncode == 2 and needle in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert victim.read_text() == "keep" and not (tmp / "nowhere").exists() and not (tmp / "record.jsonl").exists()
