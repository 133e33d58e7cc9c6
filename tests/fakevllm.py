"""A stand-in for ``vllm serve`` and ``torch`` on a machine without a GPU, put first on ``PYTHONPATH``.

It only exercises w3repack's side of a rehearsal (process group, arguments, readiness, HTTP measurement, log
parsing): the memory lines it prints use vLLM 0.33.0's format strings with numbers computed from its arguments,
and the real engine's lines are judged separately (tests/data/vllm-0.33.0-*.log, taken from GPU runs). It records
its argv and environment, and starts a grandchild (as vLLM starts its EngineCore) whose pid it records.
"""

from __future__ import annotations

import json
from pathlib import Path

TOTAL_GIB = 139.8

MAIN = r'''
import http.server, json, os, subprocess, sys, time
args = sys.argv[2:]
def opt(name, default=None):
    return args[args.index(name) + 1] if name in args else default
record = os.environ["FAKE_VLLM_RECORD"]
mode = os.environ.get("FAKE_VLLM_MODE", "ok")
grand = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
with open(record, "a") as f:
    f.write(json.dumps({"argv": sys.argv, "disabled": os.environ.get("VLLM_DISABLED_KERNELS"),
                        "logging": os.environ.get("VLLM_LOGGING_CONFIG_PATH"), "grandchild": grand.pid}) + "\n")
total = TOTAL
util = float(opt("--gpu-memory-utilization", "0.9"))
cfg = json.load(open(os.path.join(args[0], "config.json")))
weights = sum(os.path.getsize(os.path.join(args[0], p)) for p in os.listdir(args[0]) if p.endswith(".safetensors")) / 2**30
print(f"INFO [vllm.v1.worker.gpu_model_runner] Model loading took {weights:.2f} GiB memory and 1.5 seconds", flush=True)
print(f"DEBUG [vllm.v1.worker.gpu_worker] worker init memory snapshot: torch_peak=0.0GiB, torch_allocated=0.0GiB, "
      f"free_memory={total - 0.6:.2f}GiB, total_memory={total}GiB, cuda_memory=0.6GiB, torch_memory=0.0GiB, "
      "non_torch_memory=0.6GiB, timestamp=1.0, auto_measure=True", flush=True)
consumed, peak, cg = weights + 0.31, 0.42, 0.27
if "--moe-backend" in args:
    print("INFO [vllm.model_executor.layers.fused_moe] Using 'MARLIN' WNA16 MoE backend.", flush=True)
print(f"DEBUG [vllm.v1.worker.gpu_worker] Memory profiling takes 2.10 seconds. Total non KV cache memory: "
      f"{consumed + peak:.2f}GiB; torch peak memory increase: 0.5GiB; total consumed (from mem_get_info): "
      f"{consumed:.2f}GiB; weights memory: {weights:.2f}GiB.", flush=True)
print(f"INFO [vllm.v1.worker.gpu_worker] CUDA graph memory profiling is enabled (default since v0.21.0). The current "
      f"--gpu-memory-utilization={util:.4f} is equivalent to --gpu-memory-utilization={util - cg / total:.4f} without "
      "CUDA graph memory profiling.", flush=True)
kv = util * total - consumed - peak - cg
if mode == "oom" or kv <= 0:
    print("ERROR [vllm] EngineCore failed to start.", flush=True)
    print("ValueError: No available memory for the cache blocks. Try increasing `gpu_memory_utilization`", flush=True)
    sys.exit(1)
per_token = (cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"]) * 2 * cfg["num_hidden_layers"]
blocks = int(kv * 2**30 // (per_token * 16))
tokens = blocks * 16
max_len = min(cfg["max_position_embeddings"], (blocks - 1) * 16)
print(f"INFO [vllm.v1.worker.gpu_worker] Available KV cache memory: {kv:.2f} GiB", flush=True)
print(f"INFO [vllm.v1.core.kv_cache_utils] GPU KV cache size: {tokens:,} tokens, Maximum concurrency for "
      f"{max_len:,} tokens per request: 1.00x", flush=True)
print(f"INFO [vllm.v1.core.kv_cache_planning] Auto-fit max_model_len: reduced from {cfg['max_position_embeddings']} "
      f"to {max_len} to fit in available KV cache memory ({kv:.2f} GiB GPU)", flush=True)
if mode == "hang":
    time.sleep(3600)

class H(http.server.BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass
    def send(self, body, ctype="application/json"):
        data = body.encode()
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
    def do_GET(self):
        if self.path == "/health":
            self.send("")
        elif self.path == "/v1/models":
            self.send(json.dumps({"data": [{"id": opt("--served-model-name"), "max_model_len": max_len}]}))
        elif self.path == "/metrics":
            self.send(f'vllm:cache_config_info{{block_size="16",engine="0",num_gpu_blocks="{blocks}"}} 1.0\n', "text/plain")
    def do_POST(self):
        req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        time.sleep(0.002 * req["max_tokens"])
        self.send(json.dumps({"choices": [{"text": ""}], "usage": {"completion_tokens": req["max_tokens"]}}))

class S(http.server.ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024
S((opt("--host"), int(opt("--port"))), H).serve_forever()
'''

TORCH = r'''
import os
class cuda:
    @staticmethod
    def is_available():
        return os.environ.get("FAKE_TORCH_MODE") != "nogpu"
    @staticmethod
    def mem_get_info(i=0):
        free = 4.0 if os.environ.get("FAKE_TORCH_MODE") == "busy" else TOTAL - 0.6
        return (int(free * 2**30), int(TOTAL * 2**30))
    @staticmethod
    def get_device_capability(i=0):
        return (9, 0)
    @staticmethod
    def get_device_name(i=0):
        return "NVIDIA H200"
    @staticmethod
    def device_count():
        return 1
__version__ = "2.11.0+fake"
'''


def install(root: Path, vllm: bool = True) -> Path:
    """The fake ``vllm`` (0.33.0, unless not ``vllm``) and ``torch`` packages under ``root``; returns ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "torch").mkdir()
    (root / "torch" / "__init__.py").write_text(f"TOTAL = {TOTAL_GIB}\n" + TORCH)
    if not vllm:
        return root
    pkg = root / "vllm" / "entrypoints" / "cli"
    pkg.mkdir(parents=True)
    (root / "vllm" / "__init__.py").write_text('__version__ = "0.33.0"\n')
    (root / "vllm" / "entrypoints" / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "main.py").write_text(f"TOTAL = {TOTAL_GIB}\n" + MAIN)
    meta = root / "vllm-0.33.0.dist-info"
    meta.mkdir()
    (meta / "METADATA").write_text("Metadata-Version: 2.1\nName: vllm\nVersion: 0.33.0\n")
    (meta / "RECORD").write_text("")
    return root


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
