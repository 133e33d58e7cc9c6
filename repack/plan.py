"""The conversion plan: every output tensor, shard header, size and file, computed from headers alone.

Each output shard has the source shard's name and holds the outputs of that shard's tensors in source
order. A plan is deterministic in (checkpoint headers, configs, options): ``convert`` executes it and
``verify`` recomputes it to check the output against.
"""

from __future__ import annotations

import copy
import os
import stat
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
from repack.errors import FormatError, UserError
from repack.ops import Op, TensorOp, tensor_op
from repack.output import MANIFEST_NAME
from repack.safetensors_io import Header, TensorInfo, build_header

KV_B_SUFFIX = ".self_attn.kv_b_proj"
INDEXER_SUFFIXES = (".self_attn.indexer.wk", ".self_attn.indexer.weights_proj")
KV_B_PATTERN = ".*kv_b_proj.*"
INDEXER_PATTERN = r".*indexer\.(wk|weights_proj).*"
INDEXER_INFIX = ".self_attn.indexer."
# modules of a DeepSeek MTP layer that vLLM's deepseek_mtp builds unquantized (eh_proj: nn.Linear; embed_tokens:
# VocabParallelEmbedding without quant_config; shared_head.head: ParallelLMHead, unquantized under a GPTQ config)
MTP_FLOAT_PARTS = ("eh_proj", "shared_head.head", "embed_tokens")
TARGETS = ("repack", "native")
MAX_SOURCE_ENTRIES = 100_000
V32_ARCH, V3_ARCH = "DeepseekV32ForCausalLM", "DeepseekV3ForCausalLM"
DENSE_MEANING = (
    "DeepSeek-V3.2 config rewritten as DeepSeek-V3 (dense MLA attention) and the sparse-attention indexer left out: "
    "for a context of at most index_topk tokens the indexer selects every past token, so the computation is "
    "identical to the sparse model; beyond index_topk tokens every past token is attended to instead of the "
    "index_topk selected ones, an approximation of the original model"
)


@dataclass(frozen=True)
class Options:
    quant_method: str = "auto-round"
    kv_b_float: bool = True
    indexer_float: bool = True
    mtp_float: bool = True
    dense_attention: bool = False
    target: str = "repack"

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "Options":
        """Options of a manifest; keys it lacks take the behaviour of the versions that wrote none."""
        return cls(**{**LEGACY_OPTIONS, **d})


LEGACY_OPTIONS = {"mtp_float": False, "dense_attention": False, "target": "repack"}


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
    dropped: list[str] = field(default_factory=list)
    records: dict = field(default_factory=dict)

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
        dropped = set(self.dropped)
        c["float tensors"] = sum(t not in dropped for t in self.ckpt.float_tensors())
        if dropped:
            c["tensors left out"] = len(dropped)
        return dict(sorted(c.items()))


def dump_json(obj: object) -> bytes:
    import json

    return (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def module_class(m: QuantModule, options: Options, mtp: tuple[int, ...] = ()) -> str:
    if left_out(m.prefix + ".qweight", options):
        return "left out (dense attention)"
    if dequantized(m, options, mtp):
        return "dequantized to float32"
    if converted(m, options):
        return f"{m.bits}-bit -> 4-bit"
    return f"{m.bits}-bit passthrough"


def converted(m: QuantModule, options: Options) -> bool:
    """Transcoded to 4 bits: 2/3-bit modules, unless the target is the native (3-bit) engine path."""
    return options.target == "repack" and m.bits in qconfig.CONVERTED_BITS


def mtp_layers(config: dict) -> tuple[int, ...]:
    """Indices of DeepSeek MTP layers: ``num_hidden_layers .. + num_nextn_predict_layers``."""
    n, k = config.get("num_hidden_layers"), config.get("num_nextn_predict_layers")
    if not isinstance(n, int) or not isinstance(k, int) or isinstance(k, bool) or k <= 0:
        return ()
    return tuple(range(n, n + k))


def mtp_layer_of(prefix: str, mtp: tuple[int, ...]) -> int | None:
    parts = prefix.split(".")
    if len(parts) > 3 and parts[0] == "model" and parts[1] == "layers" and parts[2].isdigit() and int(parts[2]) in mtp:
        return int(parts[2])
    return None


def dequantized(m: QuantModule, options: Options, mtp: tuple[int, ...] = ()) -> bool:
    if options.kv_b_float and m.prefix.endswith(KV_B_SUFFIX):
        return True
    if options.mtp_float and mtp_layer_of(m.prefix, mtp) is not None and m.prefix.split(".", 3)[3] in MTP_FLOAT_PARTS:
        return True
    return options.indexer_float and m.prefix.endswith(INDEXER_SUFFIXES)


def left_out(tensor: str, options: Options) -> bool:
    """Not emitted at all: the V3.2 indexer under ``dense_attention``."""
    return options.dense_attention and INDEXER_INFIX in tensor


def choose_op(t: TensorInfo, m: QuantModule | None, options: Options, mtp: tuple[int, ...] = ()) -> Op:
    """The op for source tensor ``t`` of module ``m`` (None: a float tensor)."""
    if m is None:
        return Op.COPY
    part = t.name.rpartition(".")[2]
    if dequantized(m, options, mtp):
        return Op.DEQUANT if part == "qweight" else Op.COPY if part == "bias" else Op.DROP
    if converted(m, options) and part in ("qweight", "qzeros"):
        return Op.TRANSCODE if part == "qweight" else Op.ZEROS
    return Op.COPY


def _tensor_op(t: TensorInfo, ckpt: Checkpoint, options: Options, mtp: tuple[int, ...] = ()) -> TensorOp:
    if left_out(t.name, options):
        return tensor_op(Op.DROP, t, None)
    m = ckpt.module_of(t.name)
    return tensor_op(choose_op(t, m, options, mtp), t, m)


def build_plan(ckpt: Checkpoint, options: Options) -> Plan:
    """The plan; a config that makes planning fail in an unforeseen way is a FormatError naming config.json."""
    check_options(ckpt, options)
    try:
        return _build_plan(ckpt, options)
    except (TypeError, AttributeError, ValueError, KeyError, IndexError, ZeroDivisionError, RecursionError) as e:
        if isinstance(e, UserError):
            raise
        raise FormatError(f"{ckpt.root / CONFIG_NAME}: cannot be planned ({type(e).__name__}: {str(e)[:200]})") from e


def _build_plan(ckpt: Checkpoint, options: Options) -> Plan:
    mtp = mtp_layers(ckpt.config)
    shards = []
    emitted_by: dict[str, str] = {}
    for name, h in ckpt.shards.items():
        ops = [_tensor_op(t, ckpt, options, mtp) for t in h.ordered()]
        emitted = [e for e in (o.out_entry() for o in ops) if e is not None]
        for e in emitted:
            if e[0] in emitted_by:
                raise FormatError(f"{ckpt.root / name}: output tensor {e[0]} would be written twice (also from "
                                  f"{emitted_by[e[0]]}): a source tensor has the name of an emitted one; refused")
            emitted_by[e[0]] = name
        prefix, offs = build_header(emitted, h.metadata)
        out_offsets = {e[0]: (offs[i], offs[i + 1]) for i, e in enumerate(emitted)}
        shards.append(ShardPlan(name, h, ops, prefix, out_offsets))

    dropped = sorted(t for t in ckpt.tensor_shard if left_out(t, options))
    kept = {p: m for p, m in ckpt.modules.items() if not left_out(p + ".qweight", options)}
    classes = {p: module_class(m, options, mtp) for p, m in ckpt.modules.items()}
    float_modules = sorted(p for p, m in kept.items() if dequantized(m, options, mtp))
    patterns = []
    if any(p.endswith(KV_B_SUFFIX) for p in float_modules):
        patterns.append(KV_B_PATTERN)
    if any(p.endswith(INDEXER_SUFFIXES) for p in float_modules):
        patterns.append(INDEXER_PATTERN)
    mtp_float = {}
    for layer in mtp:
        parts = sorted(p.split(".", 3)[3] for p in float_modules if mtp_layer_of(p, mtp) == layer
                       and p.split(".", 3)[3] in MTP_FLOAT_PARTS)
        if parts:
            patterns.append(mtp_float_pattern(layer))
            mtp_float[layer] = parts
    style = options.quant_method
    base = 4 if options.target == "repack" else None
    base_bits = base or ckpt.quant_config.get("bits")
    mtp_bits, layer_widths = {}, {}
    for layer in mtp:
        widths = {out_bits(m, options) for p, m in kept.items() if p not in float_modules and mtp_layer_of(p, mtp) == layer}
        if len(widths) == 1:
            mtp_bits[layer] = widths.pop()
            if mtp_bits[layer] != base_bits:  # one rule for the layer: per-expert entries do not reach fused experts
                layer_widths[mtp_layer_pattern(layer)] = mtp_bits[layer]
    new_qc = qconfig.rewrite(ckpt.quant_config, style, patterns, {}, base, layer_widths)
    odd = {}
    for p, m in kept.items():
        if p in float_modules:
            continue
        if style == "auto-round" or options.target == "native":
            declared = module_override(new_qc, p, ckpt.root / CONFIG_NAME).get("bits", new_qc.get("bits"))
            if declared != out_bits(m, options):
                odd[p] = out_bits(m, options)
        elif out_bits(m, options) != 4:
            odd[p] = out_bits(m, options)
    if odd:
        new_qc = qconfig.rewrite(ckpt.quant_config, style, patterns, odd, base, layer_widths)

    config = copy.deepcopy(ckpt.config)
    records: dict = {"target": options.target, "mtp": None, "dense_attention": None}
    if mtp:
        records["mtp"] = {
            "layers": list(mtp),
            "float_modules": {str(k): v for k, v in mtp_float.items()},
            "bits": {str(k): mtp_bits.get(k) for k in mtp},
            "bytes": {str(k): sum(o.out_nbytes for sp in shards for o in sp.ops
                                  if o.out_name and mtp_layer_of(o.out_name, mtp) == k) for k in mtp},
        }
    if options.dense_attention:
        config, records["dense_attention"] = dense_config(config)
        records["dense_attention"]["dropped_tensors"] = len(dropped)
        records["dense_attention"]["dropped_bytes"] = sum(
            ckpt.shards[ckpt.tensor_shard[t]].tensors[t].nbytes for t in dropped)
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
    return Plan(ckpt, options, shards, config, qfile, index, extra, skipped, classes, float_modules, dropped, records)


def out_bits(m: QuantModule, options: Options) -> int:
    return 4 if converted(m, options) else m.bits


def mtp_float_pattern(layer: int) -> str:
    """Matches the checkpoint names and vLLM's names (``model.layers.L.head`` for the MTP head) of the float MTP modules."""
    return rf"model\.layers\.{layer}\.(eh_proj|shared_head\.head|head|embed_tokens)$"


def mtp_layer_pattern(layer: int) -> str:
    """Every module of MTP layer ``layer`` (vLLM's fused names too: ``mlp.experts``, ``fused_qkv_a_proj``)."""
    return rf"model\.layers\.{layer}\."


def check_options(ckpt: Checkpoint, options: Options) -> None:
    where = ckpt.root / CONFIG_NAME
    if options.target not in TARGETS:
        raise UserError(f"unknown target {options.target!r} (one of {', '.join(TARGETS)})")
    if options.target == "native" and options.quant_method != "auto-round":
        raise UserError("the native target keeps the source's auto-round config: --quant-method gptq writes a 4-bit "
                        "GPTQ config, which a 3-bit checkpoint cannot use")
    if options.dense_attention and not is_v32(ckpt.config):
        arch = (ckpt.config.get("architectures") or ["?"])[0]
        raise UserError(f"{where}: dense attention applies to DeepSeek-V3.2 checkpoints ({V32_ARCH} with index_topk); "
                        f"this one is {arch}")


def is_v32(config: dict) -> bool:
    return V32_ARCH in (config.get("architectures") or []) and isinstance(config.get("index_topk"), int)


def dense_config(config: dict) -> tuple[dict, dict]:
    """V3.2 config -> V3 config (architecture, model_type, no ``index_*`` keys) and the record of what changed."""
    out = copy.deepcopy(config)
    out["architectures"] = [V3_ARCH if a == V32_ARCH else a for a in config.get("architectures") or []]
    if config.get("model_type") == "deepseek_v32":
        out["model_type"] = "deepseek_v3"
    removed = {k: config[k] for k in config if k.startswith(("index_", "indexer_"))}
    for k in removed:
        del out[k]
    record = {
        "architectures": {"from": config.get("architectures"), "to": out["architectures"]},
        "model_type": {"from": config.get("model_type"), "to": out.get("model_type")},
        "removed_config_keys": removed,
        "index_topk": config["index_topk"],
        "exact_up_to_tokens": config["index_topk"],
        "meaning": DENSE_MEANING,
    }
    return out, record


def _extra_files(ckpt: Checkpoint) -> tuple[list[str], list[str]]:
    """Files copied unchanged: everything but shards, index, configs, our own files and hidden entries.

    Every copied file is a regular file whose real path lies inside the source (or, for a hub cache snapshot,
    in that repo's ``blobs``); a symlinked folder is followed only when it stays inside the source. A special
    file, a link out, an unreadable folder or a folder loop is refused, naming it.
    """
    root = ckpt.root
    real_root = Path(os.path.realpath(root))
    inside = [real_root]
    if root.parent.name == "snapshots":
        inside.append(Path(os.path.realpath(root.parent.parent / "blobs")))

    def contained(p: Path) -> bool:
        real = Path(os.path.realpath(p))
        return any(real == r or r in real.parents for r in inside)

    def refuse(e: OSError) -> None:
        raise UserError(f"{e.filename}: cannot read this folder of the source ({e.strerror or e}); refused")

    own = set(ckpt.shards) | {INDEX_NAME, CONFIG_NAME, QCONFIG_NAME, MANIFEST_NAME}
    extra, skipped = [], []
    entries = 0
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True, onerror=refuse):
        real_dir = Path(os.path.realpath(dirpath))
        for d in dirnames:
            link = Path(dirpath, d)
            if d.startswith(".") or not link.is_symlink():
                continue
            if not contained(link):
                raise UserError(f"{link}: a link to a folder outside the source ({os.path.realpath(link)}); refused")
            target = Path(os.path.realpath(link))
            if target == real_dir or target in real_dir.parents:
                raise UserError(f"{link}: a folder link that loops back into the source; refused")
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        entries += len(dirnames) + len(filenames)
        if entries > MAX_SOURCE_ENTRIES:
            raise UserError(f"{root}: more than {MAX_SOURCE_ENTRIES} files and folders (through folder links); refused")
        for fn in sorted(filenames):
            if fn.startswith("."):
                continue
            p = Path(dirpath, fn)
            rel = str(p.relative_to(root))
            if rel in own:
                continue
            if fn.endswith(".safetensors"):
                skipped.append(rel)
                continue
            if not contained(p):
                raise UserError(f"{p}: a link to a file outside the source ({os.path.realpath(p)}); refused")
            try:
                mode = os.stat(p).st_mode
            except OSError as e:
                raise UserError(f"{p}: cannot read this file of the source ({e.strerror or e}); refused") from e
            if not stat.S_ISREG(mode):
                raise UserError(f"{p}: not a regular file (a FIFO, socket or device); refused")
            extra.append(rel)
    return extra, skipped
