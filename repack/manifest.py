"""``w3repack.json``, the manifest of a finished conversion: what was converted, with which options, and the
sha256 of every file. :class:`Manifest` is its only reader and writer.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from repack import __version__
from repack.checkpoint import parse_json, read_bounded
from repack.errors import UserError

MANIFEST_NAME = "w3repack.json"
MAX_MANIFEST = 64 << 20


@dataclass(frozen=True)
class FileRecord:
    """One file in the manifest: a source shard or output shard (with size) or a copied file (without)."""

    name: str
    size: int | None = None
    sha256: str | None = None

    def to_json(self) -> dict:
        return {"name": self.name, "sha256": self.sha256} if self.size is None else \
            {"name": self.name, "size": self.size, "sha256": self.sha256}


@dataclass(frozen=True)
class ShardHashes:
    """sha256 of a finished output shard and of its source shard (None where the run did not hash)."""

    sha256: str | None
    source_sha256: str | None


_KEYS = {"tool", "tool_version", "complete", "shard_hashes", "fingerprint", "options", "source", "output_shards",
         "copied_files", "counts", "float_modules", "total_size", "verify"}


class ManifestError(UserError):
    """``w3repack.json`` exists but cannot be read as a manifest."""


def _records(obj: object, sized: bool) -> list[FileRecord]:
    out = []
    for e in obj if isinstance(obj, list) else ():
        if isinstance(e, dict) and isinstance(e.get("name"), str):
            sha = e.get("sha256") if isinstance(e.get("sha256"), str) else None
            size = e.get("size") if isinstance(e.get("size"), int) else (-1 if sized else None)
            out.append(FileRecord(e["name"], size, sha))
    return out


@dataclass
class Manifest:
    """``w3repack.json``: what was converted, with which options, and the hash of every file."""

    fingerprint: dict
    options: dict
    source_path: str
    source_files: list[FileRecord]
    output_shards: list[FileRecord]
    copied_files: list[FileRecord]
    counts: dict[str, int]
    float_modules: list[str]
    total_size: int
    shard_hashes: bool
    hub: dict | None = None
    verify: dict | None = None
    complete: bool = True
    tool_version: str = __version__
    records: dict[str, Any] = field(default_factory=dict)  # what the plan records besides (plan.records)

    def to_json(self) -> dict:
        source: dict[str, Any] = {"path": self.source_path, "files": [f.to_json() for f in self.source_files]}
        if self.hub is not None:
            source["hub"] = self.hub
        out: dict[str, Any] = {
            "tool": "w3repack",
            "tool_version": self.tool_version,
            "complete": self.complete,
            "shard_hashes": self.shard_hashes,
            "fingerprint": self.fingerprint,
            "options": self.options,
            "source": source,
            "output_shards": [f.to_json() for f in self.output_shards],
            "copied_files": [f.to_json() for f in self.copied_files],
            "counts": self.counts,
            "float_modules": self.float_modules,
            **self.records,
            "total_size": self.total_size,
        }
        if self.verify is not None:
            out["verify"] = self.verify
        return out

    @classmethod
    def from_json(cls, obj: object, path: Path) -> Manifest:
        """Lenient on everything but ``options`` (a verify needs them): missing parts read as empty."""
        if not isinstance(obj, dict) or not isinstance(obj.get("options"), dict):
            raise ManifestError(f"{path}: unreadable manifest (no options object)")
        src: dict = obj["source"] if isinstance(obj.get("source"), dict) else {}
        fp, counts, floats, total = obj.get("fingerprint"), obj.get("counts"), obj.get("float_modules"), obj.get("total_size")
        return cls(
            fingerprint=fp if isinstance(fp, dict) else {},
            options=obj["options"],
            source_path=str(src.get("path", "")),
            source_files=_records(src.get("files"), True),
            output_shards=_records(obj.get("output_shards"), True),
            copied_files=_records(obj.get("copied_files"), False),
            counts=counts if isinstance(counts, dict) else {},
            float_modules=floats if isinstance(floats, list) else [],
            total_size=total if isinstance(total, int) else 0,
            shard_hashes=obj.get("shard_hashes", True) is not False,
            hub=src["hub"] if isinstance(src.get("hub"), dict) else None,
            verify=obj["verify"] if isinstance(obj.get("verify"), dict) else None,
            complete=obj.get("complete") is True,
            tool_version=str(obj.get("tool_version", "")),
            records={k: v for k, v in obj.items() if k not in _KEYS},
        )

    @classmethod
    def load(cls, dst: Path, follow: bool = False) -> Manifest | None:
        """The manifest in folder ``dst``; None if there is none; ManifestError if it is not one. A symlink is
        refused unless ``follow`` (a source folder, e.g. a hub snapshot, where every file may be a link)."""
        path = Path(dst) / MANIFEST_NAME
        try:
            data = read_bounded(path, MAX_MANIFEST, follow=follow)
        except FileNotFoundError:
            return None
        except OSError as e:
            why = "a symlink" if e.errno == errno.ELOOP else e.strerror or e
            raise ManifestError(f"{path}: unreadable manifest ({why})") from e
        except UserError as e:
            raise ManifestError(f"{path}: unreadable manifest ({str(e).removeprefix(f'{path}: ')})") from e
        try:
            obj = parse_json(data, path, "manifest")
        except UserError as e:
            raise ManifestError(f"{path}: unreadable manifest ({str(e).removeprefix(f'{path}: ')})") from e
        return cls.from_json(obj, path)

    def mismatch(self, folder: Path, shards: list[str], fetched_later: bool) -> str | None:
        """Why this manifest is not that of ``folder``, whose index lists ``shards`` (None: it is): it records a
        complete conversion whose output shards are exactly those, each a file there of the recorded size
        (``fetched_later``: shards arrive later, as from the hub; only those present are measured)."""
        if not self.complete:
            return "it does not mark the conversion complete"
        recorded = [f.name for f in self.output_shards]
        if not recorded:
            return "it records no output shard"
        if sorted(recorded) != sorted(shards):
            unlisted = sorted(set(recorded) - set(shards))
            if unlisted:
                return f"it records output shard {unlisted[0]}, which the folder's index does not list"
            unrecorded = sorted(set(shards) - set(recorded))
            if unrecorded:
                return f"the folder's index lists shard {unrecorded[0]}, which it does not record"
            return "it records an output shard twice"
        for f in self.output_shards:
            p = folder / f.name
            if not p.is_file():
                if fetched_later and not os.path.lexists(p):
                    continue
                return f"it records output shard {f.name}, which is missing or not a regular file"
            size = p.stat().st_size
            if size != f.size:
                return f"{f.name} is {size:,} bytes, it records {f.size:,}"
        return None

    def output_sha(self, name: str) -> str | None:
        return next((f.sha256 for f in self.output_shards if f.name == name), None)

    def finished(self) -> dict[str, ShardHashes]:
        src = {f.name: f.sha256 for f in self.source_files}
        return {f.name: ShardHashes(f.sha256, src.get(f.name)) for f in self.output_shards}


def finished_output(dst: Path) -> Manifest:
    """The manifest of a finished conversion in DST, else a UserError saying what DST is."""
    man = Manifest.load(dst)
    if man is None:
        raise UserError(f"{dst}: no {MANIFEST_NAME}: not a finished w3repack output")
    if not man.complete:
        raise UserError(f"{Path(dst) / MANIFEST_NAME}: the conversion is not complete; run convert again to finish it")
    return man
