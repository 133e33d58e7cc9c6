"""File-system primitives for DST: every entry reached relative to an open folder, never through a symlink.

DST itself is opened once (``O_DIRECTORY``); below it each path part is opened with ``O_NOFOLLOW``, files are
created with ``O_EXCL`` and renamed over only a regular file (or nothing), and each rename is followed by an
fsync of the folder that holds it. A symlink, or a file where a folder is wanted, is refused with a
UserError naming it. Nothing here knows what the names mean (see :mod:`repack.output`).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import stat
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from repack.errors import UserError
from repack.stream import Stopped

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
NEW_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
TMP_SUFFIX = ".w3repack-tmp"
COPY_CHUNK = 8 << 20


def tmp_name(rel: str) -> str:
    """The temporary name ``rel`` is written under before it is renamed into place (``a/.b.w3repack-tmp``)."""
    parent, _, name = rel.rpartition("/")
    return f"{parent}/.{name}{TMP_SUFFIX}" if parent else f".{name}{TMP_SUFFIX}"


@dataclass
class Entries:
    """What a folder holds, walked without following links: regular and special files, symlinks, folders
    (names relative to the folder walked)."""

    files: list[str] = field(default_factory=list)
    links: list[str] = field(default_factory=list)
    dirs: list[str] = field(default_factory=list)

    def empty(self) -> bool:
        return not (self.files or self.links or self.dirs)


@dataclass
class RegularFile:
    """A regular file opened read-only without following a link; closed on leaving ``with``."""

    fd: int
    size: int

    def __enter__(self) -> RegularFile:
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)

    def sha256(self) -> str:
        h = hashlib.sha256()
        while chunk := os.read(self.fd, COPY_CHUNK):
            h.update(chunk)
        return h.hexdigest()


class DstFS:
    """DST's folder and the no-follow operations below it (``rel``: a ``/``-separated name inside DST)."""

    def __init__(self, path: Path):
        self.path = path
        self._root_fd: int | None = None

    def root(self) -> int:
        """DST's folder fd, opened on first use (DST itself may be reached through a link; nothing below it is)."""
        if self._root_fd is None:
            self._root_fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        return self._root_fd

    def close(self) -> None:
        if self._root_fd is not None:
            os.close(self._root_fd)
            self._root_fd = None

    def open_dir(self, parts: Sequence[str], create: bool) -> int:
        """A new fd of folder DST/``parts``, each part opened without following a link (created if ``create``)."""
        fd = os.dup(self.root())
        try:
            for i, part in enumerate(parts):
                if create:
                    with contextlib.suppress(FileExistsError):
                        os.mkdir(part, 0o755, dir_fd=fd)
                try:
                    nfd = os.open(part, DIR_FLAGS, dir_fd=fd)
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

    @contextlib.contextmanager
    def parent(self, rel: str, create: bool = True) -> Iterator[tuple[int, str]]:
        """(fd of the folder holding ``rel``, its last part); the fd is closed on leaving ``with``."""
        parts = rel.split("/")
        fd = self.open_dir(parts[:-1], create)
        try:
            yield fd, parts[-1]
        finally:
            os.close(fd)

    def create(self, rel: str) -> int:
        """A new, empty file DST/``rel`` open for writing (an earlier one of that name is removed first)."""
        with self.parent(rel) as (pfd, name):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=pfd)
            return os.open(name, NEW_FLAGS, 0o644, dir_fd=pfd)

    def unlink(self, rel: str) -> None:
        """Remove entry DST/``rel`` (a link itself, never its target); a missing one is no error."""
        with contextlib.suppress(FileNotFoundError), self.parent(rel, create=False) as (pfd, name):
            os.unlink(name, dir_fd=pfd)

    def _replace_at(self, src_fd: int, src: str, dst_fd: int, dst: str, rel: str) -> None:
        """Rename ``src`` over ``dst`` (the entry itself, never a link's target) and fsync the folder; a non-file
        at ``dst`` is refused (``src`` is removed)."""
        try:
            st = os.stat(dst, dir_fd=dst_fd, follow_symlinks=False)
        except FileNotFoundError:
            st = None
        if st is not None and not stat.S_ISREG(st.st_mode):
            os.unlink(src, dir_fd=src_fd)
            raise UserError(f"{self.path / rel}: exists and is not a regular file (a symlink?); refused")
        os.replace(src, dst, src_dir_fd=src_fd, dst_dir_fd=dst_fd)
        os.fsync(dst_fd)

    def replace(self, src_rel: str, dst_rel: str) -> None:
        """Rename DST/``src_rel`` to DST/``dst_rel`` (see ``_replace_at``); ``dst_rel``'s folders are created."""
        with self.parent(src_rel, create=False) as (sfd, src), self.parent(dst_rel) as (dfd, dst):
            self._replace_at(sfd, src, dfd, dst, dst_rel)

    def write_atomic(self, rel: str, chunks: Iterable[bytes]) -> str:
        """DST/``rel`` from ``chunks``, fsynced under its temporary name, then renamed into place; its sha256."""
        tmp = tmp_name(rel).rpartition("/")[2]
        with self.parent(rel) as (pfd, name):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp, dir_fd=pfd)
            fd = os.open(tmp, NEW_FLAGS, 0o644, dir_fd=pfd)
            try:
                h = hashlib.sha256()
                for chunk in chunks:
                    h.update(chunk)
                    view = memoryview(chunk)
                    while len(view):
                        view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            self._replace_at(pfd, tmp, pfd, name, rel)
            return h.hexdigest()

    def open_regular(self, rel: str) -> RegularFile | None:
        """DST/``rel`` opened read-only without following links; None if it is missing, a link or not a regular
        file (a FIFO is opened non-blocking, never waited on)."""
        try:
            with self.parent(rel, create=False) as (pfd, name):
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=pfd)
        except (OSError, UserError):
            return None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            return None
        return RegularFile(fd, st.st_size)

    def read(self, rel: str, limit: int) -> bytes | None:
        """DST/``rel`` (see ``open_regular``); None also if it is over ``limit`` bytes."""
        f = self.open_regular(rel)
        if f is None:
            return None
        with f:
            return None if f.size > limit else os.read(f.fd, f.size + 1)[:limit]

    def entries(self, skip: str) -> Entries:
        """Everything in DST but its top-level entry ``skip``, walked without following links."""
        out = Entries()

        def walk(fd: int, prefix: str) -> None:
            for e in sorted(os.scandir(fd), key=lambda e: e.name):
                rel = prefix + e.name
                if not prefix and e.name == skip:
                    continue
                if e.is_symlink():
                    out.links.append(rel)
                elif e.is_dir(follow_symlinks=False):
                    out.dirs.append(rel)
                    sub = os.open(e.name, DIR_FLAGS, dir_fd=fd)
                    try:
                        walk(sub, rel + "/")
                    finally:
                        os.close(sub)
                else:
                    out.files.append(rel)

        walk(self.root(), "")
        return out

    def remove_all(self, entries: Entries) -> None:
        """Remove ``entries`` (as ``entries`` gave them): files and links, then the folders, deepest first."""
        for rel in entries.files + entries.links:
            with self.parent(rel, create=False) as (pfd, name):
                os.unlink(name, dir_fd=pfd)
        for rel in sorted(entries.dirs, key=lambda d: -d.count("/")):
            with contextlib.suppress(OSError):
                os.rmdir(rel, dir_fd=self.root())

    def clear(self, folder: str, keep: str) -> None:
        """Empty DST/``folder`` (created if missing) but for its entry ``keep``."""
        fd = self.open_dir([folder], create=True)
        try:
            for e in list(os.scandir(fd)):
                if e.name != keep:
                    remove_at(fd, e.name)
        finally:
            os.close(fd)

    def remove_tree(self, rel: str) -> None:
        """Remove DST/``rel`` with all it holds (missing: no error), then fsync DST."""
        with contextlib.suppress(FileNotFoundError), self.parent(rel, create=False) as (pfd, name):
            remove_at(pfd, name)
        os.fsync(self.root())

    def listdir(self, parts: Sequence[str]) -> list[str]:
        fd = self.open_dir(parts, create=False)
        try:
            return os.listdir(fd)
        finally:
            os.close(fd)


def remove_at(dir_fd: int, name: str) -> None:
    """Remove entry ``name`` of folder ``dir_fd``, a folder with all it holds, never following a link."""
    try:
        fd = os.open(name, DIR_FLAGS, dir_fd=dir_fd)
    except OSError as e:
        if e.errno not in (errno.ELOOP, errno.ENOTDIR):
            raise
        os.unlink(name, dir_fd=dir_fd)
        return
    try:
        for entry in list(os.scandir(fd)):
            remove_at(fd, entry.name)
    finally:
        os.close(fd)
    os.rmdir(name, dir_fd=dir_fd)


def file_chunks(src: Path, stop: threading.Event | None = None) -> Iterator[bytes]:
    """The bytes of regular file ``src`` (outside DST: a link to it is followed) in chunks; a FIFO or device
    is refused, never waited on; ``stop`` set raises Stopped between chunks."""
    fd = os.open(src, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise UserError(f"{src}: not a regular file; refused")
        while True:
            if stop is not None and stop.is_set():
                raise Stopped()
            chunk = os.read(fd, COPY_CHUNK)
            if not chunk:
                return
            yield chunk
    finally:
        os.close(fd)
