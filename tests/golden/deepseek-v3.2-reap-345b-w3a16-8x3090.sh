#!/usr/bin/env bash
# Serve /models/DeepSeek-V3.2-REAP-345B-W4A16 with stock vLLM. Written by `w3repack launch`; regenerate it rather than edit it.
# recipe: deepseek-v3.2-reap-345b-w3a16-8x3090 (DeepSeek-V3.2-REAP-345B-W3A16 converted to 4-bit, on 8 x RTX 3090 24 GB (sm86, PCIe, no P2P))
# plan: 1 node(s) x 8 GPUs of 24 GiB, cc 8.6, TP 8
# weights 21.79 GiB per GPU (16.79 GiB on the GPU), KV cache 70272 bytes per token, 0.83 GiB per GPU
# max context 8192 tokens at --gpu-memory-utilization 0.93 (capacity 12608 tokens); fits: yes
# flags chosen for vLLM 0.26.0
# warning: consumer PCIe GPUs (no peer-to-peer): if NCCL hangs or errors at start, set NCCL_P2P_DISABLE=1 and pass --disable-custom-all-reduce
# warning: vLLM runs this 4-bit MoE on Marlin here (below sm90, or --moe-backend marlin); a converted tiny DeepSeek-V3 under Marlin on vLLM 0.33.0 differed from its exact float reference on 4 of 8 prompts in float16 (first-token splits at reference margins 0.08-0.12 nats) (under Humming it matched on 8 of 8; docs/validation.md): check this model's output on Marlin before relying on it, or serve the 3-bit source natively
# warning: --cpu-offload-gb 5: 5 GiB of weights per GPU live in host memory (40 GiB of pinned RAM in all) and cross PCIe on every forward pass: expect much lower throughput
set -euo pipefail

[ -n "${MODEL:-}" ] || MODEL=/models/DeepSeek-V3.2-REAP-345B-W4A16
PYTHON="${PYTHON:-python3}"
VLLM="${VLLM:-vllm}"
NEED_GPUS=8
NEED_MIB=24084
MIN_VLLM=0.17
FLAGS_VLLM=0.26.0

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

export NCCL_P2P_DISABLE=1

exec "$VLLM" serve "$MODEL" \
  --tensor-parallel-size 8 \
  --max-model-len 8192 \
  --gpu-memory-utilization 0.93 \
  --cpu-offload-gb 5 \
  --disable-custom-all-reduce \
  --max-num-seqs 8
