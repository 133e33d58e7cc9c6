"""Serving: memory planner against hand computations, launcher scripts (golden, bash -n, run against fake
GPU tools), serve --dry-run, smoke test against a local stdlib HTTP server.

The 345B replica is header-only: real safetensors headers, data regions left as sparse holes.
Golden launch scripts: regenerate with ``W3REPACK_REGEN_GOLDEN=1 pytest tests/test_serve.py -k golden``
and review the diff.
"""

import contextlib
import http.server
import json
import os
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from repack import synth
from repack.convert import convert
from repack.errors import UserError
from repack.plan import Options
from repack.run import RunConfig
from repack.serve import launcher, paths, planner, recipes, smoke
from tests.helpers import w3repack as run
from tests.replica import PLACEHOLDER, hand_weights_per_gpu, q4, quant, write_replica, write_sparse

GIB = 1 << 30
GOLDEN = Path(__file__).parent / "golden"
@pytest.fixture(scope="module")
def dense_replica(tmp_path_factory):
    """What a GPU below sm90 serves: the 345B output converted with --dense-attention."""
    return write_replica(tmp_path_factory.mktemp("r345d") / "DeepSeek-V3.2-REAP-345B-W4A16", dense=True)


@pytest.fixture(scope="module")
def replica(tmp_path_factory):
    return write_replica(tmp_path_factory.mktemp("r345") / "DeepSeek-V3.2-REAP-345B-W4A16")


def _plan(root, tp, mem, cc, **kw):
    return planner.plan(planner.load_model(root), planner.Request(tp, planner.Gpu(tp, mem, cc), **kw)).to_json()


def test_replica_is_sparse_and_full_size(replica):
    apparent = sum(p.stat().st_size for p in replica.glob("*.safetensors"))
    assert 175e9 < apparent < 200e9  # ~180 GB at 4 bits (docs/formats.md §4) plus MTP layer and float32 kv_b_proj
    assert sum(p.stat().st_blocks * 512 for p in replica.glob("*.safetensors")) < 200e6


def test_replica_on_8x3090_does_not_fit(replica):
    p = _plan(replica, 8, 24.0, "8.6")
    hand = hand_weights_per_gpu(8) / GIB
    assert abs(p["weights_gib_per_gpu"] - hand) / hand < 0.02
    assert 21.0 < p["weights_gib_per_gpu"] < 23.5
    assert p["kv_bytes_per_token_attention"] == 576 * 61 * 2
    assert p["kv_bytes_per_token_indexer"] == 61 * (128 + 4)
    assert p["kv_bytes_per_token"] == 576 * 61 * 2 + 61 * 132
    assert p["fits"] is False and p["max_model_len"] == 0
    assert any("V3.2" in w and "sm90" in w for w in p["warnings"])
    assert any("NCCL_P2P_DISABLE" in w for w in p["warnings"])
    assert p["mtp_bytes_not_loaded"] > 5e9
    kinds = {a["kind"]: a for a in p["alternatives"]}
    pp = kinds["pipeline-parallel"]
    assert pp["gpus"] == 16 and "--pipeline-parallel-size" in pp["vllm_args"]
    assert abs(pp["weights_gib_per_gpu"] - hand / 2) < 0.6
    off = kinds["cpu-offload"]
    assert "--cpu-offload-gb" in off["vllm_args"] and off["max_model_len"] >= 4096


def test_replica_on_8xa100_fits_with_long_context(replica):
    p = _plan(replica, 8, 40.0, "8.0")
    assert p["fits"] is True and p["alternatives"] == []
    a = p["allowances_gib"]
    # no measured figure for a 40 GiB card: CUDA's total is taken 0.6 GiB below nvidia-smi's
    assert p["cuda_memory_gib"] == pytest.approx(39.4) and "estimate" in p["cuda_memory_source"]
    assert a["tp_comm"] > 0 and a["margin"] > 0  # TP 8: lazily connected NCCL channels, which one GPU cannot show
    kv_gib = 39.4 * 0.90 - p["weights_gib_per_gpu"] - a["activations"] - a["cuda_graphs"] - a["non_torch"] - a["tp_comm"] - a["margin"]
    per_token = 576 * 61 * 2 + 61 * 132
    cap = (int(kv_gib * GIB // (per_token * 64)) - 1) * 64  # whole 64-token blocks, one kept back by vLLM
    assert abs(p["capacity_tokens"] - cap) <= 64
    assert p["max_model_len"] == min(163840, p["capacity_tokens"] // 1024 * 1024)
    assert ["--tensor-parallel-size", "8"] == p["vllm_args"][:2]
    assert any("V3.2" in w for w in p["warnings"])
    assert not any("NCCL_P2P_DISABLE" in w for w in p["warnings"])


def test_fp8_kv_and_cc_warnings(replica):
    p = _plan(replica, 8, 24.0, "8.6", kv_cache_dtype="fp8", max_model_len=4096)
    assert any("fp8 KV cache for MLA needs sm89+" in w for w in p["warnings"])
    assert p["kv_bytes_per_token_attention"] == 656 * 61  # fp8_ds_mla: 512 fp8 + 4 scales + 64 bf16 rope
    p = _plan(replica, 8, 80.0, "9.0")
    assert p["fits"] and not any("V3.2" in w for w in p["warnings"])
    p = _plan(replica, 8, 48.0, "7.5")
    assert any("Marlin" in w for w in p["warnings"])


def test_pipeline_stages_follow_vllm():
    assert [len(r) for r in planner.stage_layers(61, 2)] == [31, 30]
    assert [len(r) for r in planner.stage_layers(61, 4)] == [15, 15, 16, 15]
    assert [len(r) for r in planner.stage_layers(10, 3)] == [3, 4, 3]


def test_plan_cli_json_keys(replica):
    r = run("plan", replica, "--gpus", 8, "--gpu-memory", 24, "--compute-capability", "8.6", "--json")
    assert r.returncode == 0, r.stderr
    p = json.loads(r.stdout)
    types = {"weights_gib_per_gpu": float, "kv_bytes_per_token": int, "max_model_len": int, "fits": bool,
             "warnings": list, "vllm_args": list}
    for k, t in types.items():
        assert type(p[k]) is t, k
    assert p["gpu"]["source"] == {"count": "option", "memory_gib": "option", "cc": "option"}
    r = run("plan", replica, "--recipe", "deepseek-v3.2-reap-345b-w3a16-8x3090", "--json")
    p = json.loads(r.stdout)
    assert p["fits"] is True and p["max_model_len"] == 8192 and p["env"] == {"NCCL_P2P_DISABLE": "1"}
    assert "--cpu-offload-gb" in p["vllm_args"] and "--disable-custom-all-reduce" in p["vllm_args"]


def test_gpu_facts_from_nvidia_smi(replica, tmp_path):
    fake = tmp_path / "bin" / "nvidia-smi"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\nfor i in 1 2 3 4; do echo 'NVIDIA A100-SXM4-80GB, 81920, 8.0'; done\n")
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{fake.parent}:{os.environ['PATH']}"}
    p = json.loads(run("plan", replica, "--json", env=env).stdout)
    assert p["gpu"]["count"] == 4 and p["gpu"]["memory_gib"] == 80.0 and p["gpu"]["compute_capability"] == "8.0"
    assert set(p["gpu"]["source"].values()) == {"nvidia-smi"} and p["tensor_parallel"] == 4
    env["PATH"] = str(tmp_path / "empty")
    p = json.loads(run("plan", replica, "--json", env=env).stdout)
    assert p["gpu"]["source"]["count"] == "default" and "assumed" in p["warnings"][0]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    spec = synth.TinySpec.small()
    src = synth.write_checkpoint(root / "w3", spec)
    convert(src, root / "w4", Options(), RunConfig(workers=1))
    return spec, src, root / "w4"


def tiny_hand(s, tp):
    """Per-GPU bytes of the converted TinySpec.small() checkpoint, from its dimensions."""
    h = s.hidden
    total = 2 * s.vocab * h * 2 / tp + h * 2
    for layer in range(s.layers):
        total += (2 * h + s.q_lora + s.kv_lora) * 2
        total += q4(h, s.q_lora) + q4(h, s.kv_lora + s.rope)
        total += (q4(s.q_lora, s.heads * (s.nope + s.rope)) + q4(s.heads * s.v_head, h)) / tp
        total += s.heads * (s.nope + s.v_head) * s.kv_lora * 2 / tp
        if layer < s.first_dense:
            total += 3 * q4(h, s.intermediate) / tp
        else:
            total += (s.experts + 1) * 3 * q4(h, s.moe_intermediate) / tp + s.experts * h * 2 + s.experts * 4
    return total


def test_tiny_converted_exact(tiny):
    spec, _, dst = tiny
    m = planner.load_model(dst)
    for tp in (1, 2):
        assert planner.weights_per_gpu(m, tp, 1).per_stage[0] == tiny_hand(spec, tp)
    p = _plan(dst, 1, 24.0, "8.6")
    assert p["kv_bytes_per_token"] == (spec.kv_lora + spec.rope) * 2 * spec.layers
    assert p["fits"] and p["max_model_len"] == 4096  # capped at max_position_embeddings
    assert not any("bits" in w or "kv_b_proj" in w for w in p["warnings"])


def test_tiny_source_warns_3bit_and_quantized_kv_b(tiny):
    _, src, _ = tiny
    p = _plan(src, 1, 24.0, "8.6")
    assert any("at 3 bits" in w and "w3repack convert" in w for w in p["warnings"])
    assert any("quantized kv_b_proj" in w for w in p["warnings"])


def test_version_flags(replica):
    m = planner.load_model(replica)
    sm86, sm90 = planner.Gpu(8, 24.0, "8.6"), planner.Gpu(8, 80.0, "9.0")
    assert launcher.version_flags("0.16.2", m, sm86).args == ["--quantization", "auto-round"]
    assert launcher.version_flags("0.26.0", m, sm86).args == []
    assert launcher.version_flags("0.30.1rc2", m, sm86).args == []
    f = launcher.version_flags("0.30.0", m, sm90)
    # no backend forced: vLLM's own sm90 choice (Humming) measured no slower than the native path
    assert f.args == [] and f.min_version == "0.17"
    assert any("--moe-backend marlin" in n for n in f.notes)
    assert not launcher.version_flags("0.26.0+cu128", m, sm90).notes
    assert launcher.version_flags("0.33.0", m, sm86, paths.NATIVE).min_version == "0.30.0"
    with pytest.raises(UserError, match="refuses 3-bit checkpoints"):
        launcher.version_flags("0.29.1", m, sm86, paths.NATIVE)
    with pytest.raises(UserError, match="expected a version"):
        launcher.version_flags("latest", m, sm86)


def _launch(replica, out, *args):
    r = run("launch", replica, "-o", out, *args)
    assert r.returncode == 0, r.stderr
    return out.read_text().replace(str(replica), PLACEHOLDER)


GOLDEN_CASES = {
    "deepseek-v3.2-reap-345b-w3a16-8x3090.sh": ["--recipe", "deepseek-v3.2-reap-345b-w3a16-8x3090", "--vllm-version", "0.26.0"],
    "deepseek-v3.2-reap-345b-w3a16-8xa100-40g.sh": ["--recipe", "deepseek-v3.2-reap-345b-w3a16-8xa100-40g", "--vllm-version", "0.26.0"],
    "2-nodes-8xh100-vllm-0.30.sh": ["--gpus", 8, "--gpu-memory", 80, "--compute-capability", "9.0", "--nodes", 2,
                                    "--max-model-len", 65536, "--vllm-version", "0.30.0"],
}


@pytest.mark.parametrize("name", sorted(GOLDEN_CASES))
def test_launch_golden(replica, dense_replica, tmp_path, name):
    out = tmp_path / "serve.sh"
    # below sm90 the V3.2 model is served converted with --dense-attention (the planner refuses it otherwise)
    text = _launch(replica if "h100" in name else dense_replica, out, *GOLDEN_CASES[name])
    assert os.access(out, os.X_OK)
    assert subprocess.run(["bash", "-n", str(out)]).returncode == 0
    if shutil.which("shellcheck"):
        r = subprocess.run(["shellcheck", str(out)], capture_output=True, text=True)
        assert r.returncode == 0, r.stdout
    if os.environ.get("W3REPACK_REGEN_GOLDEN"):
        (GOLDEN / name).write_text(text)
    assert text == (GOLDEN / name).read_text()


def test_every_recipe_has_a_golden_and_loads():
    for n in recipes.names():
        r = recipes.load(n)
        assert r["source_repo"] == "0xSero/DeepSeek-V3.2-REAP-345B-W3A16" or n not in (
            "deepseek-v3.2-reap-345b-w3a16-8x3090", "deepseek-v3.2-reap-345b-w3a16-8xa100-40g")
        assert (GOLDEN / f"{n}.sh").exists()
    assert run("plan", "x", "--recipe", "nope").returncode == 2


def _fake_tools(tmp_path, gpus, mib):
    b = tmp_path / "fakebin"
    b.mkdir(parents=True)
    (b / "nvidia-smi").write_text(f"#!/bin/sh\nfor i in $(seq 1 {gpus}); do echo '{mib}'; done\n")
    (b / "python3").write_text("#!/bin/sh\necho 0.26.0+cu128\n")
    (b / "vllm").write_text("#!/bin/sh\necho \"vllm $* NCCL_P2P_DISABLE=${NCCL_P2P_DISABLE:-unset}\"\n")
    for f in b.iterdir():
        f.chmod(0o755)
    return {**os.environ, "PATH": f"{b}:/usr/bin:/bin"}


def test_launch_script_runs_preflight_then_execs(dense_replica, tmp_path):
    replica = dense_replica
    out = tmp_path / "serve.sh"
    _launch(replica, out, "--recipe", "deepseek-v3.2-reap-345b-w3a16-8x3090", "--vllm-version", "0.26.0")
    r = subprocess.run(["bash", str(out)], capture_output=True, text=True, env=_fake_tools(tmp_path, 8, 24576))
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"vllm serve {replica} --tensor-parallel-size 8 --max-model-len 8192")
    assert "--cpu-offload-gb 5" in r.stdout and r.stdout.strip().endswith("NCCL_P2P_DISABLE=1")
    assert "preflight: 8 GPUs, vLLM 0.26.0: ok" in r.stderr
    r = subprocess.run(["bash", str(out)], capture_output=True, text=True, env=_fake_tools(tmp_path / "a", 4, 24576))
    assert r.returncode == 1 and "4 GPUs found, the plan needs 8" in r.stderr
    r = subprocess.run(["bash", str(out)], capture_output=True, text=True, env=_fake_tools(tmp_path / "b", 8, 12288))
    assert r.returncode == 1 and "12288 MiB" in r.stderr


def test_launch_v32_below_sm90_needs_the_dense_conversion(replica, tmp_path):
    r = run("launch", replica, "-o", tmp_path / "s.sh", "--recipe", "deepseek-v3.2-reap-345b-w3a16-8x3090")
    assert r.returncode == 2 and "run `w3repack convert MODEL DST --dense-attention`, then launch DST" in r.stderr
    r = run("plan", replica, "--recipe", "deepseek-v3.2-reap-345b-w3a16-8x3090")
    assert r.returncode == 0 and "no backend" not in r.stdout and "dense-attention fallback" in r.stdout


def test_launch_refuses_unfit_unless_forced(dense_replica, tmp_path):
    replica = dense_replica
    out = tmp_path / "s.sh"
    r = run("launch", replica, "-o", out, "--gpus", 8, "--gpu-memory", 24, "--compute-capability", "8.6")
    assert r.returncode == 2 and "does not fit" in r.stderr and "--nodes 2" in r.stderr and not out.exists()
    r = run("launch", replica, "-o", out, "--gpus", 8, "--gpu-memory", 24, "--compute-capability", "8.6", "--force")
    assert r.returncode == 0 and "fits: NO" in out.read_text()


def test_serve_dry_run(dense_replica):
    replica = dense_replica
    r = run("serve", replica, "--recipe", "deepseek-v3.2-reap-345b-w3a16-8xa100-40g", "--dry-run")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == (f"vllm serve {replica} --tensor-parallel-size 8 --max-model-len 65536 "
                                "--gpu-memory-utilization 0.9")


class FakeServer(http.server.BaseHTTPRequestHandler):
    """An OpenAI-compatible fake that answers like a working model (temperature 0): it repeats what it is asked
    to repeat, counts on, answers the long prompt's question and reports cached prompt tokens the second time.

    ``crash_over``: prompts of more words answer 500 (the kv_b_proj crash). ``mode``: ``garbage`` answers
    ``!!!!`` (broken weights), ``malformed`` answers JSON of the wrong shape, ``notjson`` answers non-JSON,
    ``huge`` an endless body, ``nocache`` reports 0 cached tokens, ``wrong`` plausible but wrong text.
    """

    crash_over = None
    mode = "good"
    seen: dict = {}

    def log_message(self, *a):
        pass

    def _send(self, code, obj):
        raw = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def do_GET(self):
        if self.path == "/v1/models":
            self._send(200, {"object": "list", "data": [{"id": "tiny", "object": "model", "max_model_len": 8192}]})
        else:
            self._send(404, {"error": "not found"})

    def answer(self, prompt: str) -> str:
        if self.mode == "garbage":
            return "!!!!!!!!!!!!!!!!"
        if self.mode == "wrong":
            return "I am a helpful assistant."
        if "Repeat exactly" in prompt:
            return prompt.split(":", 1)[1].strip()
        if prompt == smoke.COUNT_PROMPT:
            return " 7, 8, 9,"
        return " paper boats"

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.mode == "notjson":
            return self._send(200, b"<html>gateway error</html>")
        if self.mode == "malformed":
            return self._send(200, {"choices": [42], "usage": "x"})
        if self.mode == "huge":
            self.send_response(200)
            self.end_headers()
            chunk = b"A" * (1 << 20)
            with contextlib.suppress(OSError):
                for _ in range(64):
                    self.wfile.write(chunk)
            return None
        if self.path == "/v1/chat/completions":
            text = self.answer(body["messages"][0]["content"])
            return self._send(200, {"choices": [{"message": {"role": "assistant", "content": text}}]})
        if self.path == "/v1/completions":
            prompt = body["prompt"]
            n = len(prompt.split())
            if self.crash_over and n > self.crash_over:
                return self._send(500, {"error": "AttributeError: 'ColumnParallelLinear' object has no attribute 'weight'"})
            cached = 0 if self.mode == "nocache" else (n // 16 * 16 if prompt in self.seen else 0)
            self.seen[prompt] = True
            return self._send(200, {"choices": [{"text": self.answer(prompt)}],
                                    "usage": {"prompt_tokens": n, "prompt_tokens_details": {"cached_tokens": cached}}})
        return self._send(404, {"error": "not found"})


@pytest.fixture
def server():
    servers = []

    def start(crash_over=None, mode="good"):
        handler = type("H", (FakeServer,), {"crash_over": crash_over, "mode": mode, "seen": {}})
        s = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=s.serve_forever, daemon=True).start()
        servers.append(s)
        return f"http://127.0.0.1:{s.server_address[1]}"

    yield start
    for s in servers:
        s.shutdown()
        s.server_close()


def test_smoke_passes_on_healthy_server(server):
    url = server()
    r = run("smoke", url, "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    rep = json.loads(r.stdout)
    assert rep["ok"] and rep["model"] == "tiny" and len(rep["checks"]) == 5 and rep["schema_version"] == 1
    long_check = rep["checks"][3]
    assert int(long_check["detail"].split("prompt_tokens=")[1].split(";")[0]) > 2048
    assert "cached_tokens=" in rep["checks"][4]["detail"] and "cached_tokens=0" not in rep["checks"][4]["detail"]


@pytest.mark.parametrize("mode,says", [
    ("garbage", "degenerate repeated text"),
    ("wrong", "expected"),
    ("malformed", "malformed response"),
    ("notjson", "HTTP 200: <html>"),
    ("huge", "larger than 4 MiB"),
    ("nocache", "prefix cache was not hit"),
])
def test_smoke_fails_a_server_that_answers_badly(server, mode, says):
    """Garbage, wrong answers, malformed or oversized responses and a prefix cache that is never hit: exit 1,
    each named, never a traceback or exit 2."""
    url = server(mode=mode)
    r = run("smoke", url, "--long-tokens", 300, "--timeout", 20)
    assert r.returncode == 1, (mode, r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and says in r.stdout, (mode, r.stdout)
    assert "FAIL" in r.stdout and r.stdout.strip().splitlines()[-1].startswith("FAILED")


def test_smoke_garbage_judgement():
    assert smoke.garbage("!!!!!!!!!!!!") and smoke.garbage("") and smoke.garbage("   \n")
    assert smoke.garbage("ok \x00\x01 text") and smoke.garbage("the the the the the the the the")
    assert smoke.garbage("caf\ufffd\ufffd")
    for good in ("paper boats", " 7, 8, 9,", "violet harbor seventeen lanterns", "Hello!!", "1111 is a number"):
        assert smoke.garbage(good) is None, good
    assert smoke.judge_count(" 7, 8")[0] and not smoke.judge_count(" 8, 9")[0] and not smoke.judge_count(" 17")[0]
    assert smoke.judge_repeat("Violet harbor, seventeen lanterns.")[0] and not smoke.judge_repeat("violet harbor")[0]


def test_smoke_total_time_is_bounded(server):
    """A server that answers nothing within the time limit: the run ends within its total limit, exit 1."""
    hang = threading.Event()

    class Slow(FakeServer):
        def do_POST(self):
            hang.wait(30)

    s = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    threading.Thread(target=s.serve_forever, daemon=True).start()
    try:
        t0 = time.monotonic()
        r = run("smoke", f"http://127.0.0.1:{s.server_address[1]}", "--long-tokens", 300, "--total-timeout", 2)
        took = time.monotonic() - t0
    finally:
        hang.set()
        s.shutdown()
        s.server_close()
    assert r.returncode == 1, r.stdout + r.stderr
    assert took < 12, took
    assert "total time limit" in r.stdout or "timed out" in r.stdout, r.stdout


def test_smoke_fails_on_long_prompt_crash(server):
    url = server(crash_over=700)
    r = run("smoke", url, "--model", "tiny")
    assert r.returncode == 1
    assert "PASS  chat: repeat exactly" in r.stdout and "FAIL  completion, ~" in r.stdout and "ColumnParallelLinear" in r.stdout
    r = run("smoke", url, "--long-tokens", 300)
    assert r.returncode == 0, r.stdout
    r = run("smoke", url, "--model", "other")
    assert r.returncode == 1 and "other not served" in r.stdout


def test_smoke_unreachable_exits_2():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = run("smoke", f"http://127.0.0.1:{port}")
    assert r.returncode == 2 and r.stderr.startswith("error: server unreachable")


def test_long_prompt_length():
    assert 2400 < len(smoke.long_prompt(2600).split()) < 2700


def test_launch_script_names_the_model_by_absolute_path(replica, tmp_path):
    """A relative MODEL would make vLLM look the name up on the hub when the script runs elsewhere."""
    out = tmp_path / "serve.sh"
    r = run("launch", replica.name, "-o", out, "--gpus", "8", "--gpu-memory", "80", "--compute-capability", "9.0",
            "--vllm-version", "0.26.0", cwd=replica.parent)
    assert r.returncode == 0, r.stderr
    model_lines = [ln for ln in out.read_text().splitlines() if "MODEL=" in ln]
    assert model_lines and all(str(replica.resolve()) in ln for ln in model_lines), model_lines


def test_plan_standard_attention_gqa_and_vocab_padding(tmp_path):
    """Llama-style GQA model: k/v are replicated once TP exceeds the KV heads; vocab 1000 pads to 1024."""
    h, heads, kv, hd, inter, vocab, layers = 1024, 16, 4, 64, 2048, 1000, 2
    root = tmp_path / "gqa"
    root.mkdir()
    t = [("model.embed_tokens.weight", "BF16", [vocab, h]), ("model.norm.weight", "BF16", [h]),
         ("lm_head.weight", "BF16", [vocab, h])]
    for i in range(layers):
        p = f"model.layers.{i}"
        t += [(f"{p}.input_layernorm.weight", "BF16", [h]), (f"{p}.post_attention_layernorm.weight", "BF16", [h])]
        t += quant(f"{p}.self_attn.q_proj", h, heads * hd) + quant(f"{p}.self_attn.k_proj", h, kv * hd)
        t += quant(f"{p}.self_attn.v_proj", h, kv * hd) + quant(f"{p}.self_attn.o_proj", heads * hd, h)
        t += quant(f"{p}.mlp.gate_proj", h, inter) + quant(f"{p}.mlp.up_proj", h, inter) + quant(f"{p}.mlp.down_proj", inter, h)
    write_sparse(root / "model.safetensors", t)
    (root / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": h, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv, "head_dim": hd, "intermediate_size": inter,
        "vocab_size": vocab, "max_position_embeddings": 4096, "torch_dtype": "bfloat16",
        "quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": 128, "sym": True, "desc_act": False}}))

    def hand(tp):
        kv_ranks = min(tp, kv)
        total = 2 * (-(-1024 // tp)) * h * 2 + h * 2  # embed + lm_head (rows padded to 1024, split), final norm
        per_layer = 2 * h * 2 + (q4(h, heads * hd) + q4(heads * hd, h)) / tp + 2 * q4(h, kv * hd) / kv_ranks
        per_layer += (2 * q4(h, inter) + q4(inter, h)) / tp
        return total + layers * per_layer

    for tp, kv_per_rank in ((2, 2), (8, 1)):
        assert planner.weights_per_gpu(planner.load_model(root), tp, 1).per_stage == [pytest.approx(hand(tp), rel=1e-12)], tp
        p = _plan(root, tp, 24.0, "8.6")
        assert p["weights_gib_per_gpu"] == pytest.approx(hand(tp) / 2**30, abs=1e-3), tp
        assert p["kv_bytes_per_token"] == 2 * kv_per_rank * hd * 2 * layers, tp
