"""``python -m sglang.launch_server`` command lines, bash launchers and SGLang's memory rule for a converted model.

Read from the SGLang 0.5.10-0.5.23 sources (not measured unless docs/serving.md says so), for the architectures
in :data:`ARCHITECTURES` (DeepSeek-V2/V3/V3.2 with MLA; GLM-4.5+ MoE and Qwen2/Qwen3 MoE with GQA):

- SGLang loads 4/8-bit symmetric GPTQ and ``auto-round`` (``auto_round:auto_gptq``) linears through
  ``gptq_marlin``; ``auto-round`` experts that Marlin could take go to ``moe_wna16`` (Triton), GPTQ-style ones to
  the GPTQ Marlin MoE method. A 3-bit module gets the removed non-Marlin GPTQ kernel (``RuntimeError: The non-Marlin
  GPTQ CUDA kernel has been removed``) or ``moe_wna16`` (4/8 bits only). :func:`check_model` refuses such a checkpoint.
- Measured (docs/validation.md): ``DeepseekV2AttentionMLA.__init__`` reads the ``weight`` of modules that GPTQ
  packing leaves without one: ``fused_qkv_a_proj_with_mqa`` (0.5.15; the line is in 0.5.10 too) and ``q_b_proj``
  (0.5.17; also in 0.5.16 and 0.5.18). :data:`MLA_WEIGHT_READS`: such a model is refused on those releases.
- Its DeepSeek loader dequantizes any ``kv_b_proj`` that has a ``qweight`` as AWQ, which misreads GPTQ packing:
  only a float ``kv_b_proj`` (``w3repack convert --kv-b-float``, the default) is served correctly (MLA only).
- ``GPTQMarlinMoEScheme`` allocates the expert scales as float16 whatever the model dtype, and the Marlin MoE
  kernel asserts ``hidden_states.dtype == w1_scale.dtype`` (sglang issues #20599, #36822): a bf16 model fails at
  the first forward. ``--dtype float16`` avoids it, and costs nothing: the checkpoint's scales are float16.
- The same scheme sizes ``w2_scales`` for the full intermediate size when ``desc_act`` is false, so under MoE
  tensor parallelism the kernel derives ``group_size = size_k // num_groups`` from a table ``moe_tp_size`` times
  too tall. ``--ep-size`` equal to the TP size makes ``moe_tp_size`` 1 (whole experts per GPU), where the sizes agree.
  Both quirks are in the quantization scheme, not in a model file: they hold for every family here. Attention and
  shared experts stay split by TP (GLM disables its shared-expert fusion under expert parallelism on NVIDIA GPUs),
  so the layout is :class:`~repack.serve.arch.Layout` ``(tp, ep=True)``, checked like vLLM's (groups, packed words,
  Marlin tiles) by :func:`repack.serve.sharding.layout_problems`.
- KV cache: MLA caches ``kv_lora_rank + qk_rope_head_dim`` values per token per layer on every GPU; GQA (SGLang's
  ``MHATokenToKVPool``) caches K and V of ``max(1, kv_heads // tp)`` heads of ``head_dim`` per layer.

Memory (SGLang's rule, ``_profile_available_bytes``): with ``P`` the free memory a GPU has before the model loads,
the KV pool is ``mem_fraction_static * P - weights on the GPU``; activations and CUDA graphs must fit in the rest,
``(1 - mem_fraction_static) * P``. vLLM instead budgets ``gpu_memory * utilization`` for weights, KV, activations
and graphs together.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from packaging.version import Version

from repack.errors import UserError
from repack.serve import planner
from repack.serve import shell as sh
from repack.serve.arch import ArchSpec, Layout

DEFAULT_SGLANG = "0.5.17"   # the newest release whose wheel pins torch 2.11
MIN_SGLANG = "0.5.10"       # the oldest release read: auto-round with regex extra_config, Marlin MoE
# (ModelFacts field, module read, first, last release, release measured on): DeepseekV2AttentionMLA.__init__ reads ``<module>.weight``
# unconditionally, and a GPTQ-packed module has none (AttributeError measured: fused_qkv_a_proj_with_mqa on 0.5.15,
# read in 0.5.10 and 0.5.15, passed only for awq/awq_marlin/moe_wna16 configs; q_b_proj on 0.5.17, read in
# 0.5.16-0.5.18 and absent from 0.5.10-0.5.15 and 0.5.19-0.5.23). 0.5.19+ not run on such a model.
MLA_WEIGHT_READS = (("quantized_q_a", "fused_qkv_a_proj_with_mqa", (0, 5, 10), (0, 5, 15), "0.5.15"),
                    ("quantized_q_b", "q_b_proj", (0, 5, 16), (0, 5, 18), "0.5.17"))
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 30000
GIB = 1 << 30
CUDA_CONTEXT_GIB = 0.5      # outside SGLang's pre-load measurement (the CUDA context)
NCCL_GIB = 0.5              # NCCL / custom all-reduce buffers with more than one GPU, also before the load
MLA_PREFILL_GRAPH_MIB = 1536.0
CONTEXT_STEP = 1024
MIN_CONTEXT = 4096
DSA_INDEXER_BYTES = 132     # index_head_dim 128 fp8 values + one 4-byte scale per 128, per layer
FP16_REASON = ("float16: SGLang's GPTQ Marlin MoE allocates expert scales as float16 and asserts the activations "
               "match (sglang issues #20599, #36822), so a bfloat16 model fails at its first forward; the checkpoint's "
               "scales are float16, so nothing is rounded")
EP_REASON = ("--ep-size {tp}: SGLang's GPTQ Marlin MoE sizes w2_scales for the full intermediate size when desc_act is "
             "false, which is wrong under MoE tensor parallelism; whole experts per GPU (moe_tp_size 1) avoid it")
ARCHITECTURES = {  # config.json architectures[0] -> SGLang's model file
    "DeepseekV2ForCausalLM": "deepseek_v2", "DeepseekV3ForCausalLM": "deepseek_v2", "DeepseekV32ForCausalLM": "deepseek_v2",
    "Glm4MoeForCausalLM": "glm4_moe", "Qwen3MoeForCausalLM": "qwen3_moe", "Qwen2MoeForCausalLM": "qwen2_moe"}


# ---------------------------------------------------------------- versions

def installed_sglang() -> str | None:
    """The installed ``sglang`` distribution's version, or None."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sglang")
    except PackageNotFoundError:
        return None


def check_version(v: str) -> str:
    """``v`` normalized (``0.5.17.post1`` stays as is); UserError if unparsable or older than MIN_SGLANG."""
    from packaging.version import InvalidVersion, Version

    try:
        parsed = Version(v)
    except (InvalidVersion, ValueError) as e:  # ValueError: a release number of more digits than int() takes
        raise UserError(f"SGLang version {v!r}: expected a version like {DEFAULT_SGLANG}") from e
    if parsed.release < Version(MIN_SGLANG).release:
        raise UserError(f"SGLang {v} is older than {MIN_SGLANG}, the oldest release whose auto-round/GPTQ Marlin path "
                        f"these flags were chosen for; pip install 'sglang>={MIN_SGLANG}'")
    return str(parsed)


# ---------------------------------------------------------------- model facts

@dataclass(frozen=True)
class ModelFacts:
    """What the launch depends on, from config.json and the shard headers (no tensor data)."""
    architecture: str                # config.json architectures[0]
    spec: ArchSpec = field(repr=False, compare=False)  # KV heads, head_dim, sharding (repack.serve.arch)
    quant_bits: dict[int, int] = field(default_factory=dict)  # bits -> number of quantized modules
    quantized_kv_b: int = 0
    quantized_q_b: int = 0           # MLA q_b_proj modules that are GPTQ-packed (no ``weight``)
    moe_quantized: bool = False      # routed experts are GPTQ-packed: the Marlin MoE path
    mla: bool = False
    dsa: bool = False                # DeepSeek sparse attention: SGLang's test is ``index_topk`` in the config
    remote_code: bool = False        # config.json has auto_map
    layers: int = 0
    kv_lora_rank: int = 0            # MLA only
    qk_rope_head_dim: int = 0        # MLA only
    max_positions: int = 0
    quantized_q_a: int = 0           # MLA q_a_proj / kv_a_proj_with_mqa modules that are GPTQ-packed (SGLang fuses them)


def facts(model: planner.Model) -> ModelFacts:
    c = model.config
    parts: dict[str, dict[str, tuple[int, ...]]] = {}
    for name, _, shape, _ in model.tensors:
        module, _, part = name.rpartition(".")
        if part in ("qzeros", "scales"):
            parts.setdefault(module, {})[part] = shape
    bits: dict[int, int] = {}
    kv_b = q_b = q_a = 0
    moe_q = False
    n = model.layers
    for module, p in parts.items():
        if len(p) < 2 or len(p["scales"]) != 2 or not p["scales"][1]:
            continue
        m = planner.LAYER_RE.search(module + ".")
        if n and m and int(m.group(1)) >= n:
            continue  # MTP / next-n layers: not loaded without speculative decoding
        b = 32 * p["qzeros"][1] // p["scales"][1]
        bits[b] = bits.get(b, 0) + 1
        kv_b += module.endswith("kv_b_proj")
        q_b += module.endswith(".q_b_proj")
        q_a += module.endswith((".q_a_proj", ".kv_a_proj_with_mqa"))
        moe_q = moe_q or ".experts." in module
    arch = (c.get("architectures") or ["?"])[0]
    return ModelFacts(str(arch), model.spec, dict(sorted(bits.items())), kv_b, q_b, moe_q, model.mla,
                      c.get("index_topk") is not None, "auto_map" in c, n, int(c.get("kv_lora_rank") or 0),
                      int(c.get("qk_rope_head_dim") or 0), model.max_positions, q_a)


def check_model(model: planner.Model, f: ModelFacts | None = None) -> ModelFacts:
    """UserError (one line) if stock SGLang cannot serve ``model`` correctly: an architecture this launcher has no
    SGLang rules for, modules that are not 4/8-bit, or a quantized DeepSeek ``kv_b_proj``."""
    f = f or facts(model)
    if f.architecture not in ARCHITECTURES:
        raise UserError(f"{model.root}: architecture {f.architecture}: the SGLang launcher has rules for "
                        f"{', '.join(sorted(ARCHITECTURES))} only (launch it with --engine vllm)")
    low = {b: k for b, k in f.quant_bits.items() if b not in (4, 8)}
    if low:
        what = ", ".join(f"{k} modules at {b} bits" for b, k in low.items())
        raise UserError(f"{model.root}: {what}; SGLang cannot load them (its GPTQ path has Marlin kernels for 4/8-bit "
                        f"only, and moe_wna16 takes 4/8 bits); convert first: w3repack convert {model.root} OUT")
    if f.quantized_kv_b and f.mla:
        raise UserError(f"{model.root}: {f.quantized_kv_b} quantized kv_b_proj modules; SGLang's DeepSeek loader "
                        "dequantizes them as AWQ and would misread GPTQ packing; convert with --kv-b-float (the default)")
    return f


def kv_bytes_per_token(f: ModelFacts, tp: int = 1, kv_dtype_bytes: int = 2) -> int:
    """SGLang's cell size on one of ``tp`` GPUs. MLA: ``(kv_lora_rank + qk_rope_head_dim) * layers * dtype bytes``
    on every GPU (attention TP does not split it), plus the DSA indexer's 132 bytes per layer when ``index_topk`` is
    set. GQA: K and V of the GPU's KV heads (``kv_heads // tp``, at least one: heads are replicated when there are
    fewer than GPUs) of ``head_dim`` values, per layer."""
    if f.mla:
        per_layer = (f.kv_lora_rank + f.qk_rope_head_dim) * kv_dtype_bytes + (DSA_INDEXER_BYTES if f.dsa else 0)
    else:
        per_layer = 2 * f.spec.kv_heads_per_rank(tp) * f.spec.head_dim * kv_dtype_bytes
    return per_layer * f.layers


# ---------------------------------------------------------------- memory

@dataclass(frozen=True)
class SglangMemory:
    """One GPU under SGLang's rule. Invariant: ``kv_pool_gib = static_gib - weights_gib_on_gpu`` and
    ``static_gib + slack_gib = pre_load_gib``; ``max_total_tokens = floor(kv_pool bytes / kv_bytes_per_token)``."""
    gpu_memory_gib: float
    pre_load_gib: float              # P: free before the model loads (memory - CUDA context - NCCL buffers)
    mem_fraction_static: float
    sglang_default_fraction: float   # what SGLang's own heuristic would pick on this GPU
    static_gib: float                # weights + KV pool
    slack_gib: float                 # activations + CUDA graphs
    reserve_gib: float               # SGLang's own estimate of what the slack must hold
    weights_gib_per_gpu: float
    cpu_offload_gb: int
    weights_gib_on_gpu: float
    kv_pool_gib: float
    kv_bytes_per_token: int
    max_total_tokens: int
    context_length: int
    fits: bool
    reason: str


def _gpu_defaults(gpu_mib: float, tp: int) -> tuple[int, int]:
    """(chunked_prefill_size, decode CUDA-graph max batch) as SGLang's ``_handle_gpu_memory_settings`` sets them."""
    if gpu_mib < 20 * 1024:
        return 2048, 8
    if gpu_mib < 35 * 1024:
        return 2048, 24 if tp < 4 else 80
    if gpu_mib < 60 * 1024:
        return 4096, 32 if tp < 4 else 160
    if gpu_mib < 160 * 1024:
        return 8192, 256 if tp < 4 else 512
    return 16384, 512


def reserve_mib(gpu_memory_gib: float, tp: int, mla: bool = True, cuda_graph: bool = True) -> float:
    """SGLang's reserve for activations and CUDA graphs (MiB): 512 + 1.5 per chunked-prefill token (at least 2048)
    + 1024 per 8 GPUs + 2 per decode-graph batch + 1536 for MLA prefill graphs; at least 10 GiB above 60 GiB."""
    gpu_mib = gpu_memory_gib * 1024
    chunk, max_bs = _gpu_defaults(gpu_mib, tp)
    r = 512 + max(chunk, 2048) * 1.5 + tp / 8 * 1024
    if cuda_graph:
        r += max_bs * 2 + (MLA_PREFILL_GRAPH_MIB if mla else 0)
    if gpu_mib > 60 * 1024:
        r = max(r, 10 * 1024)
    return r


def default_fraction(gpu_memory_gib: float, tp: int, mla: bool = True, cuda_graph: bool = True) -> float:
    """``round((gpu_mib - reserve) / gpu_mib, 3)``: SGLang's default ``--mem-fraction-static``."""
    gpu_mib = gpu_memory_gib * 1024
    return round((gpu_mib - reserve_mib(gpu_memory_gib, tp, mla, cuda_graph)) / gpu_mib, 3)


def memory(weights_gib_per_gpu: float, kv_per_token: int, gpu: planner.Gpu, tp: int, *,
           mem_fraction_static: float | None = None, context_length: int | None = None,
           cpu_offload_gb: int | None = 0, model_max_positions: int = 0, mla: bool = True,
           cuda_graph: bool = True) -> SglangMemory:
    """KV pool and context on one GPU. ``cpu_offload_gb=None``: the smallest whole number of GiB (SGLang's flag is
    an int) that makes ``context_length`` (or MIN_CONTEXT) fit, 0 if it fits already."""
    if tp < 1:
        raise UserError("--tp must be at least 1")
    if mem_fraction_static is not None and not 0 < mem_fraction_static < 1:
        raise UserError(f"--mem-fraction-static {mem_fraction_static}: must be in (0, 1)")
    if context_length is not None and context_length < 1:
        raise UserError(f"--context-length {context_length}: must be positive")
    dflt = default_fraction(gpu.memory_gib, tp, mla, cuda_graph)
    frac = dflt if mem_fraction_static is None else mem_fraction_static
    pre = gpu.memory_gib - CUDA_CONTEXT_GIB - (NCCL_GIB if tp > 1 else 0.0)
    static = frac * pre
    model_max = model_max_positions or (1 << 20)
    want = context_length or min(MIN_CONTEXT, model_max)
    if cpu_offload_gb is None:
        need = weights_gib_per_gpu - static + kv_per_token * want / GIB
        cpu_offload_gb = max(0, math.ceil(need - 1e-9)) if need > 0 else 0
        cpu_offload_gb = min(cpu_offload_gb, math.ceil(weights_gib_per_gpu))
    if cpu_offload_gb < 0:
        raise UserError("--cpu-offload-gb must not be negative")
    on_gpu = max(0.0, weights_gib_per_gpu - cpu_offload_gb)
    kv = static - on_gpu
    tokens = int(kv * GIB // kv_per_token) if kv > 0 and kv_per_token else 0
    if context_length:
        ctx = context_length
        fits = kv > 0 and tokens >= ctx and ctx <= model_max
        reason = "" if fits else (
            f"weights ({on_gpu:.2f} GiB on the GPU) exceed the static budget {static:.2f} GiB "
            f"(--mem-fraction-static {frac:g} of {pre:.2f} GiB)" if kv <= 0
            else f"--context-length {ctx} is above the model's max_position_embeddings {model_max}" if ctx > model_max
            else f"KV pool holds {tokens} tokens, fewer than --context-length {ctx}")
    else:
        ctx = min(model_max, tokens // CONTEXT_STEP * CONTEXT_STEP)
        fits = kv > 0 and ctx >= min(MIN_CONTEXT, model_max)
        reason = "" if fits else (
            f"weights ({on_gpu:.2f} GiB on the GPU) exceed the static budget {static:.2f} GiB "
            f"(--mem-fraction-static {frac:g} of {pre:.2f} GiB)" if kv <= 0
            else f"KV pool holds {tokens} tokens, fewer than the {MIN_CONTEXT}-token minimum")
    return SglangMemory(gpu.memory_gib, round(pre, 3), frac, dflt, round(static, 3), round(pre - static, 3),
                        round(reserve_mib(gpu.memory_gib, tp, mla, cuda_graph) / 1024, 3), round(weights_gib_per_gpu, 3),
                        int(cpu_offload_gb), round(on_gpu, 3), round(kv, 3), kv_per_token, max(tokens, 0),
                        max(ctx, 0), bool(fits), reason)


# ---------------------------------------------------------------- command

HEAD = ("python3", "-m", "sglang.launch_server", "--model-path")
"""How every SGLang argv starts (``python3`` being the interpreter given): the model path is the next word."""


@dataclass(frozen=True)
class SglangLaunch:
    """A launch: ``argv`` starts SGLang as is (extra args last, so they override); ``script()`` wraps it in bash.
    Layout: ``argv == [python, *HEAD[1:], model_path, *after_model]``."""
    model_path: str
    argv: list[str]
    env: dict[str, str]
    version: str
    min_version: str
    gpu: planner.Gpu
    tp: int
    memory: SglangMemory
    dtype: str | None
    attention_backend: str | None
    reasons: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    layout_problems: list[str] = field(default_factory=list)  # why this TP (and EP) layout holds no whole ranks
    ep_size: int = 1                 # --ep-size: routed experts whole, over ep_size GPUs
    refused: tuple[str, str] | None = None  # (first, last) SGLang release the script's preflight refuses for this model

    @property
    def after_model(self) -> list[str]:
        return self.argv[len(HEAD) + 1:]

    @property
    def fits(self) -> bool:
        """The one verdict: the memory fits and the layout splits the model into whole ranks."""
        return self.memory.fits and not self.layout_problems

    @property
    def reason(self) -> str:
        """Why not: the memory first (as the vLLM plan says it), then the layout."""
        if self.memory.fits and self.layout_problems:
            return (f"TP {self.tp}" + (f" with --ep-size {self.ep_size}" if self.ep_size > 1 else "")
                    + f" does not split the model into whole ranks: {self.layout_problems[0]}")
        return self.memory.reason

    def script(self, recipe: dict | None = None) -> str:
        return script(self, recipe)


def attention_backend_for(cc: tuple[int, int], dsa: bool, mla: bool = True) -> tuple[str | None, str]:
    """SGLang's MLA backend for a compute capability, and why. None: leave SGLang's own choice (always for GQA)."""
    if not mla:
        return None, ("attention backend left to SGLang: its own default for GQA, FA3 on Hopper for Glm4Moe and Qwen3Moe "
                      "(is_fa3_default_architecture), else FlashInfer (Triton without it)")
    if dsa:
        return None, ("attention backend left to SGLang: index_topk in the config selects its DSA (sparse) backend, "
                      "whose CUDA kernels (flashmla_sparse prefill, fa3 decode) need sm90+")
    if cc >= (10, 0):
        return None, "attention backend left to SGLang (trtllm_mla on sm100+)"
    if cc >= (9, 0):
        return "fa3", "--attention-backend fa3: SGLang's default MLA backend on Hopper (sgl-kernel's FA3)"
    return "triton", "--attention-backend triton: SGLang's MLA backend off Hopper (FA3/FlashMLA need sm90)"


def _consumer(gpu: planner.Gpu, consumer_pcie: bool | None) -> bool:
    if consumer_pcie is not None:
        return consumer_pcie
    if gpu.name:
        return bool(planner.CONSUMER_RE.search(gpu.name))
    return gpu.cc in ("8.6", "8.9", "12.0") and gpu.memory_gib <= 32


def _v(t: tuple[int, ...]) -> str:
    return ".".join(map(str, t))


def mla_refused(f: ModelFacts) -> tuple[str, str] | None:
    """(first, last) SGLang release that cannot build this model (:data:`MLA_WEIGHT_READS`), or None."""
    spans = [(lo, hi) for name, _, lo, hi, _ in MLA_WEIGHT_READS if f.mla and getattr(f, name)]
    return (_v(min(s[0] for s in spans)), _v(max(s[1] for s in spans))) if spans else None


def sglang_command(model_path: str, model: planner.Model, weights_gib_per_gpu: float, gpu: planner.Gpu,
                   tp: int | None = None, *, version: str | None = None, host: str = DEFAULT_HOST,
                   port: int = DEFAULT_PORT, mem_fraction_static: float | None = None, context_length: int | None = None,
                   cpu_offload_gb: int | None = None, dtype: str | None = None, attention_backend: str | None = None,
                   disable_cuda_graph: bool = False, consumer_pcie: bool | None = None,
                   env: dict[str, str] | None = None, python: str = "python3",
                   extra_args: list[str] | tuple[str, ...] = (), trust_remote_code: bool = False,
                   expert_parallel: bool = False) -> SglangLaunch:
    """The ``python -m sglang.launch_server`` command for a converted checkpoint on ``tp`` GPUs like ``gpu``.

    ``version``: the SGLang the flags are for (default: installed, else DEFAULT_SGLANG). ``dtype`` /
    ``attention_backend`` None: chosen here (float16 when the experts are on Marlin; per compute capability).
    ``cpu_offload_gb`` None: the smallest whole GiB that fits. ``trust_remote_code``: pass ``--trust-remote-code``
    (only when asked; a config with ``auto_map`` gets a warning otherwise). UserError for a checkpoint SGLang
    cannot serve. ``expert_parallel``: ``--ep-size`` = TP even when the experts are not GPTQ (it is passed for GPTQ
    experts anyway). ``fits`` is the one verdict: memory, and the layout's whole ranks (``layout_problems``).
    """
    f = check_model(model)
    tp = tp or gpu.count
    if tp < 1:
        raise UserError("--tp must be at least 1")
    if not 0 < port < 65536:
        raise UserError(f"--port {port}: must be in 1..65535")
    ver = check_version(version or installed_sglang() or DEFAULT_SGLANG)
    refused = mla_refused(f)
    for field_name, module, lo, hi, measured in MLA_WEIGHT_READS:
        n_q = getattr(f, field_name)
        if refused and n_q and lo <= Version(ver).release[:3] <= hi:
            raise UserError(f"{model_path}: SGLang {ver} cannot build this DeepSeek model: its MLA attention reads "
                            f"{module}.weight, which GPTQ-packed modules lack ({n_q} here; the line is in "
                            f"{_v(lo)}-{_v(hi)}, measured on {measured}); SGLang "
                            f"{refused[0]}-{refused[1]} cannot build it: use a later release (not run on this model) "
                            "or --engine vllm")
    warnings: list[str] = []
    reasons: list[str] = []
    if gpu.cc_tuple < (8, 0):
        warnings.append(f"compute capability {gpu.cc}: SGLang's Marlin kernels need sm80+; this GPU will not load the model")
    if dtype is None and f.moe_quantized:
        dtype = "float16"
        reasons.append(FP16_REASON)
    elif dtype in ("bfloat16", "auto") and f.moe_quantized:
        warnings.append(f"--dtype {dtype}: SGLang's GPTQ Marlin MoE asserts float16 activations (sglang #20599, "
                        "#36822); expect an AssertionError at the first forward unless this SGLang has the fix")
    backend, why = (attention_backend, f"--attention-backend {attention_backend}: given") if attention_backend \
        else attention_backend_for(gpu.cc_tuple, f.dsa, f.mla)
    reasons.append(why)
    if f.dsa:
        if gpu.cc_tuple < (9, 0):
            warnings.append(f"DeepSeek-V3.2 sparse attention: SGLang's DSA kernels need sm90+, and cc {gpu.cc} has none. "
                            "Dense fallback: a config without index_* keys (architecture DeepseekV3ForCausalLM) serves "
                            "dense MLA; top-k selection keeps every key up to index_topk tokens, so prompts that short "
                            "attend the same keys; unverified in SGLang")
        if dtype == "float16":
            warnings.append("DeepSeek-V3.2 with --dtype float16: SGLang's DSA indexer builds bfloat16 parameters and its "
                            "Hopper path assumes bfloat16; with the Marlin MoE needing float16, this pairing is unverified")
    ep = tp if (tp > 1 and (f.moe_quantized or expert_parallel)) else 1
    if ep > 1:
        reasons.append(EP_REASON.format(tp=tp) if f.moe_quantized else f"--ep-size {tp}: asked for (--expert-parallel)")
    layout = Layout(tp, 1, ep > 1)
    from repack.serve.sharding import layout_problems

    problems = layout_problems(model.spec, model.tensors, layout, marlin=True, rank=model.shard(layout))
    mem = memory(weights_gib_per_gpu, kv_bytes_per_token(f, tp), gpu, tp, mem_fraction_static=mem_fraction_static,
                 context_length=context_length, cpu_offload_gb=cpu_offload_gb, model_max_positions=f.max_positions,
                 mla=f.mla, cuda_graph=not disable_cuda_graph)
    if mem.mem_fraction_static > mem.sglang_default_fraction:  # SGLang's default leaves its own reserve by definition
        warnings.append(f"--mem-fraction-static {mem.mem_fraction_static:g} leaves {mem.slack_gib:.2f} GiB for activations "
                        f"and CUDA graphs; SGLang's own estimate is {mem.reserve_gib:.2f} GiB (its default here: "
                        f"{mem.sglang_default_fraction:g})")
    if mem.cpu_offload_gb:
        warnings.append(f"--cpu-offload-gb {mem.cpu_offload_gb}: {mem.cpu_offload_gb} GiB of weights per GPU in host memory "
                        f"({mem.cpu_offload_gb * tp} GiB pinned in all), copied over PCIe every forward pass; slow")
    if not mem.fits:
        warnings.append(f"does not fit: {mem.reason}")
    if problems:
        warnings.append(f"TP {tp}" + (f" with --ep-size {ep}" if ep > 1 else "") + " does not split the model into whole "
                        f"ranks: {'; '.join(problems[:3])}")
    argv = [python, *HEAD[1:], model_path, "--tp-size", str(tp)]
    if ep > 1:
        argv += ["--ep-size", str(ep)]
    if dtype:
        argv += ["--dtype", dtype]
    if backend:
        argv += ["--attention-backend", backend]
    argv += ["--mem-fraction-static", f"{mem.mem_fraction_static:g}", "--context-length", str(mem.context_length)]
    if mem.cpu_offload_gb:
        argv += ["--cpu-offload-gb", str(mem.cpu_offload_gb)]
    if trust_remote_code:
        argv += ["--trust-remote-code"]
        reasons.append("--trust-remote-code: asked for (SGLang may run the checkpoint's own Python code)")
    elif f.remote_code:
        warnings.append("config.json has auto_map (the checkpoint's own Python code); --trust-remote-code is not passed "
                        f"(SGLang serves {f.architecture} with its own code, {ARCHITECTURES[f.architecture]}.py); add "
                        "--trust-remote-code if SGLang asks for it")
    if tp > 1 and _consumer(gpu, consumer_pcie):
        argv += ["--disable-custom-all-reduce"]
        reasons.append("--disable-custom-all-reduce: consumer PCIe GPUs without peer-to-peer")
    if disable_cuda_graph:
        argv += ["--disable-cuda-graph"]
    argv += ["--host", host, "--port", str(port), *extra_args]
    return SglangLaunch(model_path, argv, dict(env or {}), ver, MIN_SGLANG, gpu, tp, mem, dtype, backend,
                        reasons, warnings, layout_problems=problems, ep_size=ep, refused=refused)


# ---------------------------------------------------------------- script

def script(launch: SglangLaunch, recipe: dict | None = None) -> str:
    """Bash: preflight (GPU count and memory, ``import sglang`` and its version >= min), then ``exec`` the server.
    ``MODEL`` and ``PYTHON`` in the environment override the path and the interpreter. Outside text reaches it only
    through :mod:`repack.serve.shell`; the server receives ``[$PYTHON, *launch.argv[1:]]`` with ``$MODEL`` as the
    model path."""
    m, g = launch.memory, launch.gpu
    env = sh.check_env(dict(launch.env))
    L = ["#!/usr/bin/env bash",
         sh.comment(f"Serve {launch.model_path} with stock SGLang. Written by `w3repack launch --engine sglang`; "
                    "regenerate it rather than edit it.")]
    if recipe:
        L.append(sh.comment(f"recipe: {recipe['name']} ({recipe.get('description', '')})"))
    L.append(sh.comment(f"plan: {launch.tp} GPUs of {g.memory_gib:g} GiB, cc {g.cc}, TP {launch.tp}"
                        + (f" with expert parallelism (--ep-size {launch.ep_size})" if launch.ep_size > 1 else "")))
    L.append(sh.comment(f"weights {m.weights_gib_per_gpu:.2f} GiB per GPU ({m.weights_gib_on_gpu:.2f} GiB on the GPU), "
                        f"KV {m.kv_bytes_per_token} bytes per token, KV pool {m.kv_pool_gib:.2f} GiB = {m.mem_fraction_static:g} x "
                        f"{m.pre_load_gib:.2f} GiB - weights"))
    L.append(sh.comment(f"context {m.context_length} tokens (pool {m.max_total_tokens} tokens); fits: "
                        + ("yes" if launch.fits else "NO: " + launch.reason)))
    L.append(sh.comment(f"flags chosen for SGLang {launch.version}"))
    L += [sh.comment(f"why: {r}") for r in launch.reasons]
    L += [sh.comment(f"warning: {w}") for w in launch.warnings]
    need_mib = int(g.memory_gib * 1024 * 0.98)
    L += ["set -euo pipefail", "",
          sh.default("MODEL", launch.model_path),
          'PYTHON="${PYTHON:-python3}"',
          sh.assign("NEED_GPUS", str(int(launch.tp))),
          sh.assign("NEED_MIB", str(need_mib)),
          sh.assign("MIN_SGLANG", launch.min_version),
          sh.assign("FLAGS_SGLANG", launch.version),
          "",
          *sh.PREFLIGHT_GPUS,
          'SGLANG_VERSION="$("$PYTHON" -c \'import importlib.metadata as m; print(m.version("sglang"))\' 2>/dev/null)" \\',
          '  || die "sglang is not installed for $PYTHON (pip install sglang, or set PYTHON=/path/to/venv/bin/python)"',
          'SGLANG_VERSION="${SGLANG_VERSION%%+*}"',
          'version_ge "$SGLANG_VERSION" "$MIN_SGLANG" || die "SGLang $SGLANG_VERSION is older than $MIN_SGLANG, which these flags need"',
          '[ "$SGLANG_VERSION" = "$FLAGS_SGLANG" ] || echo "preflight: note: SGLang $SGLANG_VERSION installed, flags '
          'chosen for $FLAGS_SGLANG; regenerate with --sglang-version $SGLANG_VERSION if it refuses them" >&2',
          *([] if not launch.refused else [
              sh.assign("BAD_FROM", launch.refused[0]), sh.assign("BAD_TO", launch.refused[1]),
              'if version_ge "$SGLANG_VERSION" "$BAD_FROM" && version_ge "$BAD_TO" "$SGLANG_VERSION"; then',
              '  die "SGLang $SGLANG_VERSION cannot build this DeepSeek model (its MLA attention reads the weight of '
              f'GPTQ-packed q_a/kv_a or q_b projections, which they lack); install a release outside {launch.refused[0]}-'
              f'{launch.refused[1]}"',
              'fi']),
          'echo "preflight: ${#MEM_MIB[@]} GPUs, SGLang $SGLANG_VERSION: ok" >&2',
          ""]
    for k, v in env.items():
        L.append(sh.export(k, v))
    if env:
        L.append("")
    L += sh.command_lines([sh.Var("PYTHON"), *HEAD[1:], sh.Var("MODEL"), *launch.after_model])
    return "\n".join(L) + "\n"


def from_recipe(model_path: str, model: planner.Model, weights_gib_per_gpu: float, recipe: dict, **kw) -> SglangLaunch:
    """:func:`sglang_command` with a recipe's hardware, context and environment (its vLLM-only settings,
    utilization and extra_args, do not carry over; its CPU offload is re-planned under SGLang's rule)."""
    hw, sv = recipe["hardware"], recipe.get("serve", {})
    gpu = planner.Gpu(int(hw["gpus"]), float(hw["gpu_memory_gib"]), str(hw["compute_capability"]), hw.get("gpu_name"),
                      {"count": "recipe", "memory_gib": "recipe", "cc": "recipe"})
    kw.setdefault("context_length", sv.get("max_model_len"))
    kw.setdefault("consumer_pcie", hw.get("consumer_pcie"))
    kw.setdefault("env", dict(recipe.get("env", {})))
    return sglang_command(model_path, model, weights_gib_per_gpu, gpu, gpu.count, **kw)


