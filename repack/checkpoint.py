"""Checkpoint model: config, quantization config, index, shard headers and per-module bit widths.

Only headers and JSON are read here. A quantized module ``P`` owns ``P.qweight`` (int32 ``[K*b/32, N]``),
``P.qzeros`` (int32 ``[K/g, N*b/32]``), ``P.scales`` (float ``[K/g, N]``) and optionally ``P.g_idx``
(int32 ``[K]``) and ``P.bias``. Its width ``b`` comes from the shapes (``32 * qzeros.shape[1] /
scales.shape[1]``), never from the config: real exports mix widths under one ``bits`` value.
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from repack import codec, safe_regex
from repack.errors import FormatError, UserError
from repack.safetensors_io import FLOAT_DTYPES, Header, TensorInfo, read_header

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
QCONFIG_NAME = "quantization_config.json"
MODULE_PARTS = ("qweight", "qzeros", "scales", "g_idx", "bias")
AUTOROUND_METHODS = ("auto-round", "intel/auto-round", "auto_round")


@dataclass(frozen=True)
class Loc:
    """Where a tensor lives: shard file name (relative to the checkpoint root) and its header entry."""

    shard: str
    info: TensorInfo


@dataclass
class QuantModule:
    prefix: str
    bits: int
    group_size: int
    k: int
    n: int
    qweight: Loc
    qzeros: Loc
    scales: Loc
    g_idx: Loc | None = None
    bias: Loc | None = None

    def parts(self) -> dict[str, Loc]:
        out = {"qweight": self.qweight, "qzeros": self.qzeros, "scales": self.scales}
        if self.g_idx:
            out["g_idx"] = self.g_idx
        if self.bias:
            out["bias"] = self.bias
        return out


@dataclass
class Checkpoint:
    root: Path
    config: dict
    quant_config: dict
    quant_config_file: dict | None
    index: dict | None
    shards: dict[str, Header]
    modules: dict[str, QuantModule]
    tensor_shard: dict[str, str]
    warnings: list[str] = field(default_factory=list)

    def module_of(self, tensor: str) -> QuantModule | None:
        prefix, _, part = tensor.rpartition(".")
        m = self.modules.get(prefix)
        return m if m is not None and part in MODULE_PARTS else None

    def float_tensors(self) -> list[str]:
        return [t for t in self.tensor_shard if self.module_of(t) is None]


MAX_JSON_BYTES = 256 << 20


def read_bounded(path: Path, limit: int, follow: bool = True) -> bytes:
    """A regular file's bytes, at most ``limit`` of them; never blocks on a FIFO, never reads a device.

    ``follow=False``: a symlink at ``path`` itself is refused (ELOOP). OSError for what cannot be read.
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW)
    fd = os.open(path, flags)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise FormatError(f"{path}: not a regular file (a FIFO, device or folder); refused")
        if st.st_size > limit:
            raise FormatError(f"{path}: {st.st_size} bytes, more than the {limit} bytes allowed")
        chunks: list[bytes] = []
        total = 0
        while True:
            b = os.read(fd, min(1 << 20, limit + 1 - total))
            if not b:
                return b"".join(chunks)
            chunks.append(b)
            total += len(b)
            if total > limit:
                raise FormatError(f"{path}: more than the {limit} bytes allowed")
    finally:
        os.close(fd)


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    out: dict = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not a JSON number")


def parse_json(data: bytes | str, path: Path, what: str) -> object:
    """Strict JSON: UTF-8, no duplicate keys, no NaN or Infinity, bounded nesting; a FormatError naming ``path``
    otherwise."""
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
        return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError) as e:
        raise FormatError(f"{path}: {what} is not valid JSON ({e})") from e
    except RecursionError as e:
        raise FormatError(f"{path}: {what} is nested too deeply") from e


def load_json(path: Path, what: str) -> object:
    try:
        data = read_bounded(path, MAX_JSON_BYTES)
    except FileNotFoundError as e:
        raise FormatError(f"{path}: {what} not found") from e
    except OSError as e:
        raise FormatError(f"{path}: cannot read {what}: {e.strerror or e}") from e
    return parse_json(data, path, what)


def module_override(quant_config: dict, prefix: str, where: Path | str = CONFIG_NAME) -> dict:
    """The ``extra_config`` entry that applies to module ``prefix`` (exact name first, then regex search).

    Keys are searched in bounded time (:mod:`repack.safe_regex`); one that cannot be is refused, naming ``where``.
    """
    extra = quant_config.get("extra_config") or {}
    if not isinstance(extra, dict):
        return {}
    if isinstance(extra.get(prefix), dict):
        return extra[prefix]
    for key, val in extra.items():
        if not isinstance(val, dict):
            continue
        try:
            if safe_regex.search(key, prefix):
                return val
        except safe_regex.InvalidPattern:
            continue
        except safe_regex.UnsafePattern as e:
            raise FormatError(f"{where}: extra_config key {key[:80]!r}: {e}; refused") from None
    return {}


def check_packing(qc: dict, path: Path) -> None:
    """Accept only the AutoGPTQ bit layout (AutoRound ``auto_round:auto_gptq`` or GPTQ v1); refuse the rest."""
    method = str(qc.get("quant_method", "")).lower()
    if method in AUTOROUND_METHODS:
        fmt = str(qc.get("packing_format") or qc.get("backend") or "auto_round:auto_gptq")
        if "gptq" not in fmt or "gptqmodel" in fmt or fmt.endswith("gptq_p"):
            raise UserError(
                f"{path}: packing_format {fmt!r} is not the AutoGPTQ layout (auto_round:auto_gptq); w3repack reads only that layout"
            )
    elif method == "gptq":
        fmt = str(qc.get("checkpoint_format") or "gptq")
        if fmt != "gptq":
            raise UserError(f"{path}: GPTQ checkpoint_format {fmt!r} is not supported (only 'gptq', zero points stored minus one)")
        if qc.get("desc_act"):
            raise UserError(f"{path}: desc_act (act-order) checkpoints are not supported: Marlin rejects desc_act with groups")
    else:
        raise UserError(f"{path}: quant_method {qc.get('quant_method')!r} is not auto-round or gptq")
    if qc.get("sym") is False:
        raise UserError(
            f"{path}: sym is false: asymmetric zero points cannot be served by vLLM's Marlin kernels (symmetric 4/8-bit only)"
        )


def open_checkpoint(root: str | Path, headers: Mapping[str, Header] | None = None) -> Checkpoint:
    """Read config, index and every shard header of a checkpoint folder; validate structure.

    ``headers``: the shard headers, read elsewhere (a hub snapshot whose shards are not fetched yet); they
    must cover exactly the shards the index names. Without, each shard's header is read from ``root``.
    """
    root = Path(root)
    if not root.exists():
        raise UserError(f"{root}: source not found")
    if not root.is_dir():
        raise UserError(f"{root}: source is not a directory")
    config = load_json(root / CONFIG_NAME, "config.json")
    if not isinstance(config, dict):
        raise FormatError(f"{root / CONFIG_NAME}: not a JSON object")
    qfile: dict | None = None
    if (root / QCONFIG_NAME).exists():
        qobj = load_json(root / QCONFIG_NAME, "quantization_config.json")
        if not isinstance(qobj, dict):
            raise FormatError(f"{root / QCONFIG_NAME}: not a JSON object")
        qfile = qobj
    qc = config.get("quantization_config", qfile)
    if not isinstance(qc, dict):
        raise FormatError(f"{root / CONFIG_NAME}: no quantization_config: not a quantized checkpoint")
    check_packing(qc, root / CONFIG_NAME)
    warnings = []
    if qfile is not None and qfile != qc:
        warnings.append("quantization_config.json differs from config.json's quantization_config; config.json's copy is used")

    index, shard_files = read_index(root, files_present=headers is None)
    if headers is not None and sorted(headers) != shard_files:
        raise FormatError(f"{root}: headers read for shards {sorted(headers)}, the checkpoint has {shard_files}")
    shards: dict[str, Header] = {}
    tensor_shard: dict[str, str] = {}
    for name in shard_files:
        h = headers[name] if headers is not None else read_header(root / name)
        shards[name] = h
        for t in h.tensors:
            if t in tensor_shard:
                raise FormatError(f"{root / name}: tensor {t} is also in shard {tensor_shard[t]}")
            tensor_shard[t] = name
    if index is not None:
        wm = index["weight_map"]
        for t, s in wm.items():
            if t not in tensor_shard:
                raise FormatError(f"{root / INDEX_NAME}: tensor {t} is mapped to {s}, which does not hold it")
            if tensor_shard[t] != s:
                raise FormatError(f"{root / INDEX_NAME}: tensor {t} is mapped to {s} but stored in {tensor_shard[t]}")
        for t, s in tensor_shard.items():
            if t not in wm:
                raise FormatError(f"{root / s}: tensor {t} is not listed in {INDEX_NAME}")
    modules = _collect_modules(root, qc, shards, tensor_shard)
    return Checkpoint(root, config, qc, qfile, index, shards, modules, tensor_shard, warnings)


def read_index(root: Path, files_present: bool = True) -> tuple[dict | None, list[str]]:
    """The index (None for a single ``model.safetensors``) and the sorted shard names it lists.

    ``files_present``: every shard must exist under ``root`` (a local folder, not a hub snapshot being fetched).
    """
    ipath = root / INDEX_NAME
    if not ipath.exists():
        if (root / SINGLE_NAME).exists() or not files_present:
            return None, [SINGLE_NAME]
        raise UserError(f"{root}: neither {INDEX_NAME} nor {SINGLE_NAME} found: not a safetensors checkpoint")
    index = load_json(ipath, "index")
    if not isinstance(index, dict) or not isinstance(index.get("weight_map"), dict):
        raise FormatError(f"{ipath}: no weight_map object")
    if not isinstance(index.get("metadata", {}), (dict, type(None))):
        raise FormatError(f"{ipath}: metadata is {type(index['metadata']).__name__}, not an object")
    files: set[str] = set()
    for t, s in index["weight_map"].items():
        if not isinstance(s, str) or s not in files:
            why = shard_name_problem(s)
            if why:
                raise FormatError(f"{ipath}: tensor {str(t)[:200]}: shard name {str(s)[:200]!r} {why}")
            files.add(s)
    for s in sorted(files) if files_present else ():
        if not (root / s).is_file():
            raise FormatError(f"{ipath}: names shard {s}, which is missing or not a regular file")
    return index, sorted(files)


def shard_name_problem(s: object) -> str | None:
    """Why ``s`` cannot be a shard name (None: it can): a normalized relative path of visible parts ending in
    ``.safetensors``, so it never names the manifest, a config, the state folder or a temporary file."""
    if not isinstance(s, str) or not s:
        return "is not a file name"
    if s.startswith("/") or "\\" in s or "\0" in s or not s.isprintable():
        return "is not a plain relative file name"
    parts = s.split("/")
    if any(p in ("", ".", "..") for p in parts):
        return "is not a normalized relative path"
    if any(p.startswith(".") for p in parts):
        return "has a hidden part (reserved for w3repack's own files)"
    if not s.endswith(".safetensors"):
        return "does not end in .safetensors"
    return None


def _collect_modules(root: Path, qc: dict, shards: dict[str, Header], tensor_shard: dict[str, str]) -> dict[str, QuantModule]:
    groups: dict[str, dict[str, Loc]] = {}
    for t, s in tensor_shard.items():
        prefix, _, part = t.rpartition(".")
        if part in ("qweight", "qzeros", "scales", "g_idx"):
            groups.setdefault(prefix, {})[part] = Loc(s, shards[s].tensors[t])
    modules = {}
    for prefix, parts in groups.items():
        for need in ("qweight", "qzeros", "scales"):
            if need not in parts:
                have = ", ".join(sorted(parts))
                first = parts[sorted(parts)[0]].shard
                raise FormatError(f"{root / first}: module {prefix}: has {have} but no {need} (no shard holds {prefix}.{need})")
        bias_name = prefix + ".bias"
        bias = Loc(tensor_shard[bias_name], shards[tensor_shard[bias_name]].tensors[bias_name]) if bias_name in tensor_shard else None
        modules[prefix] = _module(root, prefix, parts, bias, qc)
    return modules


def _module(root: Path, prefix: str, parts: dict[str, Loc], bias: Loc | None, qc: dict) -> QuantModule:
    def at(part: str) -> str:
        return f"{root / parts[part].shard}: tensor {parts[part].info.name}"

    qw, qz, sc = parts["qweight"].info, parts["qzeros"].info, parts["scales"].info
    gi = parts["g_idx"].info if "g_idx" in parts else None
    for part, t, ok in (("qweight", qw, ("I32",)), ("qzeros", qz, ("I32",)), ("scales", sc, FLOAT_DTYPES), ("g_idx", gi, ("I32", "I64"))):
        if t is not None and t.dtype not in ok:
            raise FormatError(f"{at(part)}: dtype {t.dtype}, expected {' or '.join(ok)}")
    for part, t in (("qweight", qw), ("qzeros", qz), ("scales", sc)):
        if len(t.shape) != 2:
            raise FormatError(f"{at(part)}: shape {list(t.shape)}, expected 2 dimensions")
    n = sc.shape[1]
    if qw.shape[1] != n:
        raise FormatError(f"{at('scales')}: scales has {n} columns but qweight {list(qw.shape)} has {qw.shape[1]}")
    if n == 0 or (32 * qz.shape[1]) % n:
        raise FormatError(f"{at('qzeros')}: qzeros {list(qz.shape)} and scales {list(sc.shape)} imply no whole bit width")
    bits = 32 * qz.shape[1] // n
    if bits not in codec.SUPPORTED_BITS:
        raise FormatError(
            f"{at('qzeros')}: qzeros {list(qz.shape)} and scales {list(sc.shape)} give {bits}-bit weights: "
            "not supported (only 2, 3, 4 and 8)"
        )
    if qz.shape[0] != sc.shape[0]:
        raise FormatError(f"{at('qzeros')}: qzeros has {qz.shape[0]} groups but scales has {sc.shape[0]}")
    if bits == 3 and (qw.shape[0] % 3 or n % 32):
        raise FormatError(f"{at('qweight')}: 3-bit qweight {list(qw.shape)} is not made of whole 3-word blocks (N must divide by 32)")
    k = qw.shape[0] * 32 // bits
    groups = sc.shape[0]
    if groups == 0 or k % groups:
        raise FormatError(f"{at('scales')}: K={k} (from qweight {list(qw.shape)}) does not split into {groups} groups")
    group = k // groups
    if gi is not None and gi.shape != (k,):
        raise FormatError(f"{at('g_idx')}: g_idx shape {list(gi.shape)} does not match K={k}")
    want = module_override(qc, prefix, root / CONFIG_NAME).get("group_size", qc.get("group_size"))
    if isinstance(want, int) and want not in (-1, 0) and want != group:
        raise FormatError(f"{at('scales')}: shapes give group size {group} (K={k}, {groups} groups) but the config says {want}")
    if isinstance(want, int) and want == -1 and groups != 1:
        raise FormatError(f"{at('scales')}: config group_size -1 but scales has {groups} groups")
    return QuantModule(prefix, bits, group, k, n, parts["qweight"], parts["qzeros"], parts["scales"], parts.get("g_idx"), bias)
