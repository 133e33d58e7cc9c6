"""Model card (README.md) for a converted checkpoint: provenance, proof, memory plan, launch command, license."""

from __future__ import annotations

import json
from pathlib import Path

from repack import __version__
from repack.plan import MANIFEST_NAME

ADDED_TAGS = ["w3repack", "gptq", "4-bit"]
DROPPED_KEYS = {"model-index", "model_index", "base_model_relation", "widget", "eval_results"}
GPU_GIB = 80


def source_metadata(dst: Path) -> tuple[dict, str]:
    """YAML metadata and body of the source card copied into DST (empty if there was none)."""
    p = Path(dst) / "README.md"
    if not p.is_file():
        return {}, ""
    from huggingface_hub import ModelCard

    try:
        c = ModelCard.load(p)
    except Exception:
        return {}, p.read_text(encoding="utf-8", errors="replace")
    return c.data.to_dict(), c.text


def card_metadata(src_meta: dict, source_repo: str | None) -> dict:
    meta = {k: v for k, v in src_meta.items() if k not in DROPPED_KEYS and v is not None}
    meta["base_model"] = src_meta.get("base_model") or source_repo
    if meta["base_model"] is None:
        del meta["base_model"]
    else:
        meta["base_model_relation"] = "quantized"
    tags = src_meta.get("tags") or []
    tags = [tags] if isinstance(tags, str) else list(tags)
    meta["tags"] = tags + [t for t in ADDED_TAGS if t not in tags]
    return meta


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def kv_bytes_per_token(config: dict) -> int | None:
    """Per-GPU KV cache bytes per token in bf16: MLA latent (not split by TP) or MHA/GQA heads (estimate)."""
    layers = config.get("num_hidden_layers")
    if not isinstance(layers, int):
        return None
    if isinstance(config.get("kv_lora_rank"), int):
        return (config["kv_lora_rank"] + int(config.get("qk_rope_head_dim") or 0)) * layers * 2
    heads = config.get("num_key_value_heads") or config.get("num_attention_heads")
    hidden, nh = config.get("hidden_size"), config.get("num_attention_heads")
    if not all(isinstance(x, int) for x in (heads, hidden, nh)):
        return None
    return 2 * heads * (config.get("head_dim") or hidden // nh) * layers * 2


def _planner():
    try:
        from repack.serve import planner
    except Exception:
        return None
    return planner


def _call(planner, names: tuple[str, ...], *args):
    for name in names:
        fn = getattr(planner, name, None)
        if callable(fn):
            try:
                out = fn(*args)
            except Exception:
                continue
            if out:
                return out
    return None


def memory_table(dst: Path, config: dict, weight_bytes: int) -> tuple[str, str]:
    """(markdown table, where it came from): the serve planner when present, else a per-TP estimate."""
    planner = _planner()
    if planner is not None:
        out = _call(planner, ("card_table", "markdown_table", "plan_table"), dst)
        if isinstance(out, str):
            return out.strip(), "planner"
        plan = _call(planner, ("plan_memory", "plan"), dst)
        to_md = getattr(plan, "to_markdown", None)
        if callable(to_md):
            try:
                return str(to_md()).strip(), "planner"
            except Exception:
                pass
    kv = kv_bytes_per_token(config)
    rows = ["| GPUs (tensor parallel) | weights per GPU | left on an 80 GiB GPU (90% usable) | KV cache per token per GPU | tokens that fit |",
            "|---|---|---|---|---|"]
    for tp in (1, 2, 4, 8):
        per = weight_bytes / tp
        left = GPU_GIB * 2**30 * 0.9 - per
        mla = isinstance(config.get("kv_lora_rank"), int)
        kv_gpu = kv if (kv is None or mla) else kv / tp
        fits = f"{int(left // kv_gpu):,}" if kv_gpu and left > 0 else "0" if left <= 0 else "?"
        rows.append(f"| {tp} | {_gib(per)} | {_gib(max(left, 0))} | "
                    + (f"{kv_gpu / 1024:.1f} KiB" if kv_gpu else "?") + f" | {fits} |")
    return "\n".join(rows), "estimate"


def serve_command(dst: Path, repo_id: str, config: dict, weight_bytes: int) -> str:
    planner = _planner()
    if planner is not None:
        out = _call(planner, ("vllm_command", "serve_command", "launch_command"), dst, repo_id)
        if isinstance(out, str):
            return out.strip()
    tp = next((t for t in (1, 2, 4, 8) if weight_bytes / t <= 0.7 * GPU_GIB * 2**30), 8)
    return f"vllm serve {repo_id} --tensor-parallel-size {tp} --max-model-len 8192"


def build_card(dst: Path, repo_id: str, verify_report: dict | None = None) -> str:
    """README.md text for ``repo_id`` from DST's manifest, config and the source card it carries."""
    from huggingface_hub import ModelCardData

    dst = Path(dst)
    man = json.loads((dst / MANIFEST_NAME).read_text())
    config = json.loads((dst / "config.json").read_text())
    src = man.get("source") or {}
    hub = src.get("hub") or {}
    source_repo = hub.get("repo")
    src_meta, _ = source_metadata(dst)
    meta = card_metadata(src_meta, source_repo)
    qc = config.get("quantization_config") or {}
    weight_bytes = int(man.get("total_size") or 0)
    arch = (config.get("architectures") or ["?"])[0]
    name = repo_id.split("/")[-1]
    origin = (f"[{source_repo}](https://huggingface.co/{source_repo}) at revision `{hub.get('revision', 'main')}` "
              f"(commit `{hub.get('commit', '?')}`)" if source_repo else f"a local checkpoint (`{Path(src.get('path', '?')).name}`)")
    table, table_src = memory_table(dst, config, weight_bytes)
    cmd = serve_command(dst, repo_id, config, weight_bytes)

    out = ["---", ModelCardData(**meta).to_yaml().rstrip(), "---", "", f"# {name}", ""]
    out += [f"4-bit GPTQ repack of {origin}, made losslessly with w3repack {man.get('tool_version', __version__)} "
            f"so that stock vLLM serves it with its Marlin kernels (3-bit AutoRound checkpoints are refused there).", ""]
    if meta.get("base_model"):
        out += [f"Base model: `{meta['base_model'] if isinstance(meta['base_model'], str) else ', '.join(meta['base_model'])}`. "
                f"Architecture: `{arch}`.", ""]
    out += ["## What changed and why it is lossless", "",
            "Every 3-bit (and 2-bit) symmetric weight code `q` was rewritten as `q + 4` (`q + 6`) at 4 bits, with the "
            "zero point moved from 4 (2) to 8 and the scales left byte-identical, so `scale * (q4 - 8) == scale * (q3 - 4)` "
            "for every weight: the dequantized model is bit-identical to the source. Modules already at 4 or 8 bits, and "
            "every float tensor, are copied byte for byte.", "",
            "Quantization config: " + ", ".join(f"`{k}: {json.dumps(qc.get(k))}`" for k in ("quant_method", "bits", "group_size", "sym"))
            + ".", "",
            "| module class | count |", "|---|---|"]
    out += [f"| {k} | {v} |" for k, v in (man.get("counts") or {}).items()]
    floats = man.get("float_modules") or []
    if floats:
        out += ["", f"{len(floats)} modules (e.g. `{floats[0]}`) are stored as their exactly dequantized float32 weights "
                "and marked unquantized, which avoids a vLLM MLA crash on long prompts with a quantized `kv_b_proj`."]
    out += ["", "### Verification", ""]
    if verify_report:
        tensors = verify_report.get("tensors_checked") or verify_report.get("tensors") or {}
        status = "identical" if verify_report.get("ok") else "DIFFERENT"
        out += [f"`w3repack verify` against the source: **{status}**, {sum(tensors.values())} tensors compared bit for bit ("
                + ", ".join(f"{k}: {v}" for k, v in tensors.items()) + ")."]
    else:
        out += ["Re-check it with `w3repack verify <source> <this checkpoint>`: a bitwise round trip over every byte."]
    out += ["", "sha256 of every shard (also in `w3repack.json`):", "", "| shard | source sha256 | output sha256 |", "|---|---|---|"]
    srcs = {f.get("name"): f.get("sha256") for f in src.get("files") or [] if isinstance(f, dict)}
    for s in man.get("output_shards") or []:
        out.append(f"| {s.get('name')} | `{srcs.get(s.get('name')) or 'not recorded'}` | `{s.get('sha256') or 'not recorded'}` |")
    out += ["", "## Memory plan", ""]
    if table_src == "estimate":
        out += [f"Estimate from the checkpoint size ({_gib(weight_bytes)} of weights) and the KV cache shape of the config; "
                "run `w3repack launch` on your machine for a plan with your GPUs.", ""]
    out += [table, "", "## Serve with vLLM", "", "```bash", cmd, "```", "",
            "vLLM >= 0.17 detects the config by itself: no `--quantization` flag is needed.", ""]
    out += ["## License", ""]
    lic = meta.get("license")
    if lic:
        extra = f" ({meta['license_link']})" if meta.get("license_link") else ""
        out += [f"`{meta.get('license_name') or lic}`{extra}, carried over from the source model; the repacking adds no terms."]
    else:
        out += ["The source card names no license: see the source repository."]
    out.append("")
    return "\n".join(out)
