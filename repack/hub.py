"""Hub in, hub out: resolve ``org/name[@revision]``, plan from headers, fetch shards one at a time, push.

Sources go through huggingface_hub's cache (``HF_HOME``, ``HF_HUB_CACHE``, ``HF_TOKEN``, ``HF_ENDPOINT``,
``HF_HUB_OFFLINE`` are honoured as by every hub client). Configs and the index come first; shard headers
come from the cached file, a copy saved in ``DST/.w3repack/hub-headers``, or an HTTP range request, so the
plan and the free-space check exist before any shard arrives.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import struct
import threading
from dataclasses import dataclass, field, fields
from pathlib import Path

from repack import __version__
from repack.checkpoint import (
    CONFIG_NAME, INDEX_NAME, QCONFIG_NAME, SINGLE_NAME, Checkpoint, _collect_modules, check_packing, load_json,
)
from repack.errors import FormatError, UserError
from repack.plan import MANIFEST_NAME, STATE_DIR, Options, Plan, ShardPlan, build_plan
from repack.safetensors_io import MAX_HEADER, Header, _check_tiling, _parse_entry, read_header
from repack.stream import atomic_write

HEADERS_DIR = "hub-headers"
VERIFIED_DIR = "hub-verified"
WEIGHT_PATTERNS = ["*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.h5", "*.msgpack", "*.gguf", "*.onnx", "*.ot"]
UPLOAD_IGNORE = [".*", ".*/**", "**/.*", "**/.*/**", "README.md"]
_REPO_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")


def parse_repo_id(src: str) -> tuple[str, str | None] | None:
    """``(repo, revision)`` if ``src`` reads as ``org/name[@revision]`` and is not an existing local path."""
    if Path(src).expanduser().exists() or src.startswith((".", "/", "~")) or not _REPO_RE.match(src):
        return None
    repo, _, rev = src.partition("@")
    return repo, rev or None


@dataclass
class HubSource:
    repo: str
    revision: str | None
    commit: str
    root: Path
    index: dict | None
    shard_names: list[str]
    prefixes: dict[str, bytes] = field(default_factory=dict)

    @property
    def repo_cache(self) -> Path:
        return self.root.parent.parent

    def ref(self) -> dict:
        return {"repo": self.repo, "revision": self.revision or "main", "commit": self.commit}


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(getattr(constants, "HF_HUB_OFFLINE", False))


@contextlib.contextmanager
def hub_errors(what: str):
    """Turn huggingface_hub and network failures into one-line UserErrors."""
    from huggingface_hub import errors as he

    try:
        yield
    except UserError:
        raise
    except he.GatedRepoError as e:
        raise UserError(f"{what}: gated repository: accept its terms on the hub and set HF_TOKEN ({_first_line(e)})") from e
    except he.RepositoryNotFoundError as e:
        raise UserError(f"{what}: no such local folder, and no such hub repository (or it is private: set HF_TOKEN)") from e
    except he.RevisionNotFoundError as e:
        raise UserError(f"{what}: revision not found") from e
    except he.LocalEntryNotFoundError as e:
        hint = "HF_HUB_OFFLINE is set" if _offline() else "the hub could not be reached"
        raise UserError(f"{what}: no such local folder, not in the local hub cache, and {hint}") from e
    except he.EntryNotFoundError as e:
        raise UserError(f"{what}: no such file in the repository") from e
    except he.OfflineModeIsEnabled as e:
        raise UserError(f"{what}: needs the network but HF_HUB_OFFLINE is set") from e
    except he.HfHubHTTPError as e:
        raise UserError(f"{what}: {_first_line(e)}") from e
    except (ConnectionError, TimeoutError) as e:
        raise UserError(f"{what}: network error: {e}") from e
    except Exception as e:
        if type(e).__module__.split(".")[0] in ("httpx", "httpx2", "requests", "urllib3"):
            raise UserError(f"{what}: network error: {_first_line(e)}") from e
        raise


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _download(repo: str, filename: str, revision: str | None, local_only: bool = False) -> Path:
    from huggingface_hub import hf_hub_download

    with hub_errors(f"{repo}@{revision or 'main'}: {filename}"):
        return Path(hf_hub_download(repo, filename, revision=revision, local_files_only=local_only))


def snapshot_from_cache(src: str) -> Path:
    """The cached snapshot folder of ``org/name[@revision]`` (no download)."""
    parsed = parse_repo_id(src)
    if parsed is None:
        return Path(src)
    repo, rev = parsed
    try:
        return _download(repo, CONFIG_NAME, rev, local_only=True).parent
    except UserError as e:
        raise UserError(f"{src}: not a local folder and not in the hub cache; `w3repack convert {src} DST` fetches it") from e


def open_hub(src: str, revision: str | None = None) -> HubSource:
    """Fetch config, index and the small files of ``org/name[@revision]``; pin the commit. No shard is fetched."""
    _quiet_hub()
    parsed = parse_repo_id(src)
    if parsed is None:
        raise UserError(f"{src}: not a hub repo id (org/name[@revision])")
    repo, rev = parsed
    if revision and rev and revision != rev:
        raise UserError(f"{src}: --revision {revision} contradicts @{rev}")
    rev = revision or rev
    cfg = _download(repo, CONFIG_NAME, rev)
    root = cfg.parent
    commit = root.name
    index = None
    try:
        ipath = _download(repo, INDEX_NAME, commit)
    except UserError:
        if not (root / SINGLE_NAME).exists() and _offline():
            raise
        shard_names = [SINGLE_NAME]
    else:
        index = load_json(ipath, "index")
        shard_names = _index_shards(ipath, index)
    if not _offline():
        from huggingface_hub import snapshot_download

        with hub_errors(f"{repo}@{commit}"):
            snapshot_download(repo, revision=commit, ignore_patterns=WEIGHT_PATTERNS)
    return HubSource(repo, rev, commit, root, index, shard_names)


def _index_shards(ipath: Path, index: object) -> list[str]:
    if not isinstance(index, dict) or not isinstance(index.get("weight_map"), dict):
        raise FormatError(f"{ipath}: no weight_map object")
    if not isinstance(index.get("metadata", {}), (dict, type(None))):
        raise FormatError(f"{ipath}: metadata is {type(index['metadata']).__name__}, not an object")
    files: list[str] = []
    for t, s in index["weight_map"].items():
        if not isinstance(s, str) or not s or s.startswith("/") or ".." in Path(s).parts:
            raise FormatError(f"{ipath}: tensor {t}: shard name {s!r} is not a relative file name")
        if s not in files:
            files.append(s)
    return sorted(files)


def header_from_prefix(path: Path, prefix: bytes) -> Header:
    """Parse a shard header from its first ``8 + N`` bytes; the file size follows from the tiling."""
    if len(prefix) < 8:
        raise FormatError(f"{path}: truncated header")
    (n,) = struct.unpack("<Q", prefix[:8])
    if n > MAX_HEADER or len(prefix) != 8 + n:
        raise FormatError(f"{path}: header length {n} does not match the {len(prefix) - 8} bytes read")
    try:
        obj = json.loads(prefix[8:].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{path}: header is not valid JSON ({e})") from e
    if not isinstance(obj, dict):
        raise FormatError(f"{path}: header is not a JSON object")
    meta = obj.pop("__metadata__", None)
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise FormatError(f"{path}: __metadata__ must map strings to strings")
    tensors = {name: _parse_entry(path, name, spec, 1 << 62) for name, spec in obj.items()}
    data_size = max((t.end for t in tensors.values()), default=0)
    _check_tiling(path, tensors, data_size)
    return Header(path=path, data_offset=8 + n, tensors=tensors, metadata=meta, file_size=8 + n + data_size)


def _read_prefix(path: Path) -> bytes:
    with open(path, "rb") as f:
        head = f.read(8)
        (n,) = struct.unpack("<Q", head) if len(head) == 8 else (0,)
        return head + f.read(min(n, MAX_HEADER))


def _fetch_prefix(hs: HubSource, name: str) -> bytes:
    from huggingface_hub import constants, hf_hub_url
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    url = hf_hub_url(hs.repo, name, revision=hs.commit, endpoint=constants.ENDPOINT)
    headers = build_hf_headers()
    with hub_errors(f"{hs.repo}@{hs.commit}: {name} header"):
        r = get_session().get(url, headers={**headers, "range": "bytes=0-65535"}, timeout=30)
        hf_raise_for_status(r)
        data = bytes(r.content)
        if len(data) < 8:
            raise FormatError(f"{hs.repo}/{name}: shorter than a safetensors header")
        (n,) = struct.unpack("<Q", data[:8])
        if n > MAX_HEADER:
            raise FormatError(f"{hs.repo}/{name}: header length {n} exceeds {MAX_HEADER} bytes")
        if len(data) < 8 + n:
            r = get_session().get(url, headers={**headers, "range": f"bytes=8-{n + 7}"}, timeout=30)
            hf_raise_for_status(r)
            data = data[:8] + bytes(r.content)
        return data[: 8 + n]


def shard_headers(hs: HubSource, dst: Path) -> dict[str, Header]:
    """Every shard header: from the cached file, the copy saved in DST, or a range request."""
    out = {}
    saved = dst / STATE_DIR / HEADERS_DIR
    for name in hs.shard_names:
        local = hs.root / name
        if local.is_file():
            out[name] = read_header(local)
            hs.prefixes[name] = _read_prefix(local)
            continue
        if (saved / name).is_file():
            prefix = (saved / name).read_bytes()
        elif _offline():
            raise UserError(_missing_offline(hs, name, dst))
        else:
            prefix = _fetch_prefix(hs, name)
        out[name] = header_from_prefix(local, prefix)
        hs.prefixes[name] = prefix
    return out


def _finished_manifest(hs: HubSource, dst: Path) -> dict | None:
    """DST's manifest if DST is a finished conversion of this hub commit."""
    try:
        man = json.loads((dst / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return None
    if isinstance(man, dict) and man.get("complete") is True and (man.get("source") or {}).get("hub", {}).get("commit") == hs.commit:
        return man
    return None


def _missing_offline(hs: HubSource, name: str, dst: Path) -> str:
    if _finished_manifest(hs, dst) is not None:  # the same options were answered by _already_done
        return (f"{dst} is a finished conversion of {hs.repo}@{hs.commit} with other options, and the source shards "
                "are not in the cache (HF_HUB_OFFLINE is set): cannot convert again")
    return f"{hs.repo}@{hs.commit}: shard {name} is not in the hub cache and HF_HUB_OFFLINE is set: its header cannot be read"


def hub_checkpoint(hs: HubSource, headers: dict[str, Header]) -> Checkpoint:
    """``open_checkpoint`` for a snapshot whose shards may not be there yet."""
    root = hs.root
    config = load_json(root / CONFIG_NAME, "config.json")
    if not isinstance(config, dict):
        raise FormatError(f"{root / CONFIG_NAME}: not a JSON object")
    qfile = None
    if (root / QCONFIG_NAME).exists():
        qfile = load_json(root / QCONFIG_NAME, "quantization_config.json")
        if not isinstance(qfile, dict):
            raise FormatError(f"{root / QCONFIG_NAME}: not a JSON object")
    qc = config.get("quantization_config", qfile)
    if not isinstance(qc, dict):
        raise FormatError(f"{root / CONFIG_NAME}: no quantization_config: not a quantized checkpoint")
    check_packing(qc, root / CONFIG_NAME)
    warnings = []
    if qfile is not None and qfile != qc:
        warnings.append("quantization_config.json differs from config.json's quantization_config; config.json's copy is used")
    tensor_shard: dict[str, str] = {}
    for name, h in headers.items():
        for t in h.tensors:
            if t in tensor_shard:
                raise FormatError(f"{root / name}: tensor {t} is also in shard {tensor_shard[t]}")
            tensor_shard[t] = name
    if hs.index is not None:
        wm = hs.index["weight_map"]
        for t, s in wm.items():
            if tensor_shard.get(t) != s:
                raise FormatError(f"{root / INDEX_NAME}: tensor {t} is mapped to {s}, which does not hold it")
        for t, s in tensor_shard.items():
            if t not in wm:
                raise FormatError(f"{root / s}: tensor {t} is not listed in {INDEX_NAME}")
    modules = _collect_modules(root, qc, headers, tensor_shard)
    return Checkpoint(root, config, qc, qfile, hs.index, dict(headers), modules, tensor_shard, warnings)


@dataclass
class HubPlan(Plan):
    """A plan whose identity is the hub commit, not file times: shards come and go from the cache."""

    hub: dict = field(default_factory=dict)

    def fingerprint(self) -> dict:
        return {
            "tool_version": __version__,
            "options": self.options.to_json(),
            "source_hub": {"repo": self.hub.get("repo"), "commit": self.hub.get("commit")},
            "source_files": {s.name: [s.src_size] for s in self.shards},
        }


def hub_plan(hs: HubSource, dst: Path, options: Options) -> HubPlan:
    plan = build_plan(hub_checkpoint(hs, shard_headers(hs, dst)), options)
    return HubPlan(**{f.name: getattr(plan, f.name) for f in fields(Plan)}, hub=hs.ref())


def _finished_in_state(plan: Plan, dst: Path) -> set[str]:
    from repack.convert import load_state

    state = load_state(dst) or {}
    if state.get("fingerprint") != plan.fingerprint():
        return set()
    names = set(state.get("finished") or {}) or {s.get("name") for s in state.get("output_shards") or [] if isinstance(s, dict)}
    sizes = {s.name: s.out_size for s in plan.shards}
    return {n for n in names if n in sizes and (dst / n).is_file() and (dst / n).stat().st_size == sizes[n]}


def _probe(p: Path) -> Path:
    return p if p.exists() else next(q for q in p.resolve().parents if q.exists())


def check_hub_space(plan: Plan, hs: HubSource, dst: Path, delete: bool, workers: int) -> None:
    """Output plus the shards still to fetch (one per worker with ``delete``) must fit before any shard arrives."""
    done = _finished_in_state(plan, dst)
    todo = [s for s in plan.shards if s.name not in done]
    out_need = plan.out_total_bytes() - sum(s.out_size for s in plan.shards if s.name in done)
    missing = sorted((s.src_size for s in todo if not (hs.root / s.name).is_file()), reverse=True)
    cache_need = sum(missing[: max(1, workers)]) if delete else sum(missing)
    dst_probe, cache_probe = _probe(dst), _probe(hs.repo_cache)
    needs = [(dst_probe, out_need), (cache_probe, cache_need)]
    if os.stat(dst_probe).st_dev == os.stat(cache_probe).st_dev:
        needs = [(dst_probe, out_need + cache_need)]
    for probe, need in needs:
        free = shutil.disk_usage(probe).free
        if free < need:
            raise UserError(
                f"not enough free space on {probe}: needs {need:,} bytes ({need / 2**30:.2f} GiB: output "
                f"{out_need / 2**30:.2f} GiB, source shards to fetch {cache_need / 2**30:.2f} GiB), "
                f"{free:,} bytes ({free / 2**30:.2f} GiB) are free"
                + ("" if delete else "; --delete-source-shards keeps only the shards in flight")
            )


def delete_cached(hs: HubSource, name: str) -> int:
    """Remove a shard's blob (unless another snapshot links to it), then its snapshot link. Returns bytes freed.

    Blob first: a run killed in between leaves a dangling link, which the next run removes, never an orphan blob.
    """
    p = hs.root / name
    if not p.is_symlink() and not p.exists():
        return 0
    blob = Path(os.path.realpath(p)) if p.is_symlink() else None
    size = p.stat().st_size if p.exists() else 0
    freed = size
    if blob is not None:
        if blob.parent.name == "blobs" and blob.is_file() and not _linked_elsewhere(hs.repo_cache, blob, p):
            blob.unlink()
        else:
            freed = 0
    p.unlink()
    return freed


def _linked_elsewhere(repo_cache: Path, blob: Path, this: Path) -> bool:
    for dirpath, _, files in os.walk(repo_cache / "snapshots"):
        for fn in files:
            q = os.path.join(dirpath, fn)
            if fn == this.name and os.path.samefile(dirpath, this.parent):
                continue
            if os.path.islink(q) and os.path.realpath(q) == str(blob):
                return True
    return False


class ShardFetcher:
    """Convert hooks: fetch each source shard before it is read (one download at a time); afterwards save its
    header into DST and, with ``delete``, verify the output shard against it bit for bit, then drop it from the cache."""

    def __init__(self, hs: HubSource, dst: Path, delete: bool, plan: Plan | None = None):
        self.hs, self.dst, self.delete, self.plan = hs, dst, delete, plan
        self.lock = threading.Lock()

    def before(self, sp: ShardPlan) -> None:
        with self.lock:
            path = _download(self.hs.repo, sp.name, self.hs.commit)
        if path.stat().st_size != sp.src_size or _read_prefix(path) != self.hs.prefixes.get(sp.name):
            raise FormatError(f"{path}: fetched shard does not match the header it was planned from")

    def after(self, sp: ShardPlan) -> None:
        saved = self.dst / STATE_DIR / HEADERS_DIR / sp.name
        saved.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(saved, self.hs.prefixes[sp.name])
        if self.delete:
            if self.plan is not None:
                self._verify(sp)
            delete_cached(self.hs, sp.name)

    def _verify(self, sp: ShardPlan) -> None:
        """The full per-tensor round trip of ``w3repack verify`` for one shard, while its source still exists."""
        from repack.convert import load_state
        from repack.errors import Mismatch
        from repack.verify import Found, verify_shard

        counts: dict[str, int] = {}
        recorded = ((load_state(self.dst) or {}).get("finished") or {}).get(sp.name, {}).get("sha256")
        try:
            sha = verify_shard(self.plan, sp, self.dst, counts, lambda n: None, hashed=recorded is not None)
        except Found as f:
            raise Mismatch(f"{f.diff.line()} (the cached source shard is kept)") from None
        if recorded is not None and recorded != sha:
            raise Mismatch(f"{self.dst / sp.name}: sha256 differs from the one recorded while writing it")
        rec = {"tensors_checked": counts, "sha256_checked": recorded is not None}
        atomic_write(self.dst / STATE_DIR / VERIFIED_DIR / sp.name, json.dumps(rec).encode())

    def finish_manifest(self, manifest: dict) -> None:
        """Name the hub source; with ``delete``, sum the per-shard verifications (kept across resumed runs).

        A shard kept from a run killed between finishing and verifying it is verified here, its source still cached.
        """
        manifest.setdefault("source", {})["hub"] = self.hs.ref()
        if not self.delete or self.plan is None:
            return
        tensors: dict[str, int] = {}
        shards = hashed = 0
        for sp in self.plan.shards:
            if not (self.dst / STATE_DIR / VERIFIED_DIR / sp.name).exists() and (self.hs.root / sp.name).is_file():
                self._verify(sp)
            try:
                rec = json.loads((self.dst / STATE_DIR / VERIFIED_DIR / sp.name).read_text())
            except (OSError, ValueError):
                continue
            shards += 1
            hashed += bool(rec.get("sha256_checked"))
            for k, v in (rec.get("tensors_checked") or {}).items():
                tensors[k] = tensors.get(k, 0) + int(v)
        manifest["verify"] = {
            "ok": True, "scope": "each output shard against its source shard, before the source shard was deleted",
            "shards": shards, "of_shards": len(self.plan.shards), "tensors_checked": dict(sorted(tensors.items())),
            "shard_hashes_checked": hashed,
        }


def convert_hub(src: str, dst: Path, options: Options, workers=None, overwrite=False, delete_source_shards=False,
                revision=None, progress=None, hashes=True):
    """Plan from configs and headers, check space, then fetch and convert shard by shard.

    ``progress(total)`` is a context manager yielding a byte-progress callback."""
    from repack.convert import convert, default_workers

    _quiet_hub()
    hs = open_hub(src, revision)
    _already_done(hs, dst, options)
    plan = hub_plan(hs, dst, options)
    if workers is None:
        workers = 1 if delete_source_shards else default_workers()
    check_hub_space(plan, hs, dst, delete_source_shards, workers)
    remove_stale_downloads(hs)
    fetcher = ShardFetcher(hs, dst, delete_source_shards, plan)
    with (progress or (lambda total: contextlib.nullcontext(None)))(plan.src_shard_bytes) as adv:
        res = convert(hs.root, dst, options, workers=workers, overwrite=overwrite, progress=adv, plan=plan,
                      before_shard=fetcher.before, after_shard=fetcher.after, hashes=hashes,
                      finish_manifest=fetcher.finish_manifest)
    if delete_source_shards:
        for sp in plan.shards:
            delete_cached(hs, sp.name)
    return res


def _quiet_hub() -> None:
    """No progress bars or retry chatter from huggingface_hub: the CLI prints one line per outcome."""
    from huggingface_hub.utils import disable_progress_bars, logging

    disable_progress_bars()
    logging.set_verbosity_error()


def remove_stale_downloads(hs: HubSource, older_than_s: float = 60.0) -> int:
    """Delete this repo's ``blobs/*.incomplete`` files untouched for ``older_than_s``: left by a killed run.

    huggingface_hub downloads into a per-process temporary file and cannot resume it, so a shard cut off
    mid-download is fetched again from its start; finished shards are never fetched again.
    """
    import time

    freed = 0
    for p in (hs.repo_cache / "blobs").glob("*.incomplete"):
        with contextlib.suppress(OSError):
            st = p.stat()
            if time.time() - st.st_mtime > older_than_s:
                p.unlink()
                freed += st.st_size
    return freed


def _already_done(hs: HubSource, dst: Path, options: Options) -> None:
    """Offline, with the source shards deleted, a finished conversion cannot be re-planned: say it is done."""
    from repack.errors import NothingToDo

    if not _offline() or all((hs.root / n).is_file() for n in hs.shard_names):
        return
    man = _finished_manifest(hs, dst)
    if man is not None and man.get("options") == options.to_json():
        raise NothingToDo(f"{dst} is already a finished conversion of {hs.repo}@{hs.commit} with these options; nothing to do")


@dataclass
class UploadOp:
    path_in_repo: str
    local: Path | None
    size: int


def upload_ops(dst: Path, card_text: str) -> list[UploadOp]:
    """What a push uploads: every visible file of DST (README.md replaced by the generated card)."""
    from huggingface_hub.utils import filter_repo_objects

    files = {p.relative_to(dst).as_posix(): p for p in sorted(dst.rglob("*")) if p.is_file()}
    keep = filter_repo_objects(list(files), ignore_patterns=UPLOAD_IGNORE)
    ops = [UploadOp(rel, files[rel], files[rel].stat().st_size) for rel in keep]
    ops.append(UploadOp("README.md", None, len(card_text.encode())))
    return ops


def check_output(dst: Path) -> dict:
    mpath = dst / MANIFEST_NAME
    try:
        man = json.loads(mpath.read_text())
    except FileNotFoundError as e:
        raise UserError(f"{dst}: no {MANIFEST_NAME}: not a finished w3repack output") from e
    except (OSError, ValueError) as e:
        raise UserError(f"{mpath}: unreadable manifest ({e})") from e
    if not isinstance(man, dict) or man.get("complete") is not True:
        raise UserError(f"{mpath}: the conversion is not complete; run convert again to finish it")
    return man


def push(dst: Path, repo_id: str, private: bool = False, dry_run: bool = False, verify_report: dict | None = None) -> dict:
    """Upload DST to ``repo_id`` with a generated model card. ``dry_run`` builds the card and file list only."""
    from repack import card

    dst = Path(dst)
    if parse_repo_id(repo_id) is None and not _REPO_RE.match(repo_id):
        raise UserError(f"{repo_id}: not a hub repo id (org/name)")
    check_output(dst)
    text = card.build_card(dst, repo_id, verify_report=verify_report)
    ops = upload_ops(dst, text)
    summary = {"repo": repo_id, "private": private, "dry_run": dry_run, "card": text,
               "files": [{"path": o.path_in_repo, "bytes": o.size, "generated": o.local is None} for o in ops],
               "bytes": sum(o.size for o in ops)}
    if dry_run:
        return summary
    from huggingface_hub import HfApi

    api = HfApi()
    with hub_errors(f"push to {repo_id}"):
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        large = getattr(api, "upload_large_folder", None)
        if large is not None:
            large(repo_id=repo_id, folder_path=str(dst), repo_type="model", ignore_patterns=UPLOAD_IGNORE)
        else:
            api.upload_folder(repo_id=repo_id, folder_path=str(dst), repo_type="model", ignore_patterns=UPLOAD_IGNORE,
                              commit_message="Upload w3repack 4-bit GPTQ repack")
        info = api.upload_file(path_or_fileobj=text.encode(), path_in_repo="README.md", repo_id=repo_id,
                               repo_type="model", commit_message="Model card (w3repack)")
    summary["url"] = str(getattr(info, "commit_url", "") or f"https://huggingface.co/{repo_id}")
    return summary
