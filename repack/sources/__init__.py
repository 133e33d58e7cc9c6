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

    def changed(self, plan: Plan) -> str | None:
        """A file of the source that changed since ``fingerprint`` (None: none did); checked before the manifest."""

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


def is_hub_id(src: str) -> bool:
    """The rule that tells a hub repo id from a local path, decided before anything is fetched.

    A local path: anything that exists here; anything starting with ``.``, ``/`` or ``~``; anything that is not
    of the form ``org/name[@revision]``; and ``org/name`` where a folder ``org`` exists here (a missing folder
    inside it is meant). Everything else (``org/name`` with no local ``org/``) is a hub repo id.
    """
    from repack.hubclient import parse_repo_id

    if parse_repo_id(src) is None:
        return False
    return not Path(src.partition("/")[0]).expanduser().is_dir()


def missing_local(src: str) -> UserError:
    """The one line for a local source that is not there."""
    org = src.partition("/")[0]
    if src.count("/") == 1 and not src.startswith((".", "/", "~")) and Path(org).expanduser().is_dir():
        return UserError(f"{src}: source not found: no such folder in {org}/ (as ./{org} exists here, {src} is read "
                         "as a local path, not as a hub repo id)")
    return UserError(f"{src}: source not found: no such file or folder")


def open_source(src: str, revision: str | None = None, delete_source_shards: bool = False) -> Source:
    """A local folder, or ``org/name[@revision]`` fetched shard by shard through huggingface_hub (see
    :func:`is_hub_id` for the rule)."""
    if is_hub_id(src):
        from repack.sources.hub import HubSource

        return HubSource.open(src, revision, delete_source_shards)
    if delete_source_shards:
        raise UserError("--delete-source-shards applies to hub sources only; local source files are never deleted")
    if revision:
        raise UserError("--revision applies to hub sources (org/name) only")
    from repack.sources.folder import FolderSource

    path = Path(src).expanduser()
    if not path.exists():
        raise missing_local(src)
    return FolderSource(path)


def resolve_local(src: str | Path) -> Path:
    """A local checkpoint folder for ``src``; a hub repo id (:func:`is_hub_id`) is looked up in the hub cache."""
    src = str(src)
    p = Path(src).expanduser()
    if p.exists() or not is_hub_id(src):
        return p
    from repack.hubclient import snapshot_from_cache

    return snapshot_from_cache(src)


def read_checkpoint(source: Source, out: Output | None = None) -> Checkpoint:
    """Configs, index and shard headers of ``source``, changing nothing anywhere (``inspect``, ``convert
    --dry-run``): a hub source's headers come from its cache, ``out``'s saved copies or range requests."""
    import os

    from repack.checkpoint import open_checkpoint
    from repack.output import Output

    headers = getattr(source, "headers", None)
    if headers is None:
        return open_checkpoint(source.root)
    return open_checkpoint(source.root, headers(out or Output(Path(os.devnull))))


def nothing_to_convert(source: Source, plan: Plan | None = None) -> None:
    """Raise NothingToDo (exit 0, one line) where ``source`` needs no conversion: it is a w3repack output (its
    ``w3repack.json`` is a manifest of that folder: :meth:`Manifest.mismatch`), or, for the repack target, no
    module is narrower than 4 bits. A ``w3repack.json`` that is not the folder's manifest is a UserError naming it."""
    from repack.checkpoint import read_index
    from repack.errors import NothingToDo
    from repack.output import MANIFEST_NAME, Manifest, ManifestError
    from repack.qconfig import CONVERTED_BITS

    name = source.label()
    path = source.root / MANIFEST_NAME
    reserved = (f"{name} holds {MANIFEST_NAME}, a name w3repack reserves for its manifest: it is taken for a "
                "w3repack output only where it is the manifest of this folder")
    try:
        man = Manifest.load(source.root, follow=True)
    except ManifestError as e:
        raise UserError(f"{e}; {reserved}") from None
    if man is not None:
        why = man.mismatch(source.root, read_index(source.root, files_present=False)[1],
                           fetched_later=bool(getattr(source, "repo", "")))
        if why is not None:
            raise UserError(f"{path}: not the manifest of this folder ({why}); {reserved}")
        raise NothingToDo(f"{name} is already a w3repack output ({MANIFEST_NAME}): nothing to convert; "
                          "`w3repack verify SOURCE OUTPUT` checks one against its source")
    if plan is not None and plan.options.target == "repack" and not any(m.bits in CONVERTED_BITS for m in plan.ckpt.modules.values()):
        widths = sorted({m.bits for m in plan.ckpt.modules.values()})
        raise NothingToDo(f"{name} needs no conversion: every quantized module is already "
                          + ("/".join(map(str, widths)) + "-bit" if widths else "unquantized")
                          + " (vLLM serves it as it is)")
