"""What ``inspect`` reports about a checkpoint and the conversion it would get (headers only)."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field

from repack.checkpoint import Checkpoint
from repack.plan import Plan
from repack.qconfig import CONVERTED_BITS


@dataclass(frozen=True)
class ConvertPreview:
    options: dict
    module_classes: dict[str, int]
    float_modules: int
    output_shard_bytes: int
    output_total_bytes: int
    growth: float
    copied_files: list[str]
    skipped_files: list[str]


@dataclass(frozen=True)
class InspectReport:
    """Widths and group sizes come from tensor shapes; ``modules_not_at_config_bits`` counts where they differ
    from the config's ``bits``."""

    path: str
    architecture: str | None
    model_type: str | None
    quantization_config: dict
    config_bits: int | None
    symmetric: bool
    module_widths: dict[str, int]
    modules_not_at_config_bits: int
    modules_not_at_config_bits_examples: list[str]
    group_sizes: dict[str, int]
    quantized_modules: int
    float_tensors: int
    shards: int
    shard_bytes: int
    index: bool
    convert: ConvertPreview
    warnings: list[str] = field(default_factory=list)

    needs_conversion: bool = True

    def to_json(self) -> dict:
        """Stable snake_case keys (``module_classes`` keys too: ``3_bit_to_4_bit``, ``4_bit_passthrough``, ...)."""
        from repack.ui import snake_keys

        d = asdict(self)
        d["convert"]["module_classes"] = snake_keys(d["convert"]["module_classes"])
        return d


def inspect_report(ckpt: Checkpoint, plan: Plan, label: str | None = None) -> InspectReport:
    qc = ckpt.quant_config
    widths = Counter(m.bits for m in ckpt.modules.values())
    groups = Counter(m.group_size for m in ckpt.modules.values())
    mismatched = sorted(p for p, m in ckpt.modules.items() if m.bits != qc.get("bits"))
    return InspectReport(
        path=label or str(ckpt.root),
        architecture=(ckpt.config.get("architectures") or [None])[0],
        model_type=ckpt.config.get("model_type"),
        quantization_config={k: qc.get(k) for k in ("quant_method", "packing_format", "bits", "group_size", "sym", "data_type")},
        config_bits=qc.get("bits"),
        symmetric=qc.get("sym", True) is not False,
        module_widths={str(k): v for k, v in sorted(widths.items())},
        modules_not_at_config_bits=len(mismatched),
        modules_not_at_config_bits_examples=mismatched[:5],
        group_sizes={str(k): v for k, v in sorted(groups.items())},
        quantized_modules=len(ckpt.modules),
        float_tensors=len(ckpt.float_tensors()),
        shards=len(ckpt.shards),
        shard_bytes=plan.src_shard_bytes,
        index=ckpt.index is not None,
        convert=ConvertPreview(
            options=plan.options.to_json(),
            module_classes=plan.counts(),
            float_modules=len(plan.float_modules),
            output_shard_bytes=plan.out_shard_bytes,
            output_total_bytes=plan.out_total_bytes(),
            growth=round(plan.out_shard_bytes / max(1, plan.src_shard_bytes), 4),
            copied_files=plan.extra_files,
            skipped_files=plan.skipped_files,
        ),
        warnings=ckpt.warnings,
        needs_conversion=plan.options.target != "repack" or any(m.bits in CONVERTED_BITS for m in ckpt.modules.values()),
    )
