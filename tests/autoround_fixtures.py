"""Real AutoRound-made 3-bit fixtures and AutoRound/transformers reference helpers.

Everything here runs on CPU with no network (``HF_HUB_OFFLINE=1``): tiny random MoE models are built
from ``transformers`` configs, a word-level tokenizer is built in code, and AutoRound (``auto-round``)
quantizes them with RTN (``iters=0``) to 3-bit symmetric ``auto_round:auto_gptq``.

Pinned stack this was written against (see the interop tests): torch 2.13.0 (CPU), auto-round 0.16.1,
transformers 5.23.0.  Imports of torch / transformers / auto_round are lazy, so importing this module
never fails; callers skip with ``pytest.importorskip("auto_round")``.

Public helpers
--------------
``build_fixture(family, group_size, out_dir)``  quantize a tiny random model into ``out_dir``.
``read_checkpoint(model_dir)``                  all tensors of a checkpoint (``{name: tensor}``).
``quantized_modules(tensors)``                  ``{module: {"qweight", "qzeros", "scales", ...}}``.
``module_bits(mod)``                            bit width derived from the shapes (not the config).
``autoround_dequant(...)``                      dense weight as AutoRound's own QuantLinear computes it.
``load_model(model_dir, dtype)`` / ``load_logits(model_dir, dtype, input_ids)``
                                                transformers + auto-round load on CPU, logits.

The CLI (``python tests/autoround_fixtures.py OUT_ROOT [family:group_size[:mtp] ...] [--gpu]``) builds fixtures
in a fresh process (``--gpu``: the set ``scripts/gpu_check.py --fixture`` takes, to be copied to a GPU host that
has no auto-round); the pytest plugin ``tests/conftest_autoround.py`` uses ``build_fixture``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

FAMILIES = ("deepseek_v3", "qwen3_moe", "qwen2_moe", "glm4_moe", "qwen3_next")
GROUP_SIZES = (128, 32)
# (family, group_size) pairs the interop tests use by default.
DEFAULT_SPECS = (
    ("deepseek_v3", 128),
    ("deepseek_v3", 32),
    ("qwen3_moe", 128),
    ("qwen3_moe", 32),
    ("qwen2_moe", 32),
    ("glm4_moe", 128),
    ("glm4_moe", 32),
    ("qwen3_next", 128),
    ("qwen3_next", 32),
)
# Families whose checkpoints place MTP layers at ``model.layers.L`` (``L = num_hidden_layers``,
# ``num_nextn_predict_layers`` of them, DeepSeek-V3 names: eh_proj, enorm, hnorm, shared_head, embed_tokens).
MTP_FAMILIES = ("deepseek_v3", "glm4_moe")
# ... and those built with one by default: every GLM-4.5/4.6/4.7 checkpoint carries one (layer 92, or 46 for Air).
MTP_BY_DEFAULT = ("glm4_moe",)
# The fixtures for scripts/gpu_check.py --fixture (one per family vLLM serves, group size 128).
GPU_SPECS = (("deepseek_v3", 128), ("glm4_moe", 128), ("qwen3_moe", 128), ("qwen3_next", 128))
# max_position_embeddings of every family: the bound of vLLM's max_model_len (the GPU check asks for 2048).
MAX_POSITIONS = 4096
# Config of the GPU fixtures where vLLM 0.33 needs real values (each found by a failed GPU run, 2026-12-02): its MLA
# kernels take DeepSeek's latent width only (kv_lora_rank 512 + qk_rope 64 = 576: "Head dimension 192 is not
# supported by MLA"), its FlashAttention MLA prefill DeepSeek's head dims only (qk_nope 128, qk_rope 64, v 128), and
# its DeepSeek MoE gate loads e_score_correction_bias only with ``topk_method: noaux_tc`` (which transformers'
# DeepseekV3Config does not write); its FLA Gated DeltaNet kernels fail to compile for key and value head dims that
# differ (64 and 32).
GPU_CONFIG = {
    "deepseek_v3": {"kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
                    "topk_method": "noaux_tc", "scoring_func": "sigmoid"},
    "qwen3_next": {"linear_key_head_dim": 128, "linear_value_head_dim": 128},
}
VOCAB_SIZE = 512
# Versions the fixtures were validated with; the cache key includes the installed ones.
PINNED = {"torch": "2.13.0", "auto-round": "0.16.1", "transformers": "5.23.0"}

# The one inference backend used for every load: AutoRound's pure-torch QuantLinear for the
# ``auto_round:auto_gptq`` packing (zero points stored minus one).  It takes 2..8 bits, so the 3-bit
# source and the 4-bit output go through the very same code.  Pinning it matters: with
# ``auto-round-lib`` installed, "auto" would pick the ark kernel for 4 bits (it has no 3-bit path),
# and source/output would no longer run the same arithmetic.
BACKEND = "auto_round:torch_zp"


def _offline_env() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# --------------------------------------------------------------------------------------------------
# tiny random models
# --------------------------------------------------------------------------------------------------


def make_config(family: str, gpu_shapes: bool = False):
    """A tiny config.  Every quantized in_features (128, 256, 512) is a multiple of 128 and 32.

    glm4_moe is GLM-4.5-shaped: GQA with q/k/v bias and q/k norm, half-rotary heads (``partial_rotary_factor`` 0.5),
    one dense layer (``first_k_dense_replace``), a shared expert, a sigmoid router with ``e_score_correction_bias``
    and ``num_nextn_predict_layers: 1``.  qwen3_next is a hybrid: a Gated DeltaNet (linear attention) layer, then a
    gated full-attention layer, both with routed experts and a gated shared expert; every linear-attention
    projection, ``in_proj_ba`` included (32 outputs), is wide enough for AutoRound to quantize it.
    """
    _offline_env()
    config = _make_config(family)
    for key, value in (GPU_CONFIG.get(family, {}) if gpu_shapes else {}).items():
        setattr(config, key, value)
    if family == "deepseek_v3" and gpu_shapes:
        config.qk_head_dim = config.qk_nope_head_dim + config.qk_rope_head_dim
        config.head_dim = config.qk_rope_head_dim
    return config


def _make_config(family: str):
    if family == "deepseek_v3":
        from transformers import DeepseekV3Config

        return DeepseekV3Config(
            vocab_size=VOCAB_SIZE,
            hidden_size=256,
            intermediate_size=512,  # dense MLP of the first `first_k_dense_replace` layers
            moe_intermediate_size=128,
            num_hidden_layers=3,
            first_k_dense_replace=1,
            num_attention_heads=4,
            num_key_value_heads=4,
            n_shared_experts=1,
            n_routed_experts=8,
            num_experts_per_tok=2,
            n_group=2,
            topk_group=1,
            routed_scaling_factor=2.5,
            q_lora_rank=128,
            kv_lora_rank=128,
            qk_rope_head_dim=32,
            qk_nope_head_dim=64,
            v_head_dim=64,
            max_position_embeddings=MAX_POSITIONS,
            tie_word_embeddings=False,
            bos_token_id=0,
            eos_token_id=1,
        )
    if family == "qwen3_moe":
        from transformers import Qwen3MoeConfig

        return Qwen3MoeConfig(
            vocab_size=VOCAB_SIZE,
            hidden_size=256,
            intermediate_size=512,  # dense MLP of the layers in `mlp_only_layers`
            moe_intermediate_size=128,
            num_hidden_layers=3,
            mlp_only_layers=[0],
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=64,
            num_experts=8,
            num_experts_per_tok=2,
            norm_topk_prob=True,
            max_position_embeddings=MAX_POSITIONS,
            tie_word_embeddings=False,
            bos_token_id=0,
            eos_token_id=1,
        )
    if family == "qwen2_moe":
        from transformers import Qwen2MoeConfig

        return Qwen2MoeConfig(
            vocab_size=VOCAB_SIZE,
            hidden_size=256,
            intermediate_size=512,
            moe_intermediate_size=128,
            shared_expert_intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_experts=4,
            num_experts_per_tok=2,
            max_position_embeddings=MAX_POSITIONS,
            tie_word_embeddings=False,
            bos_token_id=0,
            eos_token_id=1,
        )
    if family == "glm4_moe":
        from transformers import Glm4MoeConfig

        return Glm4MoeConfig(
            vocab_size=VOCAB_SIZE,
            hidden_size=256,
            intermediate_size=512,  # dense MLP of the first `first_k_dense_replace` layers
            moe_intermediate_size=128,
            num_hidden_layers=3,
            first_k_dense_replace=1,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=64,
            attention_bias=True,
            use_qk_norm=True,
            partial_rotary_factor=0.5,
            n_routed_experts=8,
            n_shared_experts=1,
            num_experts_per_tok=2,
            n_group=1,
            topk_group=1,
            routed_scaling_factor=2.5,
            norm_topk_prob=True,
            num_nextn_predict_layers=1,
            max_position_embeddings=MAX_POSITIONS,
            tie_word_embeddings=False,
            bos_token_id=0,
            eos_token_id=1,
        )
    if family == "qwen3_next":
        from transformers import Qwen3NextConfig

        return Qwen3NextConfig(
            vocab_size=VOCAB_SIZE,
            hidden_size=256,
            intermediate_size=512,
            moe_intermediate_size=128,
            shared_expert_intermediate_size=128,
            num_hidden_layers=2,
            layer_types=["linear_attention", "full_attention"],
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=64,
            linear_num_key_heads=2,
            linear_num_value_heads=16,
            linear_key_head_dim=64,
            linear_value_head_dim=32,
            linear_conv_kernel_dim=4,
            num_experts=8,
            num_experts_per_tok=2,
            norm_topk_prob=True,
            max_position_embeddings=MAX_POSITIONS,
            tie_word_embeddings=False,
            bos_token_id=0,
            eos_token_id=1,
        )
    raise ValueError(f"unknown family {family!r}; known: {FAMILIES}")


def make_random_model(family: str, seed: int = 0, gpu_shapes: bool = False):
    """A float32 random model; seeded, and the global torch RNG state is left untouched.

    transformers' init leaves norms at 1 and biases / DeepSeek's e_score_correction_bias at 0; those are
    perturbed here so that a converter which dropped or zeroed them would change the logits.
    """
    _offline_env()
    import torch
    from transformers import AutoModelForCausalLM

    config = make_config(family, gpu_shapes)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        gen = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for name, p in list(model.named_parameters()) + list(model.named_buffers()):
                if "rotary" in name or "inv_freq" in name:
                    continue
                if name.endswith("norm.weight"):
                    p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
                elif name.endswith(".bias") or name.endswith("e_score_correction_bias"):
                    p.copy_(0.02 * torch.randn(p.shape, generator=gen))
    return model.eval()


def make_tokenizer(vocab_size: int = VOCAB_SIZE):
    """A word-level fast tokenizer built in code: tokens ``[UNK] [PAD] <s> </s> w4 .. w{vocab-1}``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<s>": 0, "</s>": 1, "[UNK]": 2, "[PAD]": 3}
    vocab.update({f"w{i}": i for i in range(4, vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="[UNK]", pad_token="[PAD]"
    )


def calibration_texts(n: int = 2, words: int = 40, seed: int = 0, vocab_size: int = VOCAB_SIZE) -> list[str]:
    """Calibration strings (RTN does not use them for the weights, AutoRound still wants a dataset;
    passing a list avoids its default hub dataset NeelNanda/pile-10k, which needs the network)."""
    import random

    rnd = random.Random(seed)
    return [" ".join(f"w{rnd.randrange(4, vocab_size)}" for _ in range(words)) for _ in range(n)]


# --------------------------------------------------------------------------------------------------
# quantization with AutoRound
# --------------------------------------------------------------------------------------------------


def build_fixture(
    family: str,
    group_size: int,
    out_dir: str | os.PathLike,
    *,
    seed: int = 0,
    bits: int = 3,
    opt_rtn: bool = False,
    layer_config: dict | None = None,
    quant_lm_head: bool = False,
    mtp: bool | None = None,
    gpu_shapes: bool = False,
) -> Path:
    """Quantize a tiny random ``family`` model with AutoRound RTN into ``out_dir``; returns ``out_dir``.

    Output: ``config.json`` (with ``quantization_config``), ``quantization_config.json``,
    ``model.safetensors``, ``generation_config.json``, ``tokenizer.json``, ``tokenizer_config.json``.
    ``opt_rtn=False`` passes ``disable_opt_rtn=True`` (plain RTN; 0.16.1 otherwise turns on its
    "optimized RTN" scale search for the non-MoE blocks).  ``layer_config`` is AutoRound's per-layer
    override dict (e.g. ``{"model.layers.0.mlp.down_proj": {"bits": 4}}`` for a mixed-width export).
    ``gpu_shapes``: the config values of ``GPU_CONFIG`` (what vLLM's kernels need).
    ``mtp=True`` (``MTP_FAMILIES``; ``None``: the family's default, on for glm4_moe): the float model is saved with
    an MTP layer (``model.layers.L.*``, ``num_nextn_predict_layers: 1``) and AutoRound quantizes it from that
    folder; transformers does not load the MTP layer, and AutoRound copies it from the source folder into
    ``model_extra_tensors.safetensors`` and quantizes it by RTN at 4 bits (3 is "unsupported" there).
    """
    _offline_env()
    import torch
    from auto_round import AutoRound

    if mtp is None:
        mtp = family in MTP_BY_DEFAULT
    if mtp and family not in MTP_FAMILIES:
        raise ValueError(f"{family}: no MTP layer of the model.layers.L kind; families with one: {MTP_FAMILIES}")

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = make_random_model(family, seed, gpu_shapes)
    # save_pretrained writes it, AutoRound given a model object does not; every real checkpoint has it
    model.config.architectures = [type(model).__name__]
    tokenizer = make_tokenizer(model.config.vocab_size)
    kwargs = dict(
        bits=bits,
        group_size=group_size,
        sym=True,
        iters=0,
        nsamples=2,
        seqlen=32,
        batch_size=1,
        dataset=calibration_texts(seed=seed, vocab_size=model.config.vocab_size),
        seed=seed,
        device_map="cpu",
        enable_torch_compile=False,
        disable_opt_rtn=not opt_rtn,
    )
    if layer_config:
        kwargs["layer_config"] = layer_config
    if quant_lm_head:
        kwargs["quant_lm_head"] = True
    staging = out_dir / "_autoround_out"
    if staging.exists():
        shutil.rmtree(staging)
    source = model
    if mtp:
        source = str(_save_with_mtp(model, tokenizer, out_dir / "_float_with_mtp", seed))
    with torch.random.fork_rng(devices=[]):
        ar = AutoRound(source, tokenizer, **kwargs) if not mtp else AutoRound(source, **kwargs)
        # 0.16.1 appends a sub folder ("w3g128", or "<name>-w3g128" for a model with a name_or_path)
        # to output_dir; the real folder is returned.
        _, folders = ar.quantize_and_save(str(staging), format="auto_round:auto_gptq")
    folder = Path(folders[0] if isinstance(folders, (list, tuple)) else folders)
    for f in folder.iterdir():
        os.replace(f, out_dir / f.name)
    shutil.rmtree(staging)
    if mtp:
        shutil.rmtree(out_dir / "_float_with_mtp")
    qc = json.loads((out_dir / "config.json").read_text())["quantization_config"]
    if qc.get("packing_format") != "auto_round:auto_gptq" or qc.get("bits") != bits:
        raise RuntimeError(f"AutoRound wrote an unexpected quantization_config: {qc}")
    return out_dir


def _save_with_mtp(model, tokenizer, folder: Path, seed: int) -> Path:
    """``model`` saved to ``folder`` plus MTP layer ``L = num_hidden_layers``: a perturbed copy of the last layer,
    ``eh_proj``, ``enorm``, ``hnorm``, ``shared_head.{norm,head}`` and ``embed_tokens`` (DeepSeek-V3's names, which
    GLM-4.5's layer 92 uses too)."""
    import torch
    from safetensors.torch import load_file, save_file

    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    files = sorted(folder.glob("*.safetensors"))
    if len(files) != 1:
        raise RuntimeError(f"expected one safetensors file in {folder}, found {len(files)}")
    sd = load_file(str(files[0]))
    n, h = model.config.num_hidden_layers, model.config.hidden_size
    gen = torch.Generator().manual_seed(seed + 7)
    for k in [k for k in sd if k.startswith(f"model.layers.{n - 1}.")]:
        v = sd[k]
        sd[k.replace(f"model.layers.{n - 1}.", f"model.layers.{n}.")] = v + 0.01 * torch.randn(v.shape, generator=gen)
    sd[f"model.layers.{n}.eh_proj.weight"] = 0.02 * torch.randn(h, 2 * h, generator=gen)
    for name in ("enorm", "hnorm", "shared_head.norm"):
        sd[f"model.layers.{n}.{name}.weight"] = 1 + 0.1 * torch.randn(h, generator=gen)
    sd[f"model.layers.{n}.shared_head.head.weight"] = sd["lm_head.weight"].clone()
    sd[f"model.layers.{n}.embed_tokens.weight"] = sd["model.embed_tokens.weight"].clone()
    save_file({k: v.contiguous() for k, v in sd.items()}, str(files[0]), metadata={"format": "pt"})
    cfg = json.loads((folder / "config.json").read_text())
    cfg["num_nextn_predict_layers"] = 1
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    return folder


# --------------------------------------------------------------------------------------------------
# reading checkpoints
# --------------------------------------------------------------------------------------------------


def read_checkpoint(model_dir: str | os.PathLike) -> dict:
    """All tensors of the checkpoint in ``model_dir`` (single file or index + shards), as torch tensors."""
    from safetensors.torch import load_file

    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in model_dir.glob("*.safetensors"))
    tensors = {}
    for f in files:
        tensors.update(load_file(str(model_dir / f)))
    return tensors


def read_quant_config(model_dir: str | os.PathLike) -> dict:
    return json.loads((Path(model_dir) / "config.json").read_text()).get("quantization_config", {})


def quantized_modules(tensors: dict) -> dict:
    """``{module_name: {"qweight": .., "qzeros": .., "scales": .., ["g_idx"], ["bias"]}}``."""
    mods = {}
    for name in tensors:
        if name.endswith(".qweight"):
            m = name[: -len(".qweight")]
            d = {k: tensors[f"{m}.{k}"] for k in ("qweight", "qzeros", "scales", "g_idx", "bias") if f"{m}.{k}" in tensors}
            mods[m] = d
    return mods


def module_bits(mod: dict) -> int:
    """Bit width from the shapes (docs/formats.md: the config's ``bits`` is not always every module's)."""
    qz, sc = mod["qzeros"], mod["scales"]
    bits, rem = divmod(32 * qz.shape[1], sc.shape[1])
    if rem:
        raise ValueError(f"qzeros {tuple(qz.shape)} / scales {tuple(sc.shape)} give no integer bit width")
    return bits


def module_group_size(mod: dict) -> int:
    k = mod["qweight"].shape[0] * 32 // module_bits(mod)
    return k // mod["scales"].shape[0]


def matches_extra_config(module: str, extra_config: dict) -> dict | None:
    """The ``extra_config`` entry that applies to ``module`` (exact name first, then as a regex).

    AutoRound's loader expands the keys with ``re.search`` over the model's layer names."""
    if module in extra_config:
        return extra_config[module]
    for key, val in extra_config.items():
        try:
            if re.search(key, module):
                return val
        except re.error:
            continue
    return None


# --------------------------------------------------------------------------------------------------
# AutoRound's own dequantization
# --------------------------------------------------------------------------------------------------


def autoround_quantlinear(qweight, qzeros, scales, bits: int, group_size: int, g_idx=None):
    """AutoRound's inference QuantLinear for ``auto_round:auto_gptq`` (qlinear_torch_zp), filled."""
    import torch
    from auto_round_extension.torch.qlinear_torch_zp import QuantLinear

    k = qweight.shape[0] * 32 // bits
    n = qweight.shape[1]
    ql = QuantLinear(bits, group_size, k, n, bias=False, g_idx=g_idx is not None)
    if tuple(ql.qweight.shape) != tuple(qweight.shape) or tuple(ql.qzeros.shape) != tuple(qzeros.shape):
        raise ValueError(
            f"shapes do not fit a {bits}-bit, group {group_size} QuantLinear [{k}->{n}]: "
            f"qweight {tuple(qweight.shape)} (want {tuple(ql.qweight.shape)}), "
            f"qzeros {tuple(qzeros.shape)} (want {tuple(ql.qzeros.shape)})"
        )
    ql.qweight = qweight.to(torch.int32).contiguous()
    ql.qzeros = qzeros.to(torch.int32).contiguous()
    ql.scales = scales.contiguous()
    if g_idx is not None:
        ql.g_idx = g_idx.to(torch.int32).contiguous()
    ql.eval()
    return ql


def autoround_dequant(qweight, qzeros, scales, bits: int, group_size: int, *, g_idx=None, exact: bool = False):
    """The dense ``[out, in]`` weight that AutoRound's QuantLinear reconstructs, taken from its forward.

    ``QuantLinear.forward`` unpacks, computes ``W = scales * (q - (z + 1))``, casts ``W`` to the input
    dtype and calls ``torch.matmul(x, W)``; the ``W`` handed to that matmul is captured here.  So this
    is AutoRound's unpacking and arithmetic, not ours, signed zeros included (a negative scale times a
    zero code difference is -0.0).

    ``exact=False``: what inference does: ``scales`` stay float16, so ``W`` is the float16 product
    (one rounding of the exact value); returned as float16.
    ``exact=True``: ``scales`` upcast to float32 first, so ``W`` is the exact product ``s * (q - z)``
    (an fp16 scale times an integer of at most 8 bits fits float32 exactly); returned as float32.
    """
    import torch

    if exact:
        scales = scales.to(torch.float32)
    ql = autoround_quantlinear(qweight, qzeros, scales, bits, group_size, g_idx=g_idx)
    x = torch.zeros(1, ql.infeatures, dtype=torch.float32)
    captured = []
    orig_matmul = torch.matmul

    def spy(a, b, *args, **kwargs):
        captured.append(b)
        return orig_matmul(a, b, *args, **kwargs)

    torch.matmul = spy
    try:
        with torch.no_grad():
            ql(x)
    finally:
        torch.matmul = orig_matmul
    if len(captured) != 1 or tuple(captured[0].shape) != (ql.infeatures, ql.outfeatures):
        raise RuntimeError("AutoRound's QuantLinear.forward no longer computes x @ W as expected")
    # float32 here is an exact upcast of the float16 W (or W itself when exact=True)
    return captured[0].t().contiguous().to(scales.dtype)


def bits_equal(a, b) -> bool:
    """Bitwise equality (distinguishes -0.0 / +0.0, NaN payloads) of two same-dtype tensors."""
    import torch

    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype.is_floating_point:
        view = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32, torch.float64: torch.int64}[a.dtype]
        return torch.equal(a.contiguous().view(view), b.contiguous().view(view))
    return torch.equal(a, b)


# --------------------------------------------------------------------------------------------------
# transformers + auto-round loading
# --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _allow_float32_compute(backend: str = BACKEND):
    """AutoRound 0.16.1 lists float16/bfloat16 only as compute dtypes of its torch backends and, after
    loading, does ``model.to(torch.float16)`` ("Forced model to torch.float16") when asked for float32.
    The QuantLinear itself works in any float dtype (it dequantizes with the float16 scales and casts to
    the input dtype), so for a float32 run the backend's list is widened for the duration of the load."""
    from auto_round.inference.backend import BackendInfos

    info = BackendInfos[backend]
    old = info.compute_dtype
    info.compute_dtype = list(old) + ["float32"]
    try:
        yield
    finally:
        info.compute_dtype = old


def load_model(model_dir: str | os.PathLike, dtype, backend: str = BACKEND):
    """``AutoModelForCausalLM.from_pretrained`` on CPU in ``dtype`` with auto-round's ``backend``.

    Works for ``quant_method`` ``auto-round`` and ``gptq`` (v1) checkpoints: passing an
    ``AutoRoundConfig`` makes transformers route a GPTQ config through auto-round too."""
    _offline_env()
    import torch
    from transformers import AutoModelForCausalLM, AutoRoundConfig

    ctx = _allow_float32_compute(backend) if dtype == torch.float32 else contextlib.nullcontext()
    import warnings

    with ctx, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="You passed `quantization_config`")
        model = AutoModelForCausalLM.from_pretrained(
            str(model_dir),
            dtype=dtype,
            device_map="cpu",
            quantization_config=AutoRoundConfig(backend=backend),
        )
    if model.dtype != dtype:
        raise RuntimeError(f"asked for {dtype}, transformers/auto-round gave a {model.dtype} model")
    return model.eval()


def fixed_input_ids(vocab_size: int = VOCAB_SIZE, batch: int = 2, seq: int = 24, seed: int = 1234):
    import torch

    gen = torch.Generator().manual_seed(seed)
    return torch.randint(4, vocab_size, (batch, seq), generator=gen)


def model_logits(model, input_ids):
    import torch

    with torch.no_grad():
        return model(input_ids=input_ids).logits.detach().clone()


def load_logits(model_dir: str | os.PathLike, dtype, input_ids, backend: str = BACKEND):
    """Logits ``[batch, seq, vocab]`` (in ``dtype``) of the checkpoint in ``model_dir`` for ``input_ids``."""
    model = load_model(model_dir, dtype, backend)
    try:
        return model_logits(model, input_ids)
    finally:
        del model


# --------------------------------------------------------------------------------------------------
# CLI: build fixtures in a fresh process
# --------------------------------------------------------------------------------------------------


def installed_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("torch", "auto-round", "transformers", "tokenizers", "safetensors"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def spec_dirname(family: str, group_size: int, mtp: bool | None = None) -> str:
    """``<family>-w3g<gs>``, with ``-mtp`` / ``-nomtp`` where ``mtp`` is not the family's default."""
    tail = "" if mtp is None or mtp == (family in MTP_BY_DEFAULT) else ("-mtp" if mtp else "-nomtp")
    return f"{family}-w3g{group_size}{tail}"


def parse_spec(text: str) -> tuple[str, int, bool | None]:
    """``family:group_size[:mtp|:nomtp]`` -> (family, group_size, mtp or None for the family's default)."""
    parts = text.split(":")
    if len(parts) not in (2, 3) or parts[0] not in FAMILIES or not parts[1].isdigit() \
            or int(parts[1]) not in GROUP_SIZES or (len(parts) == 3 and parts[2] not in ("mtp", "nomtp")):
        raise ValueError(f"{text!r}: expected family:group_size[:mtp|:nomtp], family one of {', '.join(FAMILIES)}, "
                         f"group size one of {', '.join(map(str, GROUP_SIZES))}")
    mtp = None if len(parts) == 2 else parts[2] == "mtp"
    if mtp and parts[0] not in MTP_FAMILIES:
        raise ValueError(f"{text!r}: {parts[0]} has no MTP layer of the model.layers.L kind ({', '.join(MTP_FAMILIES)} do)")
    return parts[0], int(parts[1]), mtp


def main(argv=None) -> int:
    """Build fixtures into OUT_ROOT and list them in OUT_ROOT/fixtures.json (family, group size, MTP, versions)."""
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_root", help="each fixture goes to OUT_ROOT/<family>-w3g<group_size>[-mtp]")
    ap.add_argument("specs", nargs="*", help="family:group_size[:mtp|:nomtp] (default: the interop test set)")
    ap.add_argument("--gpu", action="store_true", help="the set scripts/gpu_check.py --fixture takes: "
                    + " ".join(f"{f}:{g}" for f, g in GPU_SPECS) + ", and every fixture built with GPU_CONFIG")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    try:
        specs = [parse_spec(s) for s in args.specs]
    except ValueError as e:
        ap.error(str(e))
    if args.gpu:
        specs += [(f, g, None) for f, g in GPU_SPECS]
    specs = specs or [(f, g, None) for f, g in DEFAULT_SPECS]
    root = Path(args.out_root)
    manifest = root / "fixtures.json"
    listed = json.loads(manifest.read_text()) if manifest.exists() else {"fixtures": {}}
    for family, gs, mtp in specs:
        t0 = time.perf_counter()
        name = spec_dirname(family, gs, mtp)
        d = build_fixture(family, gs, root / name, seed=args.seed, mtp=mtp, gpu_shapes=args.gpu)
        listed["fixtures"][name] = {"family": family, "group_size": gs, "seed": args.seed,
                                    "mtp": family in MTP_BY_DEFAULT if mtp is None else mtp}
        listed["versions"] = installed_versions()
        manifest.write_text(json.dumps(listed, indent=1, sort_keys=True) + "\n")
        print(f"built {d} in {time.perf_counter() - t0:.2f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
