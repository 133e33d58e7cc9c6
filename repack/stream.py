"""Streaming primitives: a read-ahead hashing reader, a staged hashing writer, atomic small-file writes.

Memory is bounded by a fixed number of fixed-size, page-aligned buffers per shard in flight (reused across
shards); no file is read whole or through a mapping (a source is mapped, untouched, only to ask ``mincore``
which of its pages are cached). Source files are opened read-only. Both ends use ``O_DIRECT``
where the filesystem allows it: no copy through the page cache, no dirty pages to flush, nothing cached
that will not be read again. Otherwise they fall back to buffered I/O that treats the page cache as a
stream (sequential read-ahead, read pages dropped, write-back started every ``WRITEBACK_EVERY`` bytes).
``W3REPACK_DIRECT_IO=0`` forces buffered I/O. A source file already in the page cache (``cached_share``,
``mincore``) is read buffered, from memory, and its pages are left cached: a warm convert is no slower than a
cold one.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import queue
import stat
import threading
from pathlib import Path

import numpy as np

from repack.errors import FormatError

CHUNK = 4 << 20
STAGE = 4 << 20
READ_BLOCK = 2 << 20
READ_BLOCKS = 4
DIRECT_ALIGN = 4096
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


def _try_direct(fd: int) -> bool:
    """Turn ``O_DIRECT`` on where the platform, the filesystem and ``W3REPACK_DIRECT_IO`` allow; returns whether it is on."""
    if not hasattr(os, "O_DIRECT") or os.environ.get("W3REPACK_DIRECT_IO", "1") in ("0", "false", "no"):
        return False
    return _set_direct(fd, True)


def _set_direct(fd: int, on: bool) -> bool:
    """Turn ``O_DIRECT`` on or off for an open file; returns whether it is on."""
    try:
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_DIRECT if on else flags & ~os.O_DIRECT)
        return on
    except OSError:
        return False


WARM_SHARE = 0.9  # a source this much in the page cache is read buffered (from memory), not with O_DIRECT


def _libc():
    try:
        import ctypes
        import ctypes.util

        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        return libc
    except (OSError, AttributeError):
        return None


_LIBC = _libc()


def cached_share(fd: int, size: int) -> float | None:
    """The share of a file's pages in the page cache (``mincore`` over a read-only mapping; nothing is read or
    faulted in); None where it cannot be told."""
    if _LIBC is None or size <= 0:
        return None
    import ctypes
    import mmap

    page = mmap.PAGESIZE
    addr = _LIBC.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
    if addr in (None, ctypes.c_void_p(-1).value):
        return None
    try:
        pages = -(-size // page)
        vec = np.zeros(pages, dtype=np.uint8)
        if _LIBC.mincore(ctypes.c_void_p(addr), ctypes.c_size_t(size), ctypes.c_void_p(vec.ctypes.data)) != 0:
            return None
        return float(np.count_nonzero(vec & 1)) / pages
    finally:
        _LIBC.munmap(ctypes.c_void_p(addr), ctypes.c_size_t(size))


HUGE = 2 << 20
_SPARE: dict[int, list[np.ndarray]] = {}
_SPARE_LOCK = threading.Lock()


def _new_buffer(size: int) -> np.ndarray:
    """A zeroed uint8 buffer of ``size`` bytes starting on a 2 MiB boundary (numpy asks for huge pages from 4 MiB on)."""
    raw = np.zeros(size + HUGE, dtype=np.uint8)
    off = -raw.ctypes.data % HUGE
    return raw[off : off + size]


def take_buffers(size: int, count: int) -> list[np.ndarray]:
    """``count`` aligned buffers of ``size`` bytes, reused across shards (fresh pages cost a fault each)."""
    with _SPARE_LOCK:
        spare = _SPARE.setdefault(size, [])
        got = [spare.pop() for _ in range(min(count, len(spare)))]
    return got + [_new_buffer(size) for _ in range(count - len(got))]


def give_buffers(bufs: list[np.ndarray]) -> None:
    with _SPARE_LOCK:
        for b in bufs:
            _SPARE.setdefault(len(b), []).append(b)


def _start_threads(*targets) -> list[threading.Thread]:
    """Daemon threads running ``targets`` (``None`` entries skipped), started."""
    threads = [threading.Thread(target=t, daemon=True) for t in targets if t is not None]
    for t in threads:
        t.start()
    return threads


class Stopped(Exception):
    """Raised inside workers when the run is being cancelled."""


class SeqReader:
    """Reads a file front to back; a background thread reads ahead ``READ_BLOCK``-sized blocks.

    Blocks start at multiples of ``READ_BLOCK`` and land in page-aligned buffers, so the file is read with
    ``O_DIRECT`` where the filesystem allows it (no page-cache copy); otherwise buffered, with sequential
    read-ahead and the pages dropped once read. Consumers take bytes in order: ``view`` and ``take``
    (zero-copy where the bytes lie in one block, valid until the next call), ``read_into``, ``read``, ``skip``.
    The sha256 covers every byte of the file in order; it is computed by the consumer after it has used
    the bytes (cheapest: they are in cache), or with ``hash_behind`` on a thread of its own that takes each
    block once the consumer has moved past it (off the consumer's thread: for when cores would otherwise sit
    idle).
    """

    def __init__(self, path: Path, hashed: bool = True, blocks: int = READ_BLOCKS, hash_behind: bool = False):
        self.path = path
        self.fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        st = os.fstat(self.fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(self.fd)
            raise FormatError(f"{path}: not a regular file (a FIFO, device or folder); refused")
        self.size = st.st_size
        share = cached_share(self.fd, self.size)
        self.warm = share is not None and share >= WARM_SHARE
        self.direct = not self.warm and _try_direct(self.fd)
        if not self.direct:
            _advise(self.fd, 0, 0, "POSIX_FADV_SEQUENTIAL")
        self.hash = hashlib.sha256() if hashed else None
        self.hash_behind = hash_behind and hashed
        self.hash_error: BaseException | None = None
        self.pos = 0
        self.buffers = take_buffers(READ_BLOCK, blocks)
        self.free: queue.SimpleQueue[np.ndarray] = queue.SimpleQueue()
        for b in self.buffers:
            self.free.put(b)
        self.ready: queue.SimpleQueue = queue.SimpleQueue()
        self.used: queue.SimpleQueue = queue.SimpleQueue()
        self.block: tuple[np.ndarray, int, int] | None = None
        self.unhashed: memoryview | None = None
        self.scratch = bytearray()
        self.closed = False
        self.threads = _start_threads(self._run, self._hash_used if self.hash_behind else None)

    def _hash_used(self) -> None:
        """Hash each block once the consumer has moved past it (in file order, still warm in cache), then free it."""
        while True:
            item = self.used.get()
            if item is None:
                return
            buf, n = item
            try:
                if self.hash_error is None:
                    self.hash.update(memoryview(buf)[:n])
            except BaseException as e:  # noqa: BLE001 - raised by hexdigest
                self.hash_error = e
            finally:
                self.free.put(buf)

    def _release(self, block: tuple[np.ndarray, int, int]) -> None:
        if self.hash_behind and not self.closed:
            self.used.put((block[0], block[2]))
        else:
            self.free.put(block[0])

    def _run(self) -> None:
        off = 0
        try:
            while off < self.size and not self.closed:
                try:
                    buf = self.free.get(timeout=0.2)
                except queue.Empty:
                    continue
                want = min(READ_BLOCK, self.size - off)
                n = self._fill(buf, off, want)
                self.ready.put((buf, off, n))
                if n < want:
                    break
                off += n
            self.ready.put(None)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            self.ready.put(e)

    def _fill(self, buf: np.ndarray, off: int, want: int) -> int:
        mv = memoryview(buf)
        got = 0
        while got < want:
            length = want - got
            if self.direct:
                length += -length % DIRECT_ALIGN
            try:
                n = os.preadv(self.fd, [mv[got : got + length]], off + got)
            except OSError as e:
                if not (self.direct and e.errno == errno.EINVAL):
                    raise
                self.direct = _set_direct(self.fd, False)
                continue
            if n == 0:
                break
            got += n
        if not self.direct and not self.warm:
            _advise(self.fd, off, got, "POSIX_FADV_DONTNEED")
        return min(got, want)

    def _hash(self, data: memoryview) -> None:
        if self.hash is not None and not self.hash_behind:
            self.hash.update(data)

    def _catch_up(self) -> None:
        """Hash the last ``view`` now that its caller has read it (hashing bytes already in cache is cheaper)."""
        if self.unhashed is not None:
            self._hash(self.unhashed)
            self.unhashed = None

    def _current(self) -> tuple[np.ndarray, int, int]:
        """The block holding ``pos``; the one before goes back to the read-ahead thread."""
        self._catch_up()
        while self.block is None or self.pos >= self.block[1] + self.block[2]:
            if self.block is not None:
                self._release(self.block)
                self.block = None
            if self.pos >= self.size:
                raise self._eof()
            item = self.ready.get()
            if isinstance(item, BaseException):
                raise item
            if item is None:
                raise self._eof()
            self.block = item
        return self.block

    def _eof(self) -> FormatError:
        return FormatError(f"{self.path}: unexpected end of file at byte {self.pos} (file changed or truncated?)")

    def view(self, max_n: int, unit: int = 1) -> memoryview:
        """The next ``k`` bytes without copying, ``unit <= k <= max_n`` a multiple of ``unit``, valid until the next call.

        Where fewer than ``unit`` bytes are left in the block, one ``unit`` is copied across the block boundary.
        """
        buf, off, n = self._current()
        start = self.pos - off
        k = min(max_n, n - start) // unit * unit
        if k == 0:
            return self._stitch(unit)
        self.pos += k
        v = memoryview(buf)[start : start + k]
        if self.hash is not None and not self.hash_behind:
            self.unhashed = v
        return v

    def take(self, size: int) -> memoryview:
        """Exactly the next ``size`` bytes, without copying where they lie in one block; valid until the next call."""
        buf, off, n = self._current()
        if self.pos + size > off + n:
            return self._stitch(size)
        return self.view(size, size) if size else memoryview(b"")

    def _stitch(self, size: int) -> memoryview:
        """The next ``size`` bytes copied across blocks into a scratch buffer the reader keeps."""
        if len(self.scratch) < size:
            self.scratch = bytearray(size)
        return self.read_into(memoryview(self.scratch)[:size])

    def read_into(self, out: memoryview) -> memoryview:
        done = 0
        while done < len(out):
            buf, off, n = self._current()
            start = self.pos - off
            k = min(len(out) - done, n - start)
            out[done : done + k] = memoryview(buf)[start : start + k]
            self._hash(out[done : done + k])
            self.pos += k
            done += k
        return out

    def read(self, size: int) -> bytearray:
        b = bytearray(size)
        self.read_into(memoryview(b))
        return b

    def skip(self, size: int) -> None:
        end = self.pos + size
        while self.pos < end:
            buf, off, n = self._current()
            k = min(end, off + n) - self.pos
            self._hash(memoryview(buf)[self.pos - off : self.pos - off + k])
            self.pos += k

    def hexdigest(self) -> str | None:
        """sha256 of the whole file (bytes not yet taken are read and hashed first)."""
        if self.hash is None:
            return None
        self._catch_up()
        self.skip(self.size - self.pos)
        self._catch_up()
        if self.hash_behind:
            if self.block is not None:
                self._release(self.block)
                self.block = None
            self.used.put(None)
            self.threads[1].join()
            if self.hash_error is not None:
                raise self.hash_error
        return self.hash.hexdigest()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.block is not None:
            self.free.put(self.block[0])
            self.block = None
        self.used.put(None)
        while any(t.is_alive() for t in self.threads):
            try:
                item = self.ready.get(timeout=0.05)
            except queue.Empty:
                continue
            if isinstance(item, tuple):
                self.free.put(item[0])
        os.close(self.fd)
        give_buffers(self.buffers)


class Sink:
    """Writes a file front to back from page-aligned staging buffers; a background thread writes them.

    Producers either ``write(data)`` (copied into staging) or fill ``space()`` in place and ``commit(n)``;
    the sha256 is computed at ``commit``, or with ``hash_behind`` on a thread of its own before the writer's.
    Every staging buffer but the last is ``STAGE`` bytes at an offset that is a multiple of ``STAGE``, so the
    file can be written with ``O_DIRECT`` (no page-cache copy, no dirty pages to flush): the last buffer is
    padded to ``DIRECT_ALIGN`` and the file truncated to its real size. Where the filesystem refuses
    ``O_DIRECT`` (or ``W3REPACK_DIRECT_IO=0``) writes are buffered, with write-back started every
    ``WRITEBACK_EVERY`` bytes and the window before dropped from the cache.
    """

    def __init__(self, path: Path, stop: threading.Event, hashed: bool = True, buffers: int = 3, hash_behind: bool = False,
                 fd: int | None = None):
        """``fd``: an already opened, empty file (``path`` then only names it); it is closed by the sink."""
        self.path = path
        self.fd = fd if fd is not None else os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self.direct = _try_direct(self.fd)
        self.stop = stop
        self.hash = hashlib.sha256() if hashed else None
        self.hash_behind = hash_behind and hashed
        self.buffers = take_buffers(STAGE, buffers)
        self.free: queue.SimpleQueue[np.ndarray] = queue.SimpleQueue()
        for b in self.buffers:
            self.free.put(b)
        self.q: queue.SimpleQueue = queue.SimpleQueue()
        self.error: BaseException | None = None
        self.written = 0
        self.queued = 0
        self.cur: np.ndarray | None = None
        self.fill = 0
        self.window = (0, 0)
        self.inbox: queue.SimpleQueue = queue.SimpleQueue() if self.hash_behind else self.q
        self.threads = _start_threads(self._run, self._hash_blocks if self.hash_behind else None)

    def _hash_blocks(self) -> None:
        """Between the producer and the writer thread: hash each staging buffer in file order."""
        while True:
            item = self.inbox.get()
            if item is not None and self.error is None:
                try:
                    self.hash.update(memoryview(item[0])[: item[1]])
                except BaseException as e:  # noqa: BLE001 - handed to the producer
                    self.error = e
            self.q.put(item)
            if item is None:
                return

    def _run(self) -> None:
        while True:
            item = self.q.get()
            if item is None:
                return
            buf, n, offset = item
            try:
                if self.error is None:
                    self._write_block(buf, n, offset)
            except BaseException as e:  # noqa: BLE001 - handed to the producer
                self.error = e
            finally:
                self.free.put(buf)

    def _write_block(self, buf: np.ndarray, n: int, offset: int) -> None:
        mv = memoryview(buf)
        size = n
        if self.direct and n % DIRECT_ALIGN:
            size = n + (-n % DIRECT_ALIGN)
            mv[n:size] = bytes(size - n)
        done = 0
        while done < size:
            try:
                k = os.pwrite(self.fd, mv[done:size], offset + done)
            except OSError as e:
                if not (self.direct and e.errno == errno.EINVAL):
                    raise
                self.direct, size = _set_direct(self.fd, False), n
                continue
            if k == 0:
                raise OSError(errno.EIO, "write returned 0", str(self.path))
            done += k
        mv.release()
        self.written = offset + n
        if not self.direct:
            self._writeback()

    def _writeback(self) -> None:
        """Start write-back of the bytes written since the last call, and drop the window before it from the cache."""
        start = sum(self.window)
        if _SYNC_FILE_RANGE is None or self.written - start < WRITEBACK_EVERY:
            return
        _SYNC_FILE_RANGE(self.fd, start, self.written - start, _SFR_WRITE)
        _advise(self.fd, *self.window, "POSIX_FADV_DONTNEED")
        self.window = (start, self.written - start)

    def _check(self) -> None:
        if self.error is not None:
            raise self.error
        if self.stop.is_set():
            raise Stopped()

    def _take(self) -> np.ndarray:
        while True:
            self._check()
            try:
                return self.free.get(timeout=0.2)
            except queue.Empty:
                continue

    def _flush(self) -> None:
        if self.cur is not None and self.fill:
            self.inbox.put((self.cur, self.fill, self.queued))
            self.queued += self.fill
            self.cur, self.fill = None, 0

    def space(self) -> memoryview:
        """The free tail of the current staging buffer (never empty); fill a prefix and ``commit`` it."""
        self._check()
        if self.cur is not None and self.fill == STAGE:
            self._flush()
        if self.cur is None:
            self.cur = self._take()
        return memoryview(self.cur)[self.fill:]

    def commit(self, n: int) -> None:
        """The next ``n`` bytes of the last ``space()`` are data (hashed here, while they are in cache)."""
        if self.hash is not None and not self.hash_behind:
            self.hash.update(memoryview(self.cur)[self.fill : self.fill + n])
        self.fill += n

    def write(self, data) -> None:
        """Copy ``data`` (bytes-like or numpy array) into the stream."""
        if isinstance(data, np.ndarray):
            data = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
        src = memoryview(data).cast("B")
        while len(src):
            dst = self.space()
            k = min(len(dst), len(src))
            dst[:k] = src[:k]
            dst.release()
            self.commit(k)
            src = src[k:]

    @property
    def position(self) -> int:
        """Bytes handed to the sink so far."""
        return self.queued + self.fill

    def finish(self) -> str | None:
        """Flush, fsync and close; returns the sha256 of everything written (None when not hashed)."""
        self._check()
        self._flush()
        self.inbox.put(None)
        for t in self.threads:
            t.join()
        try:
            if self.error is not None:
                raise self.error
            if os.fstat(self.fd).st_size != self.queued:
                os.ftruncate(self.fd, self.queued)
            os.fsync(self.fd)
        finally:
            self._release()
        return self.hash.hexdigest() if self.hash is not None else None

    def _release(self) -> None:
        """Close the file and return the buffers, once; the buffers only if the writer thread has ended."""
        if self.fd < 0:
            return
        os.close(self.fd)
        self.fd = -1
        if not any(t.is_alive() for t in self.threads):
            give_buffers(self.buffers)

    def abort(self) -> None:
        self.error = self.error or Stopped()
        self.inbox.put(None)
        for t in self.threads:
            t.join(timeout=5)
        self._release()


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
