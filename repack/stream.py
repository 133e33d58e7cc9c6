"""Streaming primitives: a sequential hashed reader, a threaded hashed writer, atomic small-file writes.

Memory is bounded by a fixed number of fixed-size buffers per shard in flight; no file is mapped or read
whole. Files are opened read-only on the source side. The page cache is treated as a stream too (Linux):
readers ask for sequential read-ahead and drop what they have read; the writer starts write-back every
``WRITEBACK_EVERY`` bytes and drops the window before, so dirty pages never pile up for one long fsync.
"""

from __future__ import annotations

import hashlib
import os
import queue
import threading
from pathlib import Path

import numpy as np

from repack.errors import FormatError

CHUNK = 4 << 20
HASH_READ = 8 << 20
WRITEBACK_EVERY = 64 << 20


def _sync_file_range():
    """libc ``sync_file_range`` (Linux), or None."""
    try:
        import ctypes
        import ctypes.util

        fn = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True).sync_file_range
        fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
        return fn
    except (OSError, AttributeError):
        return None


_SYNC_FILE_RANGE = _sync_file_range()
_SFR_WRITE = 2  # SYNC_FILE_RANGE_WRITE: start write-back, do not wait


def _advise(fd: int, offset: int, length: int, advice_name: str) -> None:
    advice = getattr(os, advice_name, None)
    if advice is not None:
        try:
            os.posix_fadvise(fd, offset, length, advice)
        except OSError:
            pass


class Stopped(Exception):
    """Raised inside workers when the run is being cancelled."""


class SeqReader:
    """Reads a file front to back into caller buffers, hashing every byte in order."""

    def __init__(self, path: Path, hashed: bool = True):
        self.path = path
        self.fd = os.open(path, os.O_RDONLY)
        _advise(self.fd, 0, 0, "POSIX_FADV_SEQUENTIAL")
        self.pos = 0
        self.hash = hashlib.sha256() if hashed else None

    def read_into(self, buf: memoryview) -> memoryview:
        size = len(buf)
        got = 0
        while got < size:
            n = os.preadv(self.fd, [buf[got:]], self.pos + got)
            if n == 0:
                raise FormatError(f"{self.path}: unexpected end of file at byte {self.pos + got} (file changed or truncated?)")
            got += n
        _advise(self.fd, self.pos, size, "POSIX_FADV_DONTNEED")
        self.pos += size
        if self.hash is not None:
            self.hash.update(buf)
        return buf

    def read(self, size: int) -> bytearray:
        b = bytearray(size)
        self.read_into(memoryview(b))
        return b

    def hexdigest(self) -> str | None:
        return self.hash.hexdigest() if self.hash is not None else None

    def close(self) -> None:
        os.close(self.fd)


class BufferPool:
    """A fixed set of reusable byte buffers; ``get`` blocks until one is free."""

    def __init__(self, count: int, size: int):
        self.size = size
        self.free: queue.Queue[np.ndarray] = queue.Queue()
        for _ in range(count):
            self.free.put(np.empty(size, dtype=np.uint8))

    def get(self, stop: threading.Event) -> np.ndarray:
        while True:
            if stop.is_set():
                raise Stopped()
            try:
                return self.free.get(timeout=0.2)
            except queue.Empty:
                continue

    def put(self, buf: np.ndarray) -> None:
        self.free.put(buf)


class Sink:
    """Writes byte chunks to a file in order on a background thread, hashing them (sha256) unless ``hashed=False``."""

    def __init__(self, path: Path, pool: BufferPool, stop: threading.Event, hashed: bool = True):
        self.path = path
        self.f = open(path, "wb", buffering=0)
        self.pool = pool
        self.stop = stop
        self.hash = hashlib.sha256() if hashed else None
        self.q: queue.Queue = queue.Queue(maxsize=4)
        self.error: BaseException | None = None
        self.written = 0
        self.window = (0, 0)
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def _run(self) -> None:
        while True:
            item = self.q.get()
            if item is None:
                return
            buf, n, pooled = item
            try:
                if self.error is None:
                    mv = memoryview(buf)[:n]
                    if self.hash is not None:
                        self.hash.update(mv)
                    while len(mv):
                        k = self.f.write(mv)
                        mv = mv[k:]
                    self.written += n
                    self._writeback()
            except BaseException as e:  # noqa: BLE001 - handed to the producer
                self.error = e
            finally:
                if pooled:
                    self.pool.put(buf)

    def _writeback(self) -> None:
        """Start write-back of the bytes written since the last call, and drop the window before it from the cache."""
        start = sum(self.window)
        if _SYNC_FILE_RANGE is None or self.written - start < WRITEBACK_EVERY:
            return
        fd = self.f.fileno()
        _SYNC_FILE_RANGE(fd, start, self.written - start, _SFR_WRITE)
        _advise(fd, *self.window, "POSIX_FADV_DONTNEED")
        self.window = (start, self.written - start)

    def _put(self, item: tuple) -> None:
        while True:
            if self.error is not None:
                raise self.error
            if self.stop.is_set():
                raise Stopped()
            try:
                self.q.put(item, timeout=0.2)
                return
            except queue.Full:
                continue

    def submit(self, buf: np.ndarray, n: int) -> None:
        """Queue ``buf[:n]``; ``buf`` came from the pool and goes back to it once written."""
        self._put((buf, n, True))

    def write(self, data: bytes | np.ndarray) -> None:
        """Queue an owned, immutable chunk (not from the pool)."""
        arr = np.frombuffer(data, dtype=np.uint8) if isinstance(data, (bytes, bytearray)) else data.reshape(-1).view(np.uint8)
        self._put((arr, arr.nbytes, False))

    def finish(self) -> str | None:
        """Flush, fsync and close; returns the sha256 of everything written (None when not hashed)."""
        self.q.put(None)
        self.t.join()
        if self.error is not None:
            self.f.close()
            raise self.error
        os.fsync(self.f.fileno())
        self.f.close()
        return self.hash.hexdigest() if self.hash is not None else None

    def abort(self) -> None:
        self.error = self.error or Stopped()
        try:
            self.q.put_nowait(None)
        except queue.Full:
            pass
        self.t.join(timeout=5)
        self.f.close()


def sha256_file(path: Path, stop: threading.Event | None = None) -> str:
    h = hashlib.sha256()
    buf = bytearray(HASH_READ)
    mv = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while True:
            if stop is not None and stop.is_set():
                raise Stopped()
            n = f.readinto(mv)
            if not n:
                break
            h.update(mv[:n])
    return h.hexdigest()


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` under a temporary name, fsync, rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.w3repack-tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def copy_file_atomic(src: Path, dst: Path, stop: threading.Event | None = None) -> str:
    """Copy ``src`` to ``dst`` through a temporary name; returns the sha256 of the bytes copied."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.w3repack-tmp")
    h = hashlib.sha256()
    buf = bytearray(HASH_READ)
    mv = memoryview(buf)
    with open(src, "rb", buffering=0) as fi, open(tmp, "wb", buffering=0) as fo:
        while True:
            if stop is not None and stop.is_set():
                raise Stopped()
            n = fi.readinto(mv)
            if not n:
                break
            h.update(mv[:n])
            out = mv[:n]
            while len(out):
                out = out[fo.write(out):]
        os.fsync(fo.fileno())
    os.replace(tmp, dst)
    fsync_dir(dst.parent)
    return h.hexdigest()
