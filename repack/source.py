"""Where a checkpoint comes from: a local folder now; a hub repo id resolves through huggingface_hub."""

from __future__ import annotations

from pathlib import Path

from repack import ui
from repack.errors import UserError


def resolve_local(src: str) -> Path:
    """A local checkpoint folder for ``src``; a repo id that is not a local path is looked up in the hub cache."""
    p = Path(src).expanduser()
    if p.exists() or src.startswith((".", "/", "~")) or src.count("/") != 1:
        return p
    from repack.hub import snapshot_from_cache

    return snapshot_from_cache(src)


def convert_source(src: str, dst: Path, options, workers=None, overwrite=False):
    from repack.checkpoint import open_checkpoint
    from repack.convert import convert
    from repack.plan import build_plan

    path = resolve_local(src)
    if not path.exists():
        raise UserError(f"{src}: source not found")
    plan = build_plan(open_checkpoint(path), options)
    with ui.byte_progress("convert", plan.src_shard_bytes) as adv:
        return convert(path, dst, options, workers=workers, overwrite=overwrite, progress=adv, plan=plan)
