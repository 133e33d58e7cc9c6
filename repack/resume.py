"""Resume: what an earlier run left in DST that this run may keep, and the state file a run records it in.

``.w3repack/state.json`` holds the run's fingerprint and the sha256 of every finished shard (None where
unhashed); it is rewritten after each shard. A finished conversion records the same in its manifest.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass

from repack.checkpoint import parse_json
from repack.dstfs import DstFS, Entries, tmp_name
from repack.errors import UserError
from repack.manifest import MANIFEST_NAME, MAX_MANIFEST, Manifest, ManifestError, ShardHashes

STATE_DIR = ".w3repack"
STATE_NAME = "state.json"
METADATA_NAMES = ("config.json", "quantization_config.json", "model.safetensors.index.json")


@dataclass(frozen=True)
class Recorded:
    """What DST records of the run it holds: its fingerprint (as read), its finished shards, every name it wrote."""

    fingerprint: object
    finished: dict[str, ShardHashes]
    names: frozenset[str]


def _sha(v: object) -> str | None:
    return v if isinstance(v, str) else None


def recorded(fs: DstFS) -> Recorded | None:
    """The record of the run DST holds: its state file, else its finished manifest; None if neither is readable."""
    raw = fs.read(f"{STATE_DIR}/{STATE_NAME}", MAX_MANIFEST)
    if raw is not None:
        try:
            obj = parse_json(raw, fs.path / STATE_DIR / STATE_NAME, "state")
        except UserError:
            return None
        if not isinstance(obj, dict):
            return None
        fin = obj.get("finished")
        finished = {
            n: ShardHashes(_sha(r.get("sha256")), _sha(r.get("source_sha256")))
            for n, r in (fin.items() if isinstance(fin, dict) else ()) if isinstance(r, dict)
        }
        return Recorded(obj.get("fingerprint"), finished, frozenset(finished))
    try:
        man = Manifest.load(fs.path)
    except ManifestError:
        return None
    if man is None:
        return None
    names = {f.name for f in man.output_shards} | {f.name for f in man.copied_files} | {MANIFEST_NAME}
    return Recorded(man.fingerprint, man.finished(), frozenset(names))


@dataclass(frozen=True)
class OnDisk:
    """A finished shard found under its final name: a regular file of the planned size; its sha256 where asked."""

    sha256: str | None


def on_disk(fs: DstFS, rel: str, size: int, hashed: bool) -> OnDisk | None:
    """DST/``rel`` if it is a regular file of ``size`` bytes (hashed if ``hashed``); None otherwise."""
    f = fs.open_regular(rel)
    if f is None:
        return None
    with f:
        if f.size != size:
            return None
        return OnDisk(f.sha256() if hashed else None)


def _with_tmp(names: set[str]) -> set[str]:
    return names | {tmp_name(n) for n in names}


def keep(fs: DstFS, found: Entries, fingerprint: dict, sizes: dict[str, int], expected: set[str], overwrite: bool,
         hashes: bool, keep_in_state: str) -> dict[str, ShardHashes]:
    """Decide what in DST (``found``: its entries outside the state folder) this run keeps; returns the finished
    shards kept (``sizes``: planned sizes) and removes what an unusable earlier run left.

    A finished shard is kept when it is a regular file of the planned size and its recorded sha256 checks
    out; one recorded without a sha256 is kept only when ``hashes`` is off, and the caller must then prove it
    (``convert`` verifies it against its source). ``overwrite`` removes only names an earlier run wrote or
    this one will write; any other entry is refused, naming it. The state folder is emptied but for
    ``keep_in_state`` whenever nothing is kept from it.
    """
    dst = fs.path
    rec = recorded(fs)
    same = rec is not None and rec.fingerprint == fingerprint
    if found.empty() and not same:
        fs.clear(STATE_DIR, keep_in_state)
        return {}
    ours = _with_tmp(expected | {MANIFEST_NAME} | set(METADATA_NAMES) | (set(rec.names) if rec is not None else set()))
    foreign = [n for n in found.files + found.links if n not in ours]
    if rec is None or not same:
        if not overwrite:
            why = "an earlier run of a different conversion" if rec is not None else "files that are not from w3repack"
            raise UserError(f"destination {dst} is not empty: it holds {why}; pass --overwrite to replace its contents")
        if foreign:
            raise UserError(f"destination {dst} holds {dst / foreign[0]}, which w3repack did not write: --overwrite "
                            "removes only what w3repack writes; remove it yourself or choose another destination")
        fs.remove_all(found)
        fs.clear(STATE_DIR, keep_in_state)
        return {}
    if foreign:
        raise UserError(f"destination {dst} holds an earlier run of this conversion plus files it did not write "
                        f"(e.g. {foreign[0]}); remove them")
    if found.links:
        raise UserError(f"{dst / found.links[0]}: a symlink in the destination, where w3repack writes its own files; "
                        "remove it")
    kept = {}
    for name, h in rec.finished.items():
        if name not in sizes:
            continue
        disk = on_disk(fs, name, sizes[name], h.sha256 is not None)
        if disk is None:
            continue
        if (disk.sha256 == h.sha256) if h.sha256 is not None else not hashes:
            kept[name] = h
    return kept


class StateFile:
    """``.w3repack/state.json`` of the run in progress: its fingerprint and finished shards, rewritten (through
    a temporary name) after each one; thread-safe."""

    def __init__(self, fs: DstFS, fingerprint: dict, finished: dict[str, ShardHashes]):
        self.fs, self.fingerprint, self.finished = fs, fingerprint, dict(finished)
        self.lock = threading.Lock()
        self._save()

    def _save(self) -> None:
        finished = {n: {"sha256": h.sha256, "source_sha256": h.source_sha256} for n, h in self.finished.items()}
        data = json.dumps({"fingerprint": self.fingerprint, "finished": finished}, indent=1).encode()
        self.fs.write_atomic(f"{STATE_DIR}/{STATE_NAME}", [data])

    def done(self, name: str, hashes: ShardHashes) -> None:
        with self.lock:
            self.finished[name] = hashes
            self._save()

    def get(self, name: str) -> ShardHashes | None:
        with self.lock:
            return self.finished.get(name)
