"""Synthetic DeepSeek-V3-shaped AutoRound ``auto_round:auto_gptq`` checkpoints (random valid codes).

Used by ``w3repack demo``, the tests and the benchmarks. Every quantized linear ``[N=out, K=in]`` is
written as ``qweight``/``qzeros``/``scales`` in the AutoGPTQ layout (symmetric zero points, signed fp16
scales); router, norms, embeddings and lm_head stay bf16. The default spec shards cleanly at tensor
parallel 8 under Marlin's tile rules (every per-rank slice a multiple of 128 on K and 64 on N).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from repack import codec
from repack.safetensors_io import build_header


@dataclass(frozen=True)
class TinySpec:
    hidden: int = 1024
    intermediate: int = 1024
    moe_intermediate: int = 1024
    layers: int = 2
    first_dense: int = 1
    experts: int = 8
    topk: int = 2
    heads: int = 8
    q_lora: int = 512
    kv_lora: int = 512
    nope: int = 128
    rope: int = 64
    v_head: int = 128
    vocab: int = 1024
    group_size: int = 128
    bits: int = 3
    mtp: bool = True
    v32: bool = False
    traps: bool = False
    shard_bytes: int = 8 << 20
    seed: int = 0
    scale: float = 0.02
    extra_files: dict = field(default_factory=dict)

    @staticmethod
    def small(**kw) -> "TinySpec":
        base = TinySpec(hidden=256, intermediate=256, moe_intermediate=256, experts=4, heads=2, q_lora=128,
                        kv_lora=128, nope=32, rope=32, v_head=128, vocab=256, shard_bytes=256 << 10)
        return replace(base, **kw)


def deepseek_config(spec: TinySpec) -> dict:
    cfg: dict[str, object] = {
        "architectures": ["DeepseekV32ForCausalLM" if spec.v32 else "DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v32" if spec.v32 else "deepseek_v3",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "first_k_dense_replace": spec.first_dense,
        "hidden_act": "silu",
        "hidden_size": spec.hidden,
        "initializer_range": 0.02,
        "intermediate_size": spec.intermediate,
        "kv_lora_rank": spec.kv_lora,
        "max_position_embeddings": 4096,
        "moe_intermediate_size": spec.moe_intermediate,
        "moe_layer_freq": 1,
        "n_group": 1,
        "n_routed_experts": spec.experts,
        "n_shared_experts": 1,
        "norm_topk_prob": True,
        "num_attention_heads": spec.heads,
        "num_experts_per_tok": spec.topk,
        "num_hidden_layers": spec.layers,
        "num_key_value_heads": spec.heads,
        "num_nextn_predict_layers": 1 if spec.mtp else 0,
        "q_lora_rank": spec.q_lora,
        "qk_nope_head_dim": spec.nope,
        "qk_rope_head_dim": spec.rope,
        "rms_norm_eps": 1e-6,
        "rope_scaling": None,
        "rope_theta": 10000,
        "routed_scaling_factor": 2.5,
        "scoring_func": "sigmoid",
        "tie_word_embeddings": False,
        "topk_group": 1,
        "topk_method": "noaux_tc",
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "v_head_dim": spec.v_head,
        "vocab_size": spec.vocab,
    }
    if spec.v32:
        cfg.update({"index_head_dim": 128, "index_n_heads": 8, "index_topk": 64})
    extra = {}
    for layer in range(spec.first_dense, spec.layers):
        extra[f"model.layers.{layer}.mlp.gate"] = {"bits": 16, "data_type": "float"}
    cfg["quantization_config"] = {
        "autoround_version": "0.9.4",
        "bits": spec.bits,
        "block_name_to_quantize": "model.layers",
        "data_type": "int",
        "group_size": spec.group_size,
        "packing_format": "auto_round:auto_gptq",
        "quant_method": "auto-round",
        "sym": True,
        "extra_config": extra,
    }
    return cfg


def _linears(spec: TinySpec) -> list[tuple[str, int, int, int]]:
    """(prefix, N=out, K=in, bits) of every quantized linear in checkpoint order."""
    out = []
    h, b = spec.hidden, spec.bits
    qk = spec.nope + spec.rope
    nlayers = spec.layers + (1 if spec.mtp else 0)
    for layer in range(nlayers):
        p = f"model.layers.{layer}"
        lb = 4 if layer >= spec.layers else b
        out += [
            (f"{p}.self_attn.q_a_proj", spec.q_lora, h, lb),
            (f"{p}.self_attn.q_b_proj", spec.heads * qk, spec.q_lora, lb),
            (f"{p}.self_attn.kv_a_proj_with_mqa", spec.kv_lora + spec.rope, h, lb),
            (f"{p}.self_attn.kv_b_proj", spec.heads * (spec.nope + spec.v_head), spec.kv_lora, lb),
            (f"{p}.self_attn.o_proj", h, spec.heads * spec.v_head, lb),
        ]
        if spec.v32:
            out += [
                (f"{p}.self_attn.indexer.wq_b", 8 * 128, spec.q_lora, lb),
                (f"{p}.self_attn.indexer.wk", 128, h, lb),
                (f"{p}.self_attn.indexer.weights_proj", 32, h, lb),
            ]
        if layer < spec.first_dense:
            inter = spec.intermediate
            out += [(f"{p}.mlp.{n}", inter, h, lb) for n in ("gate_proj", "up_proj")] + [(f"{p}.mlp.down_proj", h, inter, lb)]
        else:
            m = spec.moe_intermediate
            for e in range(spec.experts):
                q = f"{p}.mlp.experts.{e}"
                out += [(f"{q}.gate_proj", m, h, lb), (f"{q}.up_proj", m, h, lb), (f"{q}.down_proj", h, m, lb)]
            q = f"{p}.mlp.shared_experts"
            out += [(f"{q}.gate_proj", m, h, lb), (f"{q}.up_proj", m, h, lb), (f"{q}.down_proj", h, m, lb)]
        if layer >= spec.layers:
            out += [(f"{p}.eh_proj", h, 2 * h, lb), (f"{p}.shared_head.head", spec.vocab, h, lb)]
    if spec.traps:
        traps = {"model.layers.0.mlp.down_proj": 8, "model.layers.0.mlp.up_proj": 2}
        out = [(p, n, k, traps.get(p, bits)) for p, n, k, bits in out]
    return out


def _bf16_norm(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    x = (1.0 + rng.standard_normal(shape) * 0.05).astype(np.float32)
    return (x.view(np.uint32) >> 16).astype(np.uint16)


def _bf16(rng: np.random.Generator, shape: tuple[int, ...], std: float) -> np.ndarray:
    x = (rng.standard_normal(shape) * std).astype(np.float32)
    return (x.view(np.uint32) >> 16).astype(np.uint16)


def tensors(spec: TinySpec) -> list[tuple[str, str, tuple[int, ...], bytes]]:
    """Every tensor of the checkpoint as (name, dtype, shape, raw little-endian bytes), in file order."""
    rng = np.random.default_rng(spec.seed)
    out: list[tuple[str, str, tuple[int, ...], bytes]] = []

    def add(name, dtype, arr):
        out.append((name, dtype, tuple(arr.shape), np.ascontiguousarray(arr).tobytes()))

    h = spec.hidden
    add("model.embed_tokens.weight", "BF16", _bf16(rng, (spec.vocab, h), 0.02))
    linears = _linears(spec)
    for i, (prefix, n, k, bits) in enumerate(linears):
        layer = int(prefix.split(".")[2])
        if prefix.endswith("self_attn.q_a_proj"):
            p = prefix.rsplit(".", 2)[0]
            add(f"{p}.input_layernorm.weight", "BF16", _bf16_norm(rng, (h,)))
            add(f"{p}.post_attention_layernorm.weight", "BF16", _bf16_norm(rng, (h,)))
            add(f"{p}.self_attn.q_a_layernorm.weight", "BF16", _bf16_norm(rng, (spec.q_lora,)))
            add(f"{p}.self_attn.kv_a_layernorm.weight", "BF16", _bf16_norm(rng, (spec.kv_lora,)))
            if layer >= spec.first_dense and layer < spec.layers:
                add(f"{p}.mlp.gate.weight", "BF16", _bf16(rng, (spec.experts, h), 0.05))
                add(f"{p}.mlp.gate.e_score_correction_bias", "F32", (rng.standard_normal(spec.experts) * 0.01).astype(np.float32))
            if layer >= spec.layers:
                add(f"{p}.enorm.weight", "BF16", _bf16_norm(rng, (h,)))
                add(f"{p}.hnorm.weight", "BF16", _bf16_norm(rng, (h,)))
                add(f"{p}.shared_head.norm.weight", "BF16", _bf16_norm(rng, (h,)))
            if spec.v32:
                add(f"{p}.self_attn.indexer.k_norm.weight", "BF16", _bf16_norm(rng, (128,)))
        codes = rng.integers(0, 1 << bits, size=(k, n), dtype=np.uint8)
        qweight = codec.pack(codes, bits, axis=0)
        groups = k // spec.group_size
        mag = rng.uniform(0.25, 1.0, size=(groups, n)) * spec.scale / (1 << (bits - 1))
        sign = np.where(rng.random((groups, n)) < 0.5, -1.0, 1.0)
        scales = (mag * sign).astype(np.float16)
        add(f"{prefix}.qweight", "I32", qweight)
        add(f"{prefix}.qzeros", "I32", codec.sym_qzeros(groups, n, bits))
        if spec.traps and i == 1:
            add(f"{prefix}.scales", "BF16", (scales.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16))
        elif spec.traps and i == 2:
            add(f"{prefix}.scales", "F32", scales.astype(np.float32))
        else:
            add(f"{prefix}.scales", "F16", scales)
        if spec.traps and i == 3:
            add(f"{prefix}.g_idx", "I32", (np.arange(k) // spec.group_size).astype(np.int32))
        if spec.traps and prefix.endswith("o_proj") and layer == 0:
            add(f"{prefix}.bias", "BF16", _bf16(rng, (n,), 0.01))
    add("model.norm.weight", "BF16", _bf16_norm(rng, (h,)))
    add("lm_head.weight", "BF16", _bf16(rng, (spec.vocab, h), 0.02))
    return out


def _split(items: list, shard_bytes: int, traps: bool) -> list[list]:
    shards: list[list] = []
    cur: list = []
    size = 0
    for it in items:
        if cur and size + len(it[3]) > shard_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append(it)
        size += len(it[3])
    if cur:
        shards.append(cur)
    if traps and len(shards) > 1:
        # put one module's qzeros in a different shard than its qweight
        for si, sh in enumerate(shards[:-1]):
            names = [t[0] for t in sh]
            for j, name in enumerate(names):
                if name.endswith(".qzeros"):
                    shards[si + 1].append(sh.pop(j))
                    return shards
    return shards


def write_shards(root: Path, items: list, shard_bytes: int, traps: bool = False, single_file: bool = False) -> None:
    """``items`` ((name, dtype, shape, raw bytes), in file order) as shards of at most ``shard_bytes`` named
    ``model-XXXXX-of-YYYYY.safetensors`` plus their index, or one ``model.safetensors``."""
    root.mkdir(parents=True, exist_ok=True)
    groups = [items] if single_file else _split(items, shard_bytes, traps)
    names = (
        ["model.safetensors"]
        if single_file
        else [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    )
    weight_map = {}
    total = 0
    for name, group in zip(names, groups, strict=False):
        prefix, _ = build_header([(n, d, s) for n, d, s, _ in group], {"format": "pt"})
        with open(root / name, "wb") as f:
            f.write(prefix)
            for _, _, _, raw in group:
                f.write(raw)
                total += len(raw)
        for n, *_ in group:
            weight_map[n] = name
    if not single_file:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (root / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def write_checkpoint(root: str | Path, spec: TinySpec = TinySpec(), single_file: bool = False) -> Path:
    """Write the checkpoint (shards, index, config, generation config, a README) into ``root``."""
    root = Path(root)
    write_shards(root, tensors(spec), spec.shard_bytes, spec.traps, single_file)
    cfg = deepseek_config(spec)
    (root / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (root / "quantization_config.json").write_text(json.dumps(cfg["quantization_config"], indent=2) + "\n")
    (root / "generation_config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": 1}) + "\n")
    (root / "README.md").write_text(f"Synthetic 3-bit DeepSeek-V3-shaped checkpoint made by w3repack.\n\nspec: {json.dumps(asdict(spec))}\n")
    for rel, text in spec.extra_files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def random_tensors(tensors: list[tuple[str, str, tuple[int, ...]]], group_size: int = 128,
                   seed: int = 0) -> list[tuple[str, str, tuple[int, ...], bytes]]:
    """Valid random bytes for the tensors ``(name, dtype, shape)`` of a checkpoint, one block per kind and shape
    (tensors of the same shape share their bytes, which is what a speed or memory measurement needs).

    ``qweight``: random codes; ``qzeros``: the symmetric words of the module's width (from its ``scales``:
    ``32 * qzeros.shape[1] / scales.shape[1]``); ``scales``: small fp16 of both signs; ``g_idx``: ``k // group``;
    norms 1, biases 0, other floats small normal values in their dtype."""
    rng = np.random.default_rng(seed)
    scales = {n.rpartition(".")[0]: s for n, _, s in tensors if n.endswith(".scales")}
    cache: dict[tuple, bytes] = {}

    def as_dtype(x: np.ndarray, dtype: str) -> np.ndarray:
        x = x.astype(np.float32)
        if dtype == "BF16":
            return (x.view(np.uint32) >> 16).astype(np.uint16)
        return x.astype({"F16": np.float16, "F32": np.float32, "F64": np.float64}[dtype])

    def floats(dtype: str, shape: tuple[int, ...], fill: float | None) -> np.ndarray:
        return as_dtype(np.full(shape, fill) if fill is not None else rng.standard_normal(shape) * 0.02, dtype)

    def signed_scales(shape: tuple[int, ...]) -> np.ndarray:
        return rng.uniform(0.25, 1.0, shape) * 0.005 * np.where(rng.random(shape) < 0.5, -1, 1)

    def make(kind: str, dtype: str, shape: tuple[int, ...], n: int) -> np.ndarray:
        if kind == "qweight":
            return rng.integers(0, 1 << 32, size=shape, dtype=np.uint32)
        if kind == "qzeros":
            return codec.sym_qzeros(shape[0], n, 32 * shape[1] // n)
        if kind == "scales":
            return as_dtype(signed_scales(shape), dtype)
        if kind == "g_idx":
            return (np.arange(shape[0]) // group_size).astype(np.int32)
        return floats(dtype, shape, {"one": 1.0, "zero": 0.0}.get(kind))

    out = []
    for name, dtype, shape in tensors:
        module, _, part = name.rpartition(".")
        if part in ("qweight", "qzeros", "scales", "g_idx"):
            kind = part
        elif "norm" in module.rpartition(".")[2] or "norm" in part:
            kind = "one"
        elif part in ("bias", "e_score_correction_bias"):
            kind = "zero"
        else:
            kind = "float"
        n = scales[module][1] if kind == "qzeros" else 0
        key = (kind, dtype, tuple(shape), n)
        if key not in cache:
            cache[key] = np.ascontiguousarray(make(kind, dtype, tuple(shape), n)).tobytes()
        out.append((name, dtype, shape, cache[key]))
    return out


def write_random_checkpoint(root: Path, config: dict, tensors: list[tuple[str, str, tuple[int, ...]]],
                            shard_bytes: int = 2 << 30, seed: int = 0) -> Path:
    """A checkpoint with ``config`` and :func:`random_tensors` for ``tensors``, in shards of ``shard_bytes``."""
    qc = config.get("quantization_config") or {}
    g = qc.get("group_size")
    group = g if isinstance(g, int) and g > 0 else 128
    write_shards(root, random_tensors(tensors, group, seed), shard_bytes)
    (root / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (root / "generation_config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": 1}) + "\n")
    return root
