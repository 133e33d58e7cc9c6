"""Convert executor: runs a Plan into DST, atomically and resumably.

Layout of an unfinished DST: finished shards under their final names (each renamed only after fsync),
the shard in flight under ``.w3repack/<name>.partial``, and ``.w3repack/state.json`` recording the plan
fingerprint and the sha256 of every finished shard (None for shards converted with ``hashes=False``). The configs, index and manifest are written last
(``config.json`` then ``w3repack.json``), so DST is a loadable model only once everything is done.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from repack import __version__, codec
from repack.checkpoint import open_checkpoint
from repack.errors import FormatError, UserError
from repack.plan import MANIFEST_NAME, STATE_DIR, Op, Options, Plan, ShardPlan, TensorOp, build_plan
from repack.safetensors_io import NUMPY_DTYPES, read_array, to_float32
from repack.stream import (
    CHUNK, SeqReader, Sink, Stopped, atomic_write, copy_file_atomic, fsync_dir, sha256_file,
)

STATE_NAME = "state.json"
STOP_GRACE_S = 5.0
Progress = Callable[[int], None]


@dataclass
class Result:
    plan: Plan
    dst: Path
    seconds: float
    shards_written: list[str] = field(default_factory=list)
    shards_kept: list[str] = field(default_factory=list)
    manifest: dict = field(default_factory=dict)


MAX_WORKERS = 16


def effective_workers(requested: int | None, jobs: int) -> int:
    """Threads for ``jobs`` shards: the request (or the default), at most MAX_WORKERS and at most one per shard."""
    return max(1, min(requested or default_workers(), MAX_WORKERS, jobs))


def default_workers() -> int:
    """One shard in flight per core (at least two), at most MAX_WORKERS.

    A shard's reads and writes run on its own read-ahead and writer threads, so one computing thread per core
    keeps the cores busy. Each shard in flight holds 20 MiB of buffers (convert and verify alike), so
    MAX_WORKERS bounds peak resident memory near 400 MiB whatever the machine and the checkpoint.
    """
    return max(2, min(MAX_WORKERS, cores()))


def cores() -> int:
    """CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def check_paths(src: Path, dst: Path) -> None:
    s, d = src.resolve(), dst.resolve()
    if s == d:
        raise UserError(f"destination {dst} is the source itself")
    if s in d.parents:
        raise UserError(f"destination {dst} is inside the source {src}")
    if d in s.parents:
        raise UserError(f"source {src} is inside the destination {dst}")


def load_state(dst: Path) -> dict | None:
    for p in (dst / STATE_DIR / STATE_NAME, dst / MANIFEST_NAME):
        if p.exists():
            try:
                obj = json.loads(p.read_text())
            except (OSError, ValueError):
                return None
            return obj if isinstance(obj, dict) else None
    return None


def prepare_dst(plan: Plan, dst: Path, overwrite: bool, hashes: bool = True) -> dict[str, dict]:
    """Decide what in DST can be kept. Returns finished shards ``{name: {"sha256", "source_sha256"}}``.

    A finished shard is kept when its size is the planned one and its recorded sha256 checks out; one recorded
    without a sha256 is kept only when ``hashes`` is off. Final names only ever hold complete, fsynced shards.
    """
    if dst.exists() and not dst.is_dir():
        raise UserError(f"destination {dst} exists and is not a directory")
    if not dst.exists() or not any(dst.iterdir()):
        return {}
    fp = plan.fingerprint()
    state = load_state(dst)
    if state is None and [c.name for c in dst.iterdir()] == [STATE_DIR]:
        shutil.rmtree(dst / STATE_DIR)
        return {}
    same = state is not None and state.get("fingerprint") == fp
    if not same:
        if not overwrite:
            why = "an earlier run of a different conversion" if state is not None else "files that are not from w3repack"
            raise UserError(f"destination {dst} is not empty: it holds {why}; pass --overwrite to replace its contents")
        for child in dst.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
        return {}
    foreign = foreign_files(plan, dst)
    if foreign:
        if not overwrite:
            raise UserError(f"destination {dst} holds an earlier run of this conversion plus files it did not write "
                            f"(e.g. {foreign[0]}); remove them or pass --overwrite")
        for rel in foreign:
            (dst / rel).unlink()
    finished = state.get("finished")
    if not finished:  # a finished output: its manifest lists output and source hashes separately
        files = (state.get("source") or {}).get("files") or []
        src_sha = {f.get("name"): f.get("sha256") for f in files if isinstance(f, dict)}
        finished = {
            s.get("name"): {**s, "source_sha256": src_sha.get(s.get("name"))}
            for s in state.get("output_shards") or [] if isinstance(s, dict)
        }
    kept = {}
    sizes = {s.name: s.out_size for s in plan.shards}
    for name, rec in (finished.items() if isinstance(finished, dict) else ()):
        if not isinstance(rec, dict):
            continue
        p = dst / name
        if name not in sizes or not p.is_file() or p.stat().st_size != sizes[name]:
            continue
        sha = rec.get("sha256")
        if sha256_file(p) == sha if isinstance(sha, str) else not hashes:
            kept[name] = {"sha256": sha, "source_sha256": rec.get("source_sha256")}
    return kept


def foreign_files(plan: Plan, dst: Path) -> list[str]:
    """Files in DST (outside ``.w3repack/``) that this conversion would not write, nor its temporary names."""
    ours = {s.name for s in plan.shards} | set(plan.metadata_files()) | set(plan.extra_files) | {MANIFEST_NAME}
    out = []
    for dirpath, dirnames, files in os.walk(dst):
        rel_dir = Path(dirpath).relative_to(dst)
        if rel_dir == Path("."):
            dirnames[:] = [d for d in dirnames if d != STATE_DIR]
        for fn in files:
            tmp_of = fn[1:-len(".w3repack-tmp")] if fn.startswith(".") and fn.endswith(".w3repack-tmp") else None
            if str(rel_dir / fn) not in ours and (tmp_of is None or str(rel_dir / tmp_of) not in ours):
                out.append(str(rel_dir / fn))
    return sorted(out)


def check_space(plan: Plan, dst: Path, kept: dict) -> None:
    need = plan.out_total_bytes() - sum(s.out_size for s in plan.shards if s.name in kept)
    probe = dst if dst.exists() else next(p for p in dst.resolve().parents if p.exists())
    free = shutil.disk_usage(probe).free
    if free < need:
        raise UserError(
            f"not enough free space on {probe}: the output needs {need:,} more bytes ({need / 2**30:.2f} GiB), "
            f"{free:,} bytes ({free / 2**30:.2f} GiB) are free"
        )


class _State:
    def __init__(self, dst: Path, fingerprint: dict, finished: dict):
        self.path = dst / STATE_DIR / STATE_NAME
        self.fingerprint = fingerprint
        self.finished = dict(finished)
        self.lock = threading.Lock()
        self.save()

    def save(self) -> None:
        atomic_write(self.path, json.dumps({"fingerprint": self.fingerprint, "finished": self.finished}, indent=1).encode())

    def done(self, name: str, sha: str | None, src_sha: str | None) -> None:
        with self.lock:
            self.finished[name] = {"sha256": sha, "source_sha256": src_sha}
            self.save()


def convert(
    src: Path,
    dst: Path,
    options: Options,
    workers: int | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
    stop: threading.Event | None = None,
    plan: Plan | None = None,
    before_shard: Callable[[ShardPlan], None] | None = None,
    after_shard: Callable[[ShardPlan], None] | None = None,
    hashes: bool = True,
    finish_manifest: Callable[[dict], None] | None = None,
) -> Result:
    """``before_shard(sp)`` runs in the worker before shard ``sp`` is read; ``after_shard(sp)`` once it is recorded finished.

    ``hashes=False`` skips the sha256 of source and output shards (the manifest records None): the output bytes
    are the same, and ``verify`` still compares every byte with the source. ``finish_manifest(m)`` may add to
    the manifest before it is written (while ``DST/.w3repack`` still exists).
    """
    try:
        return _convert(src, dst, options, workers, overwrite, progress, stop, plan, before_shard, after_shard, hashes,
                        finish_manifest)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise UserError(
                f"{dst}: no space left on the device ({e.strerror}); finished shards are kept: "
                "free some space and run the same command again to resume"
            ) from e
        raise UserError(f"{e.filename or dst}: {e.strerror or e}") from e


def _convert(src, dst, options, workers, overwrite, progress, stop, plan, before_shard=None, after_shard=None, hashes=True,
             finish_manifest=None) -> Result:
    t0 = time.monotonic()
    src, dst = Path(src), Path(dst)
    if plan is None:
        plan = build_plan(open_checkpoint(src), options)
    check_paths(src, dst)
    kept = prepare_dst(plan, dst, overwrite, hashes)
    check_space(plan, dst, kept)
    stop = stop or threading.Event()
    progress = progress or (lambda n: None)
    dst.mkdir(parents=True, exist_ok=True)
    state = _State(dst, plan.fingerprint(), kept)
    todo = [s for s in plan.shards if s.name not in kept]
    for s in plan.shards:
        if s.name in kept:
            progress(s.src_size)
    workers = effective_workers(workers, len(todo))
    spread = workers < cores()  # spare cores: each shard's output is hashed on a thread of its own
    result = Result(plan, dst, 0.0, shards_kept=sorted(kept))

    def job(sp: ShardPlan) -> None:
        if before_shard is not None:
            before_shard(sp)
        sha, src_sha = convert_shard(plan, sp, dst, stop, progress, hashes, spread)
        state.done(sp.name, sha, src_sha)
        result.shards_written.append(sp.name)
        if after_shard is not None:
            after_shard(sp)

    ex = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="w3repack")
    futures = [ex.submit(job, sp) for sp in sorted(todo, key=lambda s: -s.src_size)]
    try:
        done, _ = wait(futures, return_when=FIRST_EXCEPTION)
        for f in done:
            if f.exception() is not None:
                raise f.exception()
    except BaseException:
        stop.set()
        ex.shutdown(wait=False, cancel_futures=True)
        # shard workers see `stop` within a chunk; a hub download may not (wait() never sees a cancelled future done)
        wait([f for f in futures if not f.cancelled()], timeout=STOP_GRACE_S)
        raise
    ex.shutdown()
    extra = {}
    for rel in plan.extra_files:
        extra[rel] = copy_file_atomic(plan.ckpt.root / rel, dst / rel, stop)
    for name, data in plan.metadata_files().items():
        atomic_write(dst / name, data)
    manifest = build_manifest(plan, state.finished, extra)
    if finish_manifest is not None:
        finish_manifest(manifest)
    atomic_write(dst / MANIFEST_NAME, json.dumps(manifest, indent=2).encode() + b"\n")
    shutil.rmtree(dst / STATE_DIR, ignore_errors=True)
    fsync_dir(dst)
    result.seconds = time.monotonic() - t0
    result.manifest = manifest
    return result


def build_manifest(plan: Plan, finished: dict, extra: dict[str, str]) -> dict:
    root = plan.ckpt.root
    return {
        "tool": "w3repack",
        "tool_version": __version__,
        "complete": True,
        "shard_hashes": all(finished[s.name]["sha256"] and finished[s.name]["source_sha256"] for s in plan.shards),
        "fingerprint": plan.fingerprint(),
        "options": plan.options.to_json(),
        "source": {
            "path": str(root.resolve()),
            "files": [
                {"name": s.name, "size": s.src_size, "sha256": finished[s.name]["source_sha256"]} for s in plan.shards
            ],
        },
        "output_shards": [{"name": s.name, "size": s.out_size, "sha256": finished[s.name]["sha256"]} for s in plan.shards],
        "copied_files": [{"name": k, "sha256": v} for k, v in extra.items()],
        "counts": plan.counts(),
        "float_modules": plan.float_modules,
        **plan.records,
        "total_size": sum(s.out_size for s in plan.shards),
    }


def convert_shard(plan: Plan, sp: ShardPlan, dst: Path, stop: threading.Event, progress: Progress,
                  hashes: bool = True, spread: bool = False) -> tuple[str | None, str | None]:
    """Stream one source shard into its output shard; returns (output sha256, source sha256), None unhashed.

    The worker transcodes and hashes the source bytes it has just used; ``spread`` moves the output's hash to
    a thread of its own (for when cores would otherwise sit idle: fewer shards in flight than cores). Moving
    the source's hash off the worker too measured no faster: it then hashes bytes no longer in cache.
    """
    src_path = plan.ckpt.root / sp.name
    tmp = dst / STATE_DIR / (sp.name + ".partial")
    tmp.parent.mkdir(parents=True, exist_ok=True)
    reader = SeqReader(src_path, hashed=hashes)
    sink = Sink(tmp, stop, hashed=hashes, hash_behind=spread)
    ok = False
    try:
        reader.read(sp.src.data_offset)
        sink.write(sp.prefix)
        progress(sp.src.data_offset)
        for op in sp.ops:
            if stop.is_set():
                raise Stopped()
            _run_op(plan, op, reader, sink, progress)
        src_sha = reader.hexdigest()
        if sink.position != sp.out_size:
            raise RuntimeError(f"internal error: {sp.name}: wrote {sink.position} bytes, planned {sp.out_size}")
        sha = sink.finish()
        final = dst / sp.name
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, final)
        fsync_dir(final.parent)
        ok = True
        return sha, src_sha
    finally:
        reader.close()
        if not ok:
            sink.abort()
            try:
                tmp.unlink()
            except FileNotFoundError:
                pass


def _stream_copy(reader: SeqReader, sink: Sink, nbytes: int, progress: Progress) -> None:
    """Passthrough bytes are read straight into the sink's staging buffers."""
    left = nbytes
    while left:
        space = sink.space()
        n = min(left, len(space), CHUNK)
        reader.read_into(space[:n])
        sink.commit(n)
        progress(n)
        left -= n


def _run_op(plan: Plan, op: TensorOp, reader: SeqReader, sink: Sink, progress: Progress) -> None:
    t = op.src
    if op.op is Op.COPY:
        if op.module is not None and t.name.endswith((".g_idx", ".qzeros")):
            data = reader.read(t.nbytes)
            if t.name.endswith(".g_idx"):
                check_g_idx(plan, op, np.frombuffer(data, dtype=NUMPY_DTYPES[t.dtype]))
            else:
                check_sym_zeros(plan, op.module, np.frombuffer(data, dtype=np.int32).reshape(t.shape))
            sink.write(data)
            progress(t.nbytes)
            return
        _stream_copy(reader, sink, t.nbytes, progress)
    elif op.op is Op.DROP:
        if t.name.endswith(".qzeros") and op.module is not None:
            data = reader.read(t.nbytes)
            check_sym_zeros(plan, op.module, np.frombuffer(data, dtype=np.int32).reshape(t.shape))
            progress(t.nbytes)
        else:
            reader.skip(t.nbytes)
            progress(t.nbytes)
    elif op.op is Op.ZEROS:
        m = op.module
        data = reader.read(t.nbytes)
        check_sym_zeros(plan, m, np.frombuffer(data, dtype=np.int32).reshape(t.shape))
        sink.write(codec.sym_qzeros(t.shape[0], m.n, 4))
        progress(t.nbytes)
    elif op.op is Op.TRANSCODE:
        _transcode(op.module, t.shape[0], reader, sink, progress)
    elif op.op is Op.DEQUANT:
        m = op.module
        qweight = np.frombuffer(reader.read(t.nbytes), dtype=np.int32).reshape(t.shape)
        progress(t.nbytes)
        zeros = read_tensor(plan, m.qzeros)
        check_sym_zeros(plan, m, zeros)
        if m.g_idx is not None:
            check_g_idx(plan, TensorOp(Op.COPY, m.g_idx.info, m), read_tensor(plan, m.g_idx))
        scales = to_float32(read_tensor(plan, m.scales), m.scales.info.dtype)
        for block in dequant_blocks(qweight, scales, m.bits, m.group_size):
            sink.write(block)
    else:  # pragma: no cover
        raise AssertionError(op.op)


def _transcode(m, rows_total: int, reader: SeqReader, sink: Sink, progress: Progress) -> None:
    """3/2-bit qweight rows -> 4-bit rows: the codec reads the reader's block and writes the sink's staging buffer.

    A block is ``words_per_block`` input rows; it becomes ``codes_per_block/8`` output rows. Blocks that do not
    fit in what is left of a staging buffer go through a small array and ``Sink.write``.
    """
    row_bytes = m.n * 4
    in_rows = codec.words_per_block(m.bits)
    out_block = codec.codes_per_block(m.bits) // 8 * row_bytes
    left = rows_total
    while left:
        space = sink.space()
        fit = len(space) // out_block * in_rows
        r = min(left, fit or in_rows)
        chunk = reader.view(r * row_bytes, in_rows * row_bytes)
        r = len(chunk) // row_bytes
        words = np.frombuffer(chunk, dtype=np.int32).reshape(r, m.n)
        out = np.frombuffer(space, dtype=np.uint8) if fit else None
        res = codec.transcode_to4(words, m.bits, out=out)
        if out is not None and np.shares_memory(res, out):
            sink.commit(res.nbytes)
        else:
            sink.write(res)
        progress(r * row_bytes)
        left -= r


def dequant_blocks(qweight: np.ndarray, scales: np.ndarray, bits: int, group: int):
    """Yield the float32 weight ``[N, K]`` in row blocks: ``scales[k//g, n] * (q[k, n] - 2**(bits-1))``."""
    n = qweight.shape[1]
    k = scales.shape[0] * group
    cols = max(32, (CHUNK // (k * 4)) // 32 * 32)
    groups = np.arange(k) // group
    for c0 in range(0, n, cols):
        q = codec.decode(np.ascontiguousarray(qweight[:, c0 : c0 + cols]), bits)
        w = (q.astype(np.int16) - (1 << (bits - 1))).astype(np.float32) * scales[groups, c0 : c0 + cols]
        yield np.ascontiguousarray(w.T)


def read_tensor(plan: Plan, loc) -> np.ndarray:
    """One source tensor, read whole (small ones: zeros, scales, g_idx) by its location in the plan."""
    path = plan.ckpt.root / loc.shard
    fd = os.open(path, os.O_RDONLY)
    try:
        return read_array(fd, plan.ckpt.shards[loc.shard], loc.info)
    finally:
        os.close(fd)


def check_sym_zeros(plan: Plan, m, zeros: np.ndarray) -> None:
    want = codec.sym_qzeros(zeros.shape[0], m.n, m.bits)
    if zeros.shape != want.shape or not np.array_equal(zeros.view(np.uint32), want.view(np.uint32)):
        codes = codec.unpack(zeros, m.bits, axis=1).astype(int) + 1
        raise FormatError(
            f"{plan.ckpt.root / m.qzeros.shard}: tensor {m.qzeros.info.name}: zero points are asymmetric "
            f"(found {sorted(set(np.unique(codes).tolist()))[:6]}, symmetric is {1 << (m.bits - 1)}); "
            "vLLM's Marlin kernels serve only symmetric 4/8-bit weights, so the 4-bit output would not load"
        )


def check_g_idx(plan: Plan, op: TensorOp, g: np.ndarray) -> None:
    m = op.module
    want = np.arange(m.k) // m.group_size
    if g.shape != want.shape or not np.array_equal(g.astype(np.int64), want):
        raise FormatError(
            f"{plan.ckpt.root / m.g_idx.shard}: tensor {op.src.name}: g_idx is not arange(K)//group_size "
            "(act-order / desc_act): Marlin rejects act-order with groups, so this is not supported"
        )
