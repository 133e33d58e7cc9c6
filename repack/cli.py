"""The ``w3repack`` command line. Exit codes: 0 ok, 1 verification found a difference, 2 bad input/usage.

Every command body raises; :func:`main` is the one place that turns exceptions into messages and exit codes.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before numpy loads: no BLAS here, and idle BLAS threads spin

import gc
import sys
import tempfile
from enum import Enum
from pathlib import Path
from typing import Optional

import typer

from repack import __version__, ui
from repack.errors import Mismatch, NothingToDo, UserError

app = typer.Typer(
    name="w3repack",
    help="Losslessly repack 3-bit AutoRound/GPTQ checkpoints into 4-bit GPTQ that stock vLLM serves with Marlin.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
_debug = {"on": False}


class Method(str, Enum):
    auto_round = "auto-round"
    gptq = "gptq"


def _version(value: bool) -> None:
    if value:
        ui.out.print(f"w3repack {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks on errors."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    _debug["on"] = debug


class Target(str, Enum):
    repack = "repack"
    native = "native"


def _options(quant_method: Method, kv_b_float: Optional[bool], indexer_float: bool, mtp_float: bool = True,
             dense_attention: bool = False, target: Target = Target.repack):
    from repack.plan import Options

    if kv_b_float is None:
        kv_b_float = target is Target.repack
    return Options(quant_method=quant_method.value, kv_b_float=kv_b_float, indexer_float=indexer_float,
                   mtp_float=mtp_float, dense_attention=dense_attention, target=target.value)


_TARGET = typer.Option(Target.repack, "--target", help="repack: 2/3-bit modules become 4-bit GPTQ. native: keep them at "
                       "their width for engines that serve 3-bit (vLLM >= 0.30) and rewrite only what a stock engine "
                       "cannot load (float modules, per-module widths).")
_KV_B = typer.Option(None, "--kv-b-float/--no-kv-b-float", help="Emit DeepSeek MLA kv_b_proj as exact float32 "
                     "(vLLM 0.26 fix; default: on for --target repack, off for native).")
_INDEXER = typer.Option(True, "--indexer-float/--no-indexer-float", help="Emit V3.2 indexer wk/weights_proj as exact float32.")
_MTP = typer.Option(True, "--mtp-float/--no-mtp-float", help="Emit the DeepSeek MTP layer's eh_proj, shared_head.head and "
                    "embed_tokens as exact float32 (vLLM's deepseek_mtp builds them unquantized).")
_DENSE = typer.Option(False, "--dense-attention", help="DeepSeek-V3.2: write a DeepSeek-V3 (dense MLA) config and leave the "
                      "indexer out, for GPUs without a sparse-attention backend (sm < 90). Identical up to index_topk "
                      "tokens of context, an approximation beyond.")


@app.command()
def inspect(
    src: str = typer.Argument(..., help="Checkpoint folder (or hub repo id)."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON."),
    quant_method: Method = typer.Option(Method.auto_round, "--quant-method"),
    kv_b_float: Optional[bool] = _KV_B,
    indexer_float: bool = _INDEXER,
    mtp_float: bool = _MTP,
    dense_attention: bool = _DENSE,
    target: Target = _TARGET,
) -> None:
    """Show architecture, quantization, per-module widths (from shapes) and what convert would do."""
    from repack.checkpoint import open_checkpoint
    from repack.plan import build_plan
    from repack.report import inspect_report

    ckpt = open_checkpoint(_local(src))
    rep = inspect_report(ckpt, build_plan(ckpt, _options(quant_method, kv_b_float, indexer_float, mtp_float, dense_attention, target)))
    if json_out:
        ui.print_json(rep)
        return
    o = ui.out
    o.print(f"[bold]{rep['path']}[/]")
    o.print(f"  architecture      {rep['architecture']} ({rep['model_type']})")
    q = rep["quantization_config"]
    o.print(f"  quantization      {q['quant_method']} {q['packing_format'] or ''} bits={q['bits']} group={q['group_size']} sym={q['sym']}")
    o.print("  module widths     " + ", ".join(f"{k}-bit: {v}" for k, v in rep["module_widths"].items()) + " (from tensor shapes)")
    if rep["modules_not_at_config_bits"]:
        o.print(f"  [yellow]{rep['modules_not_at_config_bits']} modules differ from the config's bits[/], e.g. {rep['modules_not_at_config_bits_examples'][0]}")
    o.print("  group sizes       " + ", ".join(f"{k}: {v}" for k, v in rep["group_sizes"].items()))
    o.print(f"  float tensors     {rep['float_tensors']}")
    o.print(f"  shards            {rep['shards']} ({ui.human(rep['shard_bytes'])})")
    c = rep["convert"]
    o.print("  convert would do:")
    for k, v in c["module_classes"].items():
        o.print(f"    {k:<26} {v}")
    o.print(f"  output            {ui.human(c['output_shard_bytes'])} of shards (x{c['growth']:.3f}), {ui.human(c['output_total_bytes'])} in all")
    for w in rep["warnings"]:
        o.print(f"  [yellow]warning:[/] {w}")


def _local(src: str) -> Path:
    from repack.source import resolve_local

    return resolve_local(src)


@app.command()
def convert(
    src: str = typer.Argument(..., help="3-bit checkpoint folder (or hub repo id org/name[@revision])."),
    dst: Path = typer.Argument(..., help="Output folder (created; resumable)."),
    quant_method: Method = typer.Option(Method.auto_round, "--quant-method", help="Config style of the output."),
    kv_b_float: Optional[bool] = _KV_B,
    indexer_float: bool = _INDEXER,
    mtp_float: bool = _MTP,
    dense_attention: bool = _DENSE,
    target: Target = _TARGET,
    workers: Optional[int] = typer.Option(None, "--workers", "-j", min=1, max=16, help="Shards in flight (default: one per CPU core, at least 2, at most 16: 20 MiB each)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace whatever DST holds."),
    hashes: bool = typer.Option(True, "--hash/--no-hash", help="Record the sha256 of every source and output shard (default). --no-hash saves ~60% of the CPU where the CPU, not the disk, is the limit; verify still compares every byte."),
    json_out: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
    revision: Optional[str] = typer.Option(None, "--revision", help="Hub source: branch, tag or commit (same as SRC@REVISION)."),
    delete_source_shards: bool = typer.Option(False, "--delete-source-shards", help="Hub source: delete each cached source shard once its output shard is finished (peak disk: output + one shard)."),
    push_to_hub: Optional[str] = typer.Option(None, "--push-to-hub", help="Upload the result to this hub repo (org/name) with a generated model card."),
    private: bool = typer.Option(False, "--private", help="With --push-to-hub: create the repo private."),
) -> None:
    """Convert every 2/3-bit symmetric module to 4-bit GPTQ (or, --target native, keep it); everything else byte-identical."""
    from repack.source import convert_source

    options = _options(quant_method, kv_b_float, indexer_float, mtp_float, dense_attention, target)
    res = convert_source(src, dst, options, workers=workers, overwrite=overwrite,
                         delete_source_shards=delete_source_shards, revision=revision, hashes=hashes)
    _convert_summary(res, json_out and not push_to_hub)
    if push_to_hub:
        from repack import hub

        report = None
        if all((res.plan.ckpt.root / s.name).is_file() for s in res.plan.shards):
            from repack.verify import verify as run_verify

            report = run_verify(res.plan.ckpt.root, dst, workers=workers).to_json()
            if not report.get("ok"):
                raise Mismatch(f"{dst} does not verify against its source; not pushed")
        _push_summary(hub.push(dst, push_to_hub, private=private, verify_report=report), json_out)


@app.command()
def push(
    dst: Path = typer.Argument(..., help="A finished w3repack output folder."),
    repo_id: str = typer.Argument(..., help="Hub repo to create or update (org/name)."),
    private: bool = typer.Option(False, "--private", help="Create the repo private."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the model card and the files to upload; upload nothing."),
    json_out: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Upload a converted checkpoint (resumable) with a generated model card."""
    from repack import hub

    _push_summary(hub.push(dst, repo_id, private=private, dry_run=dry_run), json_out)


def _push_summary(summary: dict, json_out: bool) -> None:
    if json_out:
        ui.print_json(summary)
        return
    o = ui.out
    if summary["dry_run"]:
        o.print(summary["card"], markup=False, highlight=False)
        o.print(f"[bold]dry run[/]: would upload {len(summary['files'])} files ({ui.human(summary['bytes'])}) to {summary['repo']}"
                + (" (private)" if summary["private"] else ""))
        for f in summary["files"]:
            o.print(f"  {f['path']:<48} {ui.human(f['bytes']):>10}" + ("  (generated card)" if f["generated"] else ""), markup=False)
        return
    o.print(f"[green]pushed[/] {len(summary['files'])} files ({ui.human(summary['bytes'])}) to {summary['repo']}: {summary.get('url', '')}")


def _convert_summary(res, json_out: bool) -> None:
    plan = res.plan
    summary = {
        "source": f"{plan.hub['repo']}@{plan.hub['commit']}" if getattr(plan, "hub", None) else str(plan.ckpt.root),
        "output": str(res.dst),
        "shards": len(plan.shards),
        "shards_written": len(res.shards_written),
        "shards_kept": len(res.shards_kept),
        "source_bytes": plan.src_shard_bytes,
        "output_bytes": plan.out_shard_bytes,
        "seconds": round(res.seconds, 3),
        "mb_per_s": round(plan.src_shard_bytes / 1e6 / max(res.seconds, 1e-9), 1),
        "module_classes": plan.counts(),
        "float_modules": plan.float_modules,
        "copied_files": plan.extra_files,
        "manifest": str(res.dst / "w3repack.json"),
    }
    if json_out:
        ui.print_json(summary)
        return
    o = ui.out
    o.print(f"[green]converted[/] {summary['source']} -> {summary['output']}")
    o.print(f"  {summary['shards']} shards ({summary['shards_written']} written, {summary['shards_kept']} kept from an earlier run), "
            f"{ui.human(summary['source_bytes'])} -> {ui.human(summary['output_bytes'])} in {summary['seconds']:.2f} s "
            f"({summary['mb_per_s']} MB/s)")
    for k, v in summary["module_classes"].items():
        o.print(f"    {k:<26} {v}")
    o.print(f"  manifest {summary['manifest']}; check it with: w3repack verify {summary['source']} {summary['output']}")


@app.command()
def verify(
    src: str = typer.Argument(..., help="The 3-bit source checkpoint."),
    dst: Path = typer.Argument(..., help="The converted checkpoint."),
    workers: Optional[int] = typer.Option(None, "--workers", "-j", min=1, max=16, help="Shards in flight (default: one per CPU core, at least 2, at most 16)."),
    json_out: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Prove DST is SRC repacked: bitwise round trip over every byte. Exit 0 only if all matches."""
    from repack.checkpoint import open_checkpoint
    from repack.plan import build_plan, Options
    from repack.verify import verify as run

    src_path = _local(src)
    total = build_plan(open_checkpoint(src_path), Options()).src_shard_bytes
    with ui.byte_progress("verify", total, enabled=False if json_out else None) as adv:
        rep = run(src_path, dst, workers=workers, progress=adv)
    if json_out:
        ui.print_json(rep.to_json())
    elif rep.ok:
        n = sum(rep.tensors.values())
        ui.out.print(f"[green]identical[/]: {n} tensors checked bit for bit ("
                     + ", ".join(f"{k} {v}" for k, v in rep.tensors.items())
                     + f"), {ui.human(rep.src_bytes)} source, {ui.human(rep.dst_bytes)} output, {rep.seconds:.2f} s")
    else:
        ui.out.print(f"[red]DIFFERENT[/]: {rep.differences[0].line()}")
        for d in rep.differences[1:10]:
            ui.out.print(f"  also: {d.line()}")
    if not rep.ok:
        raise Mismatch(rep.differences[0].line())


@app.command()
def demo(
    dir: Optional[Path] = typer.Argument(None, help="Where to build the demo (default: a temporary folder)."),
    json_out: bool = typer.Option(False, "--json"),
) -> None:
    """Build a small synthetic 3-bit DeepSeek-V3-shaped checkpoint, convert it, verify it."""
    from repack import synth
    from repack.convert import convert as run_convert
    from repack.plan import Options
    from repack.verify import verify as run_verify

    root = dir or Path(tempfile.mkdtemp(prefix="w3repack-demo-"))
    src, dst = root / "deepseek-tiny-w3", root / "deepseek-tiny-w4"
    if dst.exists() and not (dst / "w3repack.json").exists() and any(dst.iterdir()):
        raise UserError(f"{dst} exists and is not a w3repack output; choose another DIR")
    spec = synth.TinySpec(traps=False)
    synth.write_checkpoint(src, spec)
    res = run_convert(src, dst, Options(), overwrite=True)
    rep = run_verify(src, dst)
    flipped = _flip_check(src, dst)
    if json_out:
        ui.print_json({"source": str(src), "output": str(dst), "convert": res.plan.counts(), "verify": rep.to_json(),
                       "flipped_bit_detected": flipped})
    else:
        o = ui.out
        o.print(f"[bold]1. built[/] a synthetic 3-bit DeepSeek-V3-shaped checkpoint: {src}")
        o.print(f"   {len(res.plan.shards)} shards, {ui.human(res.plan.src_shard_bytes)}, {len(res.plan.ckpt.modules)} quantized modules "
                f"(3-bit layers + a 4-bit MTP layer under a bits=3 config), bf16 router/norms/embeddings")
        o.print("[bold]2. converted[/] it to 4-bit GPTQ (w3repack convert):")
        _convert_summary(res, False)
        o.print("[bold]3. verified[/]: " + ("[green]identical[/]" if rep.ok else "[red]DIFFERENT[/]")
                + f", {sum(rep.tensors.values())} tensors: " + ", ".join(f"{k} {v}" for k, v in rep.tensors.items()))
        o.print("[bold]4. tamper check[/]: one flipped bit in a copy of the output is " + ("[green]caught[/]" if flipped else "[red]NOT caught[/]"))
        if flipped:
            o.print(f"   {flipped}", markup=False)
        o.print("[bold]serve it[/] on a GPU box with stock vLLM (>= 0.17 detects auto-round by itself):")
        o.print(f"   vllm serve {dst} --tensor-parallel-size 1 --max-model-len 4096")
        o.print(f"   or: w3repack launch {dst} --gpus 8 -o serve.sh   (plans memory first)")
    if not rep.ok or not flipped:
        raise Mismatch("demo verification failed")


def _flip_check(src: Path, dst: Path) -> str | None:
    """Copy DST, flip one bit in the middle of the largest shard, and confirm verify names it."""
    import shutil

    from repack.verify import verify as run_verify

    with tempfile.TemporaryDirectory(prefix="w3repack-flip-") as tmp:
        copy = Path(tmp) / "copy"
        shutil.copytree(dst, copy)
        shard = max(copy.glob("*.safetensors"), key=lambda p: p.stat().st_size)
        data = bytearray(shard.read_bytes())
        data[len(data) * 2 // 3] ^= 0x10
        shard.write_bytes(data)
        rep = run_verify(src, copy)
        return None if rep.ok else rep.differences[0].line().replace(str(copy), "<copy>")


class KvDtype(str, Enum):
    auto = "auto"
    fp8 = "fp8"


def _serve_request(model, gpus, gpu_memory, compute_capability, max_model_len, kv_cache_dtype, util, recipe, nodes=1, cpu_offload_gb=None):
    from repack.serve.launcher import prepare

    return prepare(str(_local(model)), gpus, gpu_memory, compute_capability, max_model_len,
                   kv_cache_dtype.value if kv_cache_dtype else None, util, recipe, nodes, cpu_offload_gb)


_GPUS = typer.Option(None, "--gpus", min=1, help="GPUs per node (tensor parallel size). Default: nvidia-smi, else 8.")
_MEM = typer.Option(None, "--gpu-memory", help="GiB per GPU. Default: nvidia-smi, else 24.")
_CC = typer.Option(None, "--compute-capability", help="e.g. 8.6. Default: nvidia-smi, else 8.6.")
_LEN = typer.Option(None, "--max-model-len", min=1, help="Context to plan for. Default: the most that fits.")
_KV = typer.Option(None, "--kv-cache-dtype", help="auto (model dtype) or fp8 (sm89+ for MLA).")
_UTIL = typer.Option(None, "--gpu-memory-utilization", help="Share of each GPU vLLM may use (default 0.90).")
_RECIPE = typer.Option(None, "--recipe", help="Fill options from a recipe (see `w3repack recipes`).")
_OFFLOAD = typer.Option(None, "--cpu-offload-gb", min=0, help="GiB of weights per GPU kept in host RAM.")


@app.command("plan")
def plan_cmd(
    model: str = typer.Argument(..., help="Converted checkpoint folder (headers only are read)."),
    gpus: Optional[int] = _GPUS, gpu_memory: Optional[float] = _MEM, compute_capability: Optional[str] = _CC,
    max_model_len: Optional[int] = _LEN, kv_cache_dtype: Optional[KvDtype] = _KV, util: Optional[float] = _UTIL,
    recipe: Optional[str] = _RECIPE, cpu_offload_gb: Optional[float] = _OFFLOAD,
    nodes: int = typer.Option(1, "--nodes", min=1, help="Nodes (pipeline parallel size)."),
    json_out: bool = typer.Option(False, "--json", help="Print the plan as JSON."),
) -> None:
    """Plan GPU memory for vLLM: weights per GPU, KV cache per token, max context, warnings, alternatives."""
    from repack.serve import planner

    m, req, _ = _serve_request(model, gpus, gpu_memory, compute_capability, max_model_len, kv_cache_dtype, util, recipe, nodes, cpu_offload_gb)
    p = planner.plan(m, req)
    if json_out:
        ui.print_json(p)
        return
    o, g = ui.out, p["gpu"]
    o.print(f"[bold]{p['model']}[/] ({p['architecture']})")
    o.print(f"  GPUs              {p['gpus']} x {g['memory_gib']:g} GiB, cc {g['compute_capability']}"
            + (f", {g['name']}" if g["name"] else "") + f"  (from {', '.join(sorted(set(g['source'].values()))) or '?'})")
    o.print(f"  layout            TP {p['tensor_parallel']} x PP {p['pipeline_parallel']}")
    o.print(f"  weights per GPU   {p['weights_gib_per_gpu']:.2f} GiB" + (f" ({p['weights_gib_on_gpu']:.2f} on GPU after offload)" if p["weights_gib_on_gpu"] != p["weights_gib_per_gpu"] else ""))
    for k, v in p["weights_gib_by_class"].items():
        o.print(f"    {k:<28} {v:8.3f} GiB")
    a = p["allowances_gib"]
    o.print(f"  budget            {p['budget_gib']:.2f} GiB at utilization {p['gpu_memory_utilization']:g}; allowances: "
            f"activations {a['activations']} GiB ({a['max_num_batched_tokens']} batched tokens), CUDA graphs {a['cuda_graphs']} GiB, non-torch {a['non_torch']} GiB")
    o.print(f"  KV cache          {p['kv_bytes_per_token']} bytes/token ({p['kv_cache_dtype']}; attention {p['kv_bytes_per_token_attention']}, "
            f"indexer {p['kv_bytes_per_token_indexer']}), {p['kv_cache_gib']:.2f} GiB per GPU = {p['capacity_tokens']} tokens")
    o.print(f"  max context       {p['max_model_len']} (model max {p['model_max_position_embeddings']})")
    o.print("  fits              " + ("[green]yes[/]" if p["fits"] else f"[red]NO[/]: {p['reason']}"))
    for w in p["warnings"]:
        o.print(f"  [yellow]warning:[/] {w}", markup=True)
    for alt in p["alternatives"]:
        o.print(f"  alternative: {alt['description']}: {alt['weights_gib_per_gpu']:.2f} GiB weights/GPU, max context {alt['max_model_len']}")
    o.print("  vllm serve MODEL " + " ".join(p["vllm_args"]), markup=False)


@app.command()
def launch(
    model: str = typer.Argument(..., help="Converted checkpoint folder (same path on every node)."),
    output: Path = typer.Option(..., "-o", "--output", help="Script to write (e.g. serve.sh)."),
    gpus: Optional[int] = _GPUS, gpu_memory: Optional[float] = _MEM, compute_capability: Optional[str] = _CC,
    max_model_len: Optional[int] = _LEN, kv_cache_dtype: Optional[KvDtype] = _KV, util: Optional[float] = _UTIL,
    recipe: Optional[str] = _RECIPE, cpu_offload_gb: Optional[float] = _OFFLOAD,
    vllm_version: Optional[str] = typer.Option(None, "--vllm-version", help="Choose flags for this vLLM (default: installed, else 0.26.0)."),
    nodes: int = typer.Option(1, "--nodes", min=1, help="Nodes: >1 writes the Ray multi-node variant (PP = nodes)."),
    force: bool = typer.Option(False, "--force", help="Write the script even if the plan does not fit."),
) -> None:
    """Write an executable bash launcher: preflight checks, then exec vllm serve with the planned flags."""
    from repack.serve import launcher, planner

    m, req, rec = _serve_request(model, gpus, gpu_memory, compute_capability, max_model_len, kv_cache_dtype, util, recipe, nodes, cpu_offload_gb)
    p = planner.plan(m, req)
    _refuse_unfit(p, force)
    flags = launcher.version_flags(vllm_version or launcher.installed_vllm() or launcher.DEFAULT_VLLM, m, req.gpu)
    output.write_text(launcher.script(str(m.root.resolve()), p, flags, nodes, rec))
    output.chmod(0o755)
    ui.out.print(f"wrote {output}: {p['gpus']} GPUs, max context {p['max_model_len']}, flags for vLLM {flags.version}"
                 + (f"; run `{output} head` on the first node, `{output} worker HEAD_IP` on the others" if nodes > 1 else ""), markup=False)
    for w in p["warnings"]:
        ui.err.print(f"warning: {w}", markup=False)


def _refuse_unfit(p: dict, force: bool) -> None:
    if p["fits"] or force:
        return
    alts = "; ".join(f"{a['description']} (max context {a['max_model_len']})" for a in p["alternatives"][:4])
    raise UserError(f"the plan does not fit: {p['reason']}" + (f". Alternatives: {alts}" if alts else "") + " (--force writes it anyway)")


@app.command()
def serve(
    model: str = typer.Argument(..., help="Converted checkpoint folder."),
    gpus: Optional[int] = _GPUS, gpu_memory: Optional[float] = _MEM, compute_capability: Optional[str] = _CC,
    max_model_len: Optional[int] = _LEN, kv_cache_dtype: Optional[KvDtype] = _KV, util: Optional[float] = _UTIL,
    recipe: Optional[str] = _RECIPE, cpu_offload_gb: Optional[float] = _OFFLOAD,
    force: bool = typer.Option(False, "--force", help="Start even if the plan does not fit."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the command instead of running it."),
) -> None:
    """Plan, then replace this process with `vllm serve` (flags for the installed vLLM)."""
    import shlex

    from repack.serve import launcher, planner

    m, req, _ = _serve_request(model, gpus, gpu_memory, compute_capability, max_model_len, kv_cache_dtype, util, recipe, 1, cpu_offload_gb)
    p = planner.plan(m, req)
    _refuse_unfit(p, force)
    flags = launcher.version_flags(launcher.installed_vllm() or launcher.DEFAULT_VLLM, m, req.gpu)
    argv = launcher.command(str(m.root), p, flags)
    for w in p["warnings"]:
        ui.err.print(f"warning: {w}", markup=False)
    if dry_run:
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in p["env"].items())
        ui.out.print((env + " " if env else "") + shlex.join(argv), markup=False)
        return
    launcher.exec_serve(argv, p["env"])


@app.command()
def smoke(
    url: str = typer.Argument(..., help="Server base URL, e.g. http://127.0.0.1:8000"),
    model: Optional[str] = typer.Option(None, "--model", help="Model name (default: the first one served)."),
    long_tokens: int = typer.Option(9000, "--long-tokens", min=1, help="Length of the long prompt (beyond one prefill chunk; cut to 80% of max_model_len)."),
    timeout: float = typer.Option(600.0, "--timeout", help="Seconds per request."),
    json_out: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Check a running OpenAI-compatible server. Exit 0 all passed, 1 a check failed, 2 unreachable."""
    import os

    from repack.serve import smoke as sm

    try:
        rep = sm.run(url, model, long_tokens, timeout, os.environ.get("OPENAI_API_KEY"))
    except sm.Unreachable as e:
        raise UserError(f"server unreachable: {e}") from e
    if json_out:
        ui.print_json(rep.to_json())
    else:
        for c in rep.checks:
            ui.out.print(f"{'PASS' if c.ok else 'FAIL'}  {c.name:<40} {c.seconds:7.2f} s  {c.detail}", markup=False)
        ui.out.print(f"{'passed' if rep.ok else 'FAILED'}: {sum(c.ok for c in rep.checks)} of {len(rep.checks)} checks, {rep.url} ({rep.model})", markup=False)
    if not rep.ok:
        raise typer.Exit(1)


@app.command("recipes")
def recipes_cmd(json_out: bool = typer.Option(False, "--json", help="Print the recipes as JSON.")) -> None:
    """List the serving recipes shipped with w3repack."""
    from repack.serve import recipes as rc

    items = [rc.load(n) for n in rc.names()]
    if json_out:
        ui.print_json(items)
        return
    for r in items:
        hw = r["hardware"]
        ui.out.print(f"{r['name']:<44} {hw['gpus']} x {hw['gpu_memory_gib']:g} GiB cc {hw['compute_capability']}  source {r.get('source_repo', '-')}", markup=False)


def _is_click(e: BaseException, name: str) -> bool:
    """Click's exception classes by name: typer may bring its own copy of click (``typer._click``)."""
    return any(c.__name__ == name and "click" in c.__module__ for c in type(e).__mro__)


def main() -> None:
    """Entry point: run the app; map exceptions to one-line messages and exit codes."""
    interrupted = "interrupted: nothing half-written was kept; run the same command again to resume"
    gc.freeze()  # the imported modules' objects need no collecting; later collections scan only what runs create
    try:
        rv = app(standalone_mode=False)
    except Mismatch as e:
        if _debug["on"]:
            raise
        ui.err.print(f"verification failed: {e}", markup=False)
        sys.exit(1)
    except UserError as e:
        if _debug["on"]:
            raise
        msg = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in str(e))
        ui.err.print(f"error: {msg}", markup=False)
        sys.exit(2)
    except NothingToDo as e:
        ui.out.print(str(e), markup=False)
        sys.exit(0)
    except KeyboardInterrupt:
        ui.err.print(interrupted, markup=False)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)  # a worker blocked in a hub download would hold up the interpreter's exit
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        ui.err.print("aborted", markup=False)
        sys.exit(130)
    except Exception as e:  # click usage errors and anything unforeseen
        if _is_click(e, "ClickException"):
            ui.err.print(f"error: {e.format_message()}", markup=False)
            sys.exit(2)
        if _is_click(e, "Exit"):
            sys.exit(getattr(e, "exit_code", 0))
        if _debug["on"]:
            raise
        ui.err.print(f"error: {type(e).__name__}: {e} (run with --debug for a traceback)", markup=False)
        sys.exit(2)
    if isinstance(rv, int) and not isinstance(rv, bool) and rv:  # typer returns Exit codes; Ctrl-C comes back as 130
        if rv == 130:
            ui.err.print(interrupted, markup=False)
        sys.exit(rv)
    sys.exit(0)
