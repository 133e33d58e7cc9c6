"""What ``inspect`` reports about a checkpoint and the conversion it would get (headers only)."""

from __future__ import annotations

from collections import Counter

from repack.checkpoint import Checkpoint
from repack.plan import Plan


def inspect_report(ckpt: Checkpoint, plan: Plan) -> dict:
    qc = ckpt.quant_config
    widths = Counter(m.bits for m in ckpt.modules.values())
    groups = Counter(m.group_size for m in ckpt.modules.values())
    mismatched = sorted(p for p, m in ckpt.modules.items() if m.bits != qc.get("bits"))
    return {
        "path": str(ckpt.root),
        "architecture": (ckpt.config.get("architectures") or [None])[0],
        "model_type": ckpt.config.get("model_type"),
        "quantization_config": {k: qc.get(k) for k in ("quant_method", "packing_format", "bits", "group_size", "sym", "data_type")},
        "config_bits": qc.get("bits"),
        "symmetric": qc.get("sym", True) is not False,
        "module_widths": {str(k): v for k, v in sorted(widths.items())},
        "modules_not_at_config_bits": len(mismatched),
        "modules_not_at_config_bits_examples": mismatched[:5],
        "group_sizes": {str(k): v for k, v in sorted(groups.items())},
        "quantized_modules": len(ckpt.modules),
        "float_tensors": len(ckpt.float_tensors()),
        "shards": len(ckpt.shards),
        "shard_bytes": plan.src_shard_bytes,
        "index": ckpt.index is not None,
        "convert": {
            "options": plan.options.to_json(),
            "module_classes": plan.counts(),
            "float_modules": len(plan.float_modules),
            "output_shard_bytes": plan.out_shard_bytes,
            "output_total_bytes": plan.out_total_bytes(),
            "growth": round(plan.out_shard_bytes / max(1, plan.src_shard_bytes), 4),
            "copied_files": plan.extra_files,
            "skipped_files": plan.skipped_files,
        },
        "warnings": ckpt.warnings,
    }
