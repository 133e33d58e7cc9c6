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
import os
import stat
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from repack.checkpoint import INDEX_NAME, QCONFIG_NAME, open_checkpoint, parse_json
from repack.errors import UserError
from repack.ops import OPS, Difference, Found, Place, Progress, first_diff
from repack.output import MANIFEST_NAME, Manifest, ManifestError, ShardHashes
from repack.plan import Options, Plan, ShardPlan, build_plan, check_options
from repack.run import ProgressFactory, cores, effective_workers, no_progress
from repack.safetensors_io import read_header
from repack.stream import SeqReader, sha256_file

__all__ = ["Difference", "Found", "Report", "verify", "verify_shard"]


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


def _refused(path: Path, message: str) -> Report:
    return Report(False, [Difference(str(path), None, None, message)])


def verify(src: Path, dst: Path, workers: int | None = None, progress: ProgressFactory = no_progress) -> Report:
    """Compare DST with SRC re-planned under the options DST's manifest records; ``progress("verify", total)``."""
    t0 = time.monotonic()
    src, dst = Path(src), Path(dst)
    ckpt = open_checkpoint(src)
    if not dst.is_dir():
        raise UserError(f"{dst}: output directory not found")
    mpath = dst / MANIFEST_NAME
    try:
        manifest = Manifest.load(dst)
        if manifest is None:
            return _refused(mpath, "missing: the conversion is incomplete or DST is not a w3repack output")
        options = _options(manifest.options)
        check_options(ckpt, options)
    except (ManifestError, TypeError, UserError) as e:
        why = str(e).split("unreadable manifest ", 1)[-1] if isinstance(e, ManifestError) else f"({e})"
        return _refused(mpath, f"unreadable manifest {why}")
    plan = build_plan(ckpt, options)
    diffs = _check_metadata(plan, dst, manifest)
    counts: dict[str, int] = {}
    lock = threading.Lock()
    dst_sha: dict[str, str] = {}
    shard_diffs: dict[str, Difference] = {}
    src_diffs: dict[str, Difference] = {}
    shards = [s for s in plan.shards if (dst / s.name).is_file()]
    man_out = {f.name: f for f in manifest.output_shards}
    man_src = {f.name: f for f in manifest.source_files}
    n = effective_workers(workers, len(shards))

    with progress("verify", plan.src_shard_bytes) as advance:
        if hasattr(advance, "shards"):
            advance.shards = len(shards)

        def job(sp: ShardPlan) -> None:
            local: dict[str, int] = {}
            try:
                want_src = man_src[sp.name].sha256 if sp.name in man_src else None
                got = verify_shard(plan, sp, dst, local, advance, hashed=manifest.output_sha(sp.name) is not None,
                                   spread=n < cores(), hash_source=want_src is not None)
                if want_src is not None and got.source_sha256 != want_src:
                    with lock:
                        src_diffs[sp.name] = Difference(str(mpath), None, None,
                                                        f"sha256 recorded for source {sp.name} does not match the source")
                if got.sha256 is not None:
                    dst_sha[sp.name] = got.sha256
            except Found as f:
                shard_diffs[sp.name] = f.diff
            with lock:
                for k, v in local.items():
                    counts[k] = counts.get(k, 0) + v
            if hasattr(advance, "shard_done"):
                advance.shard_done(sp.name)

        with ThreadPoolExecutor(max_workers=n, thread_name_prefix="w3verify") as ex:
            list(ex.map(job, sorted(shards, key=lambda s: -s.src_size)))
    for sp in plan.shards:
        if sp.name in shard_diffs:
            diffs.append(shard_diffs[sp.name])
        elif sp.name in src_diffs:
            diffs.append(src_diffs[sp.name])
    for sp in plan.shards:
        rec = man_out.get(sp.name)
        if manifest.shard_hashes and (rec is None or rec.sha256 is None):
            diffs.append(Difference(str(mpath), None, None, f"no sha256 recorded for {sp.name}"))
        if sp.name in dst_sha and (rec is None or rec.sha256 != dst_sha[sp.name]):
            diffs.append(Difference(str(mpath), None, None, f"sha256 recorded for {sp.name} does not match the file"))
        src_rec = man_src.get(sp.name)
        if src_rec is None or src_rec.size != sp.src_size:
            diffs.append(Difference(str(mpath), None, None, f"source {sp.name} has changed size since conversion"))
    return Report(
        not diffs, diffs, dict(sorted(counts.items())), plan.src_shard_bytes, plan.out_shard_bytes, time.monotonic() - t0,
        len(dst_sha),
    )


def _options(obj: dict) -> Options:
    """A manifest's options, each of the type convert writes (TypeError otherwise)."""
    defaults = Options().to_json()
    for k, v in obj.items():
        if k not in defaults or type(v) is not type(defaults[k]):
            raise TypeError(f"option {str(k)[:40]}={json.dumps(v)[:40]} is not one convert writes")
    return Options.from_json(obj)


def _same(a: object, b: object) -> bool:
    """Equal as JSON, types included (``256`` is not ``256.0``, ``false`` is not ``0``)."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def _tree(dst: Path) -> tuple[set[str], list[str]]:
    """Regular files in DST (relative names) and everything else found there (links, special files), unfollowed."""
    files, odd = set(), []
    for dirpath, dirnames, filenames in os.walk(dst):
        rel = Path(dirpath).relative_to(dst)
        for d in list(dirnames):
            if os.path.islink(os.path.join(dirpath, d)):
                odd.append(str(rel / d))
                dirnames.remove(d)
        for fn in filenames:
            p = os.path.join(dirpath, fn)
            if os.path.islink(p) or not stat.S_ISREG(os.lstat(p).st_mode):
                odd.append(str(rel / fn))
            else:
                files.add(str(rel / fn))
        if not dirnames and not filenames and rel != Path("."):
            odd.append(str(rel) + "/")
    return files, sorted(odd)


def _check_metadata(plan: Plan, dst: Path, manifest: Manifest) -> list[Difference]:
    diffs = []
    expected_files = {s.name for s in plan.shards}
    files, odd = _tree(dst)
    present = {f for f in files if f.endswith(".safetensors")}
    for name in sorted(expected_files - present):
        diffs.append(Difference(str(dst / name), None, None, "output shard missing"))
    known = plan.output_files() | {MANIFEST_NAME}
    for name in sorted(files - known - (present - expected_files)) + odd:
        diffs.append(Difference(str(dst / name), None, None, "unexpected in output: convert does not write it"))
    for name in sorted(present - expected_files):
        diffs.append(Difference(str(dst / name), None, None, "unexpected shard in output"))
    for name, data in plan.metadata_files().items():
        p = dst / name
        if name not in files:
            if name not in odd:
                diffs.append(Difference(str(p), None, None, "missing"))
            continue
        raw = p.read_bytes()
        if raw == data:
            continue
        try:
            have = parse_json(raw, p, "file")
        except UserError as e:
            diffs.append(Difference(str(p), None, None, str(e).removeprefix(f"{p}: ")))
            continue
        want = json.loads(data)
        why = _json_diff(want, have) if not _same(want, have) else "bytes differ from what convert writes"
        diffs.append(Difference(str(p), None, None, why))
    diffs += _check_manifest(plan, dst, manifest)
    if plan.quant_config_file is None and (dst / QCONFIG_NAME).exists():
        diffs.append(Difference(str(dst / QCONFIG_NAME), None, None, "present in output but not in source"))
    if plan.index is None and (dst / INDEX_NAME).exists():
        diffs.append(Difference(str(dst / INDEX_NAME), None, None, "present in output but the source has no index"))
    if not manifest.complete:
        diffs.append(Difference(str(dst / MANIFEST_NAME), None, None, "manifest does not mark the conversion complete"))
    recorded = manifest.fingerprint.get("options")
    try:
        fp_options = Options.from_json(recorded) if isinstance(recorded, dict) else None
    except TypeError:
        fp_options = None
    if fp_options != plan.options:
        diffs.append(Difference(str(dst / MANIFEST_NAME), None, None, "manifest options are inconsistent"))
    if "target" in manifest.options:
        for key, want in plan.records.items():
            if manifest.records.get(key) != json.loads(json.dumps(want)):
                diffs.append(Difference(str(dst / MANIFEST_NAME), None, None, f"manifest record {key} is inconsistent"))
    copied = {c.name: c.sha256 for c in manifest.copied_files}
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


def _check_manifest(plan: Plan, dst: Path, man: Manifest) -> list[Difference]:
    """Every value in the manifest that follows from the plan, types included; its bytes as convert writes them."""
    mpath = dst / MANIFEST_NAME
    out = []
    raw = mpath.read_bytes() if mpath.is_file() and not mpath.is_symlink() else b""
    if raw != json.dumps(man.to_json(), indent=2).encode() + b"\n":
        out.append("bytes differ from what convert writes (a key or value it does not write)")
    want = {
        "counts": plan.counts(),
        "float_modules": plan.float_modules,
        "total_size": plan.out_shard_bytes,
        "output_shards": [[s.name, s.out_size] for s in plan.shards],
        "source_files": [[s.name, s.src_size] for s in plan.shards],
        "copied_files": list(plan.extra_files),
    }
    have = {
        "counts": man.counts,
        "float_modules": man.float_modules,
        "total_size": man.total_size,
        "output_shards": [[f.name, f.size] for f in man.output_shards],
        "source_files": [[f.name, f.size] for f in man.source_files],
        "copied_files": [f.name for f in man.copied_files],
    }
    for key in want:
        if not _same(want[key], have[key]):
            out.append(f"{key} is not what convert writes")
    if not _same({k: v for k, v in plan.options.to_json().items() if k in man.options}, man.options):
        out.append("options are not what convert writes")
    fp = man.fingerprint
    hub = fp.get("source_hub")
    fp_files = fp.get("source_files")
    want_fp = {s.name: s.src_size for s in plan.shards}
    if (set(fp) - {"source_hub"} != {"tool_version", "options", "source_files"} or fp.get("tool_version") != man.tool_version
            or not isinstance(fp_files, dict) or set(fp_files) != set(want_fp)
            or any(not isinstance(v, list) or not v or not all(type(x) is int for x in v) or v[0] != want_fp[k]
                   for k, v in fp_files.items())):
        out.append("fingerprint is not what convert writes")
    if (man.hub is None) != (hub is None) or (hub is not None and man.hub is not None and not _same(
            {k: man.hub.get(k) for k in ("repo", "commit")}, hub)):
        out.append("hub source does not match the fingerprint")
    if man.verify is not None and hub is None:
        out.append("holds a verify record that only a hub conversion writes")
    if set(man.records) - set(plan.records):
        out.append(f"holds keys convert does not write ({', '.join(sorted(set(man.records) - set(plan.records)))[:80]})")
    hashes = [f.sha256 for f in man.output_shards + man.source_files]
    if man.shard_hashes != all(isinstance(h, str) for h in hashes):
        out.append("shard_hashes does not match the hashes it records")
    if not all(isinstance(f.sha256, (str, type(None))) for f in man.output_shards + man.copied_files):
        out.append("a sha256 is not a string")
    return [Difference(str(mpath), None, None, f"manifest {m}") for m in out]


def _json_diff(want: object, have: object, path: str = "") -> str:
    if isinstance(want, dict) and isinstance(have, dict):
        for k in sorted(set(want) | set(have), key=str):
            if k not in have:
                return f"key {path}{k} missing"
            if k not in want:
                return f"unexpected key {path}{k}"
            if not _same(want[k], have[k]):
                return _json_diff(want[k], have[k], f"{path}{k}.")
    return f"value at {path.rstrip('.') or '(root)'} is {json.dumps(have)[:80]}, expected {json.dumps(want)[:80]}"


def verify_shard(plan: Plan, sp: ShardPlan, dst: Path, counts: dict, progress: Progress, hashed: bool = True,
                 spread: bool = False, hash_source: bool = False) -> ShardHashes:
    """Compare one output shard with its source; raises Found at the first difference. Returns the sha256 of
    the output shard (None unless ``hashed``; ``spread``: hashed on a thread of its own) and of the source
    shard (None unless ``hash_source``)."""
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
                raise Found(Difference(dname, name, None, f"header entry {t and (t.dtype, list(t.shape))} != expected {(dt, list(shape or ()))}"))
        raise Found(Difference(dname, None, None, f"size {h.file_size} != expected {sp.out_size}"))
    with SeqReader(plan.ckpt.root / sp.name, hashed=hash_source) as sr, SeqReader(dpath, hashed=hashed, hash_behind=spread) as dr:
        sr.read(sp.src.data_offset)
        head = np.frombuffer(dr.read(sp.data_offset), dtype=np.uint8)
        want = np.frombuffer(sp.prefix, dtype=np.uint8)
        if not np.array_equal(head, want):
            off = first_diff(want, head)
            raise Found(Difference(dname, None, off, "header bytes differ from the planned header"))
        src_name = str(plan.ckpt.root / sp.name)
        for op in sp.ops:
            base = sp.data_offset + (sp.out_offsets[op.out_name][0] if op.out_name else 0)
            OPS[op.op].verify(plan.ckpt, op, sr, dr, Place(dname, base, src_name))
            counts[op.op.value] = counts.get(op.op.value, 0) + 1
            progress(op.src.nbytes)
        src_sha = sr.hexdigest()
        return ShardHashes(dr.hexdigest(), src_sha)
