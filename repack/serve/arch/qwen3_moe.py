"""Qwen2-MoE and Qwen3-MoE (GQA attention with KV heads replicated when fewer than ranks, qk-norm in Qwen3,
routed experts, Qwen2-MoE's gated shared expert).

Sharding as vLLM's ``qwen3_moe.py`` / ``qwen2_moe.py``: q/k/v column-split on heads, ``o_proj`` row-split, experts
on their width, the router ``gate`` (and Qwen2-MoE's ``shared_expert_gate``) replicated. No MTP layer.
"""

from __future__ import annotations

from repack.serve.arch.base import ArchSpec, marlin_warning


class QwenMoeSpec(ArchSpec):
    name = "qwen-moe"
    architectures = ("Qwen3MoeForCausalLM", "Qwen2MoeForCausalLM")
    replicated = ArchSpec.replicated | {"shared_expert_gate"}
    expert_count_keys = ("num_experts",)
    marlin_caveat = marlin_warning("Qwen3-MoE", "differed from its exact float reference on 6 of 8 prompts in float16")
