"""DeepSeek-V2 / V3 / V3.2 (MLA attention, routed + shared experts, MTP layer, V3.2 sparse-attention indexer).

Sharding as vLLM's ``deepseek_v2.py`` does it: ``q_a_proj`` and ``kv_a_proj_with_mqa`` (and their fused
``fused_qkv_a_proj``) replicated, ``q_b_proj`` / ``kv_b_proj`` column-split on heads, ``o_proj`` row-split, the
router ``gate`` and ``e_score_correction_bias`` replicated, the V3.2 indexer replicated. The MLA KV cache is not
split by tensor parallelism: every rank caches ``kv_lora_rank + qk_rope_head_dim`` values per token per layer.
The MTP layer's ``eh_proj`` is a plain (replicated) linear; its ``embed_tokens`` and ``shared_head.head`` are split
on the vocabulary.
"""

from __future__ import annotations

from repack.serve.arch.base import ArchSpec, Split, marlin_warning, positive_int

INDEXER_QUANT_BLOCK = 128  # the V3.2 indexer cache stores one float32 scale per 128 fp8 values


class DeepSeekSpec(ArchSpec):
    name = "deepseek"
    architectures = ("DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM", "DeepseekV32ForCausalLM")
    replicated = ArchSpec.replicated | {"q_a_proj", "kv_a_proj_with_mqa", "fused_qkv_a_proj", "eh_proj"}
    column = ArchSpec.column | {"q_b_proj", "kv_b_proj"}
    mla = True
    marlin_caveat = marlin_warning("DeepSeek-V3", "differed from its exact float reference on 4 of 8 prompts in float16 "
                                  "(first-token splits at reference margins 0.08-0.12 nats)")

    @property
    def v32(self) -> bool:
        c = self.config
        return ("index_topk" in c or "DeepseekV32ForCausalLM" in (c.get("architectures") or [])
                or c.get("model_type") == "deepseek_v32")

    def module_split(self, module: str, ep: bool) -> Split:
        if ".indexer." in module + ".":
            return Split.REPLICATED
        return super().module_split(module, ep)

    def speculative_method(self, vllm: str | None) -> str | None:
        return "deepseek_mtp"  # measured on vLLM 0.26 and 0.33 (0.33 also takes "mtp")

    def kv_bytes_per_layer(self, tp: int, kv_dtype: str, dtype_bytes: int) -> tuple[int, int]:
        """MLA: ``kv_lora_rank + qk_rope_head_dim`` values per token per layer on every rank, 2 bytes each in bf16;
        with fp8, 1 byte each (V3) or vLLM's ``fp8_ds_mla`` layout for V3.2 (the latent in fp8 plus a float32 scale
        per 128 values plus the rope part in bf16: 656 bytes at 512/64). The V3.2 indexer cache holds
        ``index_head_dim`` fp8 values plus a 4-byte scale per 128 (vLLM's ``DeepseekV32IndexerCache``: 132 bytes at
        128) per token per layer on every rank."""
        c = self.config
        fp8 = kv_dtype.startswith("fp8")
        lora = positive_int(c, "kv_lora_rank")
        rope = positive_int(c, "qk_rope_head_dim", 64)
        if fp8 and self.v32:
            attn = lora + lora // 128 * 4 + rope * 2
        else:
            attn = (lora + rope) * (1 if fp8 else dtype_bytes)
        idx = 0
        if self.v32:
            d = positive_int(c, "index_head_dim", 128)
            idx = d + max(1, d // INDEXER_QUANT_BLOCK) * 4
        return attn, idx
