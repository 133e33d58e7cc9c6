"""Streaming primitives: a read-ahead hashing reader and a staged hashing writer over one buffer pool.

Memory is bounded by a fixed number of fixed-size, page-aligned buffers per shard in flight, taken from one
pool and reused across shards; no file is read whole or through a mapping (a source is mapped, untouched,
only to ask ``mincore`` which of its pages are cached). Source files are opened read-only. Both ends use
``O_DIRECT`` where the filesystem allows it: no copy through the page cache, no dirty pages to flush, nothing
cached that will not be read again; a transfer the kernel refuses under ``O_DIRECT`` is redone buffered
(:class:`_File`, the one fallback). Buffered I/O treats the page cache as a stream (sequential read-ahead,
read pages dropped, write-back started every ``WRITEBACK_EVERY`` bytes). ``W3REPACK_DIRECT_IO=0`` forces
buffered I/O. A source file already in the page cache (``cached_share``, ``mincore``) is read buffered, from
memory, and its pages are left cached: a warm convert is no slower than a cold one.

A :class:`SeqReader` and a :class:`Sink` are context managers: leaving the ``with`` closes the file, ends
their threads and gives their buffers back (a sink not ``finish``ed is aborted).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import queue
import stat
import threading
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Callable, Union

import numpy as np

from repack.errors import FormatError

CHUNK = 4 << 20
STAGE = 4 << 20
READ_BLOCK = 2 << 20
READ_BLOCKS = 4
DIRECT_ALIGN = 4096
WRITEBACK_EVERY = 64 << 20
HUGE = 2 << 20
WARM_SHARE = 0.9  # a source this much in the page cache is read buffered (from memory), not with O_DIRECT

BytesLike = Union[bytes, bytearray, memoryview, np.ndarray]


def _sync_file_range() -> Any:
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


def _set_direct(fd: int, on: bool) -> bool:
    """Turn ``O_DIRECT`` on or off for an open file; returns whether it is on."""
    try:
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_DIRECT if on else flags & ~os.O_DIRECT)
        return on
    except OSError:
        return False


def _direct_allowed() -> bool:
    return hasattr(os, "O_DIRECT") and os.environ.get("W3REPACK_DIRECT_IO", "1") not in ("0", "false", "no")


def _libc() -> Any:
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


class BufferPool:
    """Zeroed uint8 buffers starting on a 2 MiB boundary (numpy asks for huge pages from 4 MiB on), kept by
    size and handed out again: a fresh page costs a fault, a reused one nothing. Thread-safe."""

    def __init__(self) -> None:
        self._spare: dict[int, list[np.ndarray]] = {}
        self._lock = threading.Lock()

    @staticmethod
    def _new(size: int) -> np.ndarray:
        raw = np.zeros(size + HUGE, dtype=np.uint8)
        off = -raw.ctypes.data % HUGE
        return raw[off : off + size]

    def take(self, size: int, count: int) -> list[np.ndarray]:
        with self._lock:
            spare = self._spare.setdefault(size, [])
            got = [spare.pop() for _ in range(min(count, len(spare)))]
        return got + [self._new(size) for _ in range(count - len(got))]

    def give(self, bufs: list[np.ndarray]) -> None:
        with self._lock:
            for b in bufs:
                self._spare.setdefault(len(b), []).append(b)


POOL = BufferPool()


@dataclass(slots=True)
class Block:
    """``n`` bytes of file at byte ``offset``, held at the start of pool buffer ``buf``."""

    buf: np.ndarray
    offset: int
    n: int

    @property
    def end(self) -> int:
        return self.offset + self.n

    def data(self) -> memoryview:
        return self.buf.data[: self.n]


class Stopped(Exception):
    """Raised inside workers when the run is being cancelled."""


class _File:
    """An open file and whether ``O_DIRECT`` is on for it. ``transfer`` is the one fallback: a transfer the kernel
    refuses with EINVAL under ``O_DIRECT`` (alignment) turns ``O_DIRECT`` off and is redone buffered."""

    def __init__(self, fd: int, direct: bool):
        self.fd = fd
        self.direct = direct and _set_direct(fd, True)

    def transfer(self, op: Callable[[int, memoryview, int], int], view: memoryview, n: int, offset: int) -> int:
        """``op(fd, view[:k], offset)`` (a pread or pwrite) with ``k`` = ``n``, rounded up to ``DIRECT_ALIGN`` under
        ``O_DIRECT`` (``view`` has room for it); returns what ``op`` returns."""
        while True:
            k = n + (-n % DIRECT_ALIGN) if self.direct else n
            try:
                return op(self.fd, view[:k], offset)
            except OSError as e:
                if not (self.direct and e.errno == errno.EINVAL):
                    raise
                self.direct = _set_direct(self.fd, False)


def _pread(fd: int, view: memoryview, offset: int) -> int:
    return os.preadv(fd, [view], offset)


def _pwrite(fd: int, view: memoryview, offset: int) -> int:
    return os.pwrite(fd, view, offset)


class _Hasher:
    """A thread hashing blocks in file order, off the thread that made them, then handing each on (``then``);
    ``None`` ends it (and is handed on too). An error is kept for the owner to raise."""

    def __init__(self, then: Callable[[Block | None], None]):
        self.sha = hashlib.sha256()
        self.inbox: queue.SimpleQueue[Block | None] = queue.SimpleQueue()
        self.error: BaseException | None = None
        self.then = then

    def run(self) -> None:
        while True:
            block = self.inbox.get()
            try:
                if block is not None and self.error is None:
                    self.sha.update(block.data())
            except BaseException as e:  # noqa: BLE001 - handed to the owner
                self.error = e
            finally:
                self.then(block)
            if block is None:
                return


class _Stream:
    """What a reader and a writer share: the file, ``count`` buffers of ``size`` bytes from the pool and a
    queue of the free ones, the background threads. Buffers go back to the pool only once every thread has
    ended (a thread still running may yet touch one)."""

    def __init__(self, path: Path, fd: int, direct: bool, size: int, count: int):
        self.path = path
        self.file = _File(fd, direct)
        self.buffers = POOL.take(size, count)
        self.free: queue.SimpleQueue[np.ndarray] = queue.SimpleQueue()
        for b in self.buffers:
            self.free.put(b)
        self.threads: list[threading.Thread] = []

    @property
    def direct(self) -> bool:
        return self.file.direct

    def _start(self, *targets: Callable[[], None]) -> None:
        for t in targets:
            th = threading.Thread(target=t, daemon=True)
            self.threads.append(th)
            th.start()

    def _close_file(self) -> None:
        """Close the file and give the buffers back, once."""
        if self.file.fd < 0:
            return
        os.close(self.file.fd)
        self.file.fd = -1
        if not any(t.is_alive() for t in self.threads):
            POOL.give(self.buffers)


class SeqReader(_Stream):
    """Reads a file front to back; a background thread reads ahead ``READ_BLOCK``-sized blocks.

    Blocks start at multiples of ``READ_BLOCK`` and land in page-aligned buffers, so the file is read with
    ``O_DIRECT`` where the filesystem allows it; otherwise buffered, with sequential read-ahead and the pages
    dropped once read. Consumers take bytes in order: ``view`` and ``take`` (zero-copy where the bytes lie in
    one block, valid until the next call), ``read_into``, ``read``, ``skip``. The sha256 covers every byte of
    the file in order; it is computed by the consumer after it has used the bytes (cheapest: they are in
    cache), or with ``hash_behind`` on a thread of its own that takes each block once the consumer has moved
    past it (off the consumer's thread: for when cores would otherwise sit idle).
    """

    def __init__(self, path: Path, hashed: bool = True, blocks: int = READ_BLOCKS, hash_behind: bool = False):
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise FormatError(f"{path}: not a regular file (a FIFO, device or folder); refused")
            share = cached_share(fd, st.st_size)
        except BaseException:
            os.close(fd)
            raise
        self.size = st.st_size
        self.warm = share is not None and share >= WARM_SHARE
        super().__init__(path, fd, not self.warm and _direct_allowed(), READ_BLOCK, blocks)
        if not self.direct:
            _advise(fd, 0, 0, "POSIX_FADV_SEQUENTIAL")
        self.sha = hashlib.sha256() if hashed and not hash_behind else None  # hashed by the consumer
        self.behind = _Hasher(self._freed) if hashed and hash_behind else None
        self.pos = 0
        self.ready: queue.SimpleQueue[Block | BaseException | None] = queue.SimpleQueue()
        self.block: Block | None = None
        self.unhashed: memoryview | None = None
        self.scratch = bytearray()
        self.closed = False
        self._start(self._run, *([self.behind.run] if self.behind is not None else []))

    def __enter__(self) -> SeqReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _freed(self, block: Block | None) -> None:
        if block is not None:
            self.free.put(block.buf)

    def _release(self, block: Block) -> None:
        """The consumer is done with ``block``: to the hash-behind thread, else straight back to the free queue."""
        if self.behind is not None and not self.closed:
            self.behind.inbox.put(block)
        else:
            self.free.put(block.buf)

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
                self.ready.put(Block(buf, off, n))
                if n < want:
                    break
                off += n
            self.ready.put(None)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            self.ready.put(e)

    def _fill(self, buf: np.ndarray, off: int, want: int) -> int:
        """Read up to ``want`` bytes at ``off`` into ``buf``; returns how many (fewer only at the end of the file)."""
        mv = buf.data
        got = 0
        while got < want:
            n = self.file.transfer(_pread, mv[got:], want - got, off + got)
            if n == 0:
                break
            got += n
        if not self.direct and not self.warm:
            _advise(self.file.fd, off, got, "POSIX_FADV_DONTNEED")
        return min(got, want)

    def _hash(self, data: memoryview) -> None:
        if self.sha is not None:
            self.sha.update(data)

    def _catch_up(self) -> None:
        """Hash the last ``view`` now that its caller has read it (hashing bytes already in cache is cheaper)."""
        if self.unhashed is not None:
            self._hash(self.unhashed)
            self.unhashed = None

    def _current(self) -> Block:
        """The block holding ``pos``; the one before goes back to the read-ahead thread."""
        self._catch_up()
        while self.block is None or self.pos >= self.block.end:
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
        b = self._current()
        start = self.pos - b.offset
        k = min(max_n, b.n - start) // unit * unit
        if k == 0:
            return self._stitch(unit)
        self.pos += k
        v = b.buf.data[start : start + k]
        if self.sha is not None:
            self.unhashed = v
        return v

    def take(self, size: int) -> memoryview:
        """Exactly the next ``size`` bytes, without copying where they lie in one block; valid until the next call."""
        b = self._current()
        if self.pos + size > b.end:
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
            b = self._current()
            start = self.pos - b.offset
            k = min(len(out) - done, b.n - start)
            out[done : done + k] = b.buf.data[start : start + k]
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
            b = self._current()
            k = min(end, b.end) - self.pos
            self._hash(b.buf.data[self.pos - b.offset : self.pos - b.offset + k])
            self.pos += k

    def hexdigest(self) -> str | None:
        """sha256 of the whole file (bytes not yet taken are read and hashed first); None when not hashed."""
        if self.sha is None and self.behind is None:
            return None
        self._catch_up()
        self.skip(self.size - self.pos)
        self._catch_up()
        if self.behind is None:
            return self.sha.hexdigest() if self.sha is not None else None
        if self.block is not None:
            self._release(self.block)
            self.block = None
        self.behind.inbox.put(None)
        self.threads[1].join()
        if self.behind.error is not None:
            raise self.behind.error
        return self.behind.sha.hexdigest()

    def close(self) -> None:
        """End the threads (read-ahead blocks still queued are taken back), close the file, give the buffers back."""
        if self.closed:
            return
        self.closed = True
        if self.block is not None:
            self.free.put(self.block.buf)
            self.block = None
        if self.behind is not None:
            self.behind.inbox.put(None)
        while any(t.is_alive() for t in self.threads):
            try:
                item = self.ready.get(timeout=0.05)
            except queue.Empty:
                continue
            if isinstance(item, Block):
                self.free.put(item.buf)
        self._close_file()


class Sink(_Stream):
    """Writes a file front to back from page-aligned staging buffers; a background thread writes them.

    Producers either ``write(data)`` (copied into staging) or fill ``space()`` in place and ``commit(n)``;
    the sha256 is computed at ``commit``, or with ``hash_behind`` on a thread of its own before the writer's.
    Every staging buffer but the last is ``STAGE`` bytes at an offset that is a multiple of ``STAGE``, so the
    file can be written with ``O_DIRECT``: the last buffer is padded to ``DIRECT_ALIGN`` and the file
    truncated to its real size. Buffered writes start write-back every ``WRITEBACK_EVERY`` bytes and drop the
    window before from the cache. ``finish`` ends a sink that is kept; leaving a ``with`` unfinished aborts it.
    """

    def __init__(self, path: Path, stop: threading.Event, hashed: bool = True, buffers: int = 3, hash_behind: bool = False,
                 fd: int | None = None):
        """``fd``: an already opened, empty file (``path`` then only names it); the sink owns it from the call on."""
        if fd is None:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            super().__init__(path, fd, _direct_allowed(), STAGE, buffers)
        except BaseException:
            os.close(fd)
            raise
        self.stop = stop
        self.sha = hashlib.sha256() if hashed and not hash_behind else None  # hashed at commit
        self.behind = _Hasher(self._to_writer) if hashed and hash_behind else None
        self.writes: queue.SimpleQueue[Block | None] = queue.SimpleQueue()
        self.error: BaseException | None = None
        self.written = 0
        self.queued = 0
        self.cur: np.ndarray | None = None
        self.fill = 0
        self.window = (0, 0)
        self._start(self._run, *([self.behind.run] if self.behind is not None else []))

    def __enter__(self) -> Sink:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self.file.fd >= 0:
            self.abort()

    def _to_writer(self, block: Block | None) -> None:
        self.writes.put(block)

    def _send(self, block: Block | None) -> None:
        """A filled block (None: the end) to the writer thread, through the hash-behind thread if there is one."""
        if self.behind is not None:
            self.behind.inbox.put(block)
        else:
            self.writes.put(block)

    def _run(self) -> None:
        while True:
            block = self.writes.get()
            if block is None:
                return
            try:
                if self.error is None:
                    self._write_block(block)
            except BaseException as e:  # noqa: BLE001 - handed to the producer
                self.error = e
            finally:
                self.free.put(block.buf)

    def _write_block(self, block: Block) -> None:
        mv = block.buf.data
        n = block.n
        if self.direct and n % DIRECT_ALIGN:
            mv[n : n + (-n % DIRECT_ALIGN)] = bytes(-n % DIRECT_ALIGN)
        done = 0
        while done < n:
            k = self.file.transfer(_pwrite, mv[done:], n - done, block.offset + done)
            if k == 0:
                raise OSError(errno.EIO, "write returned 0", str(self.path))
            done += k
        self.written = block.end
        if not self.direct:
            self._writeback()

    def _writeback(self) -> None:
        """Start write-back of the bytes written since the last call, and drop the window before it from the cache."""
        start = sum(self.window)
        if _SYNC_FILE_RANGE is None or self.written - start < WRITEBACK_EVERY:
            return
        _SYNC_FILE_RANGE(self.file.fd, start, self.written - start, _SFR_WRITE)
        _advise(self.file.fd, *self.window, "POSIX_FADV_DONTNEED")
        self.window = (start, self.written - start)

    def _error(self) -> BaseException | None:
        if self.error is not None:
            return self.error
        return self.behind.error if self.behind is not None else None

    def _check(self) -> None:
        err = self._error()
        if err is not None:
            raise err
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
            self._send(Block(self.cur, self.queued, self.fill))
            self.queued += self.fill
            self.cur, self.fill = None, 0

    def space(self) -> memoryview:
        """The free tail of the current staging buffer (never empty); fill a prefix and ``commit`` it."""
        self._check()
        if self.cur is not None and self.fill == STAGE:
            self._flush()
        if self.cur is None:
            self.cur = self._take()
        return self.cur.data[self.fill :]

    def commit(self, n: int) -> None:
        """The next ``n`` bytes of the last ``space()`` are data (hashed here, while they are in cache)."""
        if self.sha is not None and self.cur is not None:
            self.sha.update(self.cur.data[self.fill : self.fill + n])
        self.fill += n

    def write(self, data: BytesLike) -> None:
        """Copy ``data`` (bytes-like or numpy array, any layout) into the stream."""
        if isinstance(data, np.ndarray):
            src = np.ascontiguousarray(data).reshape(-1).view(np.uint8).data
        else:
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
        self._send(None)
        for t in self.threads:
            t.join()
        try:
            err = self._error()
            if err is not None:
                raise err
            if os.fstat(self.file.fd).st_size != self.queued:
                os.ftruncate(self.file.fd, self.queued)
            os.fsync(self.file.fd)
        finally:
            self._close_file()
        sha = self.behind.sha if self.behind is not None else self.sha
        return sha.hexdigest() if sha is not None else None

    def abort(self) -> None:
        """Stop the threads (within 5 s) and close the file, which is left as it is for its owner to remove."""
        self.error = self.error or Stopped()
        self._send(None)
        for t in self.threads:
            t.join(timeout=5)
        self._close_file()


def sha256_file(path: Path) -> str:
    """sha256 of regular file ``path`` (a FIFO or device is refused, never waited on)."""
    with SeqReader(path) as r:
        sha = r.hexdigest()
    assert sha is not None
    return sha
