#!/usr/bin/env bash
# Serve /models/DeepSeek-V3.2-REAP-345B-W4A16 with stock vLLM. Written by `w3repack launch`; regenerate it rather than edit it.
# plan: 2 node(s) x 8 GPUs of 80 GiB, cc 9.0, TP 8 x PP 2
# weights 11.45 GiB per GPU (11.45 GiB on the GPU), KV cache 39804 bytes per token, 57.09 GiB per GPU
# max context 65536 tokens at --gpu-memory-utilization 0.9 (capacity 1555840 tokens); fits: yes
# flags chosen for vLLM 0.30.0
# warning: vLLM 0.30.0 picks its own MoE kernel for 4-bit on sm90 (Humming); measured against the native path in docs/benchmarks.md. For Marlin, add after --: --moe-backend marlin
set -euo pipefail

ROLE="${1:-}"
HEAD_IP="${2:-}"
case "$ROLE" in
  head) ;;
  worker) [ -n "$HEAD_IP" ] || { echo "usage: $0 worker HEAD_IP" >&2; exit 2; } ;;
  *) echo "usage: $0 head (on the first node) | $0 worker HEAD_IP (on the other 1)" >&2; exit 2 ;;
esac

[ -n "${MODEL:-}" ] || MODEL=/models/DeepSeek-V3.2-REAP-345B-W4A16
PYTHON="${PYTHON:-python3}"
VLLM="${VLLM:-vllm}"
NEED_GPUS=8
NEED_MIB=80281
MIN_VLLM=0.17
FLAGS_VLLM=0.30.0
NODES=2
RAY_PORT="${RAY_PORT:-6379}"

die() { echo "preflight: $*" >&2; exit 1; }
version_ge() { [ "$(printf '%s\n%s\n' "$1" "$2" | sort -V | head -n 1)" = "$2" ]; }

command -v nvidia-smi >/dev/null 2>&1 || die "nvidia-smi not found: no NVIDIA driver here"
mapfile -t MEM_MIB < <(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits)
[ "${#MEM_MIB[@]}" -ge "$NEED_GPUS" ] || die "${#MEM_MIB[@]} GPUs found, the plan needs $NEED_GPUS"
for i in "${!MEM_MIB[@]}"; do
  mib="${MEM_MIB[$i]%%.*}"
  mib="${mib// /}"
  [ "$mib" -ge "$NEED_MIB" ] || die "GPU $i has $mib MiB, the plan assumes at least $NEED_MIB MiB"
done
VLLM_VERSION="$("$PYTHON" -c 'import vllm; print(vllm.__version__)' 2>/dev/null)" \
  || die "cannot import vllm with $PYTHON (pip install vllm, or set PYTHON=/path/to/venv/bin/python)"
VLLM_VERSION="${VLLM_VERSION%%+*}"
version_ge "$VLLM_VERSION" "$MIN_VLLM" || die "vLLM $VLLM_VERSION is older than $MIN_VLLM, which these flags need"
[ "$VLLM_VERSION" = "$FLAGS_VLLM" ] || echo "preflight: note: vLLM $VLLM_VERSION installed, flags chosen for $FLAGS_VLLM; regenerate with --vllm-version $VLLM_VERSION if it refuses them" >&2
command -v "$VLLM" >/dev/null 2>&1 || die "$VLLM not on PATH (set VLLM=/path/to/venv/bin/vllm)"
command -v ray >/dev/null 2>&1 || die "ray not on PATH (pip install ray)"
echo "preflight: ${#MEM_MIB[@]} GPUs, vLLM $VLLM_VERSION: ok" >&2

if [ "$ROLE" = worker ]; then
  exec ray start --address="$HEAD_IP:$RAY_PORT" --block
fi
ray start --head --port="$RAY_PORT"
TOTAL=$((NODES * NEED_GPUS))
for _ in $(seq 1 120); do
  HAVE="$("$PYTHON" -c 'import ray; ray.init(address="auto", logging_level="ERROR"); print(int(ray.cluster_resources().get("GPU", 0)))' 2>/dev/null || echo 0)"
  [ "$HAVE" -ge "$TOTAL" ] && break
  echo "waiting for workers: $HAVE of $TOTAL GPUs in the Ray cluster" >&2
  sleep 5
done
[ "$HAVE" -ge "$TOTAL" ] || die "only $HAVE of $TOTAL GPUs joined the Ray cluster"
exec "$VLLM" serve "$MODEL" \
  --tensor-parallel-size 8 \
  --pipeline-parallel-size 2 \
  --max-model-len 65536 \
  --gpu-memory-utilization 0.9 \
  --distributed-executor-backend ray
