"""The conversion plan: every output tensor, shard header, size and file, computed from headers alone.

Each output shard has the source shard's name and holds the outputs of that shard's tensors in source
order. A plan is deterministic in (checkpoint headers, configs, options): ``convert`` executes it and
``verify`` recomputes it to check the output against.
"""

from __future__ import annotations

import copy
import os
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path

from repack import __version__, qconfig
from repack.checkpoint import (
    CONFIG_NAME, INDEX_NAME, QCONFIG_NAME, Checkpoint, QuantModule, module_override,
)
from repack.safetensors_io import DTYPE_SIZES, Header, TensorInfo, build_header

MANIFEST_NAME = "w3repack.json"
STATE_DIR = ".w3repack"
KV_B_SUFFIX = ".self_attn.kv_b_proj"
INDEXER_SUFFIXES = (".self_attn.indexer.wk", ".self_attn.indexer.weights_proj")
KV_B_PATTERN = ".*kv_b_proj.*"
INDEXER_PATTERN = r".*indexer\.(wk|weights_proj).*"


class Op(str, Enum):
    COPY = "copy"  # bytes unchanged
    TRANSCODE = "transcode"  # 2/3-bit qweight -> 4-bit qweight
    ZEROS = "zeros"  # symmetric qzeros -> symmetric 4-bit qzeros
    DEQUANT = "dequant"  # qweight -> exact float32 weight [N, K]
    DROP = "drop"  # read (and checked) but not emitted


@dataclass(frozen=True)
class Options:
    quant_method: str = "auto-round"
    kv_b_float: bool = True
    indexer_float: bool = True

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class TensorOp:
    op: Op
    src: TensorInfo
    module: QuantModule | None = None
    out_name: str | None = None
    out_dtype: str | None = None
    out_shape: tuple[int, ...] | None = None

    @property
    def out_nbytes(self) -> int:
        if self.out_dtype is None:
            return 0
        n = DTYPE_SIZES[self.out_dtype]
        for d in self.out_shape or ():
            n *= d
        return n


@dataclass
class ShardPlan:
    name: str
    src: Header
    ops: list[TensorOp]
    prefix: bytes
    out_offsets: dict[str, tuple[int, int]]

    @property
    def out_size(self) -> int:
        return len(self.prefix) + (max((e for _, e in self.out_offsets.values()), default=0))

    @property
    def src_size(self) -> int:
        return self.src.file_size

    @property
    def data_offset(self) -> int:
        return len(self.prefix)


@dataclass
class Plan:
    ckpt: Checkpoint
    options: Options
    shards: list[ShardPlan]
    config: dict
    quant_config_file: dict | None
    index: dict | None
    extra_files: list[str]
    skipped_files: list[str]
    module_classes: dict[str, str]
    float_modules: list[str] = field(default_factory=list)

    @property
    def out_shard_bytes(self) -> int:
        return sum(s.out_size for s in self.shards)

    @property
    def src_shard_bytes(self) -> int:
        return sum(s.src_size for s in self.shards)

    def extra_bytes(self) -> int:
        return sum(os.stat(self.ckpt.root / f).st_size for f in self.extra_files)

    def metadata_files(self) -> dict[str, bytes]:
        """Small JSON files written after the shards, in commit order (config.json last)."""
        out: dict[str, bytes] = {}
        if self.index is not None:
            out[INDEX_NAME] = dump_json(self.index)
        if self.quant_config_file is not None:
            out[QCONFIG_NAME] = dump_json(self.quant_config_file)
        out[CONFIG_NAME] = dump_json(self.config)
        return out

    def out_total_bytes(self) -> int:
        """Exact bytes the finished output occupies (shards, copied files, metadata; manifest estimated)."""
        meta = sum(len(b) for b in self.metadata_files().values())
        return self.out_shard_bytes + self.extra_bytes() + meta + 64 * 1024

    def counts(self) -> dict[str, int]:
        c: dict[str, int] = {}
        for cls in self.module_classes.values():
            c[cls] = c.get(cls, 0) + 1
        c["float tensors"] = len(self.ckpt.float_tensors())
        return dict(sorted(c.items()))

    def fingerprint(self) -> dict:
        """What identifies this conversion for resume: tool version, options and source file identities."""
        files = {}
        for s in self.shards:
            st = os.stat(self.ckpt.root / s.name)
            files[s.name] = [st.st_size, st.st_mtime_ns]
        return {"tool_version": __version__, "options": self.options.to_json(), "source_files": files}


def dump_json(obj: object) -> bytes:
    import json

    return (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def module_class(m: QuantModule, options: Options) -> str:
    if dequantized(m, options):
        return "dequantized to float32"
    if m.bits in qconfig.CONVERTED_BITS:
        return f"{m.bits}-bit -> 4-bit"
    return f"{m.bits}-bit passthrough"


def dequantized(m: QuantModule, options: Options) -> bool:
    if options.kv_b_float and m.prefix.endswith(KV_B_SUFFIX):
        return True
    return options.indexer_float and m.prefix.endswith(INDEXER_SUFFIXES)


def _tensor_op(t: TensorInfo, ckpt: Checkpoint, options: Options) -> TensorOp:
    m = ckpt.module_of(t.name)
    if m is None:
        return TensorOp(Op.COPY, t, None, t.name, t.dtype, t.shape)
    part = t.name.rpartition(".")[2]
    if dequantized(m, options):
        if part == "qweight":
            return TensorOp(Op.DEQUANT, t, m, m.prefix + ".weight", "F32", (m.n, m.k))
        if part == "bias":
            return TensorOp(Op.COPY, t, m, t.name, t.dtype, t.shape)
        return TensorOp(Op.DROP, t, m)
    if m.bits in qconfig.CONVERTED_BITS:
        if part == "qweight":
            return TensorOp(Op.TRANSCODE, t, m, t.name, "I32", (m.k // 8, m.n))
        if part == "qzeros":
            return TensorOp(Op.ZEROS, t, m, t.name, "I32", (t.shape[0], m.n // 8))
    return TensorOp(Op.COPY, t, m, t.name, t.dtype, t.shape)


def build_plan(ckpt: Checkpoint, options: Options) -> Plan:
    shards = []
    for name, h in ckpt.shards.items():
        ops = [_tensor_op(t, ckpt, options) for t in h.ordered()]
        emitted = [o for o in ops if o.out_name is not None]
        prefix, offs = build_header([(o.out_name, o.out_dtype, o.out_shape) for o in emitted], h.metadata)
        out_offsets = {o.out_name: (offs[i], offs[i + 1]) for i, o in enumerate(emitted)}
        shards.append(ShardPlan(name, h, ops, prefix, out_offsets))

    classes = {p: module_class(m, options) for p, m in ckpt.modules.items()}
    float_modules = sorted(p for p, m in ckpt.modules.items() if dequantized(m, options))
    patterns = []
    if any(p.endswith(KV_B_SUFFIX) for p in float_modules):
        patterns.append(KV_B_PATTERN)
    if any(p.endswith(INDEXER_SUFFIXES) for p in float_modules):
        patterns.append(INDEXER_PATTERN)
    style = options.quant_method
    new_qc = qconfig.rewrite(ckpt.quant_config, style, patterns, {})
    odd = {}
    for p, m in ckpt.modules.items():
        if p in float_modules:
            continue
        out_bits = 4 if m.bits in qconfig.CONVERTED_BITS else m.bits
        if style == "auto-round":
            declared = module_override(new_qc, p).get("bits", new_qc.get("bits"))
            if declared != out_bits:
                odd[p] = out_bits
        elif out_bits != 4:
            odd[p] = out_bits
    if odd:
        new_qc = qconfig.rewrite(ckpt.quant_config, style, patterns, odd)

    config = copy.deepcopy(ckpt.config)
    config["quantization_config"] = new_qc
    qfile = copy.deepcopy(new_qc) if ckpt.quant_config_file is not None else None

    index = None
    if ckpt.index is not None:
        index = copy.deepcopy(ckpt.index)
        meta = dict(index.get("metadata") or {})
        meta["total_size"] = sum(e - b for s in shards for b, e in s.out_offsets.values())
        index["metadata"] = meta
        wm = {}
        for s in shards:
            for o in s.ops:
                if o.out_name is not None:
                    wm[o.out_name] = s.name
        index["weight_map"] = dict(sorted(wm.items()))

    extra, skipped = _extra_files(ckpt)
    return Plan(ckpt, options, shards, config, qfile, index, extra, skipped, classes, float_modules)


def _extra_files(ckpt: Checkpoint) -> tuple[list[str], list[str]]:
    """Files copied unchanged: everything but shards, index, configs, our own files and hidden entries."""
    own = set(ckpt.shards) | {INDEX_NAME, CONFIG_NAME, QCONFIG_NAME, MANIFEST_NAME}
    extra, skipped = [], []
    for dirpath, dirnames, filenames in os.walk(ckpt.root, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for fn in sorted(filenames):
            if fn.startswith("."):
                continue
            rel = str(Path(dirpath, fn).relative_to(ckpt.root))
            if rel in own:
                continue
            if fn.endswith(".safetensors"):
                skipped.append(rel)
                continue
            extra.append(rel)
    return extra, skipped
