"""The conversion plan: every output tensor, shard header, size and file, computed from headers alone.

Each output shard has the source shard's name and holds the outputs of that shard's tensors in source
order. A plan is deterministic in (checkpoint headers, configs, options): ``convert`` executes it and
``verify`` recomputes it to check the output against.
"""

from __future__ import annotations

import copy
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from repack import qconfig
from repack.checkpoint import (
    CONFIG_NAME,
    INDEX_NAME,
    QCONFIG_NAME,
    Checkpoint,
    QuantModule,
    module_override,
)
from repack.ops import Op, TensorOp, tensor_op
from repack.output import MANIFEST_NAME
from repack.safetensors_io import Header, TensorInfo, build_header

KV_B_SUFFIX = ".self_attn.kv_b_proj"
INDEXER_SUFFIXES = (".self_attn.indexer.wk", ".self_attn.indexer.weights_proj")
KV_B_PATTERN = ".*kv_b_proj.*"
INDEXER_PATTERN = r".*indexer\.(wk|weights_proj).*"


@dataclass(frozen=True)
class Options:
    quant_method: str = "auto-round"
    kv_b_float: bool = True
    indexer_float: bool = True

    def to_json(self) -> dict:
        return asdict(self)


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

    def output_files(self) -> set[str]:
        """Every file the conversion writes outside ``.w3repack/`` but the manifest."""
        return {s.name for s in self.shards} | set(self.metadata_files()) | set(self.extra_files)

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


def choose_op(t: TensorInfo, m: QuantModule | None, options: Options) -> Op:
    """The op for source tensor ``t`` of module ``m`` (None: a float tensor)."""
    if m is None:
        return Op.COPY
    part = t.name.rpartition(".")[2]
    if dequantized(m, options):
        return Op.DEQUANT if part == "qweight" else Op.COPY if part == "bias" else Op.DROP
    if m.bits in qconfig.CONVERTED_BITS and part in ("qweight", "qzeros"):
        return Op.TRANSCODE if part == "qweight" else Op.ZEROS
    return Op.COPY


def _tensor_op(t: TensorInfo, ckpt: Checkpoint, options: Options) -> TensorOp:
    m = ckpt.module_of(t.name)
    return tensor_op(choose_op(t, m, options), t, m)


def build_plan(ckpt: Checkpoint, options: Options) -> Plan:
    shards = []
    for name, h in ckpt.shards.items():
        ops = [_tensor_op(t, ckpt, options) for t in h.ordered()]
        emitted = [e for e in (o.out_entry() for o in ops) if e is not None]
        prefix, offs = build_header(emitted, h.metadata)
        out_offsets = {e[0]: (offs[i], offs[i + 1]) for i, e in enumerate(emitted)}
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
