"""The output folder (DST): what an earlier run left that may be kept, the state of a run, free space, the manifest.

Layout of an unfinished DST: finished shards under their final names (each renamed only after fsync), the shard
in flight under ``.w3repack/<name>.partial``, ``.w3repack/state.json`` (the run's fingerprint and the sha256 of
every finished shard, None where unhashed) and a source's own records under ``.w3repack/<kind>/<name>``. The
configs, index and copied files come after the shards and ``w3repack.json`` last of all, so DST is a loadable
model only once everything is done.

Every file created in DST is created by a method of :class:`Output` (``partial_path``/``commit_shard``,
``write_file``, ``copy_in``, ``save_record``, the state file and the manifest): locking and no-follow creation
belong there. :class:`Manifest` is the only reader and writer of ``w3repack.json``.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from repack import __version__
from repack.errors import UserError
from repack.stream import atomic_write, copy_file_atomic, fsync_dir, sha256_file

MANIFEST_NAME = "w3repack.json"
STATE_DIR = ".w3repack"
STATE_NAME = "state.json"
TMP_SUFFIX = ".w3repack-tmp"


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
    def load(cls, dst: Path) -> Manifest | None:
        """DST's manifest; None if there is none; ManifestError if it is not one."""
        path = Path(dst) / MANIFEST_NAME
        try:
            text = path.read_text()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise ManifestError(f"{path}: unreadable manifest ({e.strerror or e})") from e
        try:
            obj = json.loads(text)
        except ValueError as e:
            raise ManifestError(f"{path}: unreadable manifest ({e})") from e
        return cls.from_json(obj, path)

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


class _State:
    """``.w3repack/state.json``: the run's fingerprint and its finished shards, rewritten after each one."""

    def __init__(self, path: Path, fingerprint: dict, finished: dict[str, ShardHashes]):
        self.path, self.fingerprint, self.finished = path, fingerprint, dict(finished)
        self.lock = threading.Lock()
        self.save()

    def save(self) -> None:
        finished = {n: {"sha256": h.sha256, "source_sha256": h.source_sha256} for n, h in self.finished.items()}
        atomic_write(self.path, json.dumps({"fingerprint": self.fingerprint, "finished": finished}, indent=1).encode())

    def done(self, name: str, hashes: ShardHashes) -> None:
        with self.lock:
            self.finished[name] = hashes
            self.save()


def _probe(p: Path) -> Path:
    """The nearest existing folder at or above ``p`` (where free space is measured)."""
    return p if p.exists() else next(q for q in p.resolve().parents if q.exists())


@dataclass
class Output:
    """DST of one conversion. ``expected``: every path (relative) the conversion writes outside ``.w3repack/``."""

    path: Path
    state: _State | None = field(default=None, init=False)

    @property
    def state_dir(self) -> Path:
        return self.path / STATE_DIR

    # --- what an earlier run left -------------------------------------------------------------------------

    def _recorded(self) -> tuple[dict | None, dict[str, ShardHashes]] | None:
        """Fingerprint and finished shards of the run DST holds: its state file, else its finished manifest."""
        p = self.state_dir / STATE_NAME
        if p.exists():
            try:
                obj = json.loads(p.read_text())
            except (OSError, ValueError):
                return None
            if not isinstance(obj, dict):
                return None
            fin = obj.get("finished")
            finished = {
                n: ShardHashes(r.get("sha256"), r.get("source_sha256"))
                for n, r in (fin.items() if isinstance(fin, dict) else ()) if isinstance(r, dict)
            }
            return obj.get("fingerprint"), finished
        try:
            man = Manifest.load(self.path)
        except ManifestError:
            return None
        return None if man is None else (man.fingerprint, man.finished())

    def prepare(self, fingerprint: dict, sizes: dict[str, int], expected: set[str], overwrite: bool,
                hashes: bool = True) -> dict[str, ShardHashes]:
        """Decide what in DST can be kept; returns the finished shards kept (``sizes``: planned output sizes).

        A finished shard is kept when its size is the planned one and its recorded sha256 checks out; one recorded
        without a sha256 is kept only when ``hashes`` is off. Final names only ever hold complete, fsynced shards.
        """
        dst = self.path
        if dst.exists() and not dst.is_dir():
            raise UserError(f"destination {dst} exists and is not a directory")
        if not dst.exists() or not any(dst.iterdir()):
            return {}
        rec = self._recorded()
        if rec is None and [c.name for c in dst.iterdir()] == [STATE_DIR]:
            shutil.rmtree(self.state_dir)
            return {}
        if rec is None or rec[0] != fingerprint:
            if not overwrite:
                why = "an earlier run of a different conversion" if rec is not None else "files that are not from w3repack"
                raise UserError(f"destination {dst} is not empty: it holds {why}; pass --overwrite to replace its contents")
            for child in dst.iterdir():
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                else:
                    child.unlink()
            return {}
        foreign = self.foreign_files(expected)
        if foreign:
            if not overwrite:
                raise UserError(f"destination {dst} holds an earlier run of this conversion plus files it did not write "
                                f"(e.g. {foreign[0]}); remove them or pass --overwrite")
            for rel in foreign:
                (dst / rel).unlink()
        kept = {}
        for name, h in rec[1].items():
            p = dst / name
            if name not in sizes or not p.is_file() or p.stat().st_size != sizes[name]:
                continue
            if sha256_file(p) == h.sha256 if isinstance(h.sha256, str) else not hashes:
                kept[name] = h
        return kept

    def foreign_files(self, expected: set[str]) -> list[str]:
        """Files in DST (outside ``.w3repack/``) that are neither ``expected`` nor the temporary name of one."""
        ours = expected | {MANIFEST_NAME}
        out = []
        for dirpath, dirnames, files in os.walk(self.path):
            rel_dir = Path(dirpath).relative_to(self.path)
            if rel_dir == Path("."):
                dirnames[:] = [d for d in dirnames if d != STATE_DIR]
            for fn in files:
                tmp_of = fn[1:-len(TMP_SUFFIX)] if fn.startswith(".") and fn.endswith(TMP_SUFFIX) else None
                if str(rel_dir / fn) not in ours and (tmp_of is None or str(rel_dir / tmp_of) not in ours):
                    out.append(str(rel_dir / fn))
        return sorted(out)

    def check_space(self, need: int, fetch: Sequence[tuple[Path, int]] = (), hint: str = "") -> None:
        """``need`` more output bytes, plus ``fetch``: bytes a source must still bring to a folder (e.g. a hub
        cache); needs on one device are added up before they are compared with its free space."""
        out_probe = _probe(self.path)
        needs: dict[int, tuple[Path, list[int]]] = {os.stat(out_probe).st_dev: (out_probe, [need, 0])}
        for where, n in fetch:
            probe = _probe(where)
            needs.setdefault(os.stat(probe).st_dev, (probe, [0, 0]))[1][1] += n
        for probe, (out_n, fetch_n) in needs.values():
            total = out_n + fetch_n
            free = shutil.disk_usage(probe).free
            if free >= total:
                continue
            if not fetch:
                raise UserError(
                    f"not enough free space on {probe}: the output needs {total:,} more bytes ({total / 2**30:.2f} GiB), "
                    f"{free:,} bytes ({free / 2**30:.2f} GiB) are free"
                )
            raise UserError(
                f"not enough free space on {probe}: needs {total:,} bytes ({total / 2**30:.2f} GiB: output "
                f"{out_n / 2**30:.2f} GiB, source shards to fetch {fetch_n / 2**30:.2f} GiB), "
                f"{free:,} bytes ({free / 2**30:.2f} GiB) are free" + hint
            )

    # --- this run -----------------------------------------------------------------------------------------

    def start(self, fingerprint: dict, kept: dict[str, ShardHashes]) -> None:
        """Create DST and the state file that makes this run resumable."""
        self.path.mkdir(parents=True, exist_ok=True)
        self.state = _State(self.state_dir / STATE_NAME, fingerprint, kept)

    def finished(self, name: str) -> ShardHashes | None:
        return None if self.state is None else self.state.finished.get(name)

    def partial_path(self, name: str) -> Path:
        """Where shard ``name`` is written until ``commit_shard``."""
        tmp = self.state_dir / (name + ".partial")
        tmp.parent.mkdir(parents=True, exist_ok=True)
        return tmp

    def commit_shard(self, name: str, hashes: ShardHashes) -> None:
        """Rename the fsynced partial shard to its final name, then record it finished."""
        final = self.path / name
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self.partial_path(name), final)
        fsync_dir(final.parent)
        assert self.state is not None
        self.state.done(name, hashes)

    def write_file(self, rel: str, data: bytes) -> None:
        atomic_write(self.path / rel, data)

    def copy_in(self, src: Path, rel: str, stop: threading.Event | None = None) -> str:
        """Copy ``src`` to DST/``rel`` through a temporary name; returns its sha256."""
        return copy_file_atomic(src, self.path / rel, stop)

    def save_record(self, kind: str, name: str, data: bytes) -> None:
        """A source's own record about shard ``name`` (e.g. its header), kept until the run finishes."""
        atomic_write(self.state_dir / kind / name, data)

    def record(self, kind: str, name: str) -> bytes | None:
        try:
            return (self.state_dir / kind / name).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None

    def finish(self, manifest: Manifest) -> None:
        """Write the manifest (DST is now a finished conversion), then drop ``.w3repack/``."""
        atomic_write(self.path / MANIFEST_NAME, json.dumps(manifest.to_json(), indent=2).encode() + b"\n")
        shutil.rmtree(self.state_dir, ignore_errors=True)
        fsync_dir(self.path)
