"""Commands on checkpoints: inspect, convert, verify, demo."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Optional

import typer

from repack import ui
from repack.cli import _output
from repack.errors import Mismatch


class Method(str, Enum):
    auto_round = "auto-round"
    gptq = "gptq"


class Target(str, Enum):
    repack = "repack"
    native = "native"


def _options(quant_method: Method, kv_b_float: Optional[bool], indexer_float: bool, mtp_float: bool = True,
             dense_attention: bool = False, target: Target = Target.repack):
    """``kv_b_float`` None: on for the repack target, off for native."""
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


def _progress(enabled: bool | None = None):
    return lambda label, total: ui.byte_progress(label, total, enabled=enabled)


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
    """Show architecture, quantization, per-module widths (from shapes) and what convert would do.

    A hub repo (org/name[@revision]) is read from its configs and shard headers alone (HTTP range requests):
    no shard is downloaded."""
    from repack.plan import build_plan
    from repack.report import inspect_report
    from repack.sources import open_source, read_checkpoint

    source = open_source(src)
    ckpt = read_checkpoint(source)
    options = _options(quant_method, kv_b_float, indexer_float, mtp_float, dense_attention, target)
    _output.inspect(inspect_report(ckpt, build_plan(ckpt, options), source.label()), json_out)


def convert(
    src: str = typer.Argument(..., help="3-bit checkpoint folder (or hub repo id org/name[@revision])."),
    dst: Path = typer.Argument(..., help="Output folder (created; resumable)."),
    quant_method: Method = typer.Option(Method.auto_round, "--quant-method", help="Config style of the output."),
    kv_b_float: Optional[bool] = _KV_B,
    indexer_float: bool = _INDEXER,
    mtp_float: bool = _MTP,
    dense_attention: bool = _DENSE,
    target: Target = _TARGET,
    workers: Optional[int] = typer.Option(
        None, "--workers", "-j", min=1, max=16, help="Shards in flight (default: one per CPU core, at least 2, at most 16: 20 MiB each)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace whatever DST holds."),
    hashes: bool = typer.Option(True, "--hash/--no-hash", help=(
        "Record the sha256 of every source and output shard (default). --no-hash saves ~60% of the CPU where the CPU, "
        "not the disk, is the limit; verify still compares every byte.")),
    json_out: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
    revision: Optional[str] = typer.Option(None, "--revision", help="Hub source: branch, tag or commit (same as SRC@REVISION)."),
    delete_source_shards: bool = typer.Option(False, "--delete-source-shards", help=(
        "Hub source: delete each cached source shard once its output shard is finished (peak disk: output + one shard).")),
    push_to_hub: Optional[str] = typer.Option(None, "--push-to-hub", help="Upload the result to this hub repo (org/name) with a generated model card."),
    private: bool = typer.Option(False, "--private", help="With --push-to-hub: create the repo private."),
    dry_run: bool = typer.Option(False, "--dry-run", help=(
        "Plan only: what convert would do, output size and the free-space check; nothing is written or downloaded "
        "(a hub source is read from its configs and shard headers).")),
) -> None:
    """Convert every 2/3-bit symmetric module to 4-bit GPTQ (or, --target native, keep it); everything else byte-identical.

    An input that needs no conversion (no 2/3-bit module, or already a w3repack output) is reported, exit 0."""
    from repack.convert import execute
    from repack.output import Output
    from repack.plan import build_plan
    from repack.run import RunConfig, effective_workers
    from repack.sources import nothing_to_convert, open_source
    from repack.space import check_space

    source = open_source(src, revision, delete_source_shards)
    run = RunConfig(workers=workers, overwrite=overwrite, hashes=hashes, progress=_progress())
    options = _options(quant_method, kv_b_float, indexer_float, mtp_float, dense_attention, target)
    out = Output(Path(dst))
    nothing_to_convert(source)
    if dry_run:
        from repack.sources import read_checkpoint

        ckpt = read_checkpoint(source, out)
    else:
        ckpt = source.checkpoint(out, options)
    plan = build_plan(ckpt, options)
    nothing_to_convert(source, plan)
    if dry_run:
        fetch = source.space_needed(plan.shards, effective_workers(workers or source.default_workers, len(plan.shards)))
        check_space(out.path, plan.out_total_bytes(), fetch, source.space_hint)
        _output.dry_run(plan, source.label(), dst, fetch, json_out)
        return
    res = execute(plan, out, run, source)
    _output.converted(res, json_out and not push_to_hub)
    if push_to_hub:
        from repack.push import push_converted

        names = [s.name for s in res.plan.shards]
        _output.pushed(push_converted(res.plan.ckpt.root, names, dst, push_to_hub, private, workers), json_out)


def verify(
    src: str = typer.Argument(..., help="The 3-bit source checkpoint."),
    dst: Path = typer.Argument(..., help="The converted checkpoint."),
    workers: Optional[int] = typer.Option(None, "--workers", "-j", min=1, max=16, help="Shards in flight (default: one per CPU core, at least 2, at most 16)."),
    json_out: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Prove DST is SRC repacked: bitwise round trip over every byte. Exit 0 only if all matches."""
    from repack.sources import resolve_local
    from repack.verify import verify as run_verify

    rep = run_verify(resolve_local(src), dst, workers=workers, progress=_progress())
    _output.verified(rep, json_out)
    if not rep.ok:
        raise Mismatch(rep.differences[0].line())


def demo(
    dir: Optional[Path] = typer.Argument(None, help="Where to build the demo (default: a temporary folder)."),
    json_out: bool = typer.Option(False, "--json"),
) -> None:
    """Build a small synthetic 3-bit DeepSeek-V3-shaped checkpoint, convert it, verify it."""
    from repack.demo import run_demo

    d = run_demo(dir)
    _output.demo(d, json_out)
    if not d.ok:
        raise Mismatch("demo verification failed")


def register(app: typer.Typer) -> None:
    for fn in (inspect, convert, verify, demo):
        app.command()(fn)
