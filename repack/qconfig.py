"""Rewrite a 3-bit quantization config into the 4-bit config of the converted checkpoint.

auto-round style keeps every key and changes only ``bits`` (and per-module overrides that named a
converted width); float overrides stay and modules emitted as float get one. gptq style writes the
config vLLM's ``gptq`` / ``gptq_marlin`` reads: ``bits 4, sym true, desc_act false, checkpoint_format gptq``
with ``dynamic`` rules (``-:regex`` = leave unquantized) for float modules.
"""

from __future__ import annotations

import copy
import re

CONVERTED_BITS = (2, 3)


def rewrite(qc: dict, style: str, float_patterns: list[str], extra_widths: dict[str, int], base_bits: int | None = 4,
            layer_widths: dict[str, int] | None = None) -> dict:
    """New quantization config.

    ``float_patterns``: regexes of modules the converter emits as float weights.
    ``extra_widths``: exact module names whose output width differs from the base and that no override covers.
    ``base_bits``: the new base width (None: keep the source's bits and overrides, the native 3-bit target).
    ``layer_widths``: regexes (whole layers, e.g. MTP) with the width every quantized module in them has; they
    follow the float patterns, so a float rule wins where both match (vLLM takes the first matching regex).
    """
    layer_widths = layer_widths or {}
    if style == "auto-round":
        out = copy.deepcopy(qc)
        extra = out.get("extra_config")
        extra = dict(extra) if isinstance(extra, dict) else {}
        if base_bits is not None:
            out["bits"] = base_bits
            for key, val in list(extra.items()):
                if isinstance(val, dict) and val.get("bits") in CONVERTED_BITS:
                    extra[key] = {**val, "bits": base_bits}
        for pat in float_patterns:
            extra[pat] = {"bits": 16, "data_type": "float"}
        for pat, bits in layer_widths.items():
            extra[pat] = {"bits": bits}
        for name, bits in extra_widths.items():
            extra[name] = {"bits": bits}
        if extra or "extra_config" in out:
            out["extra_config"] = extra
        return out
    if style == "gptq":
        out = {
            "quant_method": "gptq",
            "bits": 4,
            "group_size": qc.get("group_size", 128),
            "sym": True,
            "desc_act": False,
            "checkpoint_format": "gptq",
            "lm_head": False,
        }
        dynamic: dict[str, dict] = {}
        extra = qc.get("extra_config") or {}
        for key, val in (extra.items() if isinstance(extra, dict) else []):
            if isinstance(val, dict) and (val.get("bits", 0) >= 16 or val.get("data_type") == "float"):
                dynamic["-:" + _as_regex(key)] = {}
        for pat in float_patterns:
            dynamic["-:" + pat] = {}
        for pat, bits in layer_widths.items():
            dynamic["+:" + pat] = {"bits": bits}
        for name, bits in extra_widths.items():
            dynamic["+:" + re.escape(name) + "$"] = {"bits": bits}
        if dynamic:
            out["dynamic"] = dynamic
        return out
    raise ValueError(f"unknown config style {style!r}")


def _as_regex(key: str) -> str:
    """extra_config keys are names or regexes; a plain dotted name becomes an anchored regex."""
    if re.fullmatch(r"[\w.]+", key):
        return re.escape(key) + "$"
    return key
