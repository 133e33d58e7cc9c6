"""GLM-4.5 / 4.6 / 4.7 MoE (``Glm4MoeForCausalLM``: GQA with q/k/v bias, partial rotary, first dense layers, routed
experts with a sigmoid router and its ``e_score_correction_bias``, one shared expert, an MTP layer).

Sharding as vLLM's ``glm4_moe.py``: q/k/v and their biases column-split on heads (KV heads replicated when fewer
than ranks), ``o_proj`` row-split, dense MLPs, experts and the shared expert on their width, the router replicated.
The MTP layer (``layers.{num_hidden_layers}``, vLLM's ``Glm4MoeMTP``) has DeepSeek's layout: ``eh_proj`` a plain
(replicated, unquantized) linear, ``embed_tokens`` and ``shared_head.head`` split on the vocabulary.
"""

from __future__ import annotations

from packaging.version import InvalidVersion, Version

from repack.serve.arch.base import ArchSpec, marlin_warning


class Glm4MoeSpec(ArchSpec):
    name = "glm4-moe"
    architectures = ("Glm4MoeForCausalLM",)
    replicated = ArchSpec.replicated | {"eh_proj"}
    expert_count_keys = ("n_routed_experts",)
    marlin_caveat = marlin_warning("GLM-4.5-MoE", "differed from its exact float reference on 5 of 8 prompts in float16 "
                                  "(log-probs off by up to 0.079 nats)")

    def speculative_method(self, vllm: str | None) -> str | None:
        """vLLM 0.33 serves GLM's MTP layer as method ``mtp`` (``glm4_moe_mtp`` is its deprecated alias there);
        earlier releases were not read, and get the alias."""
        try:
            new = Version(vllm or "0.33.0") >= Version("0.33")
        except InvalidVersion:
            new = True
        return "mtp" if new else "glm4_moe_mtp"
