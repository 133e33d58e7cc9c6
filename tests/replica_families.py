"""Full-size header-only 3-bit replicas of Qwen3-235B-A22B and GLM-4.6 (AutoRound W3A16 layout: every linear
3-bit, router and norms float, embeddings and LM head bf16), and their per-GPU weight and KV bytes computed by
hand from the models' published shapes (config.json on the hub), not from the planner's code.

Qwen3-235B-A22B: 94 layers, hidden 4096, 64 heads and 4 KV heads of 128, qk-norm, 128 experts 1536 wide (top 8),
no shared expert, vocabulary 151,936. GLM-4.6: 92 layers (+ an MTP layer), hidden 5120, 96 heads and 8 KV heads of
128 with q/k/v bias, 3 dense layers 12,288 wide, then 160 experts 1536 wide (top 8) and one shared expert,
vocabulary 151,552.
"""

import json
from pathlib import Path

from tests.replica import write_sparse

GROUP = 128


def q3(prefix, k, n):
    return [(f"{prefix}.qweight", "I32", [k * 3 // 32, n]), (f"{prefix}.qzeros", "I32", [k // GROUP, n * 3 // 32]),
            (f"{prefix}.scales", "F16", [k // GROUP, n])]


def qb(k, n, bits=3):
    """Bytes vLLM holds for a quantized linear [N=n, K=k]: codes, fp16 scales, packed zeros (no g_idx)."""
    return k * n * bits // 8 + (k // GROUP) * n * 2 + (k // GROUP) * (n * bits // 32) * 4


def _write(root: Path, layers: list[list], head: list, config: dict) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    shards = {"model-00000.safetensors": head}
    for i, t in enumerate(layers):
        shards[f"model-{i + 1:05d}.safetensors"] = t
    wm = {}
    for name, tensors in shards.items():
        write_sparse(root / name, tensors)
        wm.update({t[0]: name for t in tensors})
    (root / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    (root / "config.json").write_text(json.dumps(config, indent=1))
    return root


AUTOROUND_W3 = {"quant_method": "auto-round", "packing_format": "auto_round:auto_gptq", "bits": 3, "group_size": GROUP,
                "sym": True, "data_type": "int", "autoround_version": "0.9.4"}

# ---------------------------------------------------------------- Qwen3-235B-A22B

QW = dict(layers=94, hidden=4096, heads=64, kv=4, hd=128, experts=128, moe_i=1536, vocab=151936)


def write_qwen3_235b(root) -> Path:
    L, h, hd = QW["layers"], QW["hidden"], QW["hd"]
    layers = []
    for i in range(L):
        p = f"model.layers.{i}"
        t = [(f"{p}.input_layernorm.weight", "BF16", [h]), (f"{p}.post_attention_layernorm.weight", "BF16", [h]),
             (f"{p}.self_attn.q_norm.weight", "BF16", [hd]), (f"{p}.self_attn.k_norm.weight", "BF16", [hd]),
             (f"{p}.mlp.gate.weight", "BF16", [QW["experts"], h])]
        t += q3(f"{p}.self_attn.q_proj", h, QW["heads"] * hd) + q3(f"{p}.self_attn.k_proj", h, QW["kv"] * hd)
        t += q3(f"{p}.self_attn.v_proj", h, QW["kv"] * hd) + q3(f"{p}.self_attn.o_proj", QW["heads"] * hd, h)
        for e in range(QW["experts"]):
            q = f"{p}.mlp.experts.{e}"
            t += q3(f"{q}.gate_proj", h, QW["moe_i"]) + q3(f"{q}.up_proj", h, QW["moe_i"]) + q3(f"{q}.down_proj", QW["moe_i"], h)
        layers.append(t)
    head = [("model.embed_tokens.weight", "BF16", [QW["vocab"], h]), ("model.norm.weight", "BF16", [h]),
            ("lm_head.weight", "BF16", [QW["vocab"], h])]
    config = {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": h, "num_hidden_layers": L,
              "num_attention_heads": QW["heads"], "num_key_value_heads": QW["kv"], "head_dim": hd,
              "intermediate_size": 12288, "moe_intermediate_size": QW["moe_i"], "num_experts": QW["experts"],
              "num_experts_per_tok": 8, "decoder_sparse_step": 1, "mlp_only_layers": [], "norm_topk_prob": True,
              "vocab_size": QW["vocab"], "max_position_embeddings": 40960, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
              "hidden_act": "silu", "tie_word_embeddings": False, "torch_dtype": "bfloat16",
              "quantization_config": {**AUTOROUND_W3, "extra_config": {r".*mlp\.gate$": {"bits": 16, "data_type": "float"}}}}
    return _write(Path(root), layers, head, config)


def qwen3_hand(tp: int, bits: int = 3) -> float:
    """Per-GPU bytes at TP ``tp`` (every linear at ``bits``): attention split on heads (one KV head per rank when
    there are fewer than ranks), experts on their width, router and norms whole, vocabulary split."""
    h, hd, L = QW["hidden"], QW["hd"], QW["layers"]
    kv_share = max(1, QW["kv"] // tp) / QW["kv"]
    per_layer = (2 * h + 2 * hd) * 2 + QW["experts"] * h * 2
    per_layer += qb(h, QW["heads"] * hd, bits) / tp + 2 * qb(h, QW["kv"] * hd, bits) * kv_share + qb(QW["heads"] * hd, h, bits) / tp
    per_layer += QW["experts"] * (2 * qb(h, QW["moe_i"], bits) + qb(QW["moe_i"], h, bits)) / tp
    return L * per_layer + 2 * QW["vocab"] * h * 2 / tp + h * 2


def qwen3_kv_bytes(tp: int) -> int:
    return 2 * max(1, QW["kv"] // tp) * QW["hd"] * 2 * QW["layers"]


# ---------------------------------------------------------------- GLM-4.6

GLM = dict(layers=92, hidden=5120, heads=96, kv=8, hd=128, experts=160, moe_i=1536, dense=3, dense_i=12288, vocab=151552)


def _glm_layer(i: int) -> list:
    h, hd = GLM["hidden"], GLM["hd"]
    p = f"model.layers.{i}"
    qn, kn = GLM["heads"] * hd, GLM["kv"] * hd
    t = [(f"{p}.input_layernorm.weight", "BF16", [h]), (f"{p}.post_attention_layernorm.weight", "BF16", [h]),
         (f"{p}.self_attn.q_proj.bias", "BF16", [qn]), (f"{p}.self_attn.k_proj.bias", "BF16", [kn]),
         (f"{p}.self_attn.v_proj.bias", "BF16", [kn])]
    t += q3(f"{p}.self_attn.q_proj", h, qn) + q3(f"{p}.self_attn.k_proj", h, kn) + q3(f"{p}.self_attn.v_proj", h, kn)
    t += q3(f"{p}.self_attn.o_proj", qn, h)
    if i < GLM["dense"]:
        t += q3(f"{p}.mlp.gate_proj", h, GLM["dense_i"]) + q3(f"{p}.mlp.up_proj", h, GLM["dense_i"])
        t += q3(f"{p}.mlp.down_proj", GLM["dense_i"], h)
    else:
        t += [(f"{p}.mlp.gate.weight", "BF16", [GLM["experts"], h]), (f"{p}.mlp.gate.e_score_correction_bias", "F32", [GLM["experts"]])]
        for e in [*(f"experts.{j}" for j in range(GLM["experts"])), "shared_experts"]:
            q = f"{p}.mlp.{e}"
            t += q3(f"{q}.gate_proj", h, GLM["moe_i"]) + q3(f"{q}.up_proj", h, GLM["moe_i"]) + q3(f"{q}.down_proj", GLM["moe_i"], h)
    return t


def write_glm46(root) -> Path:
    h, L = GLM["hidden"], GLM["layers"]
    layers = [_glm_layer(i) for i in range(L)]
    mtp = _glm_layer(L)
    p = f"model.layers.{L}"
    mtp += [(f"{p}.enorm.weight", "BF16", [h]), (f"{p}.hnorm.weight", "BF16", [h]), (f"{p}.shared_head.norm.weight", "BF16", [h]),
            (f"{p}.embed_tokens.weight", "BF16", [GLM["vocab"], h]), (f"{p}.shared_head.head.weight", "BF16", [GLM["vocab"], h])]
    mtp += q3(f"{p}.eh_proj", 2 * h, h)
    layers.append(mtp)
    head = [("model.embed_tokens.weight", "BF16", [GLM["vocab"], h]), ("model.norm.weight", "BF16", [h]),
            ("lm_head.weight", "BF16", [GLM["vocab"], h])]
    config = {"architectures": ["Glm4MoeForCausalLM"], "model_type": "glm4_moe", "hidden_size": h, "num_hidden_layers": L,
              "num_attention_heads": GLM["heads"], "num_key_value_heads": GLM["kv"], "head_dim": GLM["hd"],
              "attention_bias": True, "partial_rotary_factor": 0.5, "use_qk_norm": False,
              "intermediate_size": GLM["dense_i"], "moe_intermediate_size": GLM["moe_i"], "first_k_dense_replace": GLM["dense"],
              "n_routed_experts": GLM["experts"], "n_shared_experts": 1, "num_experts_per_tok": 8, "n_group": 1,
              "topk_group": 1, "norm_topk_prob": True, "routed_scaling_factor": 2.5, "num_nextn_predict_layers": 1,
              "vocab_size": GLM["vocab"], "max_position_embeddings": 202752, "rope_theta": 1000000, "rms_norm_eps": 1e-5,
              "hidden_act": "silu", "tie_word_embeddings": False, "torch_dtype": "bfloat16",
              "quantization_config": {**AUTOROUND_W3, "extra_config": {r".*mlp\.gate$": {"bits": 16, "data_type": "float"}}}}
    return _write(Path(root), layers, head, config)


def glm_hand(tp: int, bits: int = 3) -> float:
    """Per-GPU bytes at TP ``tp``, without the MTP layer (loaded only for speculation): q/k/v (and their biases)
    split on heads, o_proj on its input, dense MLPs, experts and the shared expert on their width, router, its
    correction bias (float32) and norms whole, vocabulary split."""
    h, hd, L = GLM["hidden"], GLM["hd"], GLM["layers"]
    qn, kn = GLM["heads"] * hd, GLM["kv"] * hd
    kv_share = max(1, GLM["kv"] // tp) / GLM["kv"]
    attn = (qb(h, qn, bits) + qn * 2) / tp + 2 * (qb(h, kn, bits) + kn * 2) * kv_share + qb(qn, h, bits) / tp
    norms = 2 * h * 2
    dense = (2 * qb(h, GLM["dense_i"], bits) + qb(GLM["dense_i"], h, bits)) / tp
    moe = (GLM["experts"] + 1) * (2 * qb(h, GLM["moe_i"], bits) + qb(GLM["moe_i"], h, bits)) / tp + GLM["experts"] * (h * 2 + 4)
    total = L * (attn + norms) + GLM["dense"] * dense + (L - GLM["dense"]) * moe
    return total + 2 * GLM["vocab"] * h * 2 / tp + h * 2


def glm_kv_bytes(tp: int) -> int:
    return 2 * max(1, GLM["kv"] // tp) * GLM["hd"] * 2 * GLM["layers"]
