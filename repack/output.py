"""The output folder (DST) of one conversion: the run's lock and its lifecycle.

Layout of an unfinished DST: finished shards under their final names (each renamed only after fsync), the shard
in flight under ``.w3repack/<name>.partial``, ``.w3repack/state.json`` (:mod:`repack.resume`), a source's own
records under ``.w3repack/<kind>/<name>`` and the lock ``.w3repack/lock``. The configs, index and copied files
come after the shards and ``w3repack.json`` (:mod:`repack.manifest`) last of all, so DST is a loadable model
only once everything is done.

Every file created in DST is created by a method of :class:`Output` in the state that allows it, through the
no-follow primitives of :mod:`repack.dstfs`. The names of DST (``MANIFEST_NAME``, ``Manifest``, ``STATE_DIR``,
...) are imported from here.
"""

from __future__ import annotations

import contextlib
import enum
import fcntl
import json
import os
import socket
import stat
import threading
from dataclasses import dataclass
from pathlib import Path

from repack.dstfs import DstFS, file_chunks
from repack.errors import UserError
from repack.manifest import MANIFEST_NAME, MAX_MANIFEST, FileRecord, Manifest, ManifestError, ShardHashes, finished_output
from repack.resume import METADATA_NAMES, STATE_DIR, STATE_NAME, StateFile, keep

__all__ = ["LOCK_NAME", "MANIFEST_NAME", "METADATA_NAMES", "STATE_DIR", "STATE_NAME", "FileRecord", "Manifest",
           "ManifestError", "Output", "OutputStateError", "PartialShard", "RunLock", "RunState", "ShardHashes",
           "finished_output"]

LOCK_NAME = "lock"
PARTIAL_SUFFIX = ".partial"


class RunLock:
    """An exclusive ``flock`` on ``.w3repack/lock`` naming its holder (pid and host). DST and the state folder
    are created to hold it if missing; on release, those it created go again if they hold nothing but it."""

    def __init__(self, fs: DstFS):
        self.fs = fs
        self.fd: int | None = None
        self._made: list[str] = []

    @property
    def _where(self) -> Path:
        return self.fs.path / STATE_DIR / LOCK_NAME

    def acquire(self) -> None:
        """Take the lock; another run holding it is refused, naming it."""
        dst = self.fs.path
        if dst.exists() and not dst.is_dir():
            raise UserError(f"destination {dst} exists and is not a directory")
        made = []
        if not dst.exists():
            dst.mkdir(parents=True)
            made.append("")
        if not os.path.lexists(dst / STATE_DIR):
            made.append(STATE_DIR)
        sfd = self.fs.open_dir([STATE_DIR], create=True)
        try:
            fd = os.open(LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644, dir_fd=sfd)
        except OSError as e:
            raise UserError(f"{self._where}: cannot open the lock ({e.strerror or e}); refused") from e
        finally:
            os.close(sfd)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise UserError(f"{self._where}: not a regular file; refused")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "unknown process"
                raise UserError(f"destination {dst} is in use by another w3repack run ({holder}); wait for it "
                                "to end, or stop it") from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self.fd, self._made = fd, made

    def release(self) -> None:
        """Drop the lock (held or not)."""
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            if STATE_DIR in self._made and self.fs.listdir([STATE_DIR]) == [LOCK_NAME]:
                self.fs.unlink(f"{STATE_DIR}/{LOCK_NAME}")
                os.rmdir(STATE_DIR, dir_fd=self.fs.root())
            if "" in self._made and not os.listdir(self.fs.path):
                os.rmdir(self.fs.path)
        os.close(self.fd)
        self.fd = None


class RunState(enum.Enum):
    """Where a run on DST stands; :class:`Output` checks it on every step."""

    NEW = "new"  # nothing taken: DST may be read (a source's records, free space), not written
    LOCKED = "locked"  # the lock is held; what DST holds is being judged
    PREPARED = "prepared"  # the lock is held; what is kept is decided, the rest removed
    WRITING = "writing"  # the state file is written: shards, files and records may be written
    FINISHED = "finished"  # the manifest is written, the state folder and the lock are gone
    ABORTED = "aborted"  # the lock was dropped before the manifest was written


class OutputStateError(RuntimeError):
    """A step of :class:`Output` taken in a state that does not allow it (a bug in the caller)."""


@dataclass(frozen=True)
class PartialShard:
    """The new, empty file shard ``name`` is written into (``fd``, open for writing; ``path`` names it) until
    ``Output.commit_shard`` renames it to its final name."""

    name: str
    path: Path
    fd: int


class Output:
    """DST of one conversion. Its steps, each checked against :class:`RunState`: ``prepare`` (NEW -> LOCKED ->
    PREPARED: lock, decide what is kept), ``start`` (-> WRITING: the state file makes the run resumable), shards
    (``open_partial``, ``commit_shard``) and files (``write_file``, ``copy_in``, ``save_record``), ``finish``
    (-> FINISHED: the manifest). ``release`` ends the run however it ended (a held lock -> ABORTED) and may be
    called in any state. An existing symlink where w3repack writes is refused."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.fs = DstFS(self.path)
        self.lock = RunLock(self.fs)
        self.state = RunState.NEW
        self._journal: StateFile | None = None

    def __repr__(self) -> str:
        return f"Output({str(self.path)!r}, {self.state.name})"

    def _expect(self, step: str, *allowed: RunState) -> None:
        if self.state not in allowed:
            want = " or ".join(s.name for s in allowed)
            raise OutputStateError(f"{self.path}: {step} needs the run {want}, but it is {self.state.name}")

    def _move(self, step: str, to: RunState, *allowed: RunState) -> None:
        self._expect(step, *allowed)
        self.state = to

    # --- the steps of a run -------------------------------------------------------------------------------

    def prepare(self, fingerprint: dict, sizes: dict[str, int], expected: set[str], overwrite: bool,
                hashes: bool = True) -> dict[str, ShardHashes]:
        """Lock DST and decide what in it can be kept (:func:`repack.resume.keep`); returns the finished shards
        kept (``sizes``: planned sizes). Final names only ever hold complete shards."""
        self._move("prepare", RunState.LOCKED, RunState.NEW)
        try:
            self.lock.acquire()
        except BaseException:
            self.state = RunState.NEW
            raise
        kept = keep(self.fs, self.fs.entries(skip=STATE_DIR), fingerprint, sizes, expected, overwrite, hashes, LOCK_NAME)
        self.state = RunState.PREPARED
        return kept

    def start(self, fingerprint: dict, kept: dict[str, ShardHashes]) -> None:
        """Write the state file that makes this run resumable."""
        self._expect("start", RunState.PREPARED)
        self._journal = StateFile(self.fs, fingerprint, kept)
        self.state = RunState.WRITING

    def finished(self, name: str) -> ShardHashes | None:
        """The hashes recorded for finished shard ``name`` (kept or written by this run); None if unfinished."""
        self._expect("finished", RunState.WRITING)
        assert self._journal is not None
        return self._journal.get(name)

    def _partial_rel(self, name: str) -> str:
        return f"{STATE_DIR}/{name}{PARTIAL_SUFFIX}"

    def open_partial(self, name: str) -> PartialShard:
        """A new, empty file for shard ``name`` (an earlier partial one is removed), written until ``commit_shard``."""
        self._expect("open_partial", RunState.WRITING)
        rel = self._partial_rel(name)
        return PartialShard(name, self.path / rel, self.fs.create(rel))

    def discard_partial(self, name: str) -> None:
        """Remove shard ``name``'s partial file (a failed or stopped shard); a missing one is no error."""
        self._expect("discard_partial", RunState.WRITING)
        self.fs.unlink(self._partial_rel(name))

    def commit_shard(self, name: str, hashes: ShardHashes) -> None:
        """Rename the fsynced partial shard to its final name, then record it finished."""
        self._expect("commit_shard", RunState.WRITING)
        assert self._journal is not None
        self.fs.replace(self._partial_rel(name), name)
        self._journal.done(name, hashes)

    def write_file(self, rel: str, data: bytes) -> None:
        self._expect("write_file", RunState.WRITING)
        self.fs.write_atomic(rel, [data])

    def copy_in(self, src: Path, rel: str, stop: threading.Event | None = None) -> str:
        """Copy regular file ``src`` to DST/``rel`` through a temporary name; returns its sha256."""
        self._expect("copy_in", RunState.WRITING)
        return self.fs.write_atomic(rel, file_chunks(src, stop))

    def save_record(self, kind: str, name: str, data: bytes) -> None:
        """A source's own record about shard ``name`` (e.g. its header), kept until the run finishes."""
        self._expect("save_record", RunState.WRITING)
        self.fs.write_atomic(f"{STATE_DIR}/{kind}/{name}", [data])

    def record(self, kind: str, name: str) -> bytes | None:
        """A record ``save_record`` wrote, in this run or an earlier one (read in any state; None if missing)."""
        return self.fs.read(f"{STATE_DIR}/{kind}/{name}", MAX_MANIFEST)

    def finish(self, manifest: Manifest) -> None:
        """Write the manifest (DST is now a finished conversion), drop ``.w3repack/``, then the lock."""
        self._expect("finish", RunState.WRITING)
        self.fs.write_atomic(MANIFEST_NAME, [json.dumps(manifest.to_json(), indent=2).encode() + b"\n"])
        self.fs.remove_tree(STATE_DIR)
        self.lock.release()
        self.fs.close()
        self.state = RunState.FINISHED

    def release(self) -> None:
        """End the run however it ended: a held lock is dropped (ABORTED); nothing to do in any other state."""
        if self.state in (RunState.LOCKED, RunState.PREPARED, RunState.WRITING):
            self.lock.release()
            self.state = RunState.ABORTED
        self.fs.close()
