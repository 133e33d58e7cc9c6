"""Both serving paths of a 3-bit source (native 3-bit in vLLM >= 0.30, repacked 4-bit), planned and launched.

Expected numbers are computed by hand from docs/formats.md (tests/replica.py), not by the planner's code.
"""

import json
import os
import subprocess

import pytest

from repack import synth
from repack.serve import paths, planner
from tests.helpers import w3repack as run
from tests.replica import (
    DENSE,
    DENSE_I,
    EXPERTS,
    HEADS,
    HIDDEN,
    KV_LORA,
    LAYERS,
    MOE_I,
    NOPE,
    Q_LORA,
    ROPE,
    SOURCE_PLACEHOLDER,
    VOCAB,
    V,
    hand_native_weights_per_gpu,
    q4,
    write_source_replica,
)

GIB = 1 << 30
SM86_8X24 = ["--gpus", "8", "--gpu-memory", "24", "--compute-capability", "8.6", "--gpu-memory-utilization", "0.95"]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return write_source_replica(tmp_path_factory.mktemp("src345") / "DeepSeek-V3.2-REAP-345B-W3A16")


@pytest.fixture(scope="module")
def plan_8x3090(source):
    r = run("plan", source, *SM86_8X24, "--vllm-version", "0.33.0", "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def hand_repacked_dense_per_gpu(tp):
    """The 4-bit output with --dense-attention at TP ``tp``: every linear 4-bit, kv_b_proj float (bf16 in vLLM,
    split on heads), no indexer."""
    h = HIDDEN
    total = 2 * (VOCAB * h * 2) / tp + h * 2
    per_layer = (2 * h + Q_LORA + KV_LORA) * 2 + q4(h, Q_LORA) + q4(h, KV_LORA + ROPE)
    per_layer += (q4(Q_LORA, HEADS * (NOPE + ROPE)) + q4(HEADS * V, h)) / tp + HEADS * (NOPE + V) * KV_LORA * 2 / tp
    total += LAYERS * per_layer + DENSE * 3 * q4(h, DENSE_I) / tp
    total += (LAYERS - DENSE) * ((EXPERTS + 1) * 3 * q4(h, MOE_I) / tp + EXPERTS * h * 2 + EXPERTS * 4)
    return total


def test_345b_on_8x3090_native_fits_repack_does_not(plan_8x3090):
    p = plan_8x3090
    by = {x["name"]: x for x in p["paths"]}
    assert list(by) == ["native-3bit", "repacked-4bit"]
    nat, rep = by["native-3bit"], by["repacked-4bit"]
    assert abs(nat["weights_gib_per_gpu"] - hand_native_weights_per_gpu(8) / GIB) < 0.01
    assert abs(rep["weights_gib_per_gpu"] - hand_repacked_dense_per_gpu(8) / GIB) < 0.01
    # KV cache: the budget CUDA gives (23.56 GiB x 0.95) less the weights and the allowances vLLM 0.33.0 took in the
    # 3090-target rehearsal of this rank (non-torch 2.31, activations 0.54, CUDA graphs 1.03 GiB; docs/benchmarks.md),
    # the stated 0.25 GiB for NCCL at TP 8 and a 0.02 GiB margin; whole 64-token blocks, one kept back
    kv = 23.56 * 0.95 - hand_native_weights_per_gpu(8) / GIB - (2.31 + 0.54 + 1.03 + 0.25 + 0.02)
    blocks = int(kv * GIB // (576 * 61 * 2 * 64)) - 1
    assert nat["capacity_tokens"] == blocks * 64
    assert nat["fits"] is True and nat["max_model_len"] == blocks * 64 // 1024 * 1024
    assert rep["fits"] is False and rep["max_model_len"] == 0
    assert p["recommended"] == "native-3bit" and "only the native path fits" in p["recommendation_reason"]
    # the existing top-level keys describe the recommended path
    assert p["weights_gib_per_gpu"] == nat["weights_gib_per_gpu"] and p["fits"] is True
    assert nat["min_vllm_version"] == "0.30.0" and rep["min_vllm_version"] == "0.26.0"
    assert "Humming" in nat["kernel"] and rep["kernel"] == "Marlin"
    # sm86 has no V3.2 sparse-attention backend: both paths are planned with the dense fallback
    assert nat["prepare"] == ["w3repack convert SRC DST --target native --dense-attention"]
    assert rep["prepare"] == ["w3repack convert SRC DST --dense-attention"]
    assert p["kv_bytes_per_token_indexer"] == 0 and p["kv_bytes_per_token"] == 576 * 61 * 2
    assert all(c["ok"] for x in p["paths"] for c in x["tp_checks"])
    assert nat["measured_speed"] is None and rep["measured_speed"] is None  # nothing measured on sm86
    assert "--tensor-parallel-size" in nat["vllm_args"] and "--moe-backend" not in " ".join(nat["vllm_args"])


def test_345b_on_8xh200_both_fit_native_recommended_on_the_rank_shape_speed(source):
    r = run("plan", source, "--gpus", "8", "--gpu-memory", "139", "--compute-capability", "9.0", "--vllm-version",
            "0.33.0", "--json")
    assert r.returncode == 0, r.stderr
    p = json.loads(r.stdout)
    nat, rep = p["paths"]
    assert nat["fits"] and rep["fits"]
    assert "--dense-attention" not in nat["prepare"][0]  # sm90 runs the sparse V3.2 path
    assert abs(nat["weights_gib_per_gpu"] - hand_native_weights_per_gpu(8, dense=False) / GIB) < 0.01
    # the TP-8 rank rehearsed on an H200 with both paths (docs/benchmarks.md): decode medians repacked / native
    ms = rep["measured_speed"]
    assert ms["decode_ratio_by_batch"] == {"1": 0.891, "8": 0.855, "32": 1.111, "128": 0.823}
    assert abs(ms["decode_ratio_geomean"] - (0.891 * 0.855 * 1.111 * 0.823) ** 0.25) < 5e-4
    assert p["recommended"] == "native-3bit" and "within 1.10x on sm90 at TP 8" in p["recommendation_reason"]
    # other TP sizes and GPU families were not measured: no ratio is borrowed
    r4 = json.loads(run("plan", source, "--gpus", "4", "--gpu-memory", "139", "--compute-capability", "9.0",
                        "--vllm-version", "0.33.0", "--json").stdout)
    assert r4["paths"][1]["measured_speed"] is None
    assert "Humming by default on sm90" in rep["kernel"]


def test_old_vllm_and_mtp_speculation_rule_out_the_native_path(source):
    r = run("plan", source, *SM86_8X24, "--vllm-version", "0.29.0", "--json")
    p = json.loads(r.stdout)
    assert p["recommended"] == "repacked-4bit" and "refuses 3-bit checkpoints" in p["recommendation_reason"]
    assert p["paths"][0]["runnable"] is False
    r = run("plan", source, "--gpus", "8", "--gpu-memory", "139", "--compute-capability", "9.0", "--speculative", "1",
            "--json")
    p = json.loads(r.stdout)
    assert p["recommended"] == "repacked-4bit" and "MTP speculative decoding fails" in p["recommendation_reason"]
    rep = p["paths"][1]
    assert '{"method":"deepseek_mtp","num_speculative_tokens":1}' in rep["vllm_args"]
    # the MTP layer is counted only with speculation: at 4 bits like the other MoE layers, its eh_proj (float,
    # replicated) and its own embed_tokens and shared_head.head (float, split on the vocabulary), no indexer
    r0 = json.loads(run("plan", source, "--gpus", "8", "--gpu-memory", "139", "--compute-capability", "9.0",
                        "--json").stdout)
    h = HIDDEN
    mtp = (2 * h + Q_LORA + KV_LORA) * 2 + q4(h, Q_LORA) + q4(h, KV_LORA + ROPE)
    mtp += (q4(Q_LORA, HEADS * (NOPE + ROPE)) + q4(HEADS * V, h)) / 8 + HEADS * (NOPE + V) * KV_LORA * 2 / 8
    mtp += q4(Q_LORA, 64 * 128) + (128 + 64) * h * 2 + 2 * 128 * 2  # the MTP layer's indexer (sm90: kept)
    mtp += (EXPERTS + 1) * 3 * q4(h, MOE_I) / 8 + EXPERTS * h * 2 + EXPERTS * 4
    mtp += 2 * h * h * 2 + 2 * VOCAB * h * 2 / 8 + 3 * h * 2
    got = rep["weights_gib_per_gpu"] - r0["paths"][1]["weights_gib_per_gpu"]
    assert abs(got - mtp / GIB) < 0.01


def test_tp_checks_name_what_fails():
    m = planner.Model(SOURCE_PLACEHOLDER, {"num_attention_heads": 128, "moe_intermediate_size": 2048,
                                           "intermediate_size": 18432, "quantization_config": {"group_size": 128}}, [])
    assert all(c.ok for c in paths.tp_checks(m, 8, 3))
    c = {x.what: x for x in paths.tp_checks(m, 3, 4)}
    assert not c["attention heads"].ok and "not divisible" in c["attention heads"].detail
    c = {x.what: x for x in paths.tp_checks(m, 32, 4)}  # 2048 / 32 = 64: half a group, half a Marlin K tile
    assert not c["expert slice per rank"].ok
    assert "group size 128" in c["expert slice per rank"].detail and "Marlin" in c["expert slice per rank"].detail
    c = {x.what: x for x in paths.tp_checks(m, 32, 3)}
    assert "group size 128" in c["expert slice per rank"].detail and "Marlin" not in c["expert slice per rank"].detail


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny 3-bit DeepSeek-V3 that vLLM >= 0.30 serves as it is (no MTP layer, no V3.2 indexer), and its repack."""
    d = tmp_path_factory.mktemp("tinypaths")
    src = synth.write_checkpoint(d / "src", synth.TinySpec.small(mtp=False))
    r = run("convert", src, d / "dst")
    assert r.returncode == 0, r.stderr
    return src, d / "dst"


def test_launch_native_with_pass_through(tiny, tmp_path):
    src, _ = tiny
    out = tmp_path / "serve.sh"
    r = run("launch", src, "-o", out, "--gpus", "1", "--gpu-memory", "24", "--compute-capability", "8.6",
            "--vllm-version", "0.33.0", "--", "--port", "9000", "--api-key", "k y")
    assert r.returncode == 0, r.stderr
    assert "native-3bit path" in r.stdout
    text = out.read_text()
    assert "MIN_VLLM=0.30.0" in text and "--moe-backend" not in text
    assert text.rstrip().endswith("--port 9000 \\\n  --api-key 'k y'")
    assert subprocess.run(["bash", "-n", str(out)]).returncode == 0


def test_launch_refuses_native_on_old_vllm_and_repacked_of_a_3bit_folder(tiny, tmp_path):
    src, dst = tiny
    base = ["-o", tmp_path / "s.sh", "--gpus", "1", "--gpu-memory", "24", "--compute-capability", "8.6"]
    r = run("launch", src, *base, "--vllm-version", "0.26.0", "--path", "native")
    assert r.returncode == 2 and "refuses 3-bit checkpoints" in r.stderr and "Traceback" not in r.stderr
    r = run("launch", src, *base, "--path", "repacked")
    assert r.returncode == 2 and "run `w3repack convert SRC DST`, then launch DST" in r.stderr
    r = run("launch", dst, *base, "--vllm-version", "0.26.0")
    assert r.returncode == 0, r.stderr
    assert "repacked-4bit path" in r.stdout and "MIN_VLLM=0.17" in (tmp_path / "s.sh").read_text()


def test_launch_345b_source_names_the_conversion_it_needs(source, tmp_path):
    r = run("launch", source, "-o", tmp_path / "s.sh", *SM86_8X24, "--vllm-version", "0.33.0")
    assert r.returncode == 2
    assert "w3repack convert SRC DST --target native --dense-attention" in r.stderr
    assert not (tmp_path / "s.sh").exists()


def test_serve_dry_run_passes_extra_arguments_last(tiny):
    _, dst = tiny
    r = run("serve", dst, "--gpus", "1", "--gpu-memory", "24", "--compute-capability", "8.6", "--dry-run", "--",
            "--port", "9001", "--served-model-name", "tiny")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().endswith("--port 9001 --served-model-name tiny")
    assert r.stdout.startswith("vllm serve ")


def test_speculative_needs_an_mtp_layer(tiny, tmp_path):
    _, dst = tiny
    r = run("launch", dst, "-o", tmp_path / "s.sh", "--gpus", "1", "--gpu-memory", "24", "--compute-capability", "8.6",
            "--speculative", "2")
    assert r.returncode == 2 and "needs an MTP layer" in r.stderr


def test_launch_speculative_on_a_converted_mtp_model(tmp_path):
    src = synth.write_checkpoint(tmp_path / "src", synth.TinySpec.small(mtp=True))
    assert run("convert", src, tmp_path / "dst").returncode == 0
    out = tmp_path / "s.sh"
    r = run("launch", tmp_path / "dst", "-o", out, "--gpus", "1", "--gpu-memory", "24", "--compute-capability", "9.0",
            "--speculative", "1", "--vllm-version", "0.33.0")
    assert r.returncode == 0, r.stderr
    assert """--speculative-config '{"method":"deepseek_mtp","num_speculative_tokens":1}'""" in out.read_text()
    # the 3-bit source itself is refused with speculation: vLLM reads its 4-bit MTP layer as 3-bit
    r = run("launch", src, "-o", out, "--gpus", "1", "--gpu-memory", "24", "--compute-capability", "9.0",
            "--speculative", "1", "--path", "native")
    assert r.returncode == 2 and "MTP speculative decoding fails" in r.stderr


def test_dense_converted_model_caps_or_warns_beyond_index_topk(tmp_path):
    src = synth.write_checkpoint(tmp_path / "src", synth.TinySpec.small(v32=True, mtp=False))
    assert run("convert", src, tmp_path / "dst", "--dense-attention").returncode == 0
    base = ["-o", tmp_path / "s.sh", "--gpus", "1", "--gpu-memory", "24", "--compute-capability", "8.6"]
    r = run("launch", tmp_path / "dst", *base)
    assert r.returncode == 0, r.stderr
    assert "exact up to index_topk=64 tokens" in r.stderr
    r = run("launch", tmp_path / "dst", *base, "--dense-context", "cap", "--overwrite")
    assert r.returncode == 0, r.stderr
    assert "--max-model-len 64" in (tmp_path / "s.sh").read_text() and "index_topk" not in r.stderr


def test_plan_text_shows_both_paths(source):
    r = run("plan", source, *SM86_8X24, "--vllm-version", "0.33.0", env={**os.environ, "COLUMNS": "300"})
    assert r.returncode == 0, r.stderr
    assert "native-3bit" in r.stdout and "repacked-4bit" in r.stdout
    assert "recommended       native-3bit: only the native path fits" in r.stdout


def test_launch_sglang_engine(tiny, tmp_path):
    src, dst = tiny
    out = tmp_path / "sg.sh"
    base = ["--engine", "sglang", "--gpus", "1", "--gpu-memory", "24", "--compute-capability", "8.6"]
    # the default release (0.5.17) reads q_b_proj.weight, which this model's GPTQ-packed q_b_proj lacks
    r = run("launch", dst, "-o", out, *base)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "q_b_proj" in r.stderr, r.stderr
    assert not out.exists()
    base += ["--sglang-version", "0.5.19"]
    r = run("launch", dst, "-o", out, *base, "--", "--port", "30123")
    assert r.returncode == 0, r.stderr
    text = out.read_text()
    assert 'exec "$PYTHON" -m sglang.launch_server' in text and "--dtype float16" in text
    assert text.rstrip().endswith("--port 30123")  # after the launcher's own --port: the last one wins
    assert subprocess.run(["bash", "-n", str(out)]).returncode == 0
    r = run("launch", src, "-o", tmp_path / "sg3.sh", *base)
    assert r.returncode == 2 and "SGLang cannot load them" in r.stderr
