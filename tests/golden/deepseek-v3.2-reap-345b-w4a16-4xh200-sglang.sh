#!/usr/bin/env bash
# Serve /models/DeepSeek-V3.2-REAP-345B-W4A16 with stock SGLang. Written by `w3repack launch --engine sglang`; regenerate it rather than edit it.
# plan: 4 GPUs of 140.4 GiB, cc 9.0, TP 4 with expert parallelism (--ep-size 4)
# weights 43.56 GiB per GPU (43.56 GiB on the GPU), KV 78324 bytes per token, KV pool 80.50 GiB = 0.89 x 139.40 GiB - weights
# context 163840 tokens (pool 1103627 tokens); fits: yes
# flags chosen for SGLang 0.5.19
# why: float16: SGLang's GPTQ Marlin MoE allocates expert scales as float16 and asserts the activations match (sglang issues #20599, #36822), so a bfloat16 model fails at its first forward; the checkpoint's scales are float16, so nothing is rounded
# why: attention backend left to SGLang: index_topk in the config selects its DSA (sparse) backend, whose CUDA kernels (flashmla_sparse prefill, fa3 decode) need sm90+
# why: --ep-size 4: SGLang's GPTQ Marlin MoE sizes w2_scales for the full intermediate size when desc_act is false, which is wrong under MoE tensor parallelism; whole experts per GPU (moe_tp_size 1) avoid it
# warning: DeepSeek-V3.2 with --dtype float16: SGLang's DSA indexer builds bfloat16 parameters and its Hopper path assumes bfloat16; with the Marlin MoE needing float16, this pairing is unverified
set -euo pipefail

[ -n "${MODEL:-}" ] || MODEL=/models/DeepSeek-V3.2-REAP-345B-W4A16
PYTHON="${PYTHON:-python3}"
NEED_GPUS=4
NEED_MIB=140894
MIN_SGLANG=0.5.10
FLAGS_SGLANG=0.5.19

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
SGLANG_VERSION="$("$PYTHON" -c 'import importlib.metadata as m; print(m.version("sglang"))' 2>/dev/null)" \
  || die "sglang is not installed for $PYTHON (pip install sglang, or set PYTHON=/path/to/venv/bin/python)"
SGLANG_VERSION="${SGLANG_VERSION%%+*}"
version_ge "$SGLANG_VERSION" "$MIN_SGLANG" || die "SGLang $SGLANG_VERSION is older than $MIN_SGLANG, which these flags need"
[ "$SGLANG_VERSION" = "$FLAGS_SGLANG" ] || echo "preflight: note: SGLang $SGLANG_VERSION installed, flags chosen for $FLAGS_SGLANG; regenerate with --sglang-version $SGLANG_VERSION if it refuses them" >&2
BAD_FROM=0.5.10
BAD_TO=0.5.18
if version_ge "$SGLANG_VERSION" "$BAD_FROM" && version_ge "$BAD_TO" "$SGLANG_VERSION"; then
  die "SGLang $SGLANG_VERSION cannot build this DeepSeek model (its MLA attention reads the weight of GPTQ-packed q_a/kv_a or q_b projections, which they lack); install a release outside 0.5.10-0.5.18"
fi
echo "preflight: ${#MEM_MIB[@]} GPUs, SGLang $SGLANG_VERSION: ok" >&2

exec "$PYTHON" -m sglang.launch_server \
  --model-path "$MODEL" \
  --tp-size 4 \
  --ep-size 4 \
  --dtype float16 \
  --mem-fraction-static 0.89 \
  --context-length 163840 \
  --host 127.0.0.1 \
  --port 30000
