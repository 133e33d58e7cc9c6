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


def convert_source(src: str, dst: Path, options, workers=None, overwrite=False, delete_source_shards=False, revision=None,
                   hashes=True):
    """Convert a local folder, or fetch and convert ``org/name[@revision]`` shard by shard."""
    from repack.checkpoint import open_checkpoint
    from repack.convert import convert
    from repack.plan import build_plan

    from repack import hub

    if hub.parse_repo_id(src) is not None:
        return hub.convert_hub(src, dst, options, workers=workers, overwrite=overwrite,
                               delete_source_shards=delete_source_shards, revision=revision,
                               progress=lambda total: ui.byte_progress("convert", total), hashes=hashes)
    if delete_source_shards:
        raise UserError("--delete-source-shards applies to hub sources only; local source files are never deleted")
    if revision:
        raise UserError("--revision applies to hub sources (org/name) only")
    path = resolve_local(src)
    if not path.exists():
        raise UserError(f"{src}: source not found")
    plan = build_plan(open_checkpoint(path), options)
    with ui.byte_progress("convert", plan.src_shard_bytes) as adv:
        return convert(path, dst, options, workers=workers, overwrite=overwrite, progress=adv, plan=plan, hashes=hashes)
