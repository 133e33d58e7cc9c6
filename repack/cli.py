"""The ``w3repack`` command line. Exit codes: 0 ok, 1 verification found a difference, 2 bad input/usage.

Every command body raises; :func:`main` is the one place that turns exceptions into messages and exit codes.
"""

from __future__ import annotations

import sys
import tempfile
import threading
from enum import Enum
from pathlib import Path
from typing import Optional

import typer

from repack import __version__, ui
from repack.errors import Mismatch, UserError

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


def _options(quant_method: Method, kv_b_float: bool, indexer_float: bool):
    from repack.plan import Options

    return Options(quant_method=quant_method.value, kv_b_float=kv_b_float, indexer_float=indexer_float)


@app.command()
def inspect(
    src: str = typer.Argument(..., help="Checkpoint folder (or hub repo id)."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON."),
    quant_method: Method = typer.Option(Method.auto_round, "--quant-method"),
    kv_b_float: bool = typer.Option(True, "--kv-b-float/--no-kv-b-float"),
    indexer_float: bool = typer.Option(True, "--indexer-float/--no-indexer-float"),
) -> None:
    """Show architecture, quantization, per-module widths (from shapes) and what convert would do."""
    from repack.checkpoint import open_checkpoint
    from repack.plan import build_plan
    from repack.report import inspect_report

    ckpt = open_checkpoint(_local(src))
    rep = inspect_report(ckpt, build_plan(ckpt, _options(quant_method, kv_b_float, indexer_float)))
    if json_out:
        ui.print_json(rep)
        return
    o = ui.out
    o.print(f"[bold]{rep['path']}[/]")
    o.print(f"  architecture      {rep['architecture']} ({rep['model_type']})")
    q = rep["quantization_config"]
    o.print(f"  quantization      {q['quant_method']} {q['packing_format'] or ''} bits={q['bits']} group={q['group_size']} sym={q['sym']}")
    o.print(f"  module widths     " + ", ".join(f"{k}-bit: {v}" for k, v in rep["module_widths"].items()) + " (from tensor shapes)")
    if rep["modules_not_at_config_bits"]:
        o.print(f"  [yellow]{rep['modules_not_at_config_bits']} modules differ from the config's bits[/], e.g. {rep['modules_not_at_config_bits_examples'][0]}")
    o.print(f"  group sizes       " + ", ".join(f"{k}: {v}" for k, v in rep["group_sizes"].items()))
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
    kv_b_float: bool = typer.Option(True, "--kv-b-float/--no-kv-b-float", help="Emit DeepSeek MLA kv_b_proj as exact float32 (vLLM fix)."),
    indexer_float: bool = typer.Option(True, "--indexer-float/--no-indexer-float", help="Emit V3.2 indexer wk/weights_proj as exact float32."),
    workers: Optional[int] = typer.Option(None, "--workers", "-j", min=1, help="Shards in flight (default: 2 per CPU core, at most 32)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace whatever DST holds."),
    json_out: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
    revision: Optional[str] = typer.Option(None, "--revision", help="Hub source: branch, tag or commit (same as SRC@REVISION)."),
    delete_source_shards: bool = typer.Option(False, "--delete-source-shards", help="Hub source: delete each cached source shard once its output shard is finished (peak disk: output + one shard)."),
    push_to_hub: Optional[str] = typer.Option(None, "--push-to-hub", help="Upload the result to this hub repo (org/name) with a generated model card."),
    private: bool = typer.Option(False, "--private", help="With --push-to-hub: create the repo private."),
) -> None:
    """Convert every 2/3-bit symmetric module to 4-bit GPTQ; everything else byte-identical."""
    from repack.source import convert_source

    options = _options(quant_method, kv_b_float, indexer_float)
    res = convert_source(src, dst, options, workers=workers, overwrite=overwrite,
                         delete_source_shards=delete_source_shards, revision=revision)
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
    workers: Optional[int] = typer.Option(None, "--workers", "-j", min=1),
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
        _convert_summary(res, False)
        o.print(f"[bold]3. verified[/]: " + ("[green]identical[/]" if rep.ok else "[red]DIFFERENT[/]")
                + f", {sum(rep.tensors.values())} tensors: " + ", ".join(f"{k} {v}" for k, v in rep.tensors.items()))
        o.print(f"[bold]4. tamper check[/]: one flipped bit in a copy of the output is " + ("[green]caught[/]" if flipped else "[red]NOT caught[/]"))
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


def main() -> None:
    """Entry point: run the app; map exceptions to one-line messages and exit codes."""
    interrupted = "interrupted: nothing half-written was kept; run the same command again to resume"
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
    except KeyboardInterrupt:
        ui.err.print(interrupted, markup=False)
        sys.exit(130)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        ui.err.print("aborted", markup=False)
        sys.exit(130)
    except Exception as e:  # click usage errors and anything unforeseen
        import click

        if isinstance(e, click.exceptions.ClickException):
            ui.err.print(f"error: {e.format_message()}", markup=False)
            sys.exit(2)
        if isinstance(e, click.exceptions.Exit):
            sys.exit(e.exit_code)
        if _debug["on"]:
            raise
        ui.err.print(f"error: {type(e).__name__}: {e} (run with --debug for a traceback)", markup=False)
        sys.exit(2)
    if isinstance(rv, int) and not isinstance(rv, bool) and rv:  # typer returns Exit codes; Ctrl-C comes back as 130
        if rv == 130:
            ui.err.print(interrupted, markup=False)
        sys.exit(rv)
    sys.exit(0)
