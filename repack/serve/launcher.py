"""``vllm serve`` command lines and launcher scripts from a plan, with flags chosen per vLLM version.

Version rules (docs/formats.md §3): vLLM >= 0.17 maps ``quant_method: auto-round`` to its ``inc`` method by itself,
so no ``--quantization`` is passed (older versions get ``--quantization auto-round``); GPTQ configs are
picked up as ``gptq_marlin`` by every version. From 0.30 on, sm90+ GPUs default to the Humming MoE kernel;
``--moe-backend marlin`` keeps Marlin there.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
from dataclasses import dataclass, field

from repack.errors import UserError
from repack.serve import planner, recipes

DEFAULT_VLLM = "0.26.0"
RAY_PORT = 6379


def parse_version(v: str) -> tuple[int, int, int]:
    m = re.match(r"\s*v?(\d+)(?:\.(\d+))?(?:\.(\d+))?", v)
    if not m:
        raise UserError(f"--vllm-version {v!r}: expected a version like 0.26.0")
    return tuple(int(x or 0) for x in m.groups())  # type: ignore[return-value]


def installed_vllm() -> str | None:
    try:
        from importlib.metadata import PackageNotFoundError, version
    except ImportError:  # pragma: no cover
        return None
    try:
        return version("vllm")
    except PackageNotFoundError:
        return None


@dataclass
class VersionFlags:
    version: str
    args: list[str] = field(default_factory=list)
    min_version: str = "0.0"
    notes: list[str] = field(default_factory=list)


def version_flags(version: str, model: planner.Model, gpu: planner.Gpu) -> VersionFlags:
    v = parse_version(version)
    out = VersionFlags(version)
    qm = (model.quant_method or "").lower()
    moe = bool(model.config.get("n_routed_experts") or model.config.get("num_experts")) or any(".experts." in t[0] for t in model.tensors)
    if qm in ("auto-round", "intel/auto-round", "auto_round"):
        if v < (0, 17, 0):
            out.args += ["--quantization", "auto-round"]
            out.notes.append("vLLM < 0.17: --quantization auto-round is passed explicitly")
        else:
            out.min_version = "0.17"
    if moe and qm and gpu.cc_tuple >= (9, 0):
        if v >= (0, 30, 0):
            out.args += ["--moe-backend", "marlin"]
            out.min_version = "0.30"
        else:
            out.notes.append("from vLLM 0.30 on, sm90+ defaults to the Humming MoE kernel: regenerate with --vllm-version")
    return out


def command(model_path: str, plan: dict, flags: VersionFlags, nodes: int = 1) -> list[str]:
    args = ["vllm", "serve", model_path, *plan["vllm_args"], *flags.args]
    if nodes > 1:
        args += ["--distributed-executor-backend", "ray"]
    return args


def _arg_lines(args: list[str]) -> list[str]:
    lines, i = [], 0
    while i < len(args):
        a = args[i]
        if a.startswith("--") and i + 1 < len(args) and not args[i + 1].startswith("--"):
            lines.append(f"{a} {shlex.quote(args[i + 1])}")
            i += 2
        else:
            lines.append(shlex.quote(a))
            i += 1
    return lines


def script(model_path: str, plan: dict, flags: VersionFlags, nodes: int = 1, recipe: dict | None = None) -> str:
    """A bash launcher: preflight (GPU count and memory, vLLM import and version), then ``exec vllm serve``.
    With ``nodes > 1``: the Ray variant (``serve.sh head`` on the first node, ``serve.sh worker HEAD_IP``
    on the others)."""
    tp = plan["tensor_parallel"]
    need_mib = int(plan["gpu"]["memory_gib"] * 1024 * 0.98)
    L = ["#!/usr/bin/env bash"]
    L.append(f"# Serve {model_path} with stock vLLM. Written by `w3repack launch`; regenerate it rather than edit it.")
    if recipe:
        L.append(f"# recipe: {recipe['name']} ({recipe.get('description', '')})")
    g = plan["gpu"]
    L.append(f"# plan: {nodes} node(s) x {tp} GPUs of {g['memory_gib']:g} GiB, cc {g['compute_capability']}, "
             f"TP {tp}" + (f" x PP {plan['pipeline_parallel']}" if plan["pipeline_parallel"] > 1 else ""))
    L.append(f"# weights {plan['weights_gib_per_gpu']:.2f} GiB per GPU ({plan['weights_gib_on_gpu']:.2f} GiB on the GPU), "
             f"KV cache {plan['kv_bytes_per_token']} bytes per token, {plan['kv_cache_gib']:.2f} GiB per GPU")
    L.append(f"# max context {plan['max_model_len']} tokens at --gpu-memory-utilization {plan['gpu_memory_utilization']:g} "
             f"(capacity {plan['capacity_tokens']} tokens); fits: {'yes' if plan['fits'] else 'NO: ' + plan['reason']}")
    L.append(f"# flags chosen for vLLM {flags.version}")
    for w in plan["warnings"] + flags.notes:
        L.append(f"# warning: {w}")
    L += ["set -euo pipefail", ""]
    if nodes > 1:
        L += ['ROLE="${1:-}"', 'HEAD_IP="${2:-}"',
              'case "$ROLE" in',
              '  head) ;;',
              '  worker) [ -n "$HEAD_IP" ] || { echo "usage: $0 worker HEAD_IP" >&2; exit 2; } ;;',
              f'  *) echo "usage: $0 head (on the first node) | $0 worker HEAD_IP (on the other {nodes - 1})" >&2; exit 2 ;;',
              'esac', ""]
    L += [f"MODEL=\"${{MODEL:-{_dq(model_path)}}}\"",
          'PYTHON="${PYTHON:-python3}"',
          'VLLM="${VLLM:-vllm}"',
          f"NEED_GPUS={tp}",
          f"NEED_MIB={need_mib}",
          f"MIN_VLLM={flags.min_version}"]
    if nodes > 1:
        L += [f"NODES={nodes}", f'RAY_PORT="${{RAY_PORT:-{RAY_PORT}}}"']
    L += ["",
          'die() { echo "preflight: $*" >&2; exit 1; }',
          'version_ge() { [ "$(printf \'%s\\n%s\\n\' "$1" "$2" | sort -V | head -n 1)" = "$2" ]; }',
          "",
          'command -v nvidia-smi >/dev/null 2>&1 || die "nvidia-smi not found: no NVIDIA driver here"',
          'mapfile -t MEM_MIB < <(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits)',
          '[ "${#MEM_MIB[@]}" -ge "$NEED_GPUS" ] || die "${#MEM_MIB[@]} GPUs found, the plan needs $NEED_GPUS"',
          'for i in "${!MEM_MIB[@]}"; do',
          '  mib="${MEM_MIB[$i]%%.*}"',
          '  mib="${mib// /}"',
          '  [ "$mib" -ge "$NEED_MIB" ] || die "GPU $i has $mib MiB, the plan assumes at least $NEED_MIB MiB"',
          'done',
          'VLLM_VERSION="$("$PYTHON" -c \'import vllm; print(vllm.__version__)\' 2>/dev/null)" \\',
          '  || die "cannot import vllm with $PYTHON (pip install vllm, or set PYTHON=/path/to/venv/bin/python)"',
          'VLLM_VERSION="${VLLM_VERSION%%+*}"',
          'version_ge "$VLLM_VERSION" "$MIN_VLLM" || die "vLLM $VLLM_VERSION is older than $MIN_VLLM, which these flags need"',
          f'[ "$VLLM_VERSION" = "{flags.version}" ] || echo "preflight: note: vLLM $VLLM_VERSION installed, flags chosen for '
          f'{flags.version}; regenerate with --vllm-version $VLLM_VERSION if it refuses them" >&2',
          'command -v "$VLLM" >/dev/null 2>&1 || die "$VLLM not on PATH (set VLLM=/path/to/venv/bin/vllm)"']
    if nodes > 1:
        L.append('command -v ray >/dev/null 2>&1 || die "ray not on PATH (pip install ray)"')
    L.append('echo "preflight: ${#MEM_MIB[@]} GPUs, vLLM $VLLM_VERSION: ok" >&2')
    L.append("")
    for k, v in plan.get("env", {}).items():
        L.append(f"export {k}={shlex.quote(v)}")
    if plan.get("env"):
        L.append("")
    serve = _arg_lines(command("$MODEL", plan, flags, nodes)[3:])
    exec_lines = ['exec "$VLLM" serve "$MODEL" \\'] + [f"  {a} \\" for a in serve[:-1]] + [f"  {serve[-1]}"]
    if nodes > 1:
        L += ['if [ "$ROLE" = worker ]; then',
              '  exec ray start --address="$HEAD_IP:$RAY_PORT" --block',
              'fi',
              'ray start --head --port="$RAY_PORT"',
              'TOTAL=$((NODES * NEED_GPUS))',
              'for _ in $(seq 1 120); do',
              '  HAVE="$("$PYTHON" -c \'import ray; ray.init(address="auto", logging_level="ERROR"); '
              'print(int(ray.cluster_resources().get("GPU", 0)))\' 2>/dev/null || echo 0)"',
              '  [ "$HAVE" -ge "$TOTAL" ] && break',
              '  echo "waiting for workers: $HAVE of $TOTAL GPUs in the Ray cluster" >&2',
              '  sleep 5',
              'done',
              '[ "$HAVE" -ge "$TOTAL" ] || die "only $HAVE of $TOTAL GPUs joined the Ray cluster"']
    L += exec_lines
    return "\n".join(L) + "\n"


def _dq(s: str) -> str:
    return s.replace("\\", "\\\\").replace('"', '\\"').replace("$", "\\$").replace("`", "\\`")


def prepare(model_path: str, gpus=None, gpu_memory=None, cc=None, max_model_len=None, kv_cache_dtype=None,
            utilization=None, recipe_name=None, nodes=1, cpu_offload_gb=None, max_num_batched_tokens=None,
            enforce_eager=False, probe=True, model: planner.Model | None = None) -> tuple[planner.Model, planner.Request, dict | None]:
    """Model headers (``model`` if already loaded), the request (options > recipe > nvidia-smi > defaults), the recipe."""
    recipe = recipes.load(recipe_name) if recipe_name else None
    sv = (recipe or {}).get("serve", {})
    hw = (recipe or {}).get("hardware", {})
    if nodes < 1:
        raise UserError("--nodes must be at least 1")
    gpu = planner.resolve_gpu(gpus, gpu_memory, cc, recipe, probe=probe)
    req = planner.Request(
        tp=gpu.count, gpu=gpu, pp=nodes,
        max_model_len=max_model_len if max_model_len is not None else sv.get("max_model_len"),
        kv_cache_dtype=kv_cache_dtype or sv.get("kv_cache_dtype", "auto"),
        utilization=utilization if utilization is not None else float(sv.get("gpu_memory_utilization", planner.DEFAULT_UTILIZATION)),
        cpu_offload_gib=float(cpu_offload_gb if cpu_offload_gb is not None else sv.get("cpu_offload_gb", 0.0)),
        max_num_batched_tokens=max_num_batched_tokens or sv.get("max_num_batched_tokens"),
        enforce_eager=enforce_eager or bool(sv.get("enforce_eager", False)),
        consumer_pcie=hw.get("consumer_pcie"),
        extra_args=list(sv.get("extra_args", [])),
        env=dict((recipe or {}).get("env", {})),
    )
    planner.check_request(req)
    return model or planner.load_model(model_path), req, recipe


def exec_serve(argv: list[str], env: dict[str, str]) -> None:
    """Replace this process with ``vllm serve``."""
    exe = shutil.which(argv[0])
    if exe is None:
        raise UserError(f"{argv[0]} not found on PATH: install vLLM (pip install 'w3repack[serve]') or use `w3repack launch`")
    os.environ.update(env)
    os.execvp(exe, argv)
