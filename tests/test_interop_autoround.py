"""Third-party checks of the 3-bit -> 4-bit conversion against AutoRound itself.

Fixtures are real AutoRound 0.16.1 exports (RTN, 3-bit symmetric, ``auto_round:auto_gptq``) of tiny
random DeepSeek-V3, Qwen3-MoE, Qwen2-MoE, GLM-4.5-MoE (with its MTP layer, which AutoRound exports at 4 bits)
and Qwen3-Next (linear-attention hybrid) models (tests/autoround_fixtures.py).

* Fixture layout: what AutoRound writes (documents the input format; needs no converter).
* Weight level: for every quantized module, the dense weight AutoRound's own QuantLinear
  (auto_round_extension.torch.qlinear_torch_zp) reconstructs from our 4-bit output equals, bit for bit,
  the one it reconstructs from the 3-bit source.
* Model level: transformers + auto-round load source and output on CPU; logits for fixed input ids are
  bitwise equal, in float16 and float32.
* DeepSeek ``kv_b_proj`` emitted as float (default): the difference from the source is derived exactly
  (see ``test_logits_deepseek_kv_b_float``).
* MTP layers (DeepSeek-V3, GLM-4.5): the 4-bit modules pass through, ``eh_proj`` / ``embed_tokens`` /
  ``shared_head.head`` are emitted as their exact float32 dequantization (transformers does not load the layer,
  so only the weight-level checks see it).
* A deliberately wrong conversion (q4 = q3 + 3) is detected by both checks.

The converter is run as ``python -m repack convert SRC DST [...]``, the way users run it.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

torch = pytest.importorskip("torch")
pytest.importorskip("auto_round")
pytest.importorskip("transformers")

import autoround_fixtures as arf  # noqa: E402
from conftest_autoround import autoround_converted, autoround_fixture  # noqa: E402,F401

SPECS = list(arf.DEFAULT_SPECS)
DEEPSEEK_SPECS = [s for s in SPECS if s[0] == "deepseek_v3"]
# modules of an MTP layer that vLLM's deepseek_mtp / glm4_moe_mtp build unquantized (plain nn.Linear eh_proj, an
# embedding without quant_config, and the head, which w3repack emits as float in both config styles)
MTP_FLOAT_PARTS = ("eh_proj", "embed_tokens", "shared_head.head")
METHODS = ("auto-round", "gptq")
DTYPES = (torch.float16, torch.float32)
GPTQ_SYM4_ZEROS = 0x77777777  # eight stored zero points of 7 (true zero 8)
# 32 stored 3-bit zero points of 3 (true zero 4) fill 3 words: 0xDB6DB6DB, 0xB6DB6DB6, 0x6DB6DB6D
SYM3_ZEROS = torch.tensor([0xDB6DB6DB, 0xB6DB6DB6, 0x6DB6DB6D], dtype=torch.int64).to(torch.int32)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::UserWarning")


def _id(spec):
    return f"{spec[0]}-g{spec[1]}"


def _dtype_id(dt):
    return str(dt).replace("torch.", "")


# ---------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------


def assert_bitwise_equal(a, b, what: str):
    if a.shape != b.shape or a.dtype != b.dtype:
        raise AssertionError(f"{what}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}")
    if not arf.bits_equal(a, b):
        diff = (a.float() - b.float()).abs()
        n = int((a.float() != b.float()).sum())
        raise AssertionError(
            f"{what}: not bitwise equal: {n}/{a.numel()} elements differ, max |diff| {diff.max().item():.3e} "
            f"(max |ref| {b.float().abs().max().item():.3e})"
        )


def is_marked_float(qc: dict, module: str) -> bool:
    """Does the output's quantization_config leave ``module`` unquantized?"""
    if qc.get("quant_method") == "gptq" or "dynamic" in qc:
        for key in qc.get("dynamic", {}) or {}:
            if key.startswith("-:") and re.search(key[2:], module):
                return True
    entry = arf.matches_extra_config(module, qc.get("extra_config", {}) or {})
    return entry is not None and entry.get("bits", 0) >= 16


_SOURCE_LOGITS: dict = {}


def source_logits(src: Path, dtype, ids):
    key = (str(src), dtype)
    if key not in _SOURCE_LOGITS:
        _SOURCE_LOGITS[key] = arf.load_logits(src, dtype, ids)
    return _SOURCE_LOGITS[key]


def mtp_prefixes(model_dir: Path) -> tuple[str, ...]:
    """``model.layers.L.`` of each MTP layer the config declares (``num_hidden_layers`` on)."""
    cfg = json.loads((model_dir / "config.json").read_text())
    n, k = cfg["num_hidden_layers"], cfg.get("num_nextn_predict_layers") or 0
    return tuple(f"model.layers.{i}." for i in range(n, n + k))


def convert(autoround_fixture, autoround_converted, spec, **options):
    src = autoround_fixture(*spec)
    return src, autoround_converted(src, **options)


def check_weights(src: Path, out: Path, *, method: str, kv_b_float: bool) -> dict:
    """All weight-level checks; returns {"quantized": n, "float": [module names]}.

    Source modules are 3-bit, except in MTP layers (4-bit, as AutoRound exports them); float in the output: DeepSeek
    ``kv_b_proj`` when ``kv_b_float``, and an MTP layer's ``MTP_FLOAT_PARTS``."""
    s_t, o_t = arf.read_checkpoint(src), arf.read_checkpoint(out)
    mtp = mtp_prefixes(src)
    s_mods, o_mods = arf.quantized_modules(s_t), arf.quantized_modules(o_t)
    o_qc = arf.read_quant_config(out)

    # config: 4 bits, and the requested method; quantization_config.json (if written) agrees with config.json
    assert o_qc.get("bits") == 4, o_qc
    assert o_qc.get("quant_method") == method, o_qc
    if method == "auto-round":
        assert o_qc.get("packing_format", "auto_round:auto_gptq") == "auto_round:auto_gptq", o_qc
    qc_file = out / "quantization_config.json"
    if qc_file.exists():
        assert json.loads(qc_file.read_text()) == o_qc, "quantization_config.json disagrees with config.json"

    # tensors that do not belong to a quantized module pass through byte for byte
    module_tensors = {f"{m}.{k}" for m, d in s_mods.items() for k in d}
    for name, t in s_t.items():
        if name in module_tensors:
            continue
        assert name in o_t, f"{name} missing from the output"
        assert_bitwise_equal(o_t[name], t, name)

    float_mods = []
    for m, sd in s_mods.items():
        in_mtp = m.startswith(mtp)
        bits_s = arf.module_bits(sd)
        assert bits_s == (4 if in_mtp else 3), (m, bits_s)
        gs = arf.module_group_size(sd)
        ref16 = arf.autoround_dequant(sd["qweight"], sd["qzeros"], sd["scales"], bits_s, gs)
        ref32 = arf.autoround_dequant(sd["qweight"], sd["qzeros"], sd["scales"], bits_s, gs, exact=True)
        if m in o_mods:
            od = o_mods[m]
            assert f"{m}.weight" not in o_t, f"{m}: both packed and float weights"
            assert arf.module_bits(od) == 4, (m, tuple(od["qzeros"].shape), tuple(od["scales"].shape))
            k = sd["qweight"].shape[0] * 32 // bits_s
            assert tuple(od["qweight"].shape) == (k // 8, sd["qweight"].shape[1]), m
            if bits_s == 4:
                assert_bitwise_equal(od["qweight"], sd["qweight"], f"{m}.qweight (4-bit, passed through)")
            assert od["qweight"].dtype == torch.int32 and od["qzeros"].dtype == torch.int32, m
            assert bool((od["qzeros"] == GPTQ_SYM4_ZEROS).all()), f"{m}: qzeros are not all 0x77777777"
            assert_bitwise_equal(od["scales"], sd["scales"], f"{m}.scales")
            if "bias" in sd:
                assert_bitwise_equal(od["bias"], sd["bias"], f"{m}.bias")
            if "g_idx" in od:
                assert torch.equal(od["g_idx"].to(torch.int64), torch.arange(k) // gs), f"{m}.g_idx"
            out16 = arf.autoround_dequant(od["qweight"], od["qzeros"], od["scales"], 4, gs, g_idx=od.get("g_idx"))
            out32 = arf.autoround_dequant(
                od["qweight"], od["qzeros"], od["scales"], 4, gs, g_idx=od.get("g_idx"), exact=True
            )
            assert_bitwise_equal(out16, ref16, f"{m}: AutoRound dequant (fp16 path), 4-bit output vs 3-bit source")
            assert_bitwise_equal(out32, ref32, f"{m}: AutoRound dequant (exact fp32), 4-bit output vs 3-bit source")
        else:
            # emitted as float: DeepSeek kv_b_proj when asked for, and the MTP parts vLLM builds unquantized
            w = o_t.get(f"{m}.weight")
            assert w is not None, f"{m}: neither packed nor float in the output"
            mtp_part = in_mtp and m.split(".", 3)[3] in MTP_FLOAT_PARTS
            assert (kv_b_float and m.endswith("kv_b_proj")) or mtp_part, f"{m} was unexpectedly emitted as float"
            assert w.dtype == torch.float32, f"{m}.weight is {w.dtype}, expected float32"
            # exactly dequantized: scales (fp16, upcast) * (q - 4), no rounding at all ...
            assert_bitwise_equal(w, ref32, f"{m}.weight vs exact dequant")
            # ... and rounded once to fp16 it is what AutoRound's QuantLinear computes at inference
            assert_bitwise_equal(w.to(torch.float16), ref16, f"{m}.weight (as fp16) vs QuantLinear")
            assert is_marked_float(o_qc, m), f"{m} is float but not marked unquantized in {o_qc}"
            float_mods.append(m)
    extra = set(o_mods) - set(s_mods)
    assert not extra, f"output quantizes modules the source did not: {sorted(extra)[:5]}"
    for m in o_mods:
        assert not is_marked_float(o_qc, m), f"{m} is packed but the config marks it unquantized"
    return {"quantized": len(s_mods) - len(float_mods), "float": float_mods}


# ---------------------------------------------------------------------------------------------------
# the fixtures themselves (no converter needed)
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", SPECS, ids=_id)
def test_fixture_is_autoround_3bit(autoround_fixture, spec):
    family, gs = spec
    d = autoround_fixture(family, gs)
    qc = arf.read_quant_config(d)
    assert qc["quant_method"] == "auto-round"
    assert qc["packing_format"] == "auto_round:auto_gptq"
    assert (qc["bits"], qc["group_size"], qc["sym"], qc["data_type"]) == (3, gs, True, "int")
    assert qc["autoround_version"] == "0.16.1"
    t = arf.read_checkpoint(d)
    mtp = mtp_prefixes(d) if family in arf.MTP_BY_DEFAULT else ()
    qc_file = json.loads((d / "quantization_config.json").read_text())
    if mtp:
        # AutoRound updates only config.json's copy after adding the MTP layer (the converter reads that one)
        (p,) = mtp
        assert qc["extra_config"].pop(f"{p}mlp.gate") == {"bits": 16, "data_type": "fp"}
        assert (qc["block_name_to_quantize"], qc_file["block_name_to_quantize"]) == (["model.layers"], "model.layers")
        qc["block_name_to_quantize"] = "model.layers"
    assert qc_file == qc
    mods = {m: md for m, md in arf.quantized_modules(t).items() if not (mtp and m.startswith(mtp))}
    assert mods
    for m, md in mods.items():
        assert arf.module_bits(md) == 3 and arf.module_group_size(md) == gs, m
        assert md["scales"].dtype == torch.float16 and "g_idx" not in md, m
        assert torch.equal(md["qzeros"].reshape(-1, 3), SYM3_ZEROS.expand(md["qzeros"].numel() // 3, 3)), m
    neg = sum(int((md["scales"] < 0).sum()) for md in mods.values())
    assert neg > 0, "AutoRound's symmetric scales are signed; expected some negative"
    # left in float by AutoRound
    assert "lm_head.weight" in t and "model.embed_tokens.weight" in t
    assert not any(m.endswith(".gate") for m in mods), "router gates are never quantized"
    if family == "deepseek_v3":
        assert any(m.endswith("self_attn.kv_b_proj") for m in mods), "AutoRound quantizes kv_b_proj"
        assert any(".mlp.experts." in m for m in mods)
        assert any(n.endswith("mlp.gate.e_score_correction_bias") for n in t)
    if family == "qwen2_moe":
        assert "model.layers.0.mlp.shared_expert_gate.weight" in t
        assert any("bias" in md for md in mods.values()), "q/k/v biases ride along as fp16 .bias"
    if family == "glm4_moe":
        # GLM-4.5 layout: a dense first layer, q/k/v bias and q/k norm, shared expert, sigmoid router with bias
        assert {"model.layers.0.mlp.gate_proj", "model.layers.1.mlp.shared_experts.down_proj",
                "model.layers.2.mlp.experts.7.up_proj"} <= set(mods)
        assert not any(m.startswith("model.layers.0.mlp.experts") for m in mods)
        assert all("bias" in mods[f"model.layers.1.self_attn.{x}_proj"] for x in "qkv")
        assert "bias" not in mods["model.layers.1.self_attn.o_proj"]
        assert {"model.layers.1.self_attn.q_norm.weight", "model.layers.2.mlp.gate.e_score_correction_bias"} <= set(t)
        # the MTP layer, which transformers does not load: AutoRound copies it into its own file, at 4 bits
        (p,) = mtp
        layer = {m: md for m, md in arf.quantized_modules(t).items() if m.startswith(p)}
        assert {arf.module_bits(md) for md in layer.values()} == {4}
        assert {p + x for x in MTP_FLOAT_PARTS} | {p + "mlp.experts.0.down_proj", p + "self_attn.q_proj"} <= set(layer)
        assert {p + "enorm.weight", p + "hnorm.weight", p + "shared_head.norm.weight", p + "mlp.gate.weight"} <= set(t)
        wm = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
        assert {f for n, f in wm.items() if n.startswith(p)} == {"model_extra_tensors.safetensors"}
    if family == "qwen3_next":
        # one Gated DeltaNet layer (every projection quantized, the recurrence parameters float), one gated attention
        assert {"model.layers.0.linear_attn.in_proj_qkvz", "model.layers.0.linear_attn.in_proj_ba",
                "model.layers.0.linear_attn.out_proj", "model.layers.1.self_attn.q_proj"} <= set(mods)
        assert not any(m.startswith("model.layers.1.linear_attn") or m.startswith("model.layers.0.self_attn") for m in mods)
        assert {"model.layers.0.linear_attn.A_log", "model.layers.0.linear_attn.dt_bias",
                "model.layers.0.linear_attn.conv1d.weight", "model.layers.0.mlp.shared_expert_gate.weight"} <= set(t)
        assert t["model.layers.0.linear_attn.conv1d.weight"].dim() == 3


def test_autoround_dequant_is_quantlinear_forward(autoround_fixture):
    """The helper reproduces what a loaded model's QuantLinear does with its input."""
    d = autoround_fixture("qwen3_moe", 32)
    mods = arf.quantized_modules(arf.read_checkpoint(d))
    m = mods["model.layers.1.self_attn.o_proj"]
    ql = arf.autoround_quantlinear(m["qweight"], m["qzeros"], m["scales"], 3, 32)
    x = torch.randn(5, ql.infeatures, generator=torch.Generator().manual_seed(0), dtype=torch.float32)
    w = arf.autoround_dequant(m["qweight"], m["qzeros"], m["scales"], 3, 32)
    with torch.no_grad():
        assert_bitwise_equal(torch.matmul(x, w.t().contiguous().float()), ql(x), "QuantLinear(x) vs x @ W^T")


# ---------------------------------------------------------------------------------------------------
# weight level
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("spec", SPECS, ids=_id)
def test_weights_bit_exact(autoround_fixture, autoround_converted, spec, method):
    src, out = convert(autoround_fixture, autoround_converted, spec, quant_method=method)
    res = check_weights(src, out, method=method, kv_b_float=True)
    n_layers = arf.make_config(spec[0]).num_hidden_layers
    if spec[0] == "deepseek_v3":
        assert sorted(res["float"]) == [f"model.layers.{i}.self_attn.kv_b_proj" for i in range(n_layers)]
    elif spec[0] == "glm4_moe":
        assert sorted(res["float"]) == sorted(f"model.layers.{n_layers}.{x}" for x in MTP_FLOAT_PARTS)
    else:
        assert res["float"] == []


@pytest.mark.parametrize("spec", DEEPSEEK_SPECS, ids=_id)
def test_weights_bit_exact_kv_b_packed(autoround_fixture, autoround_converted, spec):
    src, out = convert(autoround_fixture, autoround_converted, spec, quant_method="auto-round", no_kv_b_float=True)
    assert check_weights(src, out, method="auto-round", kv_b_float=False)["float"] == []


# ---------------------------------------------------------------------------------------------------
# model level
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("spec", SPECS, ids=_id)
def test_logits_bit_exact(autoround_fixture, autoround_converted, spec, method, dtype):
    # DeepSeek with its default float kv_b_proj is covered by test_logits_deepseek_kv_b_float; here
    # kv_b_proj stays packed so the whole model must be bit-identical.
    opts = {"no_kv_b_float": True} if spec[0] == "deepseek_v3" else {}
    src, out = convert(autoround_fixture, autoround_converted, spec, quant_method=method, **opts)
    ids = arf.fixed_input_ids()
    ref = source_logits(src, dtype, ids)
    got = arf.load_logits(out, dtype, ids)
    assert ref.dtype == dtype and torch.isfinite(ref).all()
    assert_bitwise_equal(got, ref, f"logits {spec} {method} {dtype}")


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("spec", DEEPSEEK_SPECS, ids=_id)
def test_logits_deepseek_kv_b_float(autoround_fixture, autoround_converted, spec, dtype):
    """kv_b_proj emitted as the exactly dequantized float32 weight, marked unquantized.

    The difference from the source is derived exactly, as two models built here from the source:
      * ``float_model``: every kv_b_proj QuantLinear replaced by ``nn.Linear(weight = exact.to(dtype))``,
        which is what transformers builds from our float32 weight. The converted logits equal its logits
        bit for bit.
      * ``quant_model``: every kv_b_proj replaced by a module doing what AutoRound's QuantLinear does with
        the weight it reconstructs, ``W16 = fp16(scales * (q - z))``: ``torch.matmul(x, W16.to(dtype))``
        on ``[K, N]``. The source logits equal its logits bit for bit.
    The two models differ in exactly two things: the GEMM call (``F.linear`` vs ``matmul``) and the weight
    values ``exact.to(dtype)`` vs ``W16.to(dtype)``, which differ exactly where the fp16 rounding of the
    exact product is inexact (only in a float32 model; in float16 both are that rounding), by at most half
    an fp16 ulp of the exact value.
    """
    src, out = convert(autoround_fixture, autoround_converted, spec, quant_method="auto-round")
    ids = arf.fixed_input_ids()
    got_model = arf.load_model(out, dtype)
    kv_names = [n for n, m in got_model.named_modules() if n.endswith("self_attn.kv_b_proj")]
    assert kv_names and all(type(got_model.get_submodule(n)) is torch.nn.Linear for n in kv_names)
    got = arf.model_logits(got_model, ids)

    s_mods = arf.quantized_modules(arf.read_checkpoint(src))
    float_model, quant_model = arf.load_model(src, dtype), arf.load_model(src, dtype)
    n_inexact = n_differ = 0
    for n in kv_names:
        sd = s_mods[n]
        gs = arf.module_group_size(sd)
        exact = arf.autoround_dequant(sd["qweight"], sd["qzeros"], sd["scales"], 3, gs, exact=True)
        fp16 = arf.autoround_dequant(sd["qweight"], sd["qzeros"], sd["scales"], 3, gs)
        inexact = fp16.float() != exact
        n_inexact += int(inexact.sum())
        loaded = got_model.get_submodule(n).weight
        assert_bitwise_equal(loaded, exact.to(dtype), f"{n}: loaded float weight")
        # the weight values the two models multiply by, and how they differ
        differ = loaded.float() != fp16.to(dtype).float()
        n_differ += int(differ.sum())
        if dtype == torch.float16:
            assert not differ.any(), f"{n}: float16 weight differs from QuantLinear's"
        else:
            assert torch.equal(differ, inexact), f"{n}: weights differ elsewhere than at inexact fp16 roundings"
            half_ulp = torch.finfo(torch.float16).eps / 2 * exact.abs()
            subnormal = exact.abs() < torch.finfo(torch.float16).tiny
            err = (exact - fp16.float()).abs()
            assert bool(((err <= half_ulp) | (subnormal & (err <= 2.0**-25))).all()), f"{n}: not a rounding"
        lin = torch.nn.Linear(exact.shape[1], exact.shape[0], bias=False, dtype=dtype)
        with torch.no_grad():
            lin.weight.copy_(exact.to(dtype))
        float_model.set_submodule(n, lin)
        quant_model.set_submodule(n, _MatmulLinear(fp16.to(dtype)))
    assert n_differ == (n_inexact if dtype == torch.float32 else 0)
    assert_bitwise_equal(got, arf.model_logits(float_model, ids), f"logits {spec} {dtype} vs source with float kv_b")
    ref = source_logits(src, dtype, ids)
    assert_bitwise_equal(arf.model_logits(quant_model, ids), ref, "source logits vs QuantLinear's GEMM replayed")


class _MatmulLinear(torch.nn.Module):
    """AutoRound QuantLinear's forward with its reconstructed weight given: ``matmul(x, W[K, N])``."""

    def __init__(self, weight_nk):
        super().__init__()
        self.register_buffer("w_kn", weight_nk.t().contiguous())

    def forward(self, x):
        out_shape = x.shape[:-1] + (self.w_kn.shape[1],)
        out = torch.matmul(x.reshape(-1, x.shape[-1]), self.w_kn.to(x.dtype)).to(x.dtype)
        return out.reshape(out_shape)


# ---------------------------------------------------------------------------------------------------
# a wrong conversion must be caught
# ---------------------------------------------------------------------------------------------------


def _write_corrupted(out: Path, dst: Path, modules: list[str]) -> Path:
    """Copy of the converted checkpoint ``out`` in which the given 4-bit modules decode to q3 + 3."""
    from safetensors.torch import save_file

    t = arf.read_checkpoint(out)
    for m in modules:
        # every nibble holds q3 + 4 >= 4, so subtracting 1 from each nibble never borrows
        t[f"{m}.qweight"] = t[f"{m}.qweight"] - 0x11111111
    dst.mkdir(parents=True)
    for f in out.iterdir():
        if f.suffix != ".safetensors" and f.name != "model.safetensors.index.json":
            shutil.copy(f, dst / f.name)
    save_file({k: v.contiguous() for k, v in t.items()}, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize("scope", ["all-modules", "one-expert"])
def test_wrong_conversion_is_detected(autoround_fixture, autoround_converted, tmp_path, scope):
    """q4 = q3 + 3 (everywhere, or in a single routed expert's down_proj) fails both checks."""
    spec = ("qwen3_moe", 32)
    src, out = convert(autoround_fixture, autoround_converted, spec, quant_method="auto-round")
    o_mods = arf.quantized_modules(arf.read_checkpoint(out))
    targets = sorted(o_mods) if scope == "all-modules" else ["model.layers.1.mlp.experts.3.down_proj"]
    bad = _write_corrupted(out, tmp_path / "bad", targets)

    with pytest.raises(AssertionError, match="not bitwise equal"):
        check_weights(src, bad, method="auto-round", kv_b_float=True)

    ids = arf.fixed_input_ids()
    for dtype in DTYPES:
        ref = source_logits(src, dtype, ids)
        wrong = arf.load_logits(bad, dtype, ids)
        with pytest.raises(AssertionError, match="not bitwise equal"):
            assert_bitwise_equal(wrong, ref, f"logits of a q3+3 conversion ({scope}, {dtype})")


# ---------------------------------------------------------------- DeepSeek MTP layer, as AutoRound exports it


@pytest.mark.parametrize("family,build", [("deepseek_v3", {"mtp": True}), ("glm4_moe", {})], ids=["deepseek_v3", "glm4_moe"])
def test_autoround_mtp_layer_is_4bit_and_converts_to_what_vllm_loads(autoround_fixture, tmp_path, family, build):
    """AutoRound 0.16.1 copies the MTP layer (which transformers does not load) from the source folder and
    quantizes every 2-D weight in it by RTN at 4 bits under ``bits: 3`` (3 is "unsupported" there), including
    ``eh_proj``, ``embed_tokens`` and ``shared_head.head``; the router stays float.  The same for GLM-4.5's layer,
    whose names are DeepSeek's; vLLM's ``glm4_moe_mtp`` builds ``eh_proj`` as a plain ``nn.Linear`` and the
    embedding without ``quant_config``, as ``deepseek_mtp`` does."""
    import subprocess

    import numpy as np

    from tests.helpers import decode_bigint, floats, read_dir

    src = autoround_fixture(family, 32, **build)
    qc = arf.read_quant_config(src)
    layers = json.loads((src / "config.json").read_text())["num_hidden_layers"]
    tensors = arf.read_checkpoint(src)
    mods = {m: d for m, d in arf.quantized_modules(tensors).items() if m.startswith(f"model.layers.{layers}.")}
    assert qc["bits"] == 3 and {arf.module_bits(d) for d in mods.values()} == {4}
    p = f"model.layers.{layers}"
    assert {f"{p}.eh_proj", f"{p}.embed_tokens", f"{p}.shared_head.head", f"{p}.mlp.experts.0.up_proj"} <= set(mods)
    assert f"{p}.mlp.gate.weight" in tensors and f"{p}.enorm.weight" in tensors
    for target in ("repack", "native"):
        dst = tmp_path / target
        r = subprocess.run([sys.executable, "-m", "repack", "convert", str(src), str(dst), "--target", target],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        assert subprocess.run([sys.executable, "-m", "repack", "verify", str(src), str(dst)]).returncode == 0
        sh, sraw = read_dir(src)
        dh, draw = read_dir(dst)
        for m in ("eh_proj", "embed_tokens", "shared_head.head"):
            name = f"{p}.{m}"
            assert f"{name}.qweight" not in dh and dh[f"{name}.weight"]["dtype"] == "F32"
            q = decode_bigint(sraw[f"{name}.qweight"], sh[f"{name}.qweight"]["shape"], 4)
            s = floats(sraw[f"{name}.scales"], sh[f"{name}.scales"]["dtype"]).reshape(sh[f"{name}.scales"]["shape"])
            want = ((q - 8) * s[np.arange(q.shape[0]) // 32]).T
            got = np.frombuffer(draw[f"{name}.weight"], "<f4").reshape(dh[f"{name}.weight"]["shape"])
            assert np.array_equal(got.astype(np.float64), want), name
        out_qc = json.loads((dst / "config.json").read_text())["quantization_config"]
        extra = out_qc["extra_config"]
        assert extra[rf"model\.layers\.{layers}\.(eh_proj|shared_head\.head|head|embed_tokens)$"] == {"bits": 16, "data_type": "float"}
        if target == "native":
            assert out_qc["bits"] == 3 and extra[rf"model\.layers\.{layers}\."] == {"bits": 4}
            assert draw[f"{p}.mlp.experts.0.up_proj.qweight"] == sraw[f"{p}.mlp.experts.0.up_proj.qweight"]
        else:
            assert out_qc["bits"] == 4 and rf"model\.layers\.{layers}\." not in extra
