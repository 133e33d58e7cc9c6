"""GPU memory plan for serving a checkpoint with vLLM, from shard headers and config.json alone.

Weights per GPU follow vLLM's tensor-parallel sharding (DeepSeek-V2/V3/V3.2 names, then a generic rule set
for other dense and MoE models): routed and shared experts and dense MLPs split on the intermediate dim,
attention heads split (``q_b_proj``, ``kv_b_proj``, ``o_proj``), embeddings and ``lm_head`` split on the
vocabulary (padded to 64), everything else replicated (``q_a_proj``, ``kv_a_proj_with_mqa``, norms, router
gate, ``e_score_correction_bias``, the V3.2 indexer). Pipeline parallelism splits layers the way vLLM's
``get_pp_indices`` does. MTP/next-n layers (``layers.{num_hidden_layers}+``) are not loaded by ``vllm serve``
and are not counted.

Bytes counted per tensor: packed ``qweight``/``qzeros`` as stored; ``scales`` at 2 bytes (Marlin keeps them
in the activation dtype); ``g_idx`` 0 (dropped without act-order); float weights at the model dtype, which is
how vLLM loads them (a float32 ``kv_b_proj`` from ``w3repack convert`` costs 2 bytes/elem in bf16), except
``e_score_correction_bias`` (vLLM keeps it float32). A still-quantized ``kv_b_proj`` adds its dequantized
bf16 copy (MLA weight absorption).

Memory model per GPU (vLLM V1): budget = ``gpu_memory × utilization``; KV cache = budget − weights on GPU −
allowances. Allowances (stated, not measured on every card): activations 1.0 GiB per 2048 batched tokens at
hidden size 7168, scaled linearly with both, at least 0.5 GiB; CUDA graphs 0.5 GiB (0 with eager mode);
NCCL/cuBLAS/non-torch 0.5 GiB with more than one GPU, else 0.25 GiB. The CUDA context (~0.5 GiB) sits
outside the budget and must fit in ``(1 − utilization) × gpu_memory``.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from repack.errors import FormatError, UserError
from repack.safetensors_io import read_header

GIB = 1 << 30
DEFAULT_GPUS = 8
DEFAULT_GPU_MEMORY_GIB = 24.0
DEFAULT_CC = "8.6"
DEFAULT_UTILIZATION = 0.90
MIN_CONTEXT = 4096
CONTEXT_STEP = 1024
ACT_GIB_PER_2K_TOKENS = 1.0
ACT_REF_HIDDEN = 7168
ACT_MIN_GIB = 0.5
CUDA_GRAPHS_GIB = 0.5
NON_TORCH_GIB_MULTI = 0.5
NON_TORCH_GIB_SINGLE = 0.25
CUDA_CONTEXT_GIB = 0.5
INDEXER_QUANT_BLOCK = 128
QUANT_PARTS = ("qweight", "qzeros", "scales", "g_idx")
LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")
COL = {"q_proj", "k_proj", "v_proj", "qkv_proj", "q_b_proj", "kv_b_proj", "gate_proj", "up_proj", "gate_up_proj",
       "w1", "w3", "c_fc", "c_attn", "query_key_value", "fc1", "wqkv"}
ROW = {"o_proj", "down_proj", "w2", "dense", "c_proj", "fc2", "out_proj", "wo"}
VOCAB = {"embed_tokens", "lm_head", "head", "wte", "word_embeddings", "embed_in", "embed_out"}
REPLICATED = {"q_a_proj", "kv_a_proj_with_mqa", "gate", "router"}
CONSUMER_RE = re.compile(r"GeForce|RTX [2-5]0[5-9]0", re.I)


@dataclass
class Gpu:
    count: int
    memory_gib: float
    cc: str
    name: str | None = None
    source: dict = field(default_factory=dict)

    @property
    def cc_tuple(self) -> tuple[int, int]:
        major, _, minor = self.cc.partition(".")
        return int(major), int(minor or 0)


@dataclass
class Request:
    tp: int
    gpu: Gpu
    pp: int = 1
    max_model_len: int | None = None
    kv_cache_dtype: str = "auto"
    utilization: float = DEFAULT_UTILIZATION
    cpu_offload_gib: float = 0.0
    max_num_batched_tokens: int | None = None
    enforce_eager: bool = False
    consumer_pcie: bool | None = None
    speculative: int = 0  # MTP draft tokens (deepseek_mtp); > 0 loads the MTP layers
    extra_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class Model:
    root: Path
    config: dict
    tensors: list[tuple[str, str, tuple[int, ...], int]]

    @property
    def layers(self) -> int:
        return int(self.config.get("num_hidden_layers") or 0)

    @property
    def mla(self) -> bool:
        return bool(self.config.get("kv_lora_rank"))

    @property
    def v32(self) -> bool:
        archs = self.config.get("architectures") or []
        return ("index_topk" in self.config or "DeepseekV32ForCausalLM" in archs
                or self.config.get("model_type") == "deepseek_v32")

    @property
    def dtype_bytes(self) -> int:
        dt = str(self.config.get("torch_dtype") or self.config.get("dtype") or "bfloat16")
        return 4 if dt in ("float32", "float") else 2

    @property
    def max_positions(self) -> int:
        return int(self.config.get("max_position_embeddings") or 0)

    @property
    def quant_method(self) -> str | None:
        qc = self.config.get("quantization_config")
        return str(qc.get("quant_method")) if isinstance(qc, dict) and qc.get("quant_method") else None


def load_model(root: str | Path) -> Model:
    """config.json and every shard header (no tensor data is read)."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root}: not a checkpoint folder")
    cpath = root / "config.json"
    try:
        config = json.loads(cpath.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise UserError(f"{cpath}: config.json not found") from e
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{cpath}: not readable JSON ({e})") from e
    if not isinstance(config, dict):
        raise FormatError(f"{cpath}: not a JSON object")
    if isinstance(config.get("text_config"), dict) and "num_hidden_layers" not in config:
        config = {**config["text_config"], "quantization_config": config.get("quantization_config")}
    ipath = root / "model.safetensors.index.json"
    if ipath.exists():
        try:
            wm = json.loads(ipath.read_text(encoding="utf-8"))["weight_map"]
            shards = sorted(set(wm.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise FormatError(f"{ipath}: no readable weight_map ({e})") from e
    else:
        shards = sorted(p.name for p in root.glob("*.safetensors"))
    if not shards:
        raise UserError(f"{root}: no safetensors shards")
    tensors = []
    for s in shards:
        for t in read_header(root / s).ordered():
            tensors.append((t.name, t.dtype, t.shape, t.nbytes))
    return Model(root, config, tensors)


def stage_layers(num_layers: int, pp: int) -> list[range]:
    """Layer ranges per pipeline stage as vLLM's ``get_pp_indices`` assigns them (extra layers go to the
    stages before the last)."""
    base = num_layers // pp
    sizes = [base] * pp
    for i in range(2, num_layers % pp + 2):
        sizes[-i] += 1
    out, start = [], 0
    for s in sizes:
        out.append(range(start, start + s))
        start += s
    return out


def _rule(module: str) -> str:
    parts = module.split(".")
    leaf = parts[-1]
    if "indexer" in parts or "norm" in leaf or leaf in REPLICATED:
        return "rep"
    if leaf in VOCAB:
        return "vocab"
    if leaf in COL:
        return "col"
    if leaf in ROW:
        return "row"
    return "rep"


def _per_rank(model: Model, module: str, rule: str, nbytes: float, shape: tuple[int, ...], tp: int, quantized: bool) -> float:
    if rule == "vocab" and not quantized and shape:
        rows = shape[0]
        padded = -(-rows // 64) * 64
        return -(-padded // tp) * (nbytes / rows)
    if rule in ("col", "row", "vocab"):
        leaf = module.rsplit(".", 1)[-1]
        kv_heads = model.config.get("num_key_value_heads")
        if leaf in ("k_proj", "v_proj") and not model.mla and isinstance(kv_heads, int) and kv_heads > 0:
            return nbytes / min(tp, kv_heads)
        return nbytes / tp
    return nbytes


@dataclass
class Weights:
    per_stage: list[float]
    skipped_mtp_bytes: int
    by_class: dict[str, float]
    quant_bits: dict[int, int]
    quantized_kv_b: int
    quantized_indexer: int = 0


def mtp_layer_count(model: Model) -> int:
    """MTP (next-n) layers the checkpoint holds: ``layers.{num_hidden_layers}+`` with tensors."""
    n = model.layers
    return len({int(m.group(1)) for t in model.tensors if (m := LAYER_RE.search(t[0])) and n and int(m.group(1)) >= n})


def quant_bits(model: Model) -> dict[int, int]:
    """Quantized modules per width, widths from shapes: ``32 * qzeros.shape[1] / scales.shape[1]``."""
    shapes: dict[str, dict[str, tuple[int, ...]]] = {}
    for name, _, shape, _ in model.tensors:
        module, _, part = name.rpartition(".")
        if part in ("qzeros", "scales"):
            shapes.setdefault(module, {})[part] = shape
    bits: dict[int, int] = {}
    for parts in shapes.values():
        if len(parts) == 2 and len(parts["scales"]) == 2 and parts["scales"][1]:
            b = 32 * parts["qzeros"][1] // parts["scales"][1]
            bits[b] = bits.get(b, 0) + 1
    return dict(sorted(bits.items()))


def weights_per_gpu(model: Model, tp: int, pp: int, mtp: bool = False) -> Weights:
    """Bytes of weights each GPU of each pipeline stage holds; MTP layers (``layers.{n}+``) only with ``mtp``,
    on the last stage (vLLM builds the draft model there)."""
    n = model.layers
    ranges = stage_layers(n, pp) if n else [range(0)] * pp
    stage_of = {}
    for s, r in enumerate(ranges):
        for layer in r:
            stage_of[layer] = s
    per_stage = [0.0] * pp
    by_class: dict[str, float] = {}
    skipped = 0
    modules: dict[str, dict] = {}
    for name, dtype, shape, nbytes in model.tensors:
        module, _, part = name.rpartition(".")
        m = LAYER_RE.search(name)
        if m:
            layer = int(m.group(1))
            if n and layer >= n and not mtp:
                skipped += nbytes
                continue
            stage = stage_of.get(layer, pp - 1)
        elif "embed" in module:
            stage = 0
        else:
            stage = pp - 1 if module.rsplit(".", 1)[-1] in VOCAB or "norm" in module else 0
        quantized = part in QUANT_PARTS
        numel = math.prod(shape) if shape else 1
        if quantized:
            modules.setdefault(module, {})[part] = shape
            loaded = 0 if part == "g_idx" else numel * 2 if part == "scales" else nbytes
        elif part == "e_score_correction_bias":
            loaded = numel * 4
        elif dtype in ("F16", "BF16", "F32", "F64"):
            loaded = numel * model.dtype_bytes
        else:
            loaded = nbytes
        rule = _rule(module)
        b = _per_rank(model, module, rule, loaded, shape, tp, quantized)
        per_stage[stage] += b
        key = "MTP layer (speculative decoding)" if m and n and int(m.group(1)) >= n else _class(module, quantized)
        by_class[key] = by_class.get(key, 0.0) + b
    bits: dict[int, int] = {}
    qkvb = qidx = 0
    for module, parts in modules.items():
        if not {"qweight", "qzeros", "scales"} <= set(parts):
            continue
        n_out = parts["scales"][1]
        b = 32 * parts["qzeros"][1] // n_out if n_out else 0
        bits[b] = bits.get(b, 0) + 1
        if module.endswith((".indexer.wk", ".indexer.weights_proj")):
            qidx += 1
        if module.endswith("kv_b_proj") and b:
            qkvb += 1
            k_in = parts["qweight"][0] * 32 // b
            extra = n_out * k_in * model.dtype_bytes / tp
            m = LAYER_RE.search(module)
            per_stage[stage_of.get(int(m.group(1)), pp - 1) if m else 0] += extra
            by_class["kv_b_proj dequantized copy"] = by_class.get("kv_b_proj dequantized copy", 0.0) + extra
    return Weights(per_stage, skipped, by_class, dict(sorted(bits.items())), qkvb, qidx)


def _class(module: str, quantized: bool) -> str:
    if ".experts." in module:
        return "routed experts"
    if "shared_experts" in module:
        return "shared experts"
    if ".indexer" in module:
        return "indexer"
    if "self_attn" in module or "attention" in module:
        return "attention" + (" (quantized)" if quantized else " (float)")
    if ".mlp." in module or module.endswith(".mlp"):
        return "dense mlp / router"
    if "embed" in module or "lm_head" in module:
        return "embeddings / lm_head"
    return "norms / other"


def kv_bytes_per_layer(model: Model, tp: int, kv_dtype: str) -> tuple[int, int]:
    """(attention KV bytes, V3.2 indexer cache bytes) per token per layer on one GPU.

    DeepSeek MLA caches ``kv_lora_rank + qk_rope_head_dim`` values per token on every rank (not split by TP):
    2 bytes each in bf16; with fp8, 1 byte each (V3) or vLLM's ``fp8_ds_mla`` layout for V3.2 (the latent in
    fp8 plus a float32 scale per 128 values plus the rope part in bf16: 656 bytes at 512/64). The V3.2 indexer
    cache holds ``index_head_dim`` fp8 values plus a 4-byte scale per 128 (vLLM's ``DeepseekV32IndexerCache``
    of ``index_head_dim + index_head_dim // 128 * 4`` uint8: 132 bytes at 128),
    per token per layer on every rank. Standard attention: ``2 × kv_heads/TP × head_dim`` values (at least
    one head per rank).
    """
    c = model.config
    fp8 = kv_dtype.startswith("fp8")
    if model.mla:
        lora, rope = int(c["kv_lora_rank"]), int(c.get("qk_rope_head_dim") or 0)
        if fp8 and model.v32:
            attn = lora + lora // 128 * 4 + rope * 2
        else:
            attn = (lora + rope) * (1 if fp8 else model.dtype_bytes)
        idx = 0
        if model.v32:
            d = int(c.get("index_head_dim") or 128)
            idx = d + max(1, d // INDEXER_QUANT_BLOCK) * 4
        return attn, idx
    heads = int(c.get("num_attention_heads") or 1)
    kv_heads = int(c.get("num_key_value_heads") or heads)
    head_dim = int(c.get("head_dim") or int(c.get("hidden_size", 0)) // heads)
    per_rank = max(1, kv_heads // tp)
    return 2 * per_rank * head_dim * (1 if fp8 else model.dtype_bytes), 0


@dataclass
class Fit:
    tp: int
    pp: int
    gpus: int
    weights_gib_per_gpu: float
    weights_gib_on_gpu: float
    kv_bytes_per_token: int
    kv_bytes_per_token_attention: int
    kv_bytes_per_token_indexer: int
    budget_gib: float
    allowances_gib: dict
    kv_cache_gib: float
    capacity_tokens: int
    max_model_len: int
    fits: bool
    reason: str


def allowances(model: Model, req: Request) -> dict:
    tokens = req.max_num_batched_tokens or default_batched_tokens(req.gpu)
    hidden = int(model.config.get("hidden_size") or ACT_REF_HIDDEN)
    act = max(ACT_MIN_GIB, ACT_GIB_PER_2K_TOKENS * tokens / 2048 * hidden / ACT_REF_HIDDEN)
    return {
        "activations": round(act, 3),
        "cuda_graphs": 0.0 if req.enforce_eager else CUDA_GRAPHS_GIB,
        "non_torch": NON_TORCH_GIB_MULTI if req.tp * req.pp > 1 else NON_TORCH_GIB_SINGLE,
        "max_num_batched_tokens": tokens,
    }


def default_batched_tokens(gpu: Gpu) -> int:
    """vLLM's default ``max_num_batched_tokens`` for ``vllm serve``: 8192 on GPUs with >= 70 GiB (not A100), else 2048."""
    big = gpu.memory_gib >= 70 and "a100" not in (gpu.name or "").lower()
    return 8192 if big else 2048


def fit(model: Model, req: Request, weights: Weights | None = None) -> Fit:
    w = weights or weights_per_gpu(model, req.tp, req.pp, bool(req.speculative))
    attn, idx = kv_bytes_per_layer(model, req.tp, req.kv_cache_dtype)
    ranges = stage_layers(model.layers, req.pp) if model.layers else [range(0)] * req.pp
    al = allowances(model, req)
    overhead = al["activations"] + al["cuda_graphs"] + al["non_torch"]
    budget = req.gpu.memory_gib * req.utilization
    cap = None
    kv_gib_min = None
    for s, r in enumerate(ranges):
        per_token = (attn + idx) * len(r)
        kv = budget - max(0.0, w.per_stage[s] / GIB - req.cpu_offload_gib) - overhead
        tokens = int(kv * GIB // per_token) if per_token and kv > 0 else (0 if kv <= 0 else 1 << 40)
        cap = tokens if cap is None else min(cap, tokens)
        kv_gib_min = kv if kv_gib_min is None else min(kv_gib_min, kv)
    worst = max(range(req.pp), key=lambda s: len(ranges[s]))
    per_token_worst = (attn + idx) * len(ranges[worst])
    weights_max = max(w.per_stage) / GIB
    model_max = model.max_positions or (1 << 20)
    if req.max_model_len:
        planned = req.max_model_len
        fits = kv_gib_min > 0 and cap >= planned
        reason = "" if fits else (
            f"weights and allowances exceed the {budget:.2f} GiB budget" if kv_gib_min <= 0
            else f"KV cache holds {cap} tokens, fewer than --max-model-len {planned}")
        if planned > model_max:
            reason = reason or f"--max-model-len {planned} is above the model's max_position_embeddings {model_max}"
            fits = False
    else:
        planned = min(model_max, cap // CONTEXT_STEP * CONTEXT_STEP) if cap >= CONTEXT_STEP else cap
        fits = kv_gib_min > 0 and planned >= min(MIN_CONTEXT, model_max)
        reason = "" if fits else (
            f"weights and allowances exceed the {budget:.2f} GiB budget" if kv_gib_min <= 0
            else f"KV cache holds {cap} tokens, fewer than the {MIN_CONTEXT}-token minimum")
    return Fit(req.tp, req.pp, req.tp * req.pp, round(weights_max, 3),
               round(max(0.0, weights_max - req.cpu_offload_gib), 3), per_token_worst, attn * len(ranges[worst]),
               idx * len(ranges[worst]), round(budget, 3), al, round(kv_gib_min, 3), max(cap, 0), max(planned, 0),
               bool(fits), reason)


def vllm_args(req: Request, f: Fit) -> list[str]:
    """Memory-relevant ``vllm serve`` arguments of a plan (version-specific flags are the launcher's)."""
    args = ["--tensor-parallel-size", str(req.tp)]
    if req.pp > 1:
        args += ["--pipeline-parallel-size", str(req.pp)]
    if f.max_model_len > 0:
        args += ["--max-model-len", str(f.max_model_len)]
    args += ["--gpu-memory-utilization", f"{req.utilization:g}"]
    if req.kv_cache_dtype != "auto":
        args += ["--kv-cache-dtype", req.kv_cache_dtype]
    if req.cpu_offload_gib:
        args += ["--cpu-offload-gb", f"{req.cpu_offload_gib:g}"]
    if req.max_num_batched_tokens:
        args += ["--max-num-batched-tokens", str(req.max_num_batched_tokens)]
    if req.enforce_eager:
        args += ["--enforce-eager"]
    if req.speculative:
        args += ["--speculative-config", json.dumps({"method": "deepseek_mtp", "num_speculative_tokens": req.speculative},
                                                    separators=(",", ":"))]
    return args + list(req.extra_args)


def warnings_for(model: Model, req: Request, w: Weights, native: bool = False) -> list[str]:
    """What the user must know before serving; ``native``: the model is served as 3-bit by vLLM >= 0.30, which
    loads low-bit modules and a quantized ``kv_b_proj`` (the 0.26 crash is fixed from 0.28)."""
    out = []
    cc = req.gpu.cc_tuple
    if model.quant_method and cc < (8, 0):
        out.append(f"compute capability {req.gpu.cc}: vLLM's Marlin kernels for 4-bit GPTQ need cc >= 8.0 "
                   "(>= 7.5 in recent versions); this GPU may not load the model at all")
    low = {b: c for b, c in w.quant_bits.items() if b not in (4, 8)}
    if low and not native:
        desc = ", ".join(f"{c} modules at {b} bits" for b, c in low.items())
        out.append(f"{desc}: stock vLLM serves them natively from 0.30 on (Humming kernels); vLLM <= 0.29 and SGLang "
                   "refuse them: convert first (w3repack convert MODEL OUT)")
    if w.quantized_kv_b and not native:
        out.append(f"{w.quantized_kv_b} quantized kv_b_proj modules: vLLM 0.26 crashes on every prompt longer than one "
                   "scheduler step (MLA prefill context); convert with --kv-b-float (the default) to store them in float")
    if w.quantized_indexer:
        out.append(f"{w.quantized_indexer} quantized indexer wk/weights_proj modules: vLLM loads them only as float "
                   "weights; convert with --indexer-float (the default) to store them dequantized")
    if model.v32 and cc < (9, 0):
        out.append(f"DeepSeek-V3.2 sparse attention (indexer) needs sm90+ in vLLM; cc {req.gpu.cc} has no backend for it "
                   "in stock vLLM. Convert with --dense-attention (a DeepSeek-V3 dense-MLA config, indexer left out): "
                   f"exact up to index_topk={model.config.get('index_topk')} tokens of context, an approximation beyond. "
                   f"This plan counts the indexer ({w.by_class.get('indexer', 0) / GIB:.2f} GiB/GPU of weights and its cache); "
                   "the dense fallback drops both")
    if req.kv_cache_dtype.startswith("fp8") and model.mla and cc < (8, 9):
        out.append(f"--kv-cache-dtype {req.kv_cache_dtype}: fp8 KV cache for MLA needs sm89+; cc {req.gpu.cc} will refuse it")
    if req.tp * req.pp > 1 and _consumer(req):
        out.append("consumer PCIe GPUs (no peer-to-peer): if NCCL hangs or errors at start, set NCCL_P2P_DISABLE=1 and "
                   "pass --disable-custom-all-reduce")
    if (1 - req.utilization) * req.gpu.memory_gib < CUDA_CONTEXT_GIB:
        out.append(f"--gpu-memory-utilization {req.utilization:g} leaves {(1 - req.utilization) * req.gpu.memory_gib:.2f} GiB "
                   f"outside vLLM's budget; the CUDA context needs about {CUDA_CONTEXT_GIB} GiB there")
    if req.cpu_offload_gib:
        out.append(f"--cpu-offload-gb {req.cpu_offload_gib:g}: {req.cpu_offload_gib:g} GiB of weights per GPU live in host "
                   f"memory ({req.cpu_offload_gib * req.tp * req.pp:g} GiB of pinned RAM in all) and cross PCIe on every "
                   "forward pass: expect much lower throughput")
    return out


def _consumer(req: Request) -> bool:
    if req.consumer_pcie is not None:
        return req.consumer_pcie
    if req.gpu.name:
        return bool(CONSUMER_RE.search(req.gpu.name))
    return req.gpu.cc in ("8.6", "8.9", "12.0") and req.gpu.memory_gib <= 32


def alternatives(model: Model, req: Request, f: Fit) -> list[dict]:
    """Layouts and settings that would fit, with their numbers (only when the request does not)."""
    out = []
    want = req.max_model_len or min(MIN_CONTEXT, model.max_positions or MIN_CONTEXT)

    def add(kind: str, text: str, r: Request) -> None:
        g = fit(model, r)
        if g.fits:
            out.append({"kind": kind, "description": text, "gpus": g.gpus, "tensor_parallel": r.tp,
                        "pipeline_parallel": r.pp, "weights_gib_per_gpu": g.weights_gib_per_gpu,
                        "max_model_len": g.max_model_len, "capacity_tokens": g.capacity_tokens,
                        "vllm_args": vllm_args(r, g)})

    if req.max_model_len and f.kv_cache_gib > 0 and f.capacity_tokens >= CONTEXT_STEP:
        short = f.capacity_tokens // CONTEXT_STEP * CONTEXT_STEP
        add("shorter-context", f"--max-model-len {short}", replace(req, max_model_len=short))
    if req.utilization < 0.95:
        add("utilization", "--gpu-memory-utilization 0.95", replace(req, utilization=0.95))
    if req.kv_cache_dtype == "auto" and req.gpu.cc_tuple >= (8, 9):
        add("fp8-kv", "--kv-cache-dtype fp8 (sm89+)", replace(req, kv_cache_dtype="fp8"))
    al = allowances(model, req)
    overhead = al["activations"] + al["cuda_graphs"] + al["non_torch"]
    need = f.weights_gib_per_gpu + overhead + f.kv_bytes_per_token * want / GIB - f.budget_gib
    if need > 0:
        off = math.ceil((need + req.cpu_offload_gib) * 2) / 2
        add("cpu-offload", f"--cpu-offload-gb {off:g} per GPU ({off * req.tp * req.pp:g} GiB host RAM; slow)",
            replace(req, cpu_offload_gib=off, max_model_len=want))
    for pp in (2, 3, 4):
        r = replace(req, pp=req.pp * pp, cpu_offload_gib=0.0)
        add("pipeline-parallel", f"{r.tp * r.pp} GPUs: TP {r.tp} x PP {r.pp} ({r.pp} nodes of {r.tp}, --nodes {r.pp})", r)
        if any(a["kind"] == "pipeline-parallel" for a in out):
            break
    if req.tp % 2 == 0 and req.tp >= 4:
        r = replace(req, tp=req.tp // 2, pp=req.pp * 2)
        add("pipeline-parallel-same-gpus", f"same {r.tp * r.pp} GPUs as TP {r.tp} x PP {r.pp} (MLA KV is split by PP, not TP)", r)
    return out


@dataclass
class MemoryPlan:
    """One serving layout's memory plan; ``to_json()`` gives the stable keys of ``w3repack plan --json``."""

    model: str
    architecture: str
    gpu: Gpu
    tensor_parallel: int
    pipeline_parallel: int
    weights_gib_per_gpu: float
    weights_gib_on_gpu: float
    weights_gib_per_stage: list[float]
    weights_gib_by_class: dict[str, float]
    mtp_bytes_not_loaded: int
    kv_cache_dtype: str
    kv_bytes_per_token: int
    kv_bytes_per_token_attention: int
    kv_bytes_per_token_indexer: int
    gpu_memory_utilization: float
    budget_gib: float
    allowances_gib: dict
    kv_cache_gib: float
    capacity_tokens: int
    max_model_len: int
    model_max_position_embeddings: int
    fits: bool
    reason: str
    warnings: list[str]
    alternatives: list[dict]
    vllm_args: list[str]
    env: dict[str, str]

    @property
    def gpus(self) -> int:
        return self.tensor_parallel * self.pipeline_parallel

    def to_json(self) -> dict:
        out = asdict(self)
        g = self.gpu
        out["gpu"] = {"count": g.count, "memory_gib": g.memory_gib, "compute_capability": g.cc, "name": g.name,
                      "source": g.source}
        out["gpus"] = self.gpus
        return out


def plan(model: Model, req: Request, native: bool = False) -> MemoryPlan:
    """The memory plan of ``model`` served as ``req`` asks; ``native``: served at 3 bits by vLLM >= 0.30."""
    w = weights_per_gpu(model, req.tp, req.pp, bool(req.speculative))
    f = fit(model, req, w)
    warns = warnings_for(model, req, w, native)
    if req.gpu.source.get("count") == "default" or req.gpu.source.get("memory_gib") == "default":
        warns.insert(0, f"GPU facts assumed (no nvidia-smi, no option): {req.gpu.count} x {req.gpu.memory_gib:g} GiB, "
                        f"cc {req.gpu.cc}; pass --gpus/--gpu-memory/--compute-capability or --recipe")
    return MemoryPlan(
        model=str(model.root),
        architecture=(model.config.get("architectures") or ["?"])[0],
        gpu=req.gpu,
        tensor_parallel=req.tp,
        pipeline_parallel=req.pp,
        weights_gib_per_gpu=f.weights_gib_per_gpu,
        weights_gib_on_gpu=f.weights_gib_on_gpu,
        weights_gib_per_stage=[round(b / GIB, 3) for b in w.per_stage],
        weights_gib_by_class={k: round(v / GIB, 3) for k, v in sorted(w.by_class.items())},
        mtp_bytes_not_loaded=w.skipped_mtp_bytes,
        kv_cache_dtype=req.kv_cache_dtype,
        kv_bytes_per_token=f.kv_bytes_per_token,
        kv_bytes_per_token_attention=f.kv_bytes_per_token_attention,
        kv_bytes_per_token_indexer=f.kv_bytes_per_token_indexer,
        gpu_memory_utilization=req.utilization,
        budget_gib=f.budget_gib,
        allowances_gib=f.allowances_gib,
        kv_cache_gib=f.kv_cache_gib,
        capacity_tokens=f.capacity_tokens,
        max_model_len=f.max_model_len,
        model_max_position_embeddings=model.max_positions,
        fits=f.fits,
        reason=f.reason,
        warnings=warns,
        alternatives=[] if f.fits else alternatives(model, req, f),
        vllm_args=vllm_args(req, f),
        env=dict(req.env),
    )


def nvidia_smi() -> Gpu | None:
    """GPU count, memory (GiB, smallest card) and compute capability from nvidia-smi, or None."""
    exe = shutil.which("nvidia-smi")
    if not exe:
        return None
    try:
        r = subprocess.run([exe, "--query-gpu=name,memory.total,compute_cap", "--format=csv,noheader,nounits"],
                           capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    rows = [[c.strip() for c in line.split(",")] for line in r.stdout.splitlines() if line.strip()]
    rows = [row for row in rows if len(row) >= 3]
    if r.returncode != 0 or not rows:
        return None
    try:
        mem = min(float(row[1]) for row in rows) / 1024
        cc = min((row[2] for row in rows), key=lambda s: tuple(int(x) for x in s.split(".")))
    except ValueError:
        return None
    return Gpu(len(rows), round(mem, 2), cc, rows[0][0])


def resolve_gpu(gpus: int | None, memory_gib: float | None, cc: str | None, recipe: dict | None = None,
                name: str | None = None, probe: bool = True) -> Gpu:
    """Explicit options, then the recipe, then nvidia-smi, then the stated defaults; each fact says its source."""
    hw = (recipe or {}).get("hardware", {})
    smi = nvidia_smi() if probe and (gpus is None or memory_gib is None or cc is None) else None
    src = {}

    def pick(key, given, from_recipe, from_smi, default):
        for value, where in ((given, "option"), (from_recipe, "recipe"), (from_smi, "nvidia-smi"), (default, "default")):
            if value is not None:
                src[key] = where
                return value

    count = pick("count", gpus, hw.get("gpus"), smi.count if smi else None, DEFAULT_GPUS)
    mem = pick("memory_gib", memory_gib, hw.get("gpu_memory_gib"), smi.memory_gib if smi else None, DEFAULT_GPU_MEMORY_GIB)
    cap = pick("cc", cc, hw.get("compute_capability"), smi.cc if smi else None, DEFAULT_CC)
    gname = name or hw.get("gpu_name") or (smi.name if smi else None)
    cap = str(cap)
    if not re.fullmatch(r"\d+(\.\d+)?", cap):
        raise UserError(f"--compute-capability {cap!r}: expected MAJOR.MINOR, e.g. 8.6")
    if int(count) < 1 or float(mem) <= 0:
        raise UserError(f"--gpus {count} / --gpu-memory {mem}: must be positive")
    return Gpu(int(count), float(mem), cap, gname, src)


def check_request(req: Request) -> None:
    if not 0 < req.utilization <= 1:
        raise UserError(f"--gpu-memory-utilization {req.utilization}: must be in (0, 1]")
    if req.kv_cache_dtype not in ("auto", "fp8", "fp8_e4m3", "fp8_e5m2", "bfloat16"):
        raise UserError(f"--kv-cache-dtype {req.kv_cache_dtype!r}: expected auto or fp8")
    if req.max_model_len is not None and req.max_model_len < 1:
        raise UserError(f"--max-model-len {req.max_model_len}: must be positive")
    if req.cpu_offload_gib < 0:
        raise UserError("--cpu-offload-gb must not be negative")
