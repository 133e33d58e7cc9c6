"""Launch helpers every engine shares: the request from options, a recipe and nvidia-smi (:func:`prepare`), a
dense-attention model's ``index_topk``, and replacing this process with the engine (:func:`exec_serve`).

The engines themselves are in :mod:`repack.serve.engines` (``engine_for(name)``). The vLLM launcher functions that
lived here (``version_flags``, ``engine_args``, ``command``, ``script``, ``select`` ...) are in
:mod:`repack.serve.engines.vllm`, and are re-exported under their old names.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import replace

from repack.errors import UserError
from repack.serve import planner, recipes
from repack.serve import shell as sh
from repack.serve.engines.vllm import (  # noqa: F401  (the names callers import from here)
    DEFAULT_VLLM,
    RAY_PORT,
    Selected,
    VersionFlags,
    command,
    engine_args,
    installed_vllm,
    parse_version,
    script,
    select,
    version_flags,
)


def prepare(model_path: str, gpus=None, gpu_memory=None, cc=None, max_model_len=None, kv_cache_dtype=None,
            utilization=None, recipe_name=None, nodes=1, cpu_offload_gb=None, max_num_batched_tokens=None,
            enforce_eager=False, probe=True, model: planner.Model | None = None, speculative: int = 0,
            extra_args: list[str] | None = None, dense_context: str = "warn", pipeline_parallel: int | None = None,
            expert_parallel: bool = False) -> tuple[planner.Model, planner.Request, dict | None]:
    """Model headers (``model`` if already loaded), the request (options > recipe > nvidia-smi > defaults), the recipe.

    Layout: ``gpus`` per node on ``nodes`` nodes; ``pipeline_parallel`` stages (default: one per node), so tensor
    parallel = gpus x nodes / stages; ``expert_parallel``: vLLM's ``--enable-expert-parallel``.
    ``extra_args`` (given after ``--``) follow the recipe's. ``dense_context`` for a model converted with
    ``--dense-attention``: ``cap`` limits the context to ``index_topk`` (where the dense computation is exact),
    ``warn`` plans the full context and says beyond which length it is an approximation."""
    recipe = recipes.load(recipe_name) if recipe_name else None
    sv = (recipe or {}).get("serve", {})
    hw = (recipe or {}).get("hardware", {})
    if nodes < 1:
        raise UserError("--nodes must be at least 1")
    gpu = planner.resolve_gpu(gpus, gpu_memory, cc, recipe, probe=probe)
    pp = pipeline_parallel or nodes
    if pp < nodes or (gpu.count * nodes) % pp:
        raise UserError(f"--pipeline-parallel {pp}: the {gpu.count * nodes} GPUs ({gpu.count} per node x {nodes} nodes) do not "
                        f"split into {pp} stages of whole tensor-parallel groups, at least one per node")
    req = planner.Request(
        tp=gpu.count * nodes // pp, gpu=gpu, pp=pp, ep=expert_parallel,
        max_model_len=max_model_len if max_model_len is not None else sv.get("max_model_len"),
        kv_cache_dtype=kv_cache_dtype or sv.get("kv_cache_dtype", "auto"),
        utilization=utilization if utilization is not None else float(sv.get("gpu_memory_utilization", planner.DEFAULT_UTILIZATION)),
        cpu_offload_gib=float(cpu_offload_gb if cpu_offload_gb is not None else sv.get("cpu_offload_gb", 0.0)),
        max_num_batched_tokens=max_num_batched_tokens or sv.get("max_num_batched_tokens"),
        enforce_eager=enforce_eager or bool(sv.get("enforce_eager", False)),
        consumer_pcie=hw.get("consumer_pcie"),
        extra_args=list(sv.get("extra_args", [])) + list(extra_args or []),
        env=dict((recipe or {}).get("env", {})),
        speculative=speculative,
    )
    planner.check_request(req)
    m = model or planner.load_model(model_path)
    if speculative and not planner.mtp_layer_count(m):
        raise UserError(f"{m.root}: --speculative needs an MTP layer (num_nextn_predict_layers > 0 and its tensors)")
    topk = dense_topk(m)
    if topk and dense_context == "cap":
        req = replace(req, max_model_len=min(req.max_model_len or topk, topk))
    return m, req, recipe


def dense_topk(model: planner.Model) -> int | None:
    """``index_topk`` of a V3.2 model that ``w3repack convert --dense-attention`` rewrote to dense MLA."""
    from repack.output import Manifest

    try:
        m = Manifest.load(model.root)
    except UserError:
        return None
    rec = (m.records or {}).get("dense_attention") if m else None
    return int(rec["index_topk"]) if isinstance(rec, dict) and isinstance(rec.get("index_topk"), int) else None


def exec_serve(argv: list[str], env: dict[str, str]) -> None:
    """Replace this process with the engine: ``argv`` as it is (no shell), ``env`` added to the environment."""
    sh.check_env(env)
    for a in argv:
        sh.word(a)  # a NUL cannot reach execve
    exe = shutil.which(argv[0])
    if exe is None:
        raise UserError(f"{argv[0]} not found on PATH: install the engine (pip install 'w3repack[serve]') or use `w3repack launch`")
    os.environ.update(env)
    os.execv(exe, argv)
