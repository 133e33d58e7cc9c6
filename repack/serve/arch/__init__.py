"""Architecture specs, registered by Hugging Face architecture name (``config.json`` ``architectures[0]``).

``spec_for(config)`` gives the registered spec, or the generic rules of :class:`ArchSpec` with a warning that
says so. A new family is a module here with an :class:`ArchSpec` subclass listing its ``architectures``, added
to :data:`SPECS`.
"""

from __future__ import annotations

from repack.serve.arch.base import ArchSpec, Layout, Split, vocab_rows
from repack.serve.arch.deepseek import DeepSeekSpec
from repack.serve.arch.glm4_moe import Glm4MoeSpec
from repack.serve.arch.qwen3_moe import QwenMoeSpec

SPECS: tuple[type[ArchSpec], ...] = (DeepSeekSpec, Glm4MoeSpec, QwenMoeSpec)
REGISTRY: dict[str, type[ArchSpec]] = {a: cls for cls in SPECS for a in cls.architectures}

__all__ = ["ArchSpec", "DeepSeekSpec", "Glm4MoeSpec", "Layout", "QwenMoeSpec", "Split", "spec_for", "unknown_warning",
           "vocab_rows"]


def architecture(config: dict) -> str:
    archs = config.get("architectures")
    return str(archs[0]) if isinstance(archs, list) and archs and isinstance(archs[0], str) else "?"


def spec_for(config: dict) -> ArchSpec:
    """The registered spec of ``config``'s architecture; :class:`ArchSpec` (generic rules) when none is."""
    return REGISTRY.get(architecture(config), ArchSpec)(config)


def unknown_warning(config: dict) -> str | None:
    """The warning an unregistered architecture gets (None for a registered one)."""
    name = architecture(config)
    if name in REGISTRY:
        return None
    known = ", ".join(sorted(REGISTRY))
    return (f"architecture {name} has no spec in w3repack (known: {known}): planned with the generic tensor-parallel "
            "rules (dense and MoE decoder names); check the numbers with `w3repack rehearse`")
