"""Where a checkpoint comes from. A :class:`Source` gives the checkpoint (configs, index, shard headers) before
any shard is read, makes each shard present before it is read (``ensure``) and lets it go once its output is
finished (``release``), and names itself in the fingerprint and the manifest.

A new kind of source is a module here implementing :class:`Source` (``FolderSource`` is the reference) and a
branch in :func:`open_source`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from repack.errors import UserError

if TYPE_CHECKING:
    from repack.checkpoint import Checkpoint
    from repack.output import Manifest, Output
    from repack.plan import Options, Plan, ShardPlan


class Source(Protocol):
    """``root``: the folder holding config, index and small files, and each shard once ``ensure``d."""

    root: Path
    default_workers: int | None

    @property
    def space_hint(self) -> str:
        """Added to a refusal for lack of space."""

    def label(self) -> str:
        """How messages and summaries name the source."""

    def checkpoint(self, out: Output, options: Options) -> Checkpoint:
        """Configs, index and every shard header. Raises NothingToDo where ``out`` already holds this conversion
        with ``options`` and the source cannot be read again."""

    def fingerprint(self, plan: Plan) -> dict:
        """The source's part of the run's identity (resume keeps shards only under an equal fingerprint)."""

    def space_needed(self, todo: list[ShardPlan], workers: int) -> list[tuple[Path, int]]:
        """Bytes the source must still bring to disk, and where, for the shards ``todo`` (``space_hint`` is added
        to a refusal)."""

    def ensure(self, sp: ShardPlan) -> None:
        """Make shard ``sp`` readable under ``root`` exactly as planned (runs on a worker thread)."""

    def release(self, plan: Plan, sp: ShardPlan, out: Output) -> None:
        """Shard ``sp``'s output is finished and recorded in ``out`` (runs on a worker thread)."""

    def finish(self, plan: Plan, out: Output, manifest: Manifest) -> None:
        """Add to the manifest before it is written (``out``'s records still exist)."""

    def close(self, plan: Plan) -> None:
        """After the manifest is written."""


def open_source(src: str, revision: str | None = None, delete_source_shards: bool = False) -> Source:
    """A local folder, or ``org/name[@revision]`` fetched shard by shard through huggingface_hub."""
    from repack.hubclient import parse_repo_id

    if parse_repo_id(src) is not None:
        from repack.sources.hub import HubSource

        return HubSource.open(src, revision, delete_source_shards)
    if delete_source_shards:
        raise UserError("--delete-source-shards applies to hub sources only; local source files are never deleted")
    if revision:
        raise UserError("--revision applies to hub sources (org/name) only")
    from repack.sources.folder import FolderSource

    path = resolve_local(src)
    if not path.exists():
        raise UserError(f"{src}: source not found")
    return FolderSource(path)


def resolve_local(src: str | Path) -> Path:
    """A local checkpoint folder for ``src``; a repo id that is not a local path is looked up in the hub cache."""
    src = str(src)
    p = Path(src).expanduser()
    if p.exists() or src.startswith((".", "/", "~")) or src.count("/") != 1:
        return p
    from repack.hubclient import snapshot_from_cache

    return snapshot_from_cache(src)
