"""The DeepSeek-V3.2-REAP-345B-W4A16 replica the serving tests plan against: real safetensors headers, data
regions left as sparse holes, and the per-GPU weight bytes computed by hand from docs/formats.md §3-4."""

import json
import struct
from pathlib import Path

PLACEHOLDER = "/models/DeepSeek-V3.2-REAP-345B-W4A16"

LAYERS, HIDDEN, EXPERTS, MOE_I, DENSE, DENSE_I = 61, 7168, 128, 2048, 3, 18432
Q_LORA, KV_LORA, ROPE, NOPE, V, HEADS, VOCAB = 1536, 512, 64, 128, 128, 128, 129280
IDX_HEADS, IDX_DIM = 64, 128
SIZES = {"BF16": 2, "F16": 2, "F32": 4, "I32": 4}

# The routing, rope and norm keys of DeepSeek-V3.2's config.json (vLLM builds e_score_correction_bias only with
# topk_method noaux_tc): a rank model built from this config loads in vLLM as the real model's would.
DEEPSEEK_KEYS = {"topk_method": "noaux_tc", "n_group": 8, "topk_group": 4, "scoring_func": "sigmoid", "norm_topk_prob": True,
                 "routed_scaling_factor": 2.5, "hidden_act": "silu", "rms_norm_eps": 1e-6, "rope_theta": 10000,
                 "moe_layer_freq": 1, "attention_bias": False, "tie_word_embeddings": False, "bos_token_id": 0,
                 "eos_token_id": 1, "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                                                     "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}}


def quant(prefix, k, n):
    return [(f"{prefix}.qweight", "I32", [k // 8, n]), (f"{prefix}.qzeros", "I32", [k // 128, n // 8]),
            (f"{prefix}.scales", "F16", [k // 128, n])]


def layer_tensors(layer):
    p = f"model.layers.{layer}"
    h = HIDDEN
    t = [(f"{p}.input_layernorm.weight", "BF16", [h]), (f"{p}.post_attention_layernorm.weight", "BF16", [h]),
         (f"{p}.self_attn.q_a_layernorm.weight", "BF16", [Q_LORA]), (f"{p}.self_attn.kv_a_layernorm.weight", "BF16", [KV_LORA]),
         (f"{p}.self_attn.kv_b_proj.weight", "F32", [HEADS * (NOPE + V), KV_LORA]),
         (f"{p}.self_attn.indexer.wk.weight", "F32", [IDX_DIM, h]),
         (f"{p}.self_attn.indexer.weights_proj.weight", "F32", [IDX_HEADS, h]),
         (f"{p}.self_attn.indexer.k_norm.weight", "BF16", [IDX_DIM]), (f"{p}.self_attn.indexer.k_norm.bias", "BF16", [IDX_DIM])]
    t += quant(f"{p}.self_attn.q_a_proj", h, Q_LORA) + quant(f"{p}.self_attn.q_b_proj", Q_LORA, HEADS * (NOPE + ROPE))
    t += quant(f"{p}.self_attn.kv_a_proj_with_mqa", h, KV_LORA + ROPE) + quant(f"{p}.self_attn.o_proj", HEADS * V, h)
    t += quant(f"{p}.self_attn.indexer.wq_b", Q_LORA, IDX_HEADS * IDX_DIM)
    if layer < DENSE:
        t += quant(f"{p}.mlp.gate_proj", h, DENSE_I) + quant(f"{p}.mlp.up_proj", h, DENSE_I) + quant(f"{p}.mlp.down_proj", DENSE_I, h)
    else:
        t += [(f"{p}.mlp.gate.weight", "BF16", [EXPERTS, h]), (f"{p}.mlp.gate.e_score_correction_bias", "F32", [EXPERTS])]
        for e in [*(f"experts.{i}" for i in range(EXPERTS)), "shared_experts"]:
            q = f"{p}.mlp.{e}"
            t += quant(f"{q}.gate_proj", h, MOE_I) + quant(f"{q}.up_proj", h, MOE_I) + quant(f"{q}.down_proj", MOE_I, h)
    if layer == LAYERS:
        t += [(f"{p}.enorm.weight", "BF16", [h]), (f"{p}.hnorm.weight", "BF16", [h]), (f"{p}.shared_head.norm.weight", "BF16", [h]),
              (f"{p}.embed_tokens.weight", "BF16", [VOCAB, h])]
        t += quant(f"{p}.eh_proj", 2 * h, h) + quant(f"{p}.shared_head.head", h, VOCAB)
    return t


def write_sparse(path, tensors):
    header, off = {}, 0
    for name, dtype, shape in tensors:
        n = SIZES[dtype]
        for d in shape:
            n *= d
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [off, off + n]}
        off += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + off)


def write_replica(root, dense=False):
    """The 4-bit output; ``dense``: as ``convert --dense-attention`` writes it (DeepSeek-V3 config, no indexer)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    shards = {"model-00000.safetensors": [("model.embed_tokens.weight", "BF16", [VOCAB, HIDDEN]),
                                          ("model.norm.weight", "BF16", [HIDDEN]), ("lm_head.weight", "BF16", [VOCAB, HIDDEN])]}
    for layer in range(LAYERS + 1):
        shards[f"model-{layer + 1:05d}.safetensors"] = layer_tensors(layer)
    if dense:
        shards = {k: [t for t in v if ".indexer." not in t[0]] for k, v in shards.items()}
    wm = {}
    for name, tensors in shards.items():
        write_sparse(root / name, tensors)
        wm.update({t[0]: name for t in tensors})
    (root / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    cfg = {"architectures": ["DeepseekV32ForCausalLM"], "model_type": "deepseek_v32", "hidden_size": HIDDEN,
           "num_hidden_layers": LAYERS, "num_nextn_predict_layers": 1, "n_routed_experts": EXPERTS, "n_shared_experts": 1,
           "num_experts_per_tok": 8, "moe_intermediate_size": MOE_I, "first_k_dense_replace": DENSE,
           "intermediate_size": DENSE_I, "q_lora_rank": Q_LORA, "kv_lora_rank": KV_LORA, "qk_rope_head_dim": ROPE,
           "qk_nope_head_dim": NOPE, "v_head_dim": V, "num_attention_heads": HEADS, "num_key_value_heads": HEADS,
           "vocab_size": VOCAB, "max_position_embeddings": 163840, "torch_dtype": "bfloat16",
           "index_head_dim": IDX_DIM, "index_n_heads": IDX_HEADS, "index_topk": 2048, **DEEPSEEK_KEYS,
           "quantization_config": {"quant_method": "auto-round", "packing_format": "auto_round:auto_gptq", "bits": 4,
                                   "group_size": 128, "sym": True, "data_type": "int",
                                   "extra_config": {".*kv_b_proj.*": {"bits": 16, "data_type": "float"}}}}
    if dense:
        cfg.update(architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3")
        for k in ("index_head_dim", "index_n_heads", "index_topk"):
            del cfg[k]
    (root / "config.json").write_text(json.dumps(cfg, indent=1))
    return root


def q4(k, n):
    """Bytes vLLM holds for a 4-bit GPTQ linear [N=n, K=k], group 128: codes, fp16 scales, packed zeros."""
    return k * n // 2 + (k // 128) * n * 2 + (k // 128) * (n // 8) * 4


def hand_weights_per_gpu(tp):
    """Per-GPU bytes at tensor parallel ``tp``, written from docs/formats.md §3-4 without the planner's code."""
    h = HIDDEN
    total = 2 * (VOCAB * h * 2) / tp + h * 2  # embed_tokens and lm_head split on vocab, final norm
    per_layer = (2 * h + Q_LORA + KV_LORA) * 2  # norms
    per_layer += q4(h, Q_LORA) + q4(h, KV_LORA + ROPE)  # replicated q_a / kv_a
    per_layer += (q4(Q_LORA, HEADS * (NOPE + ROPE)) + q4(HEADS * V, h)) / tp  # q_b, o_proj split on heads
    per_layer += HEADS * (NOPE + V) * KV_LORA * 2 / tp  # kv_b_proj: float32 on disk, bf16 in vLLM
    per_layer += q4(Q_LORA, IDX_HEADS * IDX_DIM) + (IDX_DIM + IDX_HEADS) * h * 2 + 2 * IDX_DIM * 2  # indexer, replicated
    total += LAYERS * per_layer
    total += DENSE * 3 * q4(h, DENSE_I) / tp
    total += (LAYERS - DENSE) * ((EXPERTS + 1) * 3 * q4(h, MOE_I) / tp + EXPERTS * h * 2 + EXPERTS * 4)
    return total


# ---- the 3-bit source itself, as AutoRound exports it: every linear at 3 bits (kv_b_proj and the indexer's wk /
# weights_proj too), the MTP layer (61) at 4 bits under a `bits: 3` config, embed_tokens of the MTP layer quantized.

SOURCE_PLACEHOLDER = "/models/DeepSeek-V3.2-REAP-345B-W3A16"


def quant_b(prefix, k, n, bits):
    return [(f"{prefix}.qweight", "I32", [k * bits // 32, n]), (f"{prefix}.qzeros", "I32", [k // 128, n * bits // 32]),
            (f"{prefix}.scales", "F16", [k // 128, n])]


def source_layer_tensors(layer):
    b = 4 if layer == LAYERS else 3
    out = []
    for name, dtype, shape in layer_tensors(layer):
        module, _, part = name.rpartition(".")
        if part == "qweight":
            k, n = shape[0] * 8, shape[1]
            out += quant_b(module, k, n, b)
        elif part in ("qzeros", "scales"):
            continue
        elif name.endswith(("kv_b_proj.weight", "indexer.wk.weight", "indexer.weights_proj.weight")):
            n, k = shape
            out += quant_b(module, k, n, b)
        elif name.endswith(f"layers.{LAYERS}.embed_tokens.weight"):
            out += quant_b(module, HIDDEN, VOCAB, b)
        else:
            out.append((name, dtype, shape))
    return out


def write_source_replica(root):
    """The 3-bit source: real headers, sparse data; the config AutoRound writes (base bits 3)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    shards = {"model-00000.safetensors": [("model.embed_tokens.weight", "BF16", [VOCAB, HIDDEN]),
                                          ("model.norm.weight", "BF16", [HIDDEN]), ("lm_head.weight", "BF16", [VOCAB, HIDDEN])]}
    for layer in range(LAYERS + 1):
        shards[f"model-{layer + 1:05d}.safetensors"] = source_layer_tensors(layer)
    wm = {}
    for name, tensors in shards.items():
        write_sparse(root / name, tensors)
        wm.update({t[0]: name for t in tensors})
    (root / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    cfg = _config()
    cfg["quantization_config"] = {
        "quant_method": "auto-round", "packing_format": "auto_round:auto_gptq", "bits": 3, "group_size": 128,
        "sym": True, "data_type": "int", "autoround_version": "0.9.4", "block_name_to_quantize": "model.layers",
        "extra_config": {f"model.layers.{i}.mlp.gate": {"bits": 16, "data_type": "float"} for i in range(DENSE, LAYERS + 1)}}
    (root / "config.json").write_text(json.dumps(cfg, indent=1))
    return root


def _config():
    return {
        "architectures": ["DeepseekV32ForCausalLM"], "model_type": "deepseek_v32", "hidden_size": HIDDEN,
        "num_hidden_layers": LAYERS, "num_nextn_predict_layers": 1, "n_routed_experts": EXPERTS, "n_shared_experts": 1,
        "num_experts_per_tok": 8, "moe_intermediate_size": MOE_I, "first_k_dense_replace": DENSE,
        "intermediate_size": DENSE_I, "q_lora_rank": Q_LORA, "kv_lora_rank": KV_LORA, "qk_rope_head_dim": ROPE,
        "qk_nope_head_dim": NOPE, "v_head_dim": V, "num_attention_heads": HEADS, "num_key_value_heads": HEADS,
        "vocab_size": VOCAB, "max_position_embeddings": 163840, "torch_dtype": "bfloat16",
        "index_head_dim": IDX_DIM, "index_n_heads": IDX_HEADS, "index_topk": 2048, **DEEPSEEK_KEYS}


def qb(k, n, bits):
    """Bytes vLLM holds for a ``bits``-bit GPTQ linear [N=n, K=k], group 128: codes, fp16 scales, packed zeros."""
    return k * n * bits // 8 + (k // 128) * n * 2 + (k // 128) * (n * bits // 32) * 4


def hand_native_weights_per_gpu(tp, dense=True):
    """Per-GPU bytes of the native 3-bit path at TP ``tp`` (no MTP layer: vLLM loads it only for speculation).

    From docs/formats.md §3-4, without the planner's code: every linear 3-bit as stored except ``kv_b_proj``, which
    vLLM additionally holds dequantized in bf16 (MLA weight absorption); ``dense``: the indexer is left out
    (``--dense-attention``), else its wq_b stays 3-bit and wk / weights_proj become bf16 (``--target native``)."""
    h = HIDDEN
    total = 2 * (VOCAB * h * 2) / tp + h * 2
    per_layer = (2 * h + Q_LORA + KV_LORA) * 2
    per_layer += qb(h, Q_LORA, 3) + qb(h, KV_LORA + ROPE, 3)
    per_layer += (qb(Q_LORA, HEADS * (NOPE + ROPE), 3) + qb(HEADS * V, h, 3)) / tp
    per_layer += (qb(KV_LORA, HEADS * (NOPE + V), 3) + HEADS * (NOPE + V) * KV_LORA * 2) / tp
    if not dense:
        per_layer += qb(Q_LORA, IDX_HEADS * IDX_DIM, 3) + (IDX_DIM + IDX_HEADS) * h * 2 + 2 * IDX_DIM * 2
    total += LAYERS * per_layer
    total += DENSE * 3 * qb(h, DENSE_I, 3) / tp
    total += (LAYERS - DENSE) * ((EXPERTS + 1) * 3 * qb(h, MOE_I, 3) / tp + EXPERTS * h * 2 + EXPERTS * 4)
    return total
