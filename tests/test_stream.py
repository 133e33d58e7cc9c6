"""Streaming reader/writer: every byte in order, sha256 equal to hashlib's over the file, direct and buffered I/O."""

import contextlib
import hashlib
import os
import threading

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from repack import stream
from repack.errors import FormatError
from repack.stream import READ_BLOCK, STAGE, SeqReader, Sink

settings.register_profile("stream", deadline=None, max_examples=25, suppress_health_check=[HealthCheck.function_scoped_fixture])

IO_MODES = pytest.mark.parametrize("direct", ["1", "0"], ids=["direct", "buffered"])


def _direct_supported(d) -> bool:
    try:
        fd = os.open(d / "probe", os.O_RDWR | os.O_CREAT | getattr(os, "O_DIRECT", 0))
    except OSError:
        return False
    os.close(fd)
    return hasattr(os, "O_DIRECT")


def _data(n: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, size=n, dtype=np.uint8).tobytes()


def _cold(p) -> None:
    """Drop ``p``'s pages from the page cache (a file just written is warm, and a warm source is read buffered)."""
    fd = os.open(p, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _reader_on(tmp_path, monkeypatch, direct: str, data: bytes, **kw):
    """A SeqReader over a file holding ``data``, in the I/O mode ``direct``; closed afterwards."""
    monkeypatch.setenv("W3REPACK_DIRECT_IO", direct)
    p = tmp_path / "f"
    p.write_bytes(data)
    _cold(p)
    with SeqReader(p, **kw) as r:
        yield r


# sizes around the block and alignment boundaries
SIZES = [0, 1, 4095, 4096, 4097, READ_BLOCK - 1, READ_BLOCK, READ_BLOCK + 1, 2 * READ_BLOCK + 12345, STAGE + 7]


@IO_MODES
@pytest.mark.parametrize("ahead", [False, True], ids=["hash-by-consumer", "hash-behind"])
@pytest.mark.parametrize("size", SIZES)
def test_reader_returns_every_byte_and_hashes_the_file(tmp_path, monkeypatch, direct, size, ahead):
    data = _data(size, size)
    with _reader_on(tmp_path, monkeypatch, direct, data, hash_behind=ahead) as r:
        assert r.direct == (direct == "1" and _direct_supported(tmp_path))
        got, step = bytearray(), 0
        while len(got) < size:
            step += 1
            left = size - len(got)
            kind = step % 5
            if kind == 4:
                t = r.take(min(left, 1_500_000))
                assert len(t) == min(left, 1_500_000)
                got += t
            elif kind == 0:
                got += r.read(min(left, 3 + step * 1001))
            elif kind == 1:
                n = min(left, 777_777)
                got += r.view(n, 1)
            elif kind == 2 and left >= 96:
                v = r.view(min(left, READ_BLOCK) // 96 * 96, 96)
                assert len(v) % 96 == 0 and len(v) >= 96
                got += v
            else:
                before = r.pos
                n = min(left, 100_000)
                r.skip(n)
                assert r.pos == before + n
                got += data[before : before + n]
        assert bytes(got) == data
        assert r.hexdigest() == hashlib.sha256(data).hexdigest()


@IO_MODES
def test_view_copies_one_unit_across_a_block_boundary(tmp_path, monkeypatch, direct):
    data = _data(3 * READ_BLOCK, 1)
    unit = 12 * 1000
    with _reader_on(tmp_path, monkeypatch, direct, data) as r:
        first = r.view(READ_BLOCK, unit)
        assert len(first) == READ_BLOCK // unit * unit
        across = r.view(10 * unit, unit)
        assert len(across) == unit, "the remainder of the block is shorter than a unit: one unit is stitched"
        assert bytes(across) == data[len(first) : len(first) + unit]
        rest = r.view(10 * unit, unit)
        assert bytes(rest) == data[len(first) + unit : len(first) + unit + len(rest)]
        assert r.hexdigest() == hashlib.sha256(data).hexdigest()


@IO_MODES
def test_reader_reports_a_file_shorter_than_at_open(tmp_path, monkeypatch, direct):
    with _reader_on(tmp_path, monkeypatch, direct, _data(3 * READ_BLOCK), blocks=1) as r:
        r.read(100)
        os.truncate(r.path, READ_BLOCK + 10)
        with pytest.raises(FormatError, match="unexpected end of file"):
            r.skip(3 * READ_BLOCK - 100)


def test_reader_unhashed_and_closed_early(tmp_path):
    p = tmp_path / "f"
    p.write_bytes(_data(3 * READ_BLOCK))
    with SeqReader(p, hashed=False) as r:
        assert bytes(r.read(10)) == p.read_bytes()[:10]
        assert r.hexdigest() is None
        r.close()
    r.close()


@IO_MODES
@settings(settings.get_profile("stream"))
@given(pieces=st.lists(st.tuples(st.sampled_from(["write", "space"]), st.integers(0, 3 * STAGE // 2)), max_size=8),
       behind=st.booleans())
def test_sink_writes_exact_bytes_and_hash(tmp_path, monkeypatch, direct, pieces, behind):
    monkeypatch.setenv("W3REPACK_DIRECT_IO", direct)
    p = tmp_path / "out"
    sink = Sink(p, threading.Event(), hash_behind=behind)
    assert sink.direct == (direct == "1" and _direct_supported(tmp_path))
    want = bytearray()
    for i, (how, n) in enumerate(pieces):
        chunk = _data(n, i)
        if how == "write":
            sink.write(chunk)
            want += chunk
        else:
            space = sink.space()
            k = min(n, len(space))
            space[:k] = chunk[:k]
            sink.commit(k)
            want += chunk[:k]
        assert sink.position == len(want)
    sha = sink.finish()
    assert p.read_bytes() == bytes(want), "padding for direct I/O must be truncated away"
    assert sha == hashlib.sha256(want).hexdigest()


def test_sink_takes_numpy_arrays_and_noncontiguous_ones(tmp_path):
    p = tmp_path / "out"
    sink = Sink(p, threading.Event(), hashed=False)
    a = np.arange(64, dtype=np.int32).reshape(8, 8)
    sink.write(a)
    sink.write(a[:, ::2])
    assert sink.finish() is None
    assert p.read_bytes() == a.tobytes() + np.ascontiguousarray(a[:, ::2]).tobytes()


def test_sink_stops_when_asked_and_can_abort_twice(tmp_path):
    stop = threading.Event()
    sink = Sink(tmp_path / "out", stop)
    sink.write(b"x" * 10)
    stop.set()
    with pytest.raises(stream.Stopped):
        sink.write(b"y" * (2 * STAGE))
    sink.abort()
    sink.abort()


def test_buffers_are_reused_not_shared(tmp_path):
    pool = stream.BufferPool()
    a = pool.take(READ_BLOCK, 2)
    assert all(b.ctypes.data % stream.HUGE == 0 and len(b) == READ_BLOCK for b in a)
    pool.give(a)
    b = pool.take(READ_BLOCK, 3)
    assert {x.ctypes.data for x in a} <= {x.ctypes.data for x in b}
    assert len({x.ctypes.data for x in b}) == 3
    pool.give(b)


def test_reader_and_sink_draw_on_one_pool_and_give_back_on_leaving_with(tmp_path):
    """A sink's staging buffers and a reader's read-ahead buffers come from the one pool and go back to it
    when the ``with`` ends, also when it ends by an error (an unfinished sink is aborted)."""
    p = tmp_path / "f"
    p.write_bytes(_data(3 * READ_BLOCK))
    with SeqReader(p) as r:
        r.read(10)
        taken = {b.ctypes.data for b in r.buffers}
    assert r.closed and r.file.fd == -1
    assert taken <= {b.ctypes.data for b in stream.POOL._spare[READ_BLOCK]}
    with pytest.raises(ValueError, match="boom"):
        with Sink(tmp_path / "out", threading.Event()) as sink:
            sink.write(b"x" * 100)
            staged = {b.ctypes.data for b in sink.buffers}
            raise ValueError("boom")
    assert sink.file.fd == -1 and not any(t.is_alive() for t in sink.threads)
    assert staged <= {b.ctypes.data for b in stream.POOL._spare[STAGE]}


def test_direct_io_refused_by_the_kernel_falls_back_to_buffered(tmp_path, monkeypatch):
    """An O_DIRECT transfer the kernel refuses (EINVAL: here an unaligned offset) is retried buffered, not lost."""
    monkeypatch.setenv("W3REPACK_DIRECT_IO", "1")
    if not _direct_supported(tmp_path):
        pytest.skip("no O_DIRECT on this filesystem")
    data = _data(3 * 4096 + 5)
    p = tmp_path / "f"
    p.write_bytes(data)
    _cold(p)
    with SeqReader(p, hashed=False) as r:
        assert r.direct
        buf = stream.POOL.take(READ_BLOCK, 1)[0]
        assert r._fill(buf, 1, 4096) == 4096 and not r.direct
        assert bytes(buf[:4096]) == data[1:4097]
        stream.POOL.give([buf])
    with Sink(tmp_path / "out", threading.Event(), hashed=False) as sink:
        assert sink.direct
        block = stream.POOL.take(STAGE, 1)[0]
        block[:100] = np.frombuffer(data[:100], dtype=np.uint8)
        sink._write_block(stream.Block(block, 1, 100))
        stream.POOL.give([block])
        assert not sink.direct
        sink.queued = 101
        sink.finish()
    assert (tmp_path / "out").read_bytes() == b"\0" + data[:100]


def test_a_source_in_the_page_cache_is_read_buffered_and_left_cached(tmp_path):
    """Cold: O_DIRECT where the filesystem allows (no page-cache copy). Warm (pages resident): buffered, from
    memory, and the pages stay cached, so a warm convert is no slower than a cold one."""
    import os

    from repack.stream import SeqReader, cached_share

    p = tmp_path / "f.bin"
    data = os.urandom(8 << 20)
    p.write_bytes(data)
    fd = os.open(p, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        cold = cached_share(fd, len(data))
        if cold is None or cold > 0.5:
            pytest.skip("page residency cannot be told or dropped on this filesystem")
        with SeqReader(p, hashed=True) as r:
            assert not r.warm
            assert bytes(r.read(len(data))) == data
        open(p, "rb").read()  # now it is in the page cache
        assert cached_share(fd, len(data)) == 1.0
        with SeqReader(p, hashed=True) as r:
            assert r.warm and not r.direct
            assert bytes(r.read(len(data))) == data
            assert r.hexdigest() == hashlib.sha256(data).hexdigest()
        assert cached_share(fd, len(data)) == 1.0
    finally:
        os.close(fd)
