"""Convert executor: runs a Plan from a Source into an Output, shard by shard on worker threads.

Each shard is streamed into its partial file (``Output.open_partial``), fsynced and renamed
(``Output.commit_shard``); what the op of each tensor does is in :mod:`repack.ops`. Copied files, configs and
index follow the shards, the manifest comes last.
"""

from __future__ import annotations

import contextlib
import errno
import os
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

from repack import __version__
from repack.errors import UserError
from repack.ops import OPS, Progress
from repack.output import FileRecord, Manifest, Output, ShardHashes
from repack.plan import Options, Plan, ShardPlan, build_plan
from repack.run import RunConfig, cores, effective_workers
from repack.sources import Source
from repack.space import check_space
from repack.stream import SeqReader, Sink, Stopped

STOP_GRACE_S = 5.0


@dataclass
class Result:
    plan: Plan
    dst: Path
    source: str
    manifest: Manifest
    seconds: float = 0.0
    shards_written: list[str] = field(default_factory=list)
    shards_kept: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        plan = self.plan
        return {
            "source": self.source,
            "output": str(self.dst),
            "shards": len(plan.shards),
            "shards_written": len(self.shards_written),
            "shards_kept": len(self.shards_kept),
            "source_bytes": plan.src_shard_bytes,
            "output_bytes": plan.out_shard_bytes,
            "seconds": round(self.seconds, 3),
            "mib_per_s": round(plan.src_shard_bytes / 2**20 / max(self.seconds, 1e-9), 1),
            "module_classes": plan.counts(),
            "float_modules": plan.float_modules,
            "copied_files": plan.extra_files,
            "manifest": str(self.dst / "w3repack.json"),
        }


def convert(source: Source | str | Path, dst: str | Path, options: Options = Options(), run: RunConfig = RunConfig()) -> Result:
    """Plan ``source`` (a Source or a local folder) with ``options`` and convert it into ``dst``."""
    if isinstance(source, (str, Path)):
        from repack.sources.folder import FolderSource

        source = FolderSource(Path(source))
    out = Output(Path(dst))
    plan = build_plan(source.checkpoint(out, options), options)
    return execute(plan, out, run, source)


def execute(plan: Plan, out: Output, run: RunConfig, source: Source) -> Result:
    """Run ``plan``; a full disk or another OS failure becomes one UserError (finished shards are kept)."""
    try:
        return _execute(plan, out, run, source)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise UserError(
                f"{out.path}: no space left on the device ({e.strerror}); finished shards are kept: "
                "free some space and run the same command again to resume"
            ) from e
        raise UserError(f"{e.filename or out.path}: {e.strerror or e}") from e


def _ids(p: Path) -> list[tuple[int, int]]:
    """(device, inode) of ``p`` and of each folder above it that exists, nearest first."""
    out = []
    for q in (p, *p.parents):
        with contextlib.suppress(OSError):
            st = os.stat(q)
            out.append((st.st_dev, st.st_ino))
    return out


def check_paths(src: Path, dst: Path) -> None:
    """SRC and DST are apart: compared by resolved path and by device and inode (a bind mount is the same folder)."""
    s, d = src.resolve(), dst.resolve()
    src_ids, dst_ids = _ids(s), _ids(d)
    same = d.exists() and src_ids[:1] == dst_ids[:1]
    if s == d or same:
        raise UserError(f"destination {dst} is the source itself")
    if s in d.parents or (src_ids and src_ids[0] in dst_ids[1:]):
        raise UserError(f"destination {dst} is inside the source {src}")
    if d in s.parents or (d.exists() and dst_ids and dst_ids[0] in src_ids[1:]):
        raise UserError(f"source {src} is inside the destination {dst}")


def fingerprint(plan: Plan, source: Source) -> dict:
    """What identifies this conversion for resume: tool version, options and the source's identity."""
    return {"tool_version": __version__, "options": plan.options.to_json(), **source.fingerprint(plan)}


def _execute(plan: Plan, out: Output, run: RunConfig, source: Source) -> Result:
    """Under DST's lock for the whole run (released however the run ends)."""
    check_paths(source.root, out.path)
    try:
        return _run(plan, out, run, source)
    finally:
        out.release()


def _proved(plan: Plan, out: Output, kept: dict[str, ShardHashes]) -> dict[str, ShardHashes]:
    """Kept shards with no recorded sha256 stay only if they verify against their source shard; others are redone."""
    from repack.verify import Found, verify_shard

    proved = {}
    for sp in plan.shards:
        h = kept.get(sp.name)
        if h is None:
            continue
        if h.sha256 is None:
            if not (plan.ckpt.root / sp.name).is_file():
                continue
            try:
                verify_shard(plan, sp, out.path, {}, lambda n: None, hashed=False)
            except Found:
                continue
        proved[sp.name] = h
    return proved


def _run(plan: Plan, out: Output, run: RunConfig, source: Source) -> Result:
    t0 = time.monotonic()
    fp = fingerprint(plan, source)
    sizes = {s.name: s.out_size for s in plan.shards}
    kept = _proved(plan, out, out.prepare(fp, sizes, plan.output_files(), run.overwrite, run.hashes))
    todo = [s for s in plan.shards if s.name not in kept]
    workers = effective_workers(run.workers or source.default_workers, len(todo))
    check_space(out.path, plan.out_total_bytes() - sum(sizes[n] for n in kept), source.space_needed(todo, workers),
                source.space_hint)
    stop = run.stop or threading.Event()
    if hasattr(source, "stop"):
        source.stop = stop  # a source that downloads starts no download once the run is stopping
    out.start(fp, kept)
    spread = workers < cores()  # spare cores: each shard's output is hashed on a thread of its own
    written: list[str] = []
    fetching: set[str] = set()  # shards whose source is being brought to disk (a download sees no stop flag)
    with run.progress("convert", plan.src_shard_bytes) as progress:
        shard_done = getattr(progress, "shard_done", None)
        if hasattr(progress, "shards"):
            progress.shards = len(todo)
        for s in plan.shards:
            if s.name in kept:
                progress(s.src_size)

        def job(sp: ShardPlan) -> None:
            if stop.is_set():
                raise Stopped()
            fetching.add(sp.name)
            try:
                source.ensure(sp)
            finally:
                fetching.discard(sp.name)
            if stop.is_set():
                raise Stopped()
            hashes = convert_shard(plan, sp, out, stop, progress, run.hashes, spread)
            out.commit_shard(sp.name, hashes)
            written.append(sp.name)
            source.release(plan, sp, out)
            if shard_done is not None:
                shard_done(sp.name)

        _run_jobs(job, sorted(todo, key=lambda s: -s.src_size), workers, stop, fetching)
    copied = [FileRecord(rel, None, out.copy_in(plan.ckpt.root / rel, rel, stop)) for rel in plan.extra_files]
    for name, data in plan.metadata_files().items():
        out.write_file(name, data)
    changed = source.changed(plan)
    if changed is not None:
        raise UserError(f"{changed}: the source changed during the conversion; nothing was finished: run the same "
                        "command again once it is stable")
    manifest = build_manifest(plan, out, fp, copied, manifest_source_name(source))
    source.finish(plan, out, manifest)
    out.finish(manifest)
    source.close(plan)
    return Result(plan, out.path, source.label(), manifest, time.monotonic() - t0, written, sorted(kept))


def _run_jobs(job, items: list[ShardPlan], workers: int, stop: threading.Event, fetching: set[str] | None = None) -> None:
    """``job`` over ``items`` on ``workers`` threads; the first failure (or Ctrl-C) sets ``stop`` and is raised.

    On the way out, shard workers (which see ``stop`` within a chunk and remove their partial file) get up to
    ``STOP_GRACE_S``; a worker inside a download (``fetching``) is not waited for: the download sees no stop
    flag, nothing of it is kept, and the process exits without it.
    """
    ex = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="w3repack")
    futures = {ex.submit(job, sp): sp.name for sp in items}
    try:
        done, _ = wait(futures, return_when=FIRST_EXCEPTION)
        for f in done:
            exc = f.exception()
            if exc is not None:
                raise exc
    except BaseException:
        stop.set()
        ex.shutdown(wait=False, cancel_futures=True)
        deadline = time.monotonic() + STOP_GRACE_S
        busy = fetching if fetching is not None else set()
        while time.monotonic() < deadline:
            left = [f for f, name in futures.items() if not f.done() and not f.cancelled() and name not in busy]
            if not left:
                break
            wait(left, timeout=0.05)
        raise
    ex.shutdown()


def manifest_source_name(source: Source) -> str:
    """How the manifest names the source: the hub repo and commit, or a local folder's name only (the manifest
    is uploaded with the model; no absolute local path goes into it)."""
    repo = getattr(source, "repo", "")
    return source.label() if repo else source.root.resolve().name


def build_manifest(plan: Plan, out: Output, fp: dict, copied: list[FileRecord], source_name: str | None = None) -> Manifest:
    done = {s.name: out.finished(s.name) or ShardHashes(None, None) for s in plan.shards}
    return Manifest(
        fingerprint=fp,
        options=plan.options.to_json(),
        source_path=source_name or plan.ckpt.root.resolve().name,
        source_files=[FileRecord(s.name, s.src_size, done[s.name].source_sha256) for s in plan.shards],
        output_shards=[FileRecord(s.name, s.out_size, done[s.name].sha256) for s in plan.shards],
        copied_files=copied,
        counts=plan.counts(),
        float_modules=plan.float_modules,
        total_size=plan.out_shard_bytes,
        shard_hashes=all(h.sha256 and h.source_sha256 for h in done.values()),
        records=dict(plan.records),
    )


def convert_shard(plan: Plan, sp: ShardPlan, out: Output, stop: threading.Event, progress: Progress,
                  hashes: bool = True, spread: bool = False) -> ShardHashes:
    """Stream one source shard into its partial output shard (removed again if anything fails); returns the
    (output, source) sha256, None unhashed.

    The worker transcodes and hashes the source bytes it has just used; ``spread`` moves the output's hash to
    a thread of its own (for when cores would otherwise sit idle: fewer shards in flight than cores). Moving
    the source's hash off the worker too measured no faster: it then hashes bytes no longer in cache.
    """
    with SeqReader(plan.ckpt.root / sp.name, hashed=hashes) as reader:
        part = out.open_partial(sp.name)
        try:
            with Sink(part.path, stop, hashed=hashes, hash_behind=spread, fd=part.fd) as sink:
                reader.read(sp.src.data_offset)
                sink.write(sp.prefix)
                progress(sp.src.data_offset)
                for op in sp.ops:
                    if stop.is_set():
                        raise Stopped()
                    OPS[op.op].convert(plan.ckpt, op, reader, sink, progress)
                src_sha = reader.hexdigest()
                if sink.position != sp.out_size:
                    raise RuntimeError(f"internal error: {sp.name}: wrote {sink.position} bytes, planned {sp.out_size}")
                return ShardHashes(sink.finish(), src_sha)
        except BaseException:
            out.discard_partial(sp.name)
            raise
