"""Model card (README.md) for a converted checkpoint: provenance, proof, memory plan, launch command, license."""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import NamedTuple

from repack import __version__
from repack.errors import UserError
from repack.output import finished_output
from repack.serve import launcher, planner, recipes

ADDED_TAGS = ["w3repack", "gptq", "4-bit"]
DROPPED_KEYS = {"model-index", "model_index", "base_model_relation", "widget", "eval_results"}


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


GENERIC = [(1, 80.0, "9.0"), (2, 80.0, "9.0"), (4, 80.0, "9.0"), (8, 80.0, "9.0"), (8, 24.0, "8.6")]
PLAN_ERRORS = (UserError, KeyError, TypeError, ValueError, ZeroDivisionError)


class Row(NamedTuple):
    label: str
    recipe: bool
    model: planner.Model
    req: planner.Request
    plan: planner.MemoryPlan


def plan_rows(dst: Path) -> list[Row]:
    """One planner result per shipped recipe, then per GENERIC setup, with options applied as ``launcher.prepare``
    does (no nvidia-smi probe). Raises PLAN_ERRORS when planning cannot run, including a config without KV shape."""
    rows = []
    model = planner.load_model(dst)
    for kw in [{"recipe_name": n} for n in recipes.names()] + [{"gpus": n, "gpu_memory": m, "cc": c} for n, m, c in GENERIC]:
        model, req, rec = launcher.prepare(str(dst), probe=False, model=model, **kw)
        label = f"`{rec['name']}`" if rec else f"generic {req.gpu.count}x{req.gpu.memory_gib:g} GiB"
        p = planner.plan(model, req)
        if p.kv_bytes_per_token <= 0:
            raise UserError("config.json gives no KV cache shape (num_hidden_layers with kv_lora_rank, or attention "
                            "heads and head size)")
        rows.append(Row(label, rec is not None, model, req, p))
    return rows


def _short(text: str) -> str:
    return text.split(". ", 1)[0].rstrip(".")


def memory_section(rows: list[Row]) -> list[str]:
    """Markdown table of the planner's numbers per row, then each distinct (shortened) warning with its rows."""
    out = ["| setup | GPUs | cc | weights GiB per GPU | KV bytes per token | max context | fits |",
           "|---|---|---|---|---|---|---|"]
    notes: dict[str, list[str]] = {}
    for r in rows:
        p, g = r.plan, r.req.gpu
        out.append(f"| {r.label} | {g.count} x {g.memory_gib:g} GiB | {g.cc} | {p.weights_gib_per_gpu} | "
                   f"{p.kv_bytes_per_token:,} | {p.max_model_len:,} | {'yes' if p.fits else 'no'} |")
        for w in ([f"does not fit: {p.reason}"] if not p.fits else []) + p.warnings:
            notes.setdefault(_short(w), []).append(r.label)
    if notes:
        out += [""] + [f"- {w} ({', '.join(labels)})" for w, labels in notes.items()]
    return out


def serve_choice(rows: list[Row]) -> Row:
    """The generic row with the least GPU memory in all that fits, else the one with the most (sm90+ for V3.2)."""
    generic = sorted((r for r in rows if not r.recipe and not (r.model.v32 and r.req.gpu.cc_tuple < (9, 0))),
                     key=lambda r: (r.req.gpu.count * r.req.gpu.memory_gib, r.req.gpu.count))
    return next((r for r in generic if r.plan.fits), generic[-1])


def serve_section(rows: list[Row], repo_id: str) -> list[str]:
    """``launcher.command`` for ``serve_choice`` with the repo id as MODEL, and how it was chosen."""
    r = serve_choice(rows)
    flags = launcher.version_flags(launcher.DEFAULT_VLLM, r.model, r.req.gpu)
    cmd = shlex.join(launcher.command(repo_id, r.plan, flags))
    g, p = r.req.gpu, r.plan
    if p.fits:
        why = (f"The smallest generic setup that fits: {g.count} x {g.memory_gib:g} GiB (cc {g.cc}), "
               f"max context {p.max_model_len:,} tokens; flags for vLLM {flags.version}.")
    else:
        alts = "; ".join(f"{a['description']} (max context {a['max_model_len']:,})" for a in p.alternatives[:4])
        why = (f"No generic setup fits; this is the plan for {g.count} x {g.memory_gib:g} GiB (cc {g.cc}), which does not: "
               f"{p.reason}." + (f" Alternatives: {alts}." if alts else ""))
    return [why, "", "```bash", cmd, "```", ""] + [f"Note (vLLM {flags.version}): {n}.\n" for n in flags.notes]


def _launch_hint(repo_id: str) -> str:
    return (f"For a plan on your own GPUs: `w3repack launch {repo_id} --gpus N -o serve.sh` (after downloading the repo "
            "into the hub cache, or with a local folder as MODEL) writes a launcher with preflight checks.")


def build_card(dst: Path, repo_id: str, verify_report: dict | None = None) -> str:
    """README.md text for ``repo_id`` from DST's manifest, config and the source card it carries."""
    from huggingface_hub import ModelCardData

    dst = Path(dst)
    man = finished_output(dst)
    config = json.loads((dst / "config.json").read_text())
    hub = man.hub or {}
    source_repo = hub.get("repo")
    src_meta, _ = source_metadata(dst)
    meta = card_metadata(src_meta, source_repo)
    qc = config.get("quantization_config") or {}
    arch = (config.get("architectures") or ["?"])[0]
    name = repo_id.split("/")[-1]
    origin = (f"[{source_repo}](https://huggingface.co/{source_repo}) at revision `{hub.get('revision', 'main')}` "
              f"(commit `{hub.get('commit', '?')}`)" if source_repo else f"a local checkpoint (`{Path(man.source_path or '?').name}`)")
    try:
        rows, plan_error = plan_rows(dst), None
    except PLAN_ERRORS as e:
        rows, plan_error = [], str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}"

    out = ["---", ModelCardData(**meta).to_yaml().rstrip(), "---", "", f"# {name}", ""]
    native = man.options.get("target") == "native"
    if native:
        out += [f"Fix-up of {origin} for engines that serve 3-bit weights natively (vLLM >= 0.30), made losslessly "
                f"with w3repack {man.tool_version or __version__}: quantized modules keep their width and bytes; "
                "only what a stock engine cannot load from the source was rewritten.", ""]
    else:
        out += [f"4-bit GPTQ repack of {origin}, made losslessly with w3repack {man.tool_version or __version__} "
                f"so that stock vLLM serves it with its Marlin kernels (3-bit AutoRound checkpoints are refused there).", ""]
    if meta.get("base_model"):
        out += [f"Base model: `{meta['base_model'] if isinstance(meta['base_model'], str) else ', '.join(meta['base_model'])}`. "
                f"Architecture: `{arch}`.", ""]
    out += ["## What changed and why it is lossless", ""]
    out += (["Every quantized module is copied byte for byte at its own width; the config states the width of every "
             "module that differs from its base `bits`."] if native else [
            "Every 3-bit (and 2-bit) symmetric weight code `q` was rewritten as `q + 4` (`q + 6`) at 4 bits, with the "
            "zero point moved from 4 (2) to 8 and the scales left byte-identical, so `scale * (q4 - 8) == scale * (q3 - 4)` "
            "for every weight: the dequantized model is bit-identical to the source. Modules already at 4 or 8 bits, and "
            "every float tensor, are copied byte for byte."])
    out += ["",
            "Quantization config: " + ", ".join(f"`{k}: {json.dumps(qc.get(k))}`" for k in ("quant_method", "bits", "group_size", "sym"))
            + ".", "",
            "| module class | count |", "|---|---|"]
    out += [f"| {k} | {v} |" for k, v in man.counts.items()]
    floats = man.float_modules
    if floats:
        out += ["", f"{len(floats)} modules (e.g. `{floats[0]}`) are stored as their exactly dequantized float32 weights "
                "and marked unquantized, where a stock engine loads them only as float (the MTP layer's `eh_proj` and "
                "`shared_head.head`, the V3.2 indexer's `wk` / `weights_proj`) or crashes on long prompts with them "
                "quantized (`kv_b_proj` in vLLM 0.26)."]
    mtp = man.records.get("mtp")
    if mtp:
        out += ["", f"Multi-token prediction: MTP layer(s) {', '.join(map(str, mtp['layers']))} kept, for speculative "
                "decoding in vLLM (`--speculative-config '{\"method\": \"deepseek_mtp\", \"num_speculative_tokens\": 1}'`, "
                "which `w3repack launch DST --speculative 1` adds and plans memory for); "
                "the full model checks every drafted token. Quantized width of the MTP modules: "
                + ", ".join(f"layer {k}: {v}-bit" for k, v in (mtp.get("bits") or {}).items() if v) + "."]
    dense = man.records.get("dense_attention")
    if dense:
        removed = ", ".join(f"`{k}: {json.dumps(v)}`" for k, v in dense["removed_config_keys"].items())
        out += ["", "### Dense attention instead of DeepSeek-V3.2 sparse attention", "",
                f"`config.json` says `{dense['architectures']['to'][0]}` / `{dense['model_type']['to']}` instead of "
                f"`{dense['architectures']['from'][0]}` / `{dense['model_type']['from']}`, without {removed}, and the "
                f"{dense['dropped_tensors']} indexer tensors are left out, so engines without a sparse-attention backend "
                "(GPUs below sm90) serve it with dense MLA attention. The model computes exactly what DeepSeek-V3.2 "
                f"computes for a context of up to {dense['index_topk']:,} tokens (`index_topk`: the indexer then selects "
                f"every past token); beyond {dense['index_topk']:,} tokens it attends to every past token instead of the "
                f"{dense['index_topk']:,} the indexer would select, an approximation of the original model."]
    out += ["", "### Verification", ""]
    verify_report = verify_report or man.verify
    if verify_report:
        tensors = verify_report.get("tensors_checked") or verify_report.get("tensors") or {}
        status = "identical" if verify_report.get("ok") else "DIFFERENT"
        scope = verify_report.get("scope")
        if scope:
            scope = f" Scope: {scope}; {verify_report.get('shards', '?')} of {verify_report.get('of_shards', '?')} shards."
        out += [f"`w3repack verify` against the source: **{status}**, {sum(tensors.values())} tensors compared bit for bit ("
                + ", ".join(f"{k}: {v}" for k, v in tensors.items()) + ")." + (scope or "")]
    else:
        out += ["Re-check it with `w3repack verify <source> <this checkpoint>`: a bitwise round trip over every byte."]
    out += ["", "sha256 of every shard (also in `w3repack.json`):", "", "| shard | source sha256 | output sha256 |", "|---|---|---|"]
    srcs = {f.name: f.sha256 for f in man.source_files}
    for s in man.output_shards:
        out.append(f"| {s.name} | `{srcs.get(s.name) or 'not recorded'}` | `{s.sha256 or 'not recorded'}` |")
    out += ["", "## Memory plan", ""]
    if rows:
        out += ["From `w3repack plan` (shard headers and config.json; vLLM's allowances for activations, CUDA graphs and "
                 "non-torch memory as calibrated in w3repack's rehearsals, docs/benchmarks.md) for every recipe shipped "
                 "with w3repack and a few generic setups. `w3repack rehearse` measures one rank on your own GPU.", ""] \
            + memory_section(rows)
    else:
        out += [f"The planner could not run, so there is no memory plan: {plan_error}"]
    out += ["", "## Serve with vLLM", ""]
    if rows:
        out += serve_section(rows, repo_id)
    else:
        out += ["```bash", f"vllm serve {shlex.quote(repo_id)} --tensor-parallel-size N --max-model-len LEN", "```", ""]
    out += [_launch_hint(repo_id), "", "vLLM >= 0.17 detects the config by itself: no `--quantization` flag is needed.", ""]
    out += ["## License", ""]
    lic = meta.get("license")
    if lic:
        extra = f" ({meta['license_link']})" if meta.get("license_link") else ""
        out += [f"`{meta.get('license_name') or lic}`{extra}, carried over from the source model; the repacking adds no terms."]
    else:
        out += ["The source card names no license: see the source repository."]
    out.append("")
    return "\n".join(out)
