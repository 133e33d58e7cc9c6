"""Serving commands: plan, launch, serve, smoke, recipes. Thin wrappers over ``repack.serve``."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Optional

import typer

from repack.cli import _output
from repack.errors import UserError


class KvDtype(str, Enum):
    auto = "auto"
    fp8 = "fp8"


def _serve_request(model, gpus, gpu_memory, compute_capability, max_model_len, kv_cache_dtype, util, recipe, nodes=1, cpu_offload_gb=None):
    from repack.serve.launcher import prepare
    from repack.sources import resolve_local

    return prepare(str(resolve_local(model)), gpus, gpu_memory, compute_capability, max_model_len,
                   kv_cache_dtype.value if kv_cache_dtype else None, util, recipe, nodes, cpu_offload_gb)


def _refuse_unfit(p: dict, force: bool) -> None:
    if p["fits"] or force:
        return
    alts = "; ".join(f"{a['description']} (max context {a['max_model_len']})" for a in p["alternatives"][:4])
    raise UserError(f"the plan does not fit: {p['reason']}" + (f". Alternatives: {alts}" if alts else "") + " (--force writes it anyway)")


_GPUS = typer.Option(None, "--gpus", min=1, help="GPUs per node (tensor parallel size). Default: nvidia-smi, else 8.")
_MEM = typer.Option(None, "--gpu-memory", help="GiB per GPU. Default: nvidia-smi, else 24.")
_CC = typer.Option(None, "--compute-capability", help="e.g. 8.6. Default: nvidia-smi, else 8.6.")
_LEN = typer.Option(None, "--max-model-len", min=1, help="Context to plan for. Default: the most that fits.")
_KV = typer.Option(None, "--kv-cache-dtype", help="auto (model dtype) or fp8 (sm89+ for MLA).")
_UTIL = typer.Option(None, "--gpu-memory-utilization", help="Share of each GPU vLLM may use (default 0.90).")
_RECIPE = typer.Option(None, "--recipe", help="Fill options from a recipe (see `w3repack recipes`).")
_OFFLOAD = typer.Option(None, "--cpu-offload-gb", min=0, help="GiB of weights per GPU kept in host RAM.")


def plan_cmd(
    model: str = typer.Argument(..., help="Converted checkpoint folder (headers only are read)."),
    gpus: Optional[int] = _GPUS, gpu_memory: Optional[float] = _MEM, compute_capability: Optional[str] = _CC,
    max_model_len: Optional[int] = _LEN, kv_cache_dtype: Optional[KvDtype] = _KV, util: Optional[float] = _UTIL,
    recipe: Optional[str] = _RECIPE, cpu_offload_gb: Optional[float] = _OFFLOAD,
    nodes: int = typer.Option(1, "--nodes", min=1, help="Nodes (pipeline parallel size)."),
    json_out: bool = typer.Option(False, "--json", help="Print the plan as JSON."),
) -> None:
    """Plan GPU memory for vLLM: weights per GPU, KV cache per token, max context, warnings, alternatives."""
    from repack.serve import planner

    m, req, _ = _serve_request(model, gpus, gpu_memory, compute_capability, max_model_len, kv_cache_dtype, util, recipe, nodes, cpu_offload_gb)
    _output.memory_plan(planner.plan(m, req), json_out)


def launch(
    model: str = typer.Argument(..., help="Converted checkpoint folder (same path on every node)."),
    output: Path = typer.Option(..., "-o", "--output", help="Script to write (e.g. serve.sh)."),
    gpus: Optional[int] = _GPUS, gpu_memory: Optional[float] = _MEM, compute_capability: Optional[str] = _CC,
    max_model_len: Optional[int] = _LEN, kv_cache_dtype: Optional[KvDtype] = _KV, util: Optional[float] = _UTIL,
    recipe: Optional[str] = _RECIPE, cpu_offload_gb: Optional[float] = _OFFLOAD,
    vllm_version: Optional[str] = typer.Option(None, "--vllm-version", help="Choose flags for this vLLM (default: installed, else 0.26.0)."),
    nodes: int = typer.Option(1, "--nodes", min=1, help="Nodes: >1 writes the Ray multi-node variant (PP = nodes)."),
    force: bool = typer.Option(False, "--force", help="Write the script even if the plan does not fit."),
) -> None:
    """Write an executable bash launcher: preflight checks, then exec vllm serve with the planned flags."""
    from repack.serve import launcher, planner

    m, req, rec = _serve_request(model, gpus, gpu_memory, compute_capability, max_model_len, kv_cache_dtype, util, recipe, nodes, cpu_offload_gb)
    p = planner.plan(m, req)
    _refuse_unfit(p, force)
    flags = launcher.version_flags(vllm_version or launcher.installed_vllm() or launcher.DEFAULT_VLLM, m, req.gpu)
    output.write_text(launcher.script(str(m.root.resolve()), p, flags, nodes, rec))
    output.chmod(0o755)
    _output.launcher_written(output, p, flags.version, nodes)


def serve(
    model: str = typer.Argument(..., help="Converted checkpoint folder."),
    gpus: Optional[int] = _GPUS, gpu_memory: Optional[float] = _MEM, compute_capability: Optional[str] = _CC,
    max_model_len: Optional[int] = _LEN, kv_cache_dtype: Optional[KvDtype] = _KV, util: Optional[float] = _UTIL,
    recipe: Optional[str] = _RECIPE, cpu_offload_gb: Optional[float] = _OFFLOAD,
    force: bool = typer.Option(False, "--force", help="Start even if the plan does not fit."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the command instead of running it."),
) -> None:
    """Plan, then replace this process with `vllm serve` (flags for the installed vLLM)."""
    from repack.serve import launcher, planner

    m, req, _ = _serve_request(model, gpus, gpu_memory, compute_capability, max_model_len, kv_cache_dtype, util, recipe, 1, cpu_offload_gb)
    p = planner.plan(m, req)
    _refuse_unfit(p, force)
    flags = launcher.version_flags(launcher.installed_vllm() or launcher.DEFAULT_VLLM, m, req.gpu)
    argv = launcher.command(str(m.root), p, flags)
    _output.plan_warnings(p)
    if dry_run:
        _output.serve_command(p["env"], argv)
        return
    launcher.exec_serve(argv, p["env"])


def smoke(
    url: str = typer.Argument(..., help="Server base URL, e.g. http://127.0.0.1:8000"),
    model: Optional[str] = typer.Option(None, "--model", help="Model name (default: the first one served)."),
    long_tokens: int = typer.Option(9000, "--long-tokens", min=1, help="Length of the long prompt (beyond one prefill chunk; cut to 80% of max_model_len)."),
    timeout: float = typer.Option(600.0, "--timeout", help="Seconds per request."),
    json_out: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Check a running OpenAI-compatible server. Exit 0 all passed, 1 a check failed, 2 unreachable."""
    import os

    from repack.serve import smoke as sm

    try:
        rep = sm.run(url, model, long_tokens, timeout, os.environ.get("OPENAI_API_KEY"))
    except sm.Unreachable as e:
        raise UserError(f"server unreachable: {e}") from e
    _output.smoke(rep, json_out)
    if not rep.ok:
        raise typer.Exit(1)


def recipes_cmd(json_out: bool = typer.Option(False, "--json", help="Print the recipes as JSON.")) -> None:
    """List the serving recipes shipped with w3repack."""
    from repack.serve import recipes as rc

    _output.recipes([rc.load(n) for n in rc.names()], json_out)


def register(app: typer.Typer) -> None:
    app.command("plan")(plan_cmd)
    app.command()(launch)
    app.command()(serve)
    app.command()(smoke)
    app.command("recipes")(recipes_cmd)
