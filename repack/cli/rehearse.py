"""``w3repack rehearse``: one tensor-parallel rank of a deployment, served by stock vLLM on this machine's GPU."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Optional

import typer

from repack.cli import _output
from repack.cli.serve import _CC, _EXTRA, _GPUS, _KV, _LEN, _MEM, _RECIPE, _RECIPE_FILE, _SPEC, _UTIL, KvDtype, _number, _recipe


class RehearsePath(str, Enum):
    native = "native"
    repacked = "repacked"
    both = "both"


def rehearse_cmd(
    model: str = typer.Argument(..., help="3-bit source or converted folder, or a hub repo id (config and shard headers only are read)."),
    extra: Optional[list[str]] = _EXTRA,
    gpus: Optional[int] = _GPUS, gpu_memory: Optional[float] = _MEM, compute_capability: Optional[str] = _CC,
    max_model_len: Optional[int] = _LEN, kv_cache_dtype: Optional[KvDtype] = _KV, util: Optional[float] = _UTIL,
    recipe: Optional[str] = _RECIPE, recipe_file: Optional[Path] = _RECIPE_FILE, speculative: int = _SPEC,
    path: RehearsePath = typer.Option(RehearsePath.both, "--path", help="native, repacked or both."),
    work: Path = typer.Option(Path("w3repack-rehearsal"), "--work", help="Folder for the rank models (checked for space first)."),
    keep: bool = typer.Option(False, "--keep", help="Keep the rank models under --work."),
    output: Path = typer.Option(Path("rehearsal.json"), "-o", "--output", help="Where rehearsal.json is written."),
    append: bool = typer.Option(False, "--append", help="Add to an existing --output of the same model and target."),
    dense_attention: Optional[bool] = typer.Option(None, "--dense-attention/--sparse-attention",
                                                   help="DeepSeek-V3.2: rehearse the dense-attention conversion "
                                                        "(default: below sm90 only, where sparse attention has no backend)."),
    timeout: float = typer.Option(1800.0, "--timeout", callback=_number(1.0, 7 * 86400.0, False),
                                  help="Seconds per path: start-up and measurements (1 to 604800)."),
    json_out: bool = typer.Option(False, "--json", help="Print the rehearsal as JSON."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Plan the rank models only: build and run nothing, write nothing."),
) -> None:
    """Rehearse a deployment on one GPU: build one TP rank of each serving path, serve it with the installed stock
    vLLM under the target's memory budget, record what vLLM reports (memory, KV cache, longest context, kernels,
    speed) beside the plan. `plan` and `launch` take the result with --rehearsal."""
    from repack.errors import UserError
    from repack.serve import launcher, planner
    from repack.serve import rehearse as rh
    from repack.sources import open_source, read_checkpoint

    source = open_source(model)
    m = planner.model_from_checkpoint(read_checkpoint(source))
    m, req, _ = launcher.prepare(str(m.root), gpus, gpu_memory, compute_capability, max_model_len,
                                 kv_cache_dtype.value if kv_cache_dtype else None, util, _recipe(recipe, recipe_file), 1, None,
                                 speculative=speculative, extra_args=list(extra or []), model=m)
    vllm = launcher.installed_vllm() or launcher.DEFAULT_VLLM
    _, ranks = rh.prepare(m, req, path.value, vllm, dense_attention)
    if dry_run:
        _output.json_or_lines(rh.dry_run(req, ranks), json_out)
        return
    if output.is_symlink():
        raise UserError(f"--output {output}: a link is there; refused (rehearse writes a regular file)")
    previous = rh.Rehearsal.load(output) if append and output.exists() else None
    if output.exists() and not append:
        raise UserError(f"{output}: exists; choose another --output, or --append to add to it")
    dense = bool(m.v32 and (dense_attention if dense_attention is not None else req.gpu.cc_tuple < (9, 0)))
    reh = rh.rehearse(source.label(), m, req, ranks, work, output, timeout, keep, previous,
                      progress=_output.progress_line, dense_attention=dense)
    _output.rehearsal(reh, json_out)


def register(app: typer.Typer) -> None:
    app.command("rehearse")(rehearse_cmd)
