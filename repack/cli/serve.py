"""Serving commands: plan, launch, serve, smoke, recipes. Thin wrappers over ``repack.serve``."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Optional

import typer

from repack.cli import _output
from repack.errors import UserError
from repack.serve import recipes as rc


class KvDtype(str, Enum):
    auto = "auto"
    fp8 = "fp8"


class PathChoice(str, Enum):
    auto = "auto"
    native = "native"
    repacked = "repacked"


class Engine(str, Enum):
    """The ``--engine`` choices: the names of ``repack.serve.engines.ENGINES``."""

    vllm = "vllm"
    sglang = "sglang"


class DenseContext(str, Enum):
    warn = "warn"
    cap = "cap"


def _recipe(recipe: Optional[str], recipe_file: Optional[Path]) -> rc.RecipeRef | None:
    """A shipped recipe's name (checked now), or the file given with ``--recipe-file``; not both."""
    if recipe is not None and recipe_file is not None:
        raise UserError("--recipe and --recipe-file: give one of them")
    if recipe_file is not None:
        return rc.RecipeFile(recipe_file)
    if recipe is not None:
        rc.load(recipe)
    return recipe


def _serve_request(model, gpus, gpu_memory, compute_capability, max_model_len, kv_cache_dtype, util, recipe, nodes=1,
                   cpu_offload_gb=None, speculative=0, extra=None, dense_context=DenseContext.warn, recipe_file=None,
                   pipeline_parallel=None, expert_parallel=False):
    from repack.serve.launcher import prepare
    from repack.sources import resolve_local

    return prepare(str(resolve_local(model)), gpus, gpu_memory, compute_capability, max_model_len,
                   kv_cache_dtype.value if kv_cache_dtype else None, util, _recipe(recipe, recipe_file), nodes,
                   cpu_offload_gb, speculative=speculative, extra_args=list(extra or []), dense_context=dense_context.value,
                   pipeline_parallel=pipeline_parallel, expert_parallel=expert_parallel)


def _number(lo: float, hi: float, low_open: bool):
    """An option callback: a finite float in the range (the recipes' ranges), else one usage error."""
    def check(value: Optional[float]) -> Optional[float]:
        if value is None:
            return None
        try:
            return rc.number(value, lo, hi, low_open)
        except ValueError as e:
            raise typer.BadParameter(f"{value}: {e}") from None
    return check


_GPUS = typer.Option(None, "--gpus", min=1, max=rc.MAX_GPUS, help="GPUs per node (tensor parallel size). Default: nvidia-smi, else 8.")
_MEM = typer.Option(None, "--gpu-memory", callback=_number(*rc.GPU_MEMORY_GIB, True), help="GiB per GPU. Default: nvidia-smi, else 24.")
_CC = typer.Option(None, "--compute-capability", help="e.g. 8.6. Default: nvidia-smi, else 8.6.")
_LEN = typer.Option(None, "--max-model-len", min=1, max=rc.MAX_TOKENS, help="Context to plan for. Default: the most that fits.")
_KV = typer.Option(None, "--kv-cache-dtype", help="auto (model dtype) or fp8 (sm89+ for MLA).")
_UTIL = typer.Option(None, "--gpu-memory-utilization", callback=_number(*rc.UTILIZATION, True),
                     help="Share of each GPU vLLM may use, in (0, 1] (default 0.90).")
_RECIPE = typer.Option(None, "--recipe", help="Fill options from a shipped recipe, by name (see `w3repack recipes`).")
_RECIPE_FILE = typer.Option(None, "--recipe-file", help="Fill options from a recipe file of your own (same schema as the shipped ones).")
_OFFLOAD = typer.Option(None, "--cpu-offload-gb", callback=_number(*rc.CPU_OFFLOAD_GIB, False), help="GiB of weights per GPU kept in host RAM.")
_REHEARSAL = typer.Option(None, "--rehearsal", help="rehearsal.json from `w3repack rehearse` of this model and target: "
                          "the KV cache and speed vLLM measured replace the calibrated figures.")


def _rehearsal(path: Optional[Path]):
    if path is None:
        return None
    from repack.serve.rehearse import Rehearsal

    return Rehearsal.load(path)


_DENSE_ATTN = typer.Option(None, "--dense-attention/--sparse-attention",
                           help="DeepSeek-V3.2 source: plan its dense-attention conversion (default: below sm90 only).")
_PP = typer.Option(None, "--pipeline-parallel", min=1, max=rc.MAX_GPUS,
                   help="Pipeline stages (default: one per node); tensor parallel = GPUs x nodes / stages.")
_EP = typer.Option(False, "--expert-parallel", help="vLLM --enable-expert-parallel: whole routed experts per GPU.")
_NODES = typer.Option(1, "--nodes", min=1, max=rc.MAX_GPUS, help="Nodes (pipeline parallel size).")
_SPEC = typer.Option(0, "--speculative", min=0, max=64, help="DeepSeek MTP speculative decoding with N draft tokens (needs the MTP layer).")
_TRUST = typer.Option(False, "--trust-remote-code", help="Let the engine run the checkpoint's own Python code (config.json auto_map).")
_PATH = typer.Option(PathChoice.auto, "--path", help="auto (the recommended path), native (3-bit, vLLM >= 0.30) or repacked (4-bit).")
_VLLM = typer.Option(None, "--vllm-version", help="Choose and check flags for this vLLM (default: installed, else 0.33.0).")
_DENSE = typer.Option(DenseContext.warn, "--dense-context",
                      help="For a --dense-attention model: cap the context at index_topk (exact) or warn beyond it.")
_EXTRA = typer.Argument(None, help="Arguments passed to the engine as they are, after --, e.g. -- --port 9000.")


def plan_cmd(
    model: str = typer.Argument(..., help="Checkpoint folder, 3-bit source or converted (headers only are read)."),
    gpus: Optional[int] = _GPUS, gpu_memory: Optional[float] = _MEM, compute_capability: Optional[str] = _CC,
    max_model_len: Optional[int] = _LEN, kv_cache_dtype: Optional[KvDtype] = _KV, util: Optional[float] = _UTIL,
    recipe: Optional[str] = _RECIPE, recipe_file: Optional[Path] = _RECIPE_FILE, cpu_offload_gb: Optional[float] = _OFFLOAD,
    nodes: int = _NODES, pipeline_parallel: Optional[int] = _PP, expert_parallel: bool = _EP,
    speculative: int = _SPEC, vllm_version: Optional[str] = _VLLM,
    rehearsal: Optional[Path] = _REHEARSAL, dense_attention: Optional[bool] = _DENSE_ATTN,
    json_out: bool = typer.Option(False, "--json", help="Print the plan as JSON."),
) -> None:
    """Plan GPU memory for vLLM: both serving paths of a 3-bit source side by side, and the one to take."""
    from repack.serve import engines, paths

    m, req, _ = _serve_request(model, gpus, gpu_memory, compute_capability, max_model_len, kv_cache_dtype, util, recipe,
                               nodes, cpu_offload_gb, speculative, recipe_file=recipe_file,
                               pipeline_parallel=pipeline_parallel, expert_parallel=expert_parallel)
    _output.paths_plan(paths.plan_paths(m, req, vllm_version=engines.engine_for("vllm").version(vllm_version),
                                        dense_attention=dense_attention, rehearsal=_rehearsal(rehearsal)), json_out)


def _engine(engine: Engine, versions: dict[str, Optional[str]]):
    """The engine chosen and the version its flags are for (from its own version option; another engine's
    version option given is refused rather than ignored)."""
    from repack.serve import engines

    eng = engines.engine_for(engine.value)
    for option, value in versions.items():
        if value is not None and option != eng.version_option:
            raise UserError(f"{option} {value}: the launch is for --engine {eng.name}, whose flags are chosen with "
                            f"{eng.version_option}")
    return eng, versions.get(eng.version_option)


def launch(
    model: str = typer.Argument(..., help="Checkpoint folder (same path on every node)."),
    extra: Optional[list[str]] = _EXTRA,
    output: Path = typer.Option(..., "-o", "--output", help="Script to write (e.g. serve.sh): a new file, never through a link."),
    gpus: Optional[int] = _GPUS, gpu_memory: Optional[float] = _MEM, compute_capability: Optional[str] = _CC,
    max_model_len: Optional[int] = _LEN, kv_cache_dtype: Optional[KvDtype] = _KV, util: Optional[float] = _UTIL,
    recipe: Optional[str] = _RECIPE, recipe_file: Optional[Path] = _RECIPE_FILE, cpu_offload_gb: Optional[float] = _OFFLOAD,
    vllm_version: Optional[str] = _VLLM, path: PathChoice = _PATH, speculative: int = _SPEC,
    engine: Engine = typer.Option(Engine.vllm, "--engine", help="vllm, or sglang (4-bit only)."),
    sglang_version: Optional[str] = typer.Option(None, "--sglang-version", help="SGLang the flags are for (default: installed)."),
    dense_context: DenseContext = _DENSE, rehearsal: Optional[Path] = _REHEARSAL,
    nodes: int = typer.Option(1, "--nodes", min=1, max=rc.MAX_GPUS, help="Nodes: >1 writes the Ray multi-node variant (PP = nodes)."),
    pipeline_parallel: Optional[int] = _PP, expert_parallel: bool = _EP,
    trust_remote_code: bool = _TRUST,
    force: bool = typer.Option(False, "--force", help="Write the script even if the plan does not fit."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the -o file if it exists (a regular file only)."),
) -> None:
    """Write an executable bash launcher: preflight checks, then exec the engine with the planned flags."""
    from repack.serve import shell as sh

    eng, version = _engine(engine, {"--vllm-version": vllm_version, "--sglang-version": sglang_version})
    m, req, rec = _serve_request(model, gpus, gpu_memory, compute_capability, max_model_len, kv_cache_dtype, util, recipe,
                                 nodes, cpu_offload_gb, speculative, extra, dense_context, recipe_file,
                                 pipeline_parallel, expert_parallel)
    L = eng.plan(m, req, path=path.value, version=version, force=force, rehearsal=_rehearsal(rehearsal),
                 trust_remote_code=trust_remote_code, nodes=nodes, recipe=rec)
    sh.write_script(output, sh.encode(eng.script(L, rec)), overwrite)
    _output.launch_written(output, L)


def serve(
    model: str = typer.Argument(..., help="Checkpoint folder."),
    extra: Optional[list[str]] = _EXTRA,
    gpus: Optional[int] = _GPUS, gpu_memory: Optional[float] = _MEM, compute_capability: Optional[str] = _CC,
    max_model_len: Optional[int] = _LEN, kv_cache_dtype: Optional[KvDtype] = _KV, util: Optional[float] = _UTIL,
    recipe: Optional[str] = _RECIPE, recipe_file: Optional[Path] = _RECIPE_FILE, cpu_offload_gb: Optional[float] = _OFFLOAD,
    path: PathChoice = _PATH, speculative: int = _SPEC,
    engine: Engine = typer.Option(Engine.vllm, "--engine", help="vllm, or sglang (4-bit only)."),
    dense_context: DenseContext = _DENSE, trust_remote_code: bool = _TRUST,
    pipeline_parallel: Optional[int] = _PP, expert_parallel: bool = _EP,
    force: bool = typer.Option(False, "--force", help="Start even if the plan does not fit."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the command instead of running it."),
) -> None:
    """Plan, then replace this process with the engine (flags for the installed version). The engine gets the
    model as an absolute path."""
    from repack.serve import launcher
    from repack.serve import shell as sh

    eng, _ = _engine(engine, {})
    m, req, rec = _serve_request(model, gpus, gpu_memory, compute_capability, max_model_len, kv_cache_dtype, util, recipe,
                                 1, cpu_offload_gb, speculative, extra, dense_context, recipe_file,
                                 pipeline_parallel, expert_parallel)
    L = eng.plan(m, req, path=path.value, force=force, trust_remote_code=trust_remote_code, recipe=rec)
    sh.check_env(dict(L.env))
    _output.warnings(L.warnings)
    if dry_run:
        _output.serve_command(L.env, L.argv)
        return
    launcher.exec_serve(L.argv, L.env)


def smoke(
    url: str = typer.Argument(..., help="Server base URL, e.g. http://127.0.0.1:8000"),
    model: Optional[str] = typer.Option(None, "--model", help="Model name (default: the first one served)."),
    long_tokens: int = typer.Option(9000, "--long-tokens", min=1, max=1 << 20,
                                    help="Length of the long prompt (beyond one prefill chunk; cut to 80% of max_model_len)."),
    timeout: float = typer.Option(600.0, "--timeout", callback=_number(0.1, 7 * 86400.0, False),
                                  help="Wall-clock seconds per request, however the answer arrives."),
    total_timeout: float = typer.Option(1800.0, "--total-timeout", callback=_number(0.1, 7 * 86400.0, False),
                                        help="Wall-clock seconds for the whole run."),
    json_out: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Check a running OpenAI-compatible server by its answers (repeat, count, a long prompt twice, cached tokens).
    Exit 0 all passed, 1 a check failed (wrong, garbage or malformed answers), 2 unreachable or a bad URL.
    http and https only; redirects are not followed; credentials go in OPENAI_API_KEY, never in the URL."""
    import os

    from repack.serve import smoke as sm

    try:
        rep = sm.run(url, model, long_tokens, timeout, os.environ.get("OPENAI_API_KEY"), total_timeout)
    except sm.Unreachable as e:
        raise UserError(f"server unreachable: {e}") from None
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
