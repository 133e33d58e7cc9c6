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

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import socket
import stat
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from repack import __version__
from repack.checkpoint import parse_json, read_bounded
from repack.errors import UserError
from repack.stream import Stopped

MANIFEST_NAME = "w3repack.json"
STATE_DIR = ".w3repack"
STATE_NAME = "state.json"
TMP_SUFFIX = ".w3repack-tmp"
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
    def load(cls, dst: Path) -> Manifest | None:
        """DST's manifest; None if there is none; ManifestError if it is not one."""
        path = Path(dst) / MANIFEST_NAME
        try:
            data = read_bounded(path, MAX_MANIFEST, follow=False)
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

    def __init__(self, out: Output, fingerprint: dict, finished: dict[str, ShardHashes]):
        self.out, self.fingerprint, self.finished = out, fingerprint, dict(finished)
        self.lock = threading.Lock()
        self.save()

    def save(self) -> None:
        finished = {n: {"sha256": h.sha256, "source_sha256": h.source_sha256} for n, h in self.finished.items()}
        data = json.dumps({"fingerprint": self.fingerprint, "finished": finished}, indent=1).encode()
        self.out._write_atomic(f"{STATE_DIR}/{STATE_NAME}", data)

    def done(self, name: str, hashes: ShardHashes) -> None:
        with self.lock:
            self.finished[name] = hashes
            self.save()


def _probe(p: Path) -> Path:
    """The nearest existing folder at or above ``p`` (where free space is measured)."""
    return p if p.exists() else next(q for q in p.resolve().parents if q.exists())


_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
LOCK_NAME = "lock"
METADATA_NAMES = ("config.json", "quantization_config.json", "model.safetensors.index.json")


@dataclass
class Output:
    """DST of one conversion. Every entry w3repack creates in DST is created relative to an open folder, never
    through a symlink (``O_NOFOLLOW``/``O_EXCL``); an existing symlink where w3repack writes is refused. A run
    holds an exclusive ``flock`` on ``.w3repack/lock`` from ``prepare`` to ``finish`` (or ``release``)."""

    path: Path
    state: _State | None = field(default=None, init=False)
    _root_fd: int | None = field(default=None, init=False, repr=False)
    _lock_fd: int | None = field(default=None, init=False, repr=False)
    _made: list[str] = field(default_factory=list, init=False, repr=False)

    @property
    def state_dir(self) -> Path:
        return self.path / STATE_DIR

    # --- no-follow file operations ------------------------------------------------------------------------

    def _root(self) -> int:
        if self._root_fd is None:
            self._root_fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        return self._root_fd

    def _dir(self, parts: Sequence[str], create: bool) -> int:
        """A new fd of folder DST/``parts``, each part opened without following a link (created if ``create``)."""
        fd = os.dup(self._root())
        try:
            for i, part in enumerate(parts):
                if create:
                    with contextlib.suppress(FileExistsError):
                        os.mkdir(part, 0o755, dir_fd=fd)
                try:
                    nfd = os.open(part, _DIR, dir_fd=fd)
                except OSError as e:
                    if e.errno in (errno.ELOOP, errno.ENOTDIR):
                        raise UserError(f"{self.path.joinpath(*parts[: i + 1])}: a symlink or a file where w3repack "
                                        "keeps a folder of its own; refused") from None
                    raise
                os.close(fd)
                fd = nfd
            return fd
        except BaseException:
            os.close(fd)
            raise

    def _parent(self, rel: str, create: bool = True) -> tuple[int, str]:
        parts = rel.split("/")
        return self._dir(parts[:-1], create), parts[-1]

    def _replace(self, src_fd: int, src: str, dst_fd: int, dst: str, rel: str) -> None:
        """Rename ``src`` over ``dst`` (the entry itself, never a link's target); a non-file at ``dst`` is refused."""
        try:
            st = os.stat(dst, dir_fd=dst_fd, follow_symlinks=False)
        except FileNotFoundError:
            st = None
        if st is not None and not stat.S_ISREG(st.st_mode):
            os.unlink(src, dir_fd=src_fd)
            raise UserError(f"{self.path / rel}: exists and is not a regular file (a symlink?); refused")
        os.replace(src, dst, src_dir_fd=src_fd, dst_dir_fd=dst_fd)
        os.fsync(dst_fd)

    def _write_atomic(self, rel: str, data: bytes | None = None, src: Path | None = None,
                      stop: threading.Event | None = None) -> str:
        """DST/``rel`` from ``data`` or a copy of file ``src``, through a temporary name; returns its sha256."""
        pfd, name = self._parent(rel)
        tmp = f".{name}{TMP_SUFFIX}"
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp, dir_fd=pfd)
            fd = os.open(tmp, _NEW, 0o644, dir_fd=pfd)
            try:
                h = hashlib.sha256()
                chunks = [data] if data is not None else _read_chunks(src, stop) if src is not None else []
                for chunk in chunks:
                    h.update(chunk)
                    view = memoryview(chunk)
                    while len(view):
                        view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            self._replace(pfd, tmp, pfd, name, rel)
            return h.hexdigest()
        finally:
            os.close(pfd)

    def _open_regular(self, rel: str) -> tuple[int, int] | None:
        """(fd, size) of DST/``rel`` opened without following links; None if it is missing, a link or not a
        regular file. The caller closes the fd."""
        try:
            pfd, name = self._parent(rel, create=False)
        except (OSError, UserError):
            return None
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=pfd)
        except OSError:
            return None
        finally:
            os.close(pfd)
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            return None
        return fd, st.st_size

    def _read(self, rel: str, limit: int) -> bytes | None:
        """DST/``rel`` read without following links; None if it is missing, a link, not a regular file or over
        ``limit`` bytes."""
        opened = self._open_regular(rel)
        if opened is None:
            return None
        fd, size = opened
        try:
            return None if size > limit else os.read(fd, size + 1)[:limit]
        finally:
            os.close(fd)

    def _entries(self) -> tuple[list[str], list[str], list[str]]:
        """Files, symlinks and folders in DST outside ``.w3repack/`` (relative names), walked without following links."""
        files: list[str] = []
        links: list[str] = []
        dirs: list[str] = []

        def walk(fd: int, prefix: str) -> None:
            for e in sorted(os.scandir(fd), key=lambda e: e.name):
                rel = prefix + e.name
                if not prefix and e.name == STATE_DIR:
                    continue
                if e.is_symlink():
                    links.append(rel)
                elif e.is_dir(follow_symlinks=False):
                    dirs.append(rel)
                    sub = os.open(e.name, _DIR, dir_fd=fd)
                    try:
                        walk(sub, rel + "/")
                    finally:
                        os.close(sub)
                else:
                    files.append(rel)

        walk(self._root(), "")
        return files, links, dirs

    # --- exclusive ownership ------------------------------------------------------------------------------

    def acquire(self) -> None:
        """Create DST if needed and take the run's lock; another run holding it is refused, naming it."""
        if self._lock_fd is not None:
            return
        dst = self.path
        if dst.exists() and not dst.is_dir():
            raise UserError(f"destination {dst} exists and is not a directory")
        if not dst.exists():
            dst.mkdir(parents=True)
            self._made.append("")
        if not os.path.lexists(dst / STATE_DIR):
            self._made.append(STATE_DIR)
        sfd = self._dir([STATE_DIR], create=True)
        try:
            fd = os.open(LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644, dir_fd=sfd)
        except OSError as e:
            os.close(sfd)
            raise UserError(f"{self.state_dir / LOCK_NAME}: cannot open the lock ({e.strerror or e}); refused") from e
        os.close(sfd)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise UserError(f"{self.state_dir / LOCK_NAME}: not a regular file; refused")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "unknown process"
                raise UserError(f"destination {dst} is in use by another w3repack run ({holder}); wait for it "
                                "to end, or stop it") from None
        except BaseException:
            os.close(fd)
            self._made.clear()
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self._lock_fd = fd

    def release(self) -> None:
        """Drop the lock; a state folder (and DST) this run created and left holding nothing but it goes too."""
        if self._lock_fd is None:
            return
        with contextlib.suppress(OSError):
            if STATE_DIR in self._made and os.listdir(self.state_dir) == [LOCK_NAME]:
                os.unlink(LOCK_NAME, dir_fd=self._dir([STATE_DIR], create=False))
                os.rmdir(STATE_DIR, dir_fd=self._root())
            if "" in self._made and not os.listdir(self.path):
                os.rmdir(self.path)
        os.close(self._lock_fd)
        self._lock_fd = None
        if self._root_fd is not None:
            os.close(self._root_fd)
            self._root_fd = None

    # --- what an earlier run left -------------------------------------------------------------------------

    def _recorded(self) -> tuple[dict | None, dict[str, ShardHashes], set[str]] | None:
        """Fingerprint, finished shards and every name written by the run DST holds: its state file, else its
        finished manifest."""
        raw = self._read(f"{STATE_DIR}/{STATE_NAME}", MAX_MANIFEST)
        if raw is not None:
            try:
                obj = parse_json(raw, self.state_dir / STATE_NAME, "state")
            except UserError:
                return None
            if not isinstance(obj, dict):
                return None
            fin = obj.get("finished")
            finished = {
                n: ShardHashes(r.get("sha256"), r.get("source_sha256"))
                for n, r in (fin.items() if isinstance(fin, dict) else ()) if isinstance(r, dict)
            }
            return obj.get("fingerprint"), finished, set(finished)
        try:
            man = Manifest.load(self.path)
        except ManifestError:
            return None
        if man is None:
            return None
        names = {f.name for f in man.output_shards} | {f.name for f in man.copied_files} | {MANIFEST_NAME}
        return man.fingerprint, man.finished(), names

    def prepare(self, fingerprint: dict, sizes: dict[str, int], expected: set[str], overwrite: bool,
                hashes: bool = True) -> dict[str, ShardHashes]:
        """Lock DST and decide what in it can be kept; returns the finished shards kept (``sizes``: planned sizes).

        A finished shard is kept when it is a regular file of the planned size and its recorded sha256 checks
        out; one recorded without a sha256 is kept only when ``hashes`` is off, and the caller must then prove it
        (``convert`` verifies it against its source). ``overwrite`` removes only names an earlier run wrote or
        this one will write; any other entry is refused, naming it. Final names only ever hold complete shards.
        """
        dst = self.path
        self.acquire()
        files, links, dirs = self._entries()
        rec = self._recorded()
        if not files and not links and not dirs and (rec is None or rec[0] != fingerprint):
            self._clear_state()
            return {}
        ours = expected | {MANIFEST_NAME} | set(METADATA_NAMES) | (rec[2] if rec is not None else set())
        ours |= {str(Path(n).parent / f".{Path(n).name}{TMP_SUFFIX}").removeprefix("./") for n in ours}
        foreign = [n for n in files + links if n not in ours]
        if rec is None or rec[0] != fingerprint:
            if not overwrite:
                why = "an earlier run of a different conversion" if rec is not None else "files that are not from w3repack"
                raise UserError(f"destination {dst} is not empty: it holds {why}; pass --overwrite to replace its contents")
            if foreign:
                raise UserError(f"destination {dst} holds {dst / foreign[0]}, which w3repack did not write: --overwrite "
                                "removes only what w3repack writes; remove it yourself or choose another destination")
            for rel in files + links:
                pfd, name = self._parent(rel, create=False)
                try:
                    os.unlink(name, dir_fd=pfd)
                finally:
                    os.close(pfd)
            for rel in sorted(dirs, key=lambda d: -d.count("/")):
                with contextlib.suppress(OSError):
                    os.rmdir(rel, dir_fd=self._root())
            self._clear_state()
            return {}
        if foreign:
            raise UserError(f"destination {dst} holds an earlier run of this conversion plus files it did not write "
                            f"(e.g. {foreign[0]}); remove them")
        if links:
            raise UserError(f"{dst / links[0]}: a symlink in the destination, where w3repack writes its own files; "
                            "remove it")
        kept = {}
        for name, h in rec[1].items():
            if name not in sizes:
                continue
            sha = self._hash_regular(name, sizes[name], isinstance(h.sha256, str))
            if sha is False:
                continue
            if sha == h.sha256 if isinstance(h.sha256, str) else not hashes:
                kept[name] = h
        return kept

    def _hash_regular(self, rel: str, size: int, hashed: bool) -> str | bool | None:
        """sha256 of DST/``rel`` (None unless ``hashed``); False unless it is a regular file of ``size`` bytes."""
        opened = self._open_regular(rel)
        if opened is None:
            return False
        fd, actual = opened
        try:
            if actual != size:
                return False
            if not hashed:
                return None
            h = hashlib.sha256()
            while chunk := os.read(fd, 8 << 20):
                h.update(chunk)
            return h.hexdigest()
        finally:
            os.close(fd)

    def _clear_state(self) -> None:
        """Empty ``.w3repack/`` but for the lock (what an unfinished, unusable earlier run left)."""
        sfd = self._dir([STATE_DIR], create=True)
        try:
            for e in os.scandir(sfd):
                if e.name == LOCK_NAME:
                    continue
                _remove_at(sfd, e.name)
        finally:
            os.close(sfd)

    def foreign_files(self, expected: set[str]) -> list[str]:
        """Files and links in DST (outside ``.w3repack/``) that are neither ``expected`` nor a temporary name of one."""
        ours = expected | {MANIFEST_NAME}
        ours |= {str(Path(n).parent / f".{Path(n).name}{TMP_SUFFIX}").removeprefix("./") for n in ours}
        files, links, _ = self._entries()
        return sorted(n for n in files + links if n not in ours)

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
        """Lock and create DST, and write the state file that makes this run resumable."""
        self.acquire()
        self._made.clear()
        self.state = _State(self, fingerprint, kept)

    def finished(self, name: str) -> ShardHashes | None:
        return None if self.state is None else self.state.finished.get(name)

    def open_partial(self, name: str) -> int:
        """A new file for shard ``name``, written until ``commit_shard`` (``.w3repack/<name>.partial``)."""
        pfd, base = self._parent(f"{STATE_DIR}/{name}.partial")
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(base, dir_fd=pfd)
            return os.open(base, _NEW, 0o644, dir_fd=pfd)
        finally:
            os.close(pfd)

    def discard_partial(self, name: str) -> None:
        pfd, base = self._parent(f"{STATE_DIR}/{name}.partial", create=False)
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(base, dir_fd=pfd)
        finally:
            os.close(pfd)

    def partial_path(self, name: str) -> Path:
        """Where shard ``name`` is written until ``commit_shard`` (created empty, without following links)."""
        os.close(self.open_partial(name))
        return self.state_dir / (name + ".partial")

    def commit_shard(self, name: str, hashes: ShardHashes) -> None:
        """Rename the fsynced partial shard to its final name, then record it finished."""
        sfd, base = self._parent(f"{STATE_DIR}/{name}.partial", create=False)
        try:
            dfd, final = self._parent(name)
            try:
                self._replace(sfd, base, dfd, final, name)
            finally:
                os.close(dfd)
        finally:
            os.close(sfd)
        assert self.state is not None
        self.state.done(name, hashes)

    def write_file(self, rel: str, data: bytes) -> None:
        self._write_atomic(rel, data)

    def copy_in(self, src: Path, rel: str, stop: threading.Event | None = None) -> str:
        """Copy regular file ``src`` to DST/``rel`` through a temporary name; returns its sha256."""
        return self._write_atomic(rel, src=src, stop=stop)

    def save_record(self, kind: str, name: str, data: bytes) -> None:
        """A source's own record about shard ``name`` (e.g. its header), kept until the run finishes."""
        self._write_atomic(f"{STATE_DIR}/{kind}/{name}", data)

    def record(self, kind: str, name: str) -> bytes | None:
        return self._read(f"{STATE_DIR}/{kind}/{name}", MAX_MANIFEST)

    def finish(self, manifest: Manifest) -> None:
        """Write the manifest (DST is now a finished conversion), drop ``.w3repack/``, then the lock."""
        self._write_atomic(MANIFEST_NAME, json.dumps(manifest.to_json(), indent=2).encode() + b"\n")
        with contextlib.suppress(FileNotFoundError):
            _remove_at(self._root(), STATE_DIR)
        os.fsync(self._root())
        self.release()


def _remove_at(dir_fd: int, name: str) -> None:
    """Remove entry ``name`` of folder ``dir_fd``, a folder with all it holds, never following a link."""
    try:
        fd = os.open(name, _DIR, dir_fd=dir_fd)
    except OSError as e:
        if e.errno not in (errno.ELOOP, errno.ENOTDIR):
            raise
        os.unlink(name, dir_fd=dir_fd)
        return
    try:
        for entry in list(os.scandir(fd)):
            _remove_at(fd, entry.name)
    finally:
        os.close(fd)
    os.rmdir(name, dir_fd=dir_fd)


def _read_chunks(src: Path, stop: threading.Event | None):
    """The bytes of regular file ``src`` in chunks (a FIFO or device is refused, never waited on)."""
    fd = os.open(src, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise UserError(f"{src}: not a regular file; refused")
        while True:
            if stop is not None and stop.is_set():
                raise Stopped()
            chunk = os.read(fd, 8 << 20)
            if not chunk:
                return
            yield chunk
    finally:
        os.close(fd)
