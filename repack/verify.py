"""Verify executor: a bitwise round trip of DST against SRC over every byte.

The expected output is recomputed from SRC (plan from headers + the options in DST's manifest). Per tensor:
passthrough bytes must be identical; converted qweights, taken back to the source width by
``codec.transcode_from4``, must equal the source bytes; converted qzeros must be the symmetric 4-bit
pattern; float-emitted modules must equal the reference dequantization (generic unpacker) bit for bit.
Configs, index, shard set, copied files and manifest hashes are checked too (an output shard's sha256 only
where the manifest records one: ``convert --no-hash`` records none).
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from repack import codec
from repack.checkpoint import INDEX_NAME, QCONFIG_NAME, open_checkpoint
from repack.convert import cores, effective_workers, read_tensor
from repack.errors import UserError
from repack.plan import MANIFEST_NAME, Op, Options, Plan, ShardPlan, build_plan
from repack.safetensors_io import read_header, to_float32
from repack.stream import CHUNK, SeqReader, sha256_file

Progress = Callable[[int], None]


@dataclass
class Difference:
    file: str
    tensor: str | None
    offset: int | None
    message: str

    def line(self) -> str:
        where = self.file
        if self.tensor:
            where += f": tensor {self.tensor}"
        if self.offset is not None:
            where += f" at byte {self.offset}"
        return f"{where}: {self.message}"


@dataclass
class Report:
    ok: bool
    differences: list[Difference]
    tensors: dict[str, int] = field(default_factory=dict)
    src_bytes: int = 0
    dst_bytes: int = 0
    seconds: float = 0.0
    hashes_checked: int = 0

    def to_json(self) -> dict:
        return {
            "ok": self.ok,
            "tensors_checked": self.tensors,
            "shard_hashes_checked": self.hashes_checked,
            "source_bytes": self.src_bytes,
            "output_bytes": self.dst_bytes,
            "seconds": round(self.seconds, 3),
            "first_difference": self.differences[0].line() if self.differences else None,
            "differences": [d.line() for d in self.differences[:50]],
        }


class Found(Exception):
    """The first difference in a shard, raised out of the per-tensor loop."""

    def __init__(self, diff: Difference):
        self.diff = diff


def verify(src: Path, dst: Path, workers: int | None = None, progress: Progress | None = None) -> Report:
    t0 = time.monotonic()
    src, dst = Path(src), Path(dst)
    progress = progress or (lambda n: None)
    ckpt = open_checkpoint(src)
    if not dst.is_dir():
        raise UserError(f"{dst}: output directory not found")
    mpath = dst / MANIFEST_NAME
    if not mpath.exists():
        return Report(False, [Difference(str(mpath), None, None, "missing: the conversion is incomplete or DST is not a w3repack output")])
    try:
        manifest = json.loads(mpath.read_text())
        options = Options.from_json(manifest["options"])
    except (ValueError, KeyError, TypeError) as e:
        return Report(False, [Difference(str(mpath), None, None, f"unreadable manifest ({e})")])
    plan = build_plan(ckpt, options)
    diffs = _check_metadata(plan, dst, manifest)
    counts: dict[str, int] = {}
    lock = threading.Lock()
    dst_sha: dict[str, str] = {}
    shard_diffs: dict[str, Difference] = {}
    shards = [s for s in plan.shards if (dst / s.name).is_file()]
    man_out = {s.get("name"): s for s in manifest.get("output_shards", []) if isinstance(s, dict)}
    man_src = {s.get("name"): s for s in manifest.get("source", {}).get("files", []) if isinstance(s, dict)}

    def job(sp: ShardPlan) -> None:
        local: dict[str, int] = {}
        try:
            sha = verify_shard(plan, sp, dst, local, progress, hashed=man_out.get(sp.name, {}).get("sha256") is not None,
                               spread=n < cores())
            if sha is not None:
                dst_sha[sp.name] = sha
        except Found as f:
            shard_diffs[sp.name] = f.diff
        with lock:
            for k, v in local.items():
                counts[k] = counts.get(k, 0) + v

    n = effective_workers(workers, len(shards))
    with ThreadPoolExecutor(max_workers=n, thread_name_prefix="w3verify") as ex:
        list(ex.map(job, sorted(shards, key=lambda s: -s.src_size)))
    for sp in plan.shards:
        if sp.name in shard_diffs:
            diffs.append(shard_diffs[sp.name])
    for sp in plan.shards:
        if manifest.get("shard_hashes", True) and man_out.get(sp.name, {}).get("sha256") is None:
            diffs.append(Difference(str(mpath), None, None, f"no sha256 recorded for {sp.name}"))
        if sp.name in dst_sha and man_out.get(sp.name, {}).get("sha256") != dst_sha[sp.name]:
            diffs.append(Difference(str(mpath), None, None, f"sha256 recorded for {sp.name} does not match the file"))
        if man_src.get(sp.name, {}).get("size") != sp.src_size:
            diffs.append(Difference(str(mpath), None, None, f"source {sp.name} has changed size since conversion"))
    return Report(
        not diffs, diffs, dict(sorted(counts.items())), plan.src_shard_bytes, plan.out_shard_bytes, time.monotonic() - t0,
        len(dst_sha),
    )


def _check_metadata(plan: Plan, dst: Path, manifest: dict) -> list[Difference]:
    diffs = []
    expected_files = {s.name for s in plan.shards}
    present = {str(p.relative_to(dst)) for p in dst.rglob("*.safetensors") if not p.name.startswith(".")}
    for name in sorted(expected_files - present):
        diffs.append(Difference(str(dst / name), None, None, "output shard missing"))
    for name in sorted(present - expected_files):
        diffs.append(Difference(str(dst / name), None, None, "unexpected shard in output"))
    for name, data in plan.metadata_files().items():
        p = dst / name
        try:
            have = json.loads(p.read_text())
        except FileNotFoundError:
            diffs.append(Difference(str(p), None, None, "missing"))
            continue
        except ValueError as e:
            diffs.append(Difference(str(p), None, None, f"not valid JSON ({e})"))
            continue
        want = json.loads(data)
        if have != want:
            diffs.append(Difference(str(p), None, None, _json_diff(want, have)))
    if plan.quant_config_file is None and (dst / QCONFIG_NAME).exists():
        diffs.append(Difference(str(dst / QCONFIG_NAME), None, None, "present in output but not in source"))
    if plan.index is None and (dst / INDEX_NAME).exists():
        diffs.append(Difference(str(dst / INDEX_NAME), None, None, "present in output but the source has no index"))
    if manifest.get("complete") is not True:
        diffs.append(Difference(str(dst / MANIFEST_NAME), None, None, "manifest does not mark the conversion complete"))
    try:
        fp_options = Options.from_json(manifest.get("fingerprint", {}).get("options"))
    except TypeError:
        fp_options = None
    if fp_options != plan.options:
        diffs.append(Difference(str(dst / MANIFEST_NAME), None, None, "manifest options are inconsistent"))
    if "target" in manifest.get("options", {}):
        for key, want in plan.records.items():
            if manifest.get(key) != json.loads(json.dumps(want)):
                diffs.append(Difference(str(dst / MANIFEST_NAME), None, None, f"manifest record {key} is inconsistent"))
    copied = {c.get("name"): c.get("sha256") for c in manifest.get("copied_files", []) if isinstance(c, dict)}
    for rel in plan.extra_files:
        p = dst / rel
        if not p.is_file():
            diffs.append(Difference(str(p), None, None, "copied file missing"))
            continue
        have = sha256_file(p)
        if have != sha256_file(plan.ckpt.root / rel):
            diffs.append(Difference(str(p), None, None, "differs from the source file"))
        elif copied.get(rel) != have:
            diffs.append(Difference(str(dst / MANIFEST_NAME), None, None, f"sha256 recorded for {rel} does not match"))
    return diffs


def _json_diff(want: object, have: object, path: str = "") -> str:
    if isinstance(want, dict) and isinstance(have, dict):
        for k in sorted(set(want) | set(have), key=str):
            if k not in have:
                return f"key {path}{k} missing"
            if k not in want:
                return f"unexpected key {path}{k}"
            if want[k] != have[k]:
                return _json_diff(want[k], have[k], f"{path}{k}.")
    return f"value at {path.rstrip('.') or '(root)'} is {json.dumps(have)[:80]}, expected {json.dumps(want)[:80]}"


def _first_diff(a: np.ndarray, b: np.ndarray) -> int:
    a, b = a.reshape(-1).view(np.uint8), b.reshape(-1).view(np.uint8)
    n = min(a.size, b.size)
    idx = np.flatnonzero(a[:n] != b[:n])
    return int(idx[0]) if idx.size else n


def verify_shard(plan: Plan, sp: ShardPlan, dst: Path, counts: dict, progress: Progress, hashed: bool = True,
                 spread: bool = False) -> str | None:
    """Compare one output shard with its source; returns the output's sha256 (None unless ``hashed``; ``spread``: hash on a thread of its own)."""
    dpath = dst / sp.name
    dname = str(dpath)
    try:
        h = read_header(dpath)
    except UserError as e:
        raise Found(Difference(dname, None, None, f"unreadable output shard: {e}")) from None
    if h.file_size != sp.out_size or h.data_offset != sp.data_offset:
        expected = {o.out_name: (o.out_dtype, o.out_shape) for o in sp.ops if o.out_name}
        for name, (dt, shape) in expected.items():
            t = h.tensors.get(name)
            if t is None or t.dtype != dt or t.shape != shape:
                raise Found(Difference(dname, name, None, f"header entry {t and (t.dtype, list(t.shape))} != expected {(dt, list(shape))}"))
        raise Found(Difference(dname, None, None, f"size {h.file_size} != expected {sp.out_size}"))
    sr, dr = SeqReader(plan.ckpt.root / sp.name, hashed=False), SeqReader(dpath, hashed=hashed, hash_behind=spread)
    try:
        sr.read(sp.src.data_offset)
        head = np.frombuffer(dr.read(sp.data_offset), dtype=np.uint8)
        want = np.frombuffer(sp.prefix, dtype=np.uint8)
        if not np.array_equal(head, want):
            off = _first_diff(want, head)
            raise Found(Difference(dname, None, off, "header bytes differ from the planned header"))
        for op in sp.ops:
            _verify_op(plan, sp, op, sr, dr, dname)
            counts[op.op.value] = counts.get(op.op.value, 0) + 1
            progress(op.src.nbytes)
        return dr.hexdigest()
    finally:
        sr.close()
        dr.close()


def _verify_op(plan, sp, op, sr: SeqReader, dr: SeqReader, dname: str) -> None:
    t = op.src
    base = sp.data_offset + (sp.out_offsets[op.out_name][0] if op.out_name else 0)
    if op.op is Op.COPY:
        done = 0
        while done < t.nbytes:
            a = np.frombuffer(sr.view(min(CHUNK, t.nbytes - done)), dtype=np.uint8)
            b = np.frombuffer(dr.take(len(a)), dtype=np.uint8)
            n = len(a)
            if not np.array_equal(a, b):
                raise Found(Difference(dname, op.out_name, base + done + _first_diff(a, b), "passthrough bytes differ from the source"))
            done += n
    elif op.op is Op.DROP:
        sr.skip(t.nbytes)
    elif op.op is Op.ZEROS:
        m = op.module
        src_z = np.frombuffer(sr.read(t.nbytes), dtype=np.uint32)
        out_z = np.frombuffer(dr.read(op.out_nbytes), dtype=np.uint8)
        if not np.array_equal(src_z, codec.sym_qzeros(t.shape[0], m.n, m.bits).view(np.uint32).reshape(-1)):
            raise Found(Difference(str(plan.ckpt.root / sp.name), t.name, None, "source zero points are not symmetric"))
        want = codec.sym_qzeros(t.shape[0], m.n, 4).view(np.uint8).reshape(-1)
        if not np.array_equal(out_z, want):
            raise Found(Difference(dname, op.out_name, base + _first_diff(want, out_z), "4-bit zero points are not symmetric 0x77777777"))
    elif op.op is Op.TRANSCODE:
        m = op.module
        row = m.n * 4
        per = codec.words_per_block(m.bits)
        rows = max(per, (CHUNK // row) // per * per)
        done = 0
        while done < t.shape[0]:
            a = np.frombuffer(sr.view(min(rows, t.shape[0] - done) * row, per * row), dtype=np.int32).reshape(-1, m.n)
            r = a.shape[0]
            r4 = r * 4 // per if m.bits == 3 else r * 32 // (m.bits * 8)
            b = np.frombuffer(dr.take(r4 * row), dtype=np.int32).reshape(r4, m.n)
            back, ok = codec.transcode_from4(b, m.bits)
            if not ok or not np.array_equal(back, a):
                expect = codec.transcode_to4(a, m.bits)
                off = base + done * 32 // m.bits * m.n // 8 * 4 + _first_diff(expect, b)
                why = "4-bit codes outside the source range" if not ok else f"codes minus {8 - (1 << (m.bits - 1))} differ from the source"
                raise Found(Difference(dname, op.out_name, off, why))
            done += r
    elif op.op is Op.DEQUANT:
        m = op.module
        qweight = np.frombuffer(sr.read(t.nbytes), dtype=np.int32).reshape(t.shape)
        qzeros = read_tensor(plan, m.qzeros)
        scales = to_float32(read_tensor(plan, m.scales), m.scales.info.dtype)
        cols = max(32, (CHUNK // (m.k * 4)) // 32 * 32)
        zw = lambda c: c * m.bits // 32  # noqa: E731
        for c0 in range(0, m.n, cols):
            c1 = min(m.n, c0 + cols)
            want = codec.dequantize(qweight[:, c0:c1], qzeros[:, zw(c0) : zw(c1)], scales[:, c0:c1], m.bits, m.group_size)
            have = np.frombuffer(dr.read(want.nbytes), dtype=np.float32).reshape(want.shape)
            if not np.array_equal(want.view(np.uint32), have.view(np.uint32)):
                raise Found(Difference(dname, op.out_name, base + c0 * m.k * 4 + _first_diff(want, have), "float weight differs from the exact dequantization"))
    else:  # pragma: no cover
        raise AssertionError(op.op)
