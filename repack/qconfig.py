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


def rewrite(qc: dict, style: str, float_patterns: list[str], extra_widths: dict[str, int]) -> dict:
    """New quantization config.

    ``float_patterns``: regexes of modules the converter emits as float weights.
    ``extra_widths``: exact module names whose output width differs from 4 and that no override covers.
    """
    if style == "auto-round":
        out = copy.deepcopy(qc)
        out["bits"] = 4
        extra = out.get("extra_config")
        extra = dict(extra) if isinstance(extra, dict) else {}
        for key, val in list(extra.items()):
            if isinstance(val, dict) and val.get("bits") in CONVERTED_BITS:
                extra[key] = {**val, "bits": 4}
        for pat in float_patterns:
            extra[pat] = {"bits": 16, "data_type": "float"}
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
