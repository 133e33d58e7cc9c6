"""A hub repo ``org/name[@revision]`` pinned to a commit: planned from configs and shard headers before any shard
arrives, then fetched one shard at a time into huggingface_hub's cache.

Headers come from the cached shard, the copy saved in DST (``.w3repack/hub-headers``) or an HTTP range request.
With ``delete``, each output shard is verified against its source shard bit for bit (recorded under
``.w3repack/hub-verified``), then the source shard leaves the cache: peak disk is the output plus the shards in
flight.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from repack.checkpoint import CONFIG_NAME, INDEX_NAME, SINGLE_NAME, Checkpoint, open_checkpoint, read_index
from repack.errors import FormatError, Mismatch, NothingToDo, UserError
from repack.hubclient import download, fetch_header_prefix, go_offline, hub_errors, offline, parse_repo_id, quiet, unreachable
from repack.output import Manifest, ManifestError, Output
from repack.plan import Options, Plan, ShardPlan
from repack.safetensors_io import Header, parse_header, read_prefix
from repack.sources.folder import FolderSource

HEADERS_DIR = "hub-headers"
VERIFIED_DIR = "hub-verified"
WEIGHT_PATTERNS = ["*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.h5", "*.msgpack", "*.gguf", "*.onnx", "*.ot"]
STALE_S = 60.0


@dataclass
class HubSource(FolderSource):
    """``root``: the snapshot folder of ``commit`` in the hub cache. Identity: repo, commit and shard sizes
    (shards come and go from the cache, so file times say nothing)."""

    repo: str = ""
    revision: str | None = None
    commit: str = ""
    delete: bool = False
    prefixes: dict[str, bytes] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    stop: threading.Event | None = field(default=None, repr=False)  # set by the executor: no download starts once set

    @classmethod
    def open(cls, src: str, revision: str | None = None, delete: bool = False) -> HubSource:
        """Fetch config, index and the small files of ``org/name[@revision]``; pin the commit. No shard is fetched."""
        quiet()
        parsed = parse_repo_id(src)
        if parsed is None:
            raise UserError(f"{src}: not a hub repo id (org/name[@revision])")
        repo, rev = parsed
        if revision and rev and revision != rev:
            raise UserError(f"{src}: --revision {revision} contradicts @{rev}")
        rev = revision or rev
        if not offline():
            why = unreachable()
            if why is not None:
                try:
                    download(repo, CONFIG_NAME, rev, local_only=True)
                except UserError:
                    raise UserError(f"{src}: no such local folder, and as a hub repo id: {why} "
                                    "(HF_HUB_OFFLINE=1 uses the local hub cache only)") from None
                from repack import ui

                ui.err.print(f"warning: {why}; using the cached snapshot of {src}", markup=False)
                go_offline()
        root = download(repo, CONFIG_NAME, rev).parent
        commit = root.name
        try:
            download(repo, INDEX_NAME, commit)
        except UserError:
            if not (root / SINGLE_NAME).exists() and offline():
                raise
        if not offline():
            from huggingface_hub import snapshot_download

            with hub_errors(f"{repo}@{commit}"):
                snapshot_download(repo, revision=commit, ignore_patterns=WEIGHT_PATTERNS)
        return cls(root, 1 if delete else None, repo, rev, commit, delete)

    @property
    def repo_cache(self) -> Path:
        return self.root.parent.parent

    def ref(self) -> dict:
        return {"repo": self.repo, "revision": self.revision or "main", "commit": self.commit}

    def label(self) -> str:
        return f"{self.repo}@{self.commit}"

    def shard_names(self) -> list[str]:
        return read_index(self.root, files_present=False)[1]

    # --- planning -----------------------------------------------------------------------------------------

    def checkpoint(self, out: Output, options: Options) -> Checkpoint:
        self._already_done(out, options)
        ckpt = open_checkpoint(self.root, self.headers(out))
        remove_stale_downloads(self.repo_cache)
        return ckpt

    def headers(self, out: Output) -> dict[str, Header]:
        """Every shard header: from the cached file, the copy saved in DST, or a range request."""
        headers = {}
        for name in self.shard_names():
            local = self.root / name
            size = None
            if local.is_file():
                prefix, size = read_prefix(local)
            else:
                saved = out.record(HEADERS_DIR, name)
                if saved is not None:
                    prefix = saved
                elif offline():
                    raise UserError(self._missing_offline(name, out))
                else:
                    prefix = fetch_header_prefix(self.repo, self.commit, name)
            headers[name] = parse_header(prefix, local, size)
            self.prefixes[name] = prefix
        return headers

    def _finished_here(self, out: Output) -> Manifest | None:
        """DST's manifest if DST is a finished conversion of this commit."""
        try:
            man = Manifest.load(out.path)
        except ManifestError:
            return None
        if man is not None and man.complete and (man.hub or {}).get("commit") == self.commit:
            return man
        return None

    def _already_done(self, out: Output, options: Options) -> None:
        """Offline, with the source shards deleted, a finished conversion cannot be re-planned: say it is done."""
        if not offline() or all((self.root / n).is_file() for n in self.shard_names()):
            return
        man = self._finished_here(out)
        if man is not None and man.options == options.to_json():
            raise NothingToDo(f"{out.path} is already a finished conversion of {self.label()} with these options; nothing to do")

    def _missing_offline(self, name: str, out: Output) -> str:
        if self._finished_here(out) is not None:  # the same options were answered by _already_done
            return (f"{out.path} is a finished conversion of {self.label()} with other options, and the source shards "
                    "are not in the cache (HF_HUB_OFFLINE is set): cannot convert again")
        return f"{self.label()}: shard {name} is not in the hub cache and HF_HUB_OFFLINE is set: its header cannot be read"

    def fingerprint(self, plan: Plan) -> dict:
        return {"source_hub": {"repo": self.repo, "commit": self.commit},
                "source_files": {s.name: [s.src_size] for s in plan.shards}}

    def changed(self, plan: Plan) -> str | None:
        """Shards come and go from the cache; each fetched one is checked against its planned size and header."""
        return None

    def space_needed(self, todo: list[ShardPlan], workers: int) -> list[tuple[Path, int]]:
        """The shards still to fetch; with ``delete`` only one per worker is on disk at a time."""
        missing = sorted((s.src_size for s in todo if not (self.root / s.name).is_file()), reverse=True)
        return [(self.repo_cache, sum(missing[: max(1, workers)]) if self.delete else sum(missing))]

    # --- converting ---------------------------------------------------------------------------------------

    @property
    def space_hint(self) -> str:
        return "" if self.delete else "; --delete-source-shards keeps only the shards in flight"

    def ensure(self, sp: ShardPlan) -> None:
        """One download at a time; the fetched shard must be the one planned (size and header bytes)."""
        from repack import ui

        with self.lock:
            if self.stop is not None and self.stop.is_set():
                from repack.stream import Stopped

                raise Stopped()
            if (self.root / sp.name).is_file():
                path = download(self.repo, sp.name, self.commit)
            else:
                blobs = self.repo_cache / "blobs"
                with ui.fetching(sp.name, sp.src_size, lambda: ui.incomplete_bytes(blobs)):
                    path = download(self.repo, sp.name, self.commit)
        if path.stat().st_size != sp.src_size or read_prefix(path)[0] != self.prefixes.get(sp.name):
            raise FormatError(f"{path}: fetched shard does not match the header it was planned from")

    def release(self, plan: Plan, sp: ShardPlan, out: Output) -> None:
        """Save the header into DST (a resumed run plans without the shard); with ``delete``, verify, then delete."""
        out.save_record(HEADERS_DIR, sp.name, self.prefixes[sp.name])
        if self.delete:
            self._verify(plan, sp, out)
            delete_cached(self.root, self.repo_cache, sp.name)

    def _verify(self, plan: Plan, sp: ShardPlan, out: Output) -> None:
        """The full per-tensor round trip of ``w3repack verify`` for one shard, while its source still exists."""
        from repack.verify import Found, verify_shard

        counts: dict[str, int] = {}
        done = out.finished(sp.name)
        recorded = done.sha256 if done is not None else None
        try:
            sha = verify_shard(plan, sp, out.path, counts, lambda n: None, hashed=recorded is not None).sha256
        except Found as f:
            raise Mismatch(f"{f.diff.line()} (the cached source shard is kept)") from None
        if recorded is not None and recorded != sha:
            raise Mismatch(f"{out.path / sp.name}: sha256 differs from the one recorded while writing it")
        rec = {"tensors_checked": counts, "sha256_checked": recorded is not None}
        out.save_record(VERIFIED_DIR, sp.name, json.dumps(rec).encode())

    def finish(self, plan: Plan, out: Output, manifest: Manifest) -> None:
        """Name the hub source; with ``delete``, sum the per-shard verifications (kept across resumed runs).

        A shard kept from a run killed between finishing and verifying it is verified here, its source still cached.
        """
        manifest.hub = self.ref()
        if not self.delete:
            return
        tensors: dict[str, int] = {}
        shards = hashed = 0
        for sp in plan.shards:
            if out.record(VERIFIED_DIR, sp.name) is None and (self.root / sp.name).is_file():
                self._verify(plan, sp, out)
            try:
                rec = json.loads(out.record(VERIFIED_DIR, sp.name) or b"")
            except ValueError:
                continue
            shards += 1
            hashed += bool(rec.get("sha256_checked"))
            for k, v in (rec.get("tensors_checked") or {}).items():
                tensors[k] = tensors.get(k, 0) + int(v)
        manifest.verify = {
            "ok": True, "scope": "each output shard against its source shard, before the source shard was deleted",
            "shards": shards, "of_shards": len(plan.shards), "tensors_checked": dict(sorted(tensors.items())),
            "shard_hashes_checked": hashed,
        }

    def close(self, plan: Plan) -> None:
        if self.delete:
            for sp in plan.shards:
                delete_cached(self.root, self.repo_cache, sp.name)


def delete_cached(snapshot: Path, repo_cache: Path, name: str) -> int:
    """Remove a shard's blob (unless another snapshot links to it), then its snapshot link. Returns bytes freed.

    Blob first: a run killed in between leaves a dangling link, which the next run removes, never an orphan blob.
    """
    p = snapshot / name
    if not p.is_symlink() and not p.exists():
        return 0
    blob = Path(os.path.realpath(p)) if p.is_symlink() else None
    size = p.stat().st_size if p.exists() else 0
    freed = size
    if blob is not None:
        blobs = Path(os.path.realpath(repo_cache / "blobs"))
        if blob.parent == blobs and blob.is_file() and not _linked_elsewhere(repo_cache, blob, p):
            blob.unlink()
        else:
            freed = 0
    p.unlink()
    return freed


def _linked_elsewhere(repo_cache: Path, blob: Path, this: Path) -> bool:
    for dirpath, _, files in os.walk(repo_cache / "snapshots"):
        for fn in files:
            q = os.path.join(dirpath, fn)
            if fn == this.name and os.path.samefile(dirpath, this.parent):
                continue
            if os.path.islink(q) and os.path.realpath(q) == str(blob):
                return True
    return False


def remove_stale_downloads(repo_cache: Path, older_than_s: float = STALE_S) -> int:
    """Delete this repo's ``blobs/*.incomplete`` files untouched for ``older_than_s``: left by a killed run.

    huggingface_hub downloads into a per-process temporary file and cannot resume it, so a shard cut off
    mid-download is fetched again from its start; finished shards are never fetched again.
    """
    freed = 0
    for p in (repo_cache / "blobs").glob("*.incomplete"):
        with contextlib.suppress(OSError):
            st = p.stat()
            if time.time() - st.st_mtime > older_than_s:
                p.unlink()
                freed += st.st_size
    return freed
