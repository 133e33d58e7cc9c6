"""Beyond DeepSeek: Qwen3-235B-A22B and GLM-4.6 planned from full-size header-only 3-bit replicas, against hand
computations (tests/replica_families.py), at TP 4 (weights, KV bytes) and TP 8 (one verdict, a layout that runs)."""

import json
import os
import subprocess
from pathlib import Path

import pytest

from repack.serve import paths, planner
from repack.serve.arch import spec_for
from tests.helpers import w3repack as run
from tests.replica import write_sparse
from tests.replica_families import glm_hand, glm_kv_bytes, qwen3_hand, qwen3_kv_bytes, write_glm46, write_qwen3_235b

GIB = 1 << 30
H200 = ["--gpu-memory", "140.4", "--compute-capability", "9.0", "--vllm-version", "0.33.0"]


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    return write_qwen3_235b(tmp_path_factory.mktemp("q235") / "Qwen3-235B-A22B-W3A16")


@pytest.fixture(scope="module")
def glm(tmp_path_factory):
    return write_glm46(tmp_path_factory.mktemp("glm46") / "GLM-4.6-W3A16")


@pytest.fixture(scope="module")
def glm_model(glm):
    return planner.load_model(glm)


def _plan(root, *args):
    r = run("plan", root, *args, "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_specs_are_registered_by_architecture():
    assert spec_for({"architectures": ["Qwen3MoeForCausalLM"]}).name == "qwen-moe"
    assert spec_for({"architectures": ["Glm4MoeForCausalLM"]}).speculative_method("0.33.0") == "mtp"
    assert spec_for({"architectures": ["DeepseekV3ForCausalLM"]}).speculative_method("0.33.0") == "deepseek_mtp"
    assert spec_for({"architectures": ["MixtralForCausalLM"]}).name == "generic"


def test_qwen3_235b_at_tp4_exact_weights_and_kv(qwen3):
    p = _plan(qwen3, "--gpus", "4", *H200)
    by = {x["name"]: x for x in p["paths"]}
    assert by["native-3bit"]["weights_gib_per_gpu"] == pytest.approx(qwen3_hand(4) / GIB, abs=6e-4)
    assert by["repacked-4bit"]["weights_gib_per_gpu"] == pytest.approx(qwen3_hand(4, bits=4) / GIB, abs=6e-4)
    # 4 KV heads over 4 ranks: one each; 94 layers of K and V at 128 values, bf16
    assert p["kv_bytes_per_token"] == qwen3_kv_bytes(4) == 48128
    assert p["fits"] and by["native-3bit"]["fits"] and by["native-3bit"]["prepare"] == []
    assert not any(w.startswith("architecture ") for w in p["warnings"])  # a registered family: no generic warning


def test_qwen3_235b_at_tp8_one_verdict_and_layouts_that_run(qwen3):
    p = _plan(qwen3, "--gpus", "8", *H200)
    # experts 1536 wide: 192 per rank at TP 8, not whole groups of 128
    assert p["fits"] is False and all(x["fits"] is False for x in p["paths"])
    assert "moe_intermediate_size 1536 / TP 8 = 192 per rank is not a multiple of the quantization group size 128" in p["reason"]
    assert p["layout_problems"][0] == p["reason"].split("whole ranks: ", 1)[1]
    alts = {a["kind"]: a for a in p["alternatives"]}
    ep, pp = alts["expert-parallel"], alts["pipeline-parallel-same-gpus"]
    assert "--enable-expert-parallel" in ep["vllm_args"] and ep["tensor_parallel"] == 8 and ep["gpus"] == 8
    assert pp["vllm_args"][:4] == ["--tensor-parallel-size", "4", "--pipeline-parallel-size", "2"] and pp["gpus"] == 8
    text = run("plan", qwen3, "--gpus", "8", *H200).stdout
    assert "fits              NO" in text and "fits              yes" not in text
    # the layouts offered run: planned with the option, they fit, with the same weights per GPU at TP 8
    e = _plan(qwen3, "--gpus", "8", "--expert-parallel", *H200)
    assert e["fits"] and e["expert_parallel"] and "--enable-expert-parallel" in e["vllm_args"] and e["layout_problems"] == []
    assert e["paths"][0]["weights_gib_per_gpu"] == pytest.approx(qwen3_hand(8) / GIB, abs=6e-4)
    assert e["kv_bytes_per_token"] == qwen3_kv_bytes(8)  # one KV head per rank, replicated over two
    s = _plan(qwen3, "--gpus", "8", "--pipeline-parallel", "2", *H200)
    assert s["fits"] and (s["tensor_parallel"], s["pipeline_parallel"]) == (4, 2)
    assert s["kv_bytes_per_token"] == qwen3_kv_bytes(4) // 94 * 47  # one stage holds 47 of the 94 layers


def test_glm46_at_tp4_exact_weights_and_kv(glm_model):
    req = planner.Request(4, planner.Gpu(4, 140.4, "9.0"), vllm_version="0.33.0")
    rep = paths.plan_paths(glm_model, req, vllm_version="0.33.0")
    nat, rp = rep.path(paths.NATIVE), rep.path(paths.REPACKED)
    assert nat.plan.weights_gib_per_gpu == pytest.approx(glm_hand(4) / GIB, abs=6e-4)
    assert rp.plan.weights_gib_per_gpu == pytest.approx(glm_hand(4, bits=4) / GIB, abs=6e-4)
    assert nat.plan.kv_bytes_per_token == glm_kv_bytes(4) == 94208  # 8 KV heads over 4 ranks: two each
    assert nat.fits and rp.fits
    assert nat.prepare == ["w3repack convert SRC DST --target native"]  # the MTP layer's float parts
    assert nat.plan.mtp_bytes_not_loaded > 0


def test_glm46_at_tp8_expert_parallel_does_not_help_the_shared_expert(glm_model):
    req = planner.Request(8, planner.Gpu(8, 140.4, "9.0"), vllm_version="0.33.0")
    p = planner.plan(glm_model, req, native=True)
    assert not p.fits and "moe_intermediate_size 1536 / TP 8 = 192" in p.reason
    kinds = {a["kind"] for a in p.alternatives}
    # under expert parallelism the shared expert is still split by TP: 192 rows of its down projection per rank
    assert "expert-parallel" not in kinds and "pipeline-parallel-same-gpus" in kinds
    e = planner.plan(glm_model, planner.Request(8, req.gpu, ep=True, vllm_version="0.33.0"), native=True)
    assert not e.fits and any("shared_experts.down_proj" in x for x in e.layout_problems)
    assert planner.plan(glm_model, planner.Request(4, req.gpu, pp=2, vllm_version="0.33.0"), native=True).fits


def test_glm46_mtp_speculation(glm):
    p = _plan(glm, "--gpus", "4", *H200, "--speculative", "1")
    rep = p["paths"][1]
    assert '{"method":"mtp","num_speculative_tokens":1}' in rep["vllm_args"]
    assert p["recommended"] == "repacked-4bit" and p["paths"][0]["runnable"] is False


GOLDEN = Path(__file__).parent / "golden"


def _golden(name: str, text: str) -> None:
    """Compare with tests/golden/NAME (regenerate with W3REPACK_REGEN_GOLDEN=1 and review the diff)."""
    path = GOLDEN / name
    if os.environ.get("W3REPACK_REGEN_GOLDEN"):
        path.write_text(text)
    assert text == path.read_text()


def test_qwen3_repack_on_marlin_carries_the_failed_gpu_check(qwen3, tmp_path):
    """The converted tiny Qwen3-MoE did not match its float reference under Marlin (docs/validation.md): a plan
    that runs the repack on Marlin says so; one on Humming (sm90) does not."""
    conv, _ = paths.virtual_output(planner.load_model(qwen3))
    dst = tmp_path / "Qwen3-235B-A22B-W4A16"
    dst.mkdir()
    write_sparse(dst / "model.safetensors", [(n, d, list(s)) for n, d, s, _ in conv.tensors])
    (dst / "config.json").write_text(json.dumps(conv.config))
    caveat = "under Marlin on vLLM 0.33.0 differed from its exact float reference"
    sm86 = _plan(dst, "--gpus", "8", "--gpu-memory", "48", "--compute-capability", "8.6", "--vllm-version", "0.33.0")
    assert any(caveat in w for w in sm86["warnings"])
    sm90 = _plan(dst, "--gpus", "4", *H200)
    assert not any(caveat in w for w in sm90["warnings"])


def test_golden_vllm_launchers_per_family(qwen3, glm_model, tmp_path):
    """Qwen3 serves its 3-bit source natively as it is; GLM's repack is launched from its conversion (a
    header-only replica of what `w3repack convert` writes), with MTP speculation."""
    out = tmp_path / "q.sh"
    r = run("launch", qwen3, "--gpus", "4", *H200, "--path", "native", "-o", out)
    assert r.returncode == 0, r.stderr
    assert subprocess.run(["bash", "-n", str(out)]).returncode == 0
    _golden("qwen3-235b-a22b-w3a16-4xh200-native.sh", out.read_text().replace(str(qwen3), "/models/Qwen3-235B-A22B-W3A16"))
    conv, _ = paths.virtual_output(glm_model)
    dst = tmp_path / "GLM-4.6-W4A16"
    dst.mkdir()
    write_sparse(dst / "model.safetensors", [(n, d, list(s)) for n, d, s, _ in conv.tensors])
    (dst / "config.json").write_text(json.dumps(conv.config))
    out = tmp_path / "g.sh"
    r = run("launch", dst, "--gpus", "8", "--pipeline-parallel", "2", *H200, "--speculative", "1", "-o", out)
    assert r.returncode == 0, r.stderr
    assert subprocess.run(["bash", "-n", str(out)]).returncode == 0
    text = out.read_text()
    assert '{"method":"mtp","num_speculative_tokens":1}' in text and "NEED_GPUS=8" in text
    _golden("glm-4.6-w4a16-8xh200-tp4-pp2-mtp.sh", text.replace(str(dst), "/models/GLM-4.6-W4A16"))
