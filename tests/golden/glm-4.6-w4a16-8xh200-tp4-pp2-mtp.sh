#!/usr/bin/env bash
# Serve /models/GLM-4.6-W4A16 with stock vLLM. Written by `w3repack launch`; regenerate it rather than edit it.
# plan: 1 node(s) x 8 GPUs of 140.4 GiB, cc 9.0, TP 4 x PP 2
# weights 23.62 GiB per GPU (23.62 GiB on the GPU), KV cache 47104 bytes per token, 99.15 GiB per GPU
# max context 202752 tokens at --gpu-memory-utilization 0.9 (capacity 2259968 tokens); fits: yes
# flags chosen for vLLM 0.33.0
# warning: vLLM 0.33.0 picks its own MoE kernel for 4-bit on sm90 (Humming); measured against the native path in docs/benchmarks.md. For Marlin, add after --: --moe-backend marlin
set -euo pipefail

[ -n "${MODEL:-}" ] || MODEL=/models/GLM-4.6-W4A16
PYTHON="${PYTHON:-python3}"
VLLM="${VLLM:-vllm}"
NEED_GPUS=8
NEED_MIB=140894
MIN_VLLM=0.26
FLAGS_VLLM=0.33.0

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
echo "preflight: ${#MEM_MIB[@]} GPUs, vLLM $VLLM_VERSION: ok" >&2

exec "$VLLM" serve "$MODEL" \
  --tensor-parallel-size 4 \
  --pipeline-parallel-size 2 \
  --max-model-len 202752 \
  --gpu-memory-utilization 0.9 \
  --speculative-config '{"method":"mtp","num_speculative_tokens":1}'
