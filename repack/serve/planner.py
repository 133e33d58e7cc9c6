"""GPU memory plan for serving a checkpoint with vLLM, from shard headers and config.json alone.

Weights per GPU: each tensor's share on one rank (:mod:`repack.serve.sharding`, from the model's
:class:`~repack.serve.arch.ArchSpec`), counted as vLLM holds it: packed ``qweight``/``qzeros`` as stored;
``scales`` at 2 bytes (Marlin/Humming keep them in the activation dtype); ``g_idx`` 0 (dropped without act-order);
float weights at the model dtype (a float32 ``kv_b_proj`` from ``w3repack convert`` costs 2 bytes/elem in bf16),
except ``e_score_correction_bias`` (vLLM keeps it float32). A still-quantized ``kv_b_proj`` adds its dequantized
bf16 copy (MLA weight absorption). Pipeline parallelism splits layers the way vLLM's ``get_pp_indices`` does.
MTP/next-n layers (``layers.{num_hidden_layers}+``) are loaded only for speculative decoding.

Memory per GPU follows vLLM's own accounting (:mod:`repack.serve.calibration`): budget = the memory CUDA reports
(below nvidia-smi's total) × utilization; KV cache = budget − weights − the allowances calibrated for this vLLM
version (non-torch memory, the activation peak at ``max_num_batched_tokens``, CUDA graphs), less a stated
allowance for what one GPU cannot show at TP > 1 (lazily connected NCCL channels) and a margin. A rehearsal
(``w3repack rehearse``) replaces the KV figure by what vLLM itself allocated for one rank.
"""

from __future__ import annotations

import bisect
import json
import math
import re
import shutil
import subprocess
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from repack.errors import FormatError, UserError
from repack.serve import calibration
from repack.serve.arch import ArchSpec, Layout, spec_for, unknown_warning
from repack.serve.arch.base import LAYER_RE, positive_int
from repack.serve.sharding import QUANT_PARTS, shard

GIB = 1 << 30
DEFAULT_GPUS = 8
DEFAULT_GPU_MEMORY_GIB = 24.0
DEFAULT_CC = "8.6"
DEFAULT_UTILIZATION = 0.90
MIN_CONTEXT = 4096
CONTEXT_STEP = 1024
KV_BLOCK = 64  # tokens per KV block at most (FlashMLA's block size; others use 16): capacity is rounded to it
MAX_LAYERS = 10_000
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

    @property
    def card(self) -> calibration.CardMemory:
        """The memory CUDA can use on this card (below nvidia-smi's ``memory_gib``)."""
        return calibration.card_memory(self.memory_gib, self.name)


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
    speculative: int = 0  # MTP draft tokens; > 0 loads the MTP layers
    ep: bool = False  # vLLM's --enable-expert-parallel: routed experts whole, spread over the TP ranks
    extra_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    vllm_version: str | None = None  # picks the calibration of the allowances


@dataclass
class Model:
    """``tensors``: (name, dtype, shape, bytes) of every tensor, in file order; ``ckpt``: the checkpoint read, when
    there is one (the conversion plans of the serving paths are built from it)."""

    root: Path
    config: dict
    tensors: list[tuple[str, str, tuple[int, ...], int]]
    ckpt: object | None = field(default=None, repr=False, compare=False)
    derived: dict = field(default_factory=dict, repr=False, compare=False)  # conversions planned from it, by options

    @property
    def spec(self) -> ArchSpec:
        if "spec" not in self.derived:
            self.derived["spec"] = spec_for(self.config)
        return self.derived["spec"]

    def shard(self, layout: Layout) -> list:
        """Every tensor's split under ``layout`` (:func:`repack.serve.sharding.shard`), computed once."""
        key = ("shard", layout)
        if key not in self.derived:
            self.derived[key] = shard(self.spec, self.tensors, layout)
        return self.derived[key]

    @property
    def layers(self) -> int:
        v = self.config.get("num_hidden_layers")
        return v if isinstance(v, int) and not isinstance(v, bool) and 0 < v <= MAX_LAYERS else 0

    @property
    def mla(self) -> bool:
        return self.spec.mla

    @property
    def v32(self) -> bool:
        return bool(getattr(self.spec, "v32", False))

    @property
    def dtype_bytes(self) -> int:
        dt = str(self.config.get("torch_dtype") or self.config.get("dtype") or "bfloat16")
        return 4 if dt in ("float32", "float") else 2

    @property
    def max_positions(self) -> int:
        v = self.config.get("max_position_embeddings")
        return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else 0

    @property
    def quant_method(self) -> str | None:
        qc = self.config.get("quantization_config")
        return str(qc.get("quant_method")) if isinstance(qc, dict) and qc.get("quant_method") else None


CHECKED_KEYS = ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                "vocab_size", "max_position_embeddings", "intermediate_size", "moe_intermediate_size",
                "n_routed_experts", "num_experts", "num_experts_per_tok", "kv_lora_rank", "qk_rope_head_dim",
                "index_head_dim", "num_nextn_predict_layers", "first_k_dense_replace")


def check_config(config: dict, where: Path | str) -> None:
    """Type and range of every config value the plan uses; a FormatError naming the key otherwise."""
    for key in CHECKED_KEYS:
        if key in config and config[key] is not None:
            if key in ("num_nextn_predict_layers", "first_k_dense_replace"):
                v = config[key]
                if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= MAX_LAYERS:
                    raise FormatError(f"{where}: {key} is {v!r}, expected an integer from 0 to {MAX_LAYERS}")
                continue
            positive_int(config, key, where=str(where))
    positive_int(config, "num_hidden_layers", where=str(where))
    if config["num_hidden_layers"] > MAX_LAYERS:
        raise FormatError(f"{where}: num_hidden_layers is {config['num_hidden_layers']}, more than {MAX_LAYERS}")
    dt = config.get("torch_dtype", config.get("dtype"))
    if dt is not None and not isinstance(dt, str):
        raise FormatError(f"{where}: torch_dtype is {dt!r}, expected a string such as bfloat16")


def model_from_checkpoint(ckpt) -> Model:
    """The planner's view of a :class:`repack.checkpoint.Checkpoint` (config and headers; no tensor data)."""
    config = ckpt.config
    if isinstance(config.get("text_config"), dict) and "num_hidden_layers" not in config:
        config = {**config["text_config"], "quantization_config": config.get("quantization_config")}
    check_config(config, ckpt.root / "config.json")
    tensors = [(t.name, t.dtype, tuple(t.shape), t.nbytes) for h in ckpt.shards.values() for t in h.ordered()]
    return Model(ckpt.root, config, tensors, ckpt)


def load_model(root: str | Path) -> Model:
    """config.json, the index and every shard header, through the converter's bounded strict readers."""
    from repack.checkpoint import open_checkpoint

    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root}: not a checkpoint folder")
    return model_from_checkpoint(open_checkpoint(root))


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


def _stage_of(ranges: list[range], layer: int) -> int:
    """The pipeline stage holding ``layer``; layers past the last (MTP) go to the last stage."""
    return min(bisect.bisect_right([r.start for r in ranges], layer) - 1, len(ranges) - 1) if ranges else 0


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


def loaded_bytes(model: Model, name: str, dtype: str, shape: tuple[int, ...], nbytes: int) -> int:
    """Bytes vLLM holds for a whole tensor (before sharding): see the module docstring."""
    part = name.rpartition(".")[2]
    numel = math.prod(shape) if shape else 1
    if part == "g_idx":
        return 0
    if part == "scales":
        return numel * 2
    if part in QUANT_PARTS:
        return nbytes
    if part == "e_score_correction_bias":
        return numel * 4
    if dtype in ("F16", "BF16", "F32", "F64"):
        return numel * model.dtype_bytes
    return nbytes


def weights_per_gpu(model: Model, tp: int, pp: int, mtp: bool = False, ep: bool = False) -> Weights:
    """Bytes of weights each GPU of each pipeline stage holds; MTP layers (``layers.{n}+``) only with ``mtp``,
    on the last stage (vLLM builds the draft model there)."""
    n = model.layers
    ranges = stage_layers(n, pp) if n else [range(0)] * pp
    per_stage = [0.0] * pp
    by_class: dict[str, float] = {}
    skipped = 0
    modules: dict[str, dict] = {}
    rank = model.shard(Layout(tp, pp, ep))
    for t, (name, dtype, shape, nbytes) in zip(rank, model.tensors, strict=True):
        module, part = t.module, t.part
        m = LAYER_RE.search(name)
        is_mtp = bool(m and n and int(m.group(1)) >= n)
        if m:
            if is_mtp and not mtp:
                skipped += nbytes
                continue
            stage = _stage_of(ranges, int(m.group(1)))
        elif "embed" in module:
            stage = 0
        else:
            stage = pp - 1 if t.split.value == "vocab" or "norm" in module else 0
        if t.quantized:
            modules.setdefault(module, {})[part] = shape
        b = t.share(loaded_bytes(model, name, dtype, shape, nbytes))
        per_stage[stage] += b
        key = "MTP layer (speculative decoding)" if is_mtp else _class(module, t.quantized)
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
            m = LAYER_RE.search(module + ".")
            per_stage[_stage_of(ranges, int(m.group(1))) if m else 0] += extra
            by_class["kv_b_proj dequantized copy"] = by_class.get("kv_b_proj dequantized copy", 0.0) + extra
    return Weights(per_stage, skipped, by_class, dict(sorted(bits.items())), qkvb, qidx)


def _class(module: str, quantized: bool) -> str:
    if ".experts." in module:
        return "routed experts"
    if "shared_experts" in module or "shared_expert" in module:
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
    """(attention KV bytes, extra cache bytes such as the V3.2 indexer's) per token per layer on one GPU, from
    the model's architecture spec."""
    return model.spec.kv_bytes_per_layer(tp, kv_dtype, model.dtype_bytes)


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


@dataclass(frozen=True)
class MeasuredKV:
    """The KV cache vLLM itself allocated for one rank of this plan (a rehearsal): bytes and tokens."""

    kv_cache_gib: float
    tokens: int
    source: str


def kernels(req: Request, native: bool) -> str:
    """The weight-kernel family vLLM runs for a path: Humming for 3-bit; for 4-bit Humming on sm90 from vLLM 0.30
    (its default there) unless ``--moe-backend marlin`` is passed, else Marlin."""
    if native:
        return "humming"
    from packaging.version import InvalidVersion, Version

    try:
        v = Version(req.vllm_version) if req.vllm_version else Version("0.33.0")
    except InvalidVersion:
        v = Version("0.33.0")
    forced = " ".join(req.extra_args).replace("=", " ").split()
    marlin = any(a == "--moe-backend" and b == "marlin" for a, b in zip(forced, forced[1:]))
    return "humming" if req.gpu.cc_tuple >= (9, 0) and v >= Version("0.30") and not marlin else "marlin"


def default_batched_tokens(gpu: Gpu) -> int:
    """vLLM's default ``max_num_batched_tokens`` for ``vllm serve`` on this card."""
    return calibration.default_batched_tokens(gpu.memory_gib, gpu.name)[0]


def allowances(model: Model, req: Request, native: bool = False) -> dict:
    """GiB per GPU the plan keeps from the KV cache, with the calibration they come from."""
    cal = calibration.for_version(req.vllm_version, kernels(req, native), req.gpu.cc_tuple >= (9, 0), native)
    tokens = req.max_num_batched_tokens or default_batched_tokens(req.gpu)
    c = model.config
    hv = c.get("hidden_size")
    hidden = hv if isinstance(hv, int) else cal.ref_hidden
    layers = max((len(r) for r in stage_layers(model.layers, req.pp)), default=0) or cal.ref_layers
    non_torch, act, graphs = calibration.scaled(cal, layers, hidden, tokens)
    return {
        "activations": round(act, 3),
        "cuda_graphs": 0.0 if req.enforce_eager else round(graphs, 3),
        "non_torch": round(non_torch, 3),
        "tp_comm": calibration.TP_COMM_GIB if req.tp * req.pp > 1 else 0.0,
        "margin": calibration.MARGIN_GIB,
        "max_num_batched_tokens": tokens,
        "calibration": calibration.describe(cal, layers, hidden),
    }


def overhead_gib(al: dict) -> float:
    return al["activations"] + al["cuda_graphs"] + al["non_torch"] + al["tp_comm"] + al["margin"]


def capacity(kv_bytes: float, per_token: int) -> int:
    """Tokens a KV pool of ``kv_bytes`` holds for one sequence: whole blocks of :data:`KV_BLOCK`, less the one
    block vLLM's block pool keeps back."""
    if kv_bytes <= 0 or not per_token:
        return 0
    return max(0, int(kv_bytes // (per_token * KV_BLOCK)) - 1) * KV_BLOCK


def fit(model: Model, req: Request, weights: Weights | None = None, native: bool = False,
        measured: MeasuredKV | None = None) -> Fit:
    """Weights, KV cache and the longest context on the fullest GPU; ``measured``: the rank's KV cache as vLLM
    allocated it in a rehearsal (used instead of budget − weights − allowances)."""
    w = weights or weights_per_gpu(model, req.tp, req.pp, bool(req.speculative), req.ep)
    attn, idx = kv_bytes_per_layer(model, req.tp, req.kv_cache_dtype)
    ranges = stage_layers(model.layers, req.pp) if model.layers else [range(0)] * req.pp
    al = allowances(model, req, native)
    budget = req.gpu.card.cuda_gib * req.utilization
    cap: int | None = None
    kv_gib_min: float | None = None
    for s, r in enumerate(ranges):
        per_token = (attn + idx) * len(r)
        if measured is not None:
            kv = measured.kv_cache_gib - al["tp_comm"]
            tokens = min(capacity(kv * GIB, per_token),
                         measured.tokens - (math.ceil(al["tp_comm"] * GIB / per_token) if per_token else 0))
        else:
            kv = budget - max(0.0, w.per_stage[s] / GIB - req.cpu_offload_gib) - overhead_gib(al)
            tokens = capacity(kv * GIB, per_token) if per_token else (0 if kv <= 0 else 1 << 40)
        cap = tokens if cap is None else min(cap, tokens)
        kv_gib_min = kv if kv_gib_min is None else min(kv_gib_min, kv)
    assert cap is not None and kv_gib_min is not None
    cap = max(cap, 0)
    worst = max(range(req.pp), key=lambda s: len(ranges[s]))
    per_token_worst = (attn + idx) * len(ranges[worst])
    weights_max = max(w.per_stage) / GIB
    model_max = model.max_positions or (1 << 20)
    short = (f"weights and allowances exceed the {budget:.2f} GiB budget" if kv_gib_min <= 0
             else f"KV cache holds {cap} tokens")
    if req.max_model_len:
        planned = req.max_model_len
        fits = kv_gib_min > 0 and cap >= planned
        reason = "" if fits else (short if kv_gib_min <= 0 else f"{short}, fewer than --max-model-len {planned}")
        if planned > model_max:
            reason = reason or f"--max-model-len {planned} is above the model's max_position_embeddings {model_max}"
            fits = False
    else:
        planned = min(model_max, cap // CONTEXT_STEP * CONTEXT_STEP) if cap >= CONTEXT_STEP else cap
        fits = kv_gib_min > 0 and planned >= min(MIN_CONTEXT, model_max)
        reason = "" if fits else (short if kv_gib_min <= 0 else f"{short}, fewer than the {MIN_CONTEXT}-token minimum")
    return Fit(req.tp, req.pp, req.tp * req.pp, round(weights_max, 3),
               round(max(0.0, weights_max - req.cpu_offload_gib), 3), per_token_worst, attn * len(ranges[worst]),
               idx * len(ranges[worst]), round(budget, 3), al, round(kv_gib_min, 3), cap, max(planned, 0),
               bool(fits), reason)


def vllm_args(req: Request, f: Fit, spec: ArchSpec | None = None) -> list[str]:
    """Memory- and layout-relevant ``vllm serve`` arguments of a plan (version-specific flags are the launcher's);
    ``spec`` names the MTP method for ``--speculative``."""
    args = ["--tensor-parallel-size", str(req.tp)]
    if req.pp > 1:
        args += ["--pipeline-parallel-size", str(req.pp)]
    if req.ep:
        args += ["--enable-expert-parallel"]
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
        method = (spec.speculative_method(req.vllm_version) if spec else None) or "deepseek_mtp"
        args += ["--speculative-config", json.dumps({"method": method, "num_speculative_tokens": req.speculative},
                                                    separators=(",", ":"))]
    return args + list(req.extra_args)


def problems(model: Model, req: Request, native: bool = False) -> list[str]:
    """What keeps the layout of ``req`` from splitting ``model`` into whole ranks (divisibility, quantization
    groups, packed words, Marlin's tiles where Marlin runs): [] when it does."""
    from repack.serve.sharding import layout_problems

    key = ("problems", Layout(req.tp, req.pp, req.ep), kernels(req, native) == "marlin")
    if key not in model.derived:
        model.derived[key] = layout_problems(model.spec, model.tensors, key[1], marlin=key[2], rank=model.shard(key[1]))
    return list(model.derived[key])


def layout_text(req: Request) -> str:
    return f"TP {req.tp}" + (f" x PP {req.pp}" if req.pp > 1 else "") + (" with expert parallelism" if req.ep else "")


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
    outside = (1 - req.utilization) * req.gpu.card.cuda_gib
    cal = calibration.for_version(req.vllm_version, kernels(req, native), cc >= (9, 0), native)
    need = cal.context_gib + (calibration.TP_PRE_SNAPSHOT_GIB if req.tp * req.pp > 1 else 0.0)
    if outside < need:
        out.append(f"--gpu-memory-utilization {req.utilization:g} leaves {outside:.2f} GiB outside vLLM's budget; the "
                   f"CUDA context and cuBLAS handles" + (" and NCCL/all-reduce buffers" if req.tp * req.pp > 1 else "")
                   + f" need about {need:.2f} GiB there (vLLM refuses to start when the free memory is below its budget)")
    if not native and model.quant_method and model.spec.marlin_caveat and kernels(req, native) == "marlin":
        out.append(model.spec.marlin_caveat)
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


def alternatives(model: Model, req: Request, f: Fit, native: bool = False) -> list[dict]:
    """Layouts and settings that would fit, with their numbers (only when the request does not)."""
    out = []
    want = req.max_model_len or min(MIN_CONTEXT, model.max_positions or MIN_CONTEXT)

    def add(kind: str, text: str, r: Request) -> None:
        g = fit(model, r, native=native)
        if g.fits and not problems(model, r, native):
            out.append({"kind": kind, "description": text, "gpus": g.gpus, "tensor_parallel": r.tp,
                        "pipeline_parallel": r.pp, "expert_parallel": r.ep, "weights_gib_per_gpu": g.weights_gib_per_gpu,
                        "max_model_len": g.max_model_len, "capacity_tokens": g.capacity_tokens,
                        "vllm_args": vllm_args(r, g, model.spec)})

    if not req.ep and model.spec.experts:
        add("expert-parallel", f"--expert-parallel on the same {req.tp * req.pp} GPUs (vLLM --enable-expert-parallel: "
            "whole routed experts per GPU; attention and shared experts still split by TP)", replace(req, ep=True))

    if req.max_model_len and f.kv_cache_gib > 0 and f.capacity_tokens >= CONTEXT_STEP:
        short = f.capacity_tokens // CONTEXT_STEP * CONTEXT_STEP
        add("shorter-context", f"--max-model-len {short}", replace(req, max_model_len=short))
    if req.utilization < 0.95:
        add("utilization", "--gpu-memory-utilization 0.95", replace(req, utilization=0.95))
    if req.kv_cache_dtype == "auto" and req.gpu.cc_tuple >= (8, 9):
        add("fp8-kv", "--kv-cache-dtype fp8 (sm89+)", replace(req, kv_cache_dtype="fp8"))
    need = f.weights_gib_per_gpu + overhead_gib(f.allowances_gib) + f.kv_bytes_per_token * (want + 2 * KV_BLOCK) / GIB \
        - f.budget_gib
    if need > 0:
        off = math.ceil(need * 2) / 2  # need counts every weight byte, offloaded or not
        add("cpu-offload", f"--cpu-offload-gb {off:g} per GPU ({off * req.tp * req.pp:g} GiB host RAM; slow)",
            replace(req, cpu_offload_gib=off, max_model_len=want))
    for pp in (2, 3, 4):
        r = replace(req, pp=req.pp * pp, cpu_offload_gib=0.0)
        add("pipeline-parallel", f"{r.tp * r.pp} GPUs: TP {r.tp} x PP {r.pp} ({r.pp} nodes of {r.tp}, --nodes {r.pp})", r)
        if any(a["kind"] == "pipeline-parallel" for a in out):
            break
    if req.tp % 2 == 0 and req.tp >= 4:
        r = replace(req, tp=req.tp // 2, pp=req.pp * 2)
        add("pipeline-parallel-same-gpus", f"same {r.tp * r.pp} GPUs as TP {r.tp} x PP {r.pp} (--pipeline-parallel {r.pp}"
            + ("; MLA KV is split by PP, not TP)" if model.mla else ")"), r)
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
    cuda_memory_gib: float
    cuda_memory_source: str
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
    kv_measured: str | None = None  # where the KV figure was measured (a rehearsal), None: planned
    layout_problems: list[str] = field(default_factory=list)  # why this layout holds no whole ranks
    expert_parallel: bool = False

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


def plan(model: Model, req: Request, native: bool = False, measured: MeasuredKV | None = None) -> MemoryPlan:
    """The memory plan of ``model`` served as ``req`` asks; ``native``: served at 3 bits by vLLM >= 0.30;
    ``measured``: the KV cache a rehearsal of one rank measured (instead of the calibrated allowances)."""
    w = weights_per_gpu(model, req.tp, req.pp, bool(req.speculative))
    f = fit(model, req, w, native, measured)
    warns = warnings_for(model, req, w, native)
    bad = problems(model, req, native)
    unknown = unknown_warning(model.config)
    if unknown:
        warns.insert(0, unknown)
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
        cuda_memory_gib=req.gpu.card.cuda_gib,
        cuda_memory_source=req.gpu.card.source,
        budget_gib=f.budget_gib,
        allowances_gib=f.allowances_gib,
        kv_cache_gib=f.kv_cache_gib,
        capacity_tokens=f.capacity_tokens,
        max_model_len=f.max_model_len,
        model_max_position_embeddings=model.max_positions,
        fits=f.fits and not bad,
        reason=f.reason or (f"{layout_text(req)} does not split the model into whole ranks: {bad[0]}" if bad else ""),
        warnings=warns,
        alternatives=[] if (f.fits and not bad) or measured is not None else alternatives(model, req, f, native),
        vllm_args=vllm_args(req, f, model.spec),
        layout_problems=bad,
        expert_parallel=req.ep,
        env=dict(req.env),
        kv_measured=measured.source if measured else None,
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
    if not re.fullmatch(r"[0-9]{1,3}(\.[0-9]{1,3})?", cap):  # ASCII digits, a few: int() takes them
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
