"""Everything the commands print: JSON on stdout with ``--json``, else short human lines (progress and
warnings on stderr, through ``repack.ui``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from repack import ui

S = ui.safe  # every piece of outside text in a line printed with Rich markup goes through it

if TYPE_CHECKING:
    from repack.convert import Result
    from repack.demo import DemoResult
    from repack.report import InspectReport
    from repack.serve.engines import Launch
    from repack.serve.paths import PathsReport, ServingPath
    from repack.serve.planner import MemoryPlan
    from repack.serve.smoke import Report as SmokeReport
    from repack.verify import Report


def inspect(rep: InspectReport, json_out: bool) -> None:
    if json_out:
        ui.print_json(rep.to_json())
        return
    o = ui.out
    o.print(f"[bold]{S(rep.path)}[/]")
    o.print(f"  architecture      {S(rep.architecture)} ({S(rep.model_type)})")
    q = rep.quantization_config
    o.print(f"  quantization      {S(q['quant_method'])} {S(q['packing_format'] or '')} bits={S(q['bits'])} group={S(q['group_size'])} sym={S(q['sym'])}")
    o.print("  module widths     " + ", ".join(f"{S(k)}-bit: {S(v)}" for k, v in rep.module_widths.items()) + " (from tensor shapes)")
    if rep.modules_not_at_config_bits:
        o.print(f"  [yellow]{rep.modules_not_at_config_bits} modules differ from the config's bits[/], e.g. {S(rep.modules_not_at_config_bits_examples[0])}")
    o.print("  group sizes       " + ", ".join(f"{S(k)}: {S(v)}" for k, v in rep.group_sizes.items()))
    o.print(f"  float tensors     {rep.float_tensors}")
    o.print(f"  shards            {rep.shards} ({ui.human(rep.shard_bytes)})")
    c = rep.convert
    o.print("  convert would do:")
    for k, v in c.module_classes.items():
        o.print(f"    {k:<26} {v}", markup=False)
    o.print(f"  output            {ui.human(c.output_shard_bytes)} of shards (x{c.growth:.3f}), {ui.human(c.output_total_bytes)} in all")
    if not rep.needs_conversion:
        o.print("  [yellow]nothing to convert[/]: no module is narrower than 4 bits (vLLM serves it as it is)")
    for w in rep.warnings:
        o.print(f"  [yellow]warning:[/] {S(w)}")


def converted(res: Result, json_out: bool) -> None:
    summary = res.summary()
    if json_out:
        ui.print_json({**summary, "module_classes": ui.snake_keys(summary["module_classes"])})
        return
    o = ui.out
    o.print(f"[green]converted[/] {S(summary['source'])} -> {S(summary['output'])}")
    o.print(f"  {summary['shards']} shards ({summary['shards_written']} written, {summary['shards_kept']} kept from an earlier run), "
            f"{ui.human(summary['source_bytes'])} -> {ui.human(summary['output_bytes'])} in {summary['seconds']:.2f} s "
            f"({summary['mib_per_s']} MiB/s)")
    for k, v in summary["module_classes"].items():
        o.print(f"    {k:<26} {v}", markup=False)
    o.print(ui.printable(f"  manifest {summary['manifest']}; check it with: w3repack verify {summary['source']} {summary['output']}"),
            markup=False)


OP_WORDS = {"copy": "byte-identical", "transcode": "codes transcoded to 4-bit", "zeros": "zero points",
            "dequant": "dequantized to float32", "drop": "checked, not emitted"}


def tensor_counts(tensors: dict[str, int]) -> str:
    """verify's per-op counts in words (the JSON keeps the op names as keys)."""
    return ", ".join(f"{v} {OP_WORDS.get(k, k)}" for k, v in tensors.items())


def dry_run(plan, source: str, dst, fetch: list, json_out: bool) -> None:
    """``convert --dry-run``: what would be done, the sizes, and that the free-space check passed."""
    need_fetch = sum(n for _, n in fetch)
    summary = {"dry_run": True, "source": source, "output": str(dst), "shards": len(plan.shards),
               "source_bytes": plan.src_shard_bytes, "output_bytes": plan.out_shard_bytes,
               "output_total_bytes": plan.out_total_bytes(), "bytes_to_fetch": need_fetch, "free_space_ok": True,
               "module_classes": ui.snake_keys(plan.counts()), "float_modules": plan.float_modules,
               "copied_files": plan.extra_files, "options": plan.options.to_json()}
    if json_out:
        ui.print_json(summary)
        return
    o = ui.out
    o.print(f"[bold]dry run[/]: {S(source)} -> {S(dst)} (nothing written)")
    o.print(f"  {len(plan.shards)} shards, {ui.human(plan.src_shard_bytes)} -> {ui.human(plan.out_shard_bytes)} of shards, "
            f"{ui.human(plan.out_total_bytes())} in all" + (f"; {ui.human(need_fetch)} to fetch from the hub" if need_fetch else ""))
    for k, v in plan.counts().items():
        o.print(f"    {k:<26} {v}", markup=False)
    o.print("  free space: enough for the output" + (" and the shards to fetch" if need_fetch else ""))


def verified(rep: Report, json_out: bool) -> None:
    if json_out:
        ui.print_json(rep.to_json())
    elif rep.ok:
        n = sum(rep.tensors.values())
        ui.out.print(f"[green]identical[/]: {n} tensors checked bit for bit ("
                     + tensor_counts(rep.tensors)
                     + f"), {ui.human(rep.src_bytes)} source, {ui.human(rep.dst_bytes)} output, {rep.seconds:.2f} s")
    else:
        ui.out.print(f"[red]DIFFERENT[/]: {S(rep.differences[0].line())}")
        for d in rep.differences[1:10]:
            ui.out.print(ui.printable(f"  also: {d.line()}"), markup=False)


def pushed(summary: dict, json_out: bool) -> None:
    if json_out:
        ui.print_json(summary)
        return
    o = ui.out
    if summary["dry_run"]:
        o.print(ui.printable(summary["card"], keep="\n"), markup=False, highlight=False)
        o.print(f"[bold]dry run[/]: would upload {len(summary['files'])} files ({ui.human(summary['bytes'])}) to {S(summary['repo'])}"
                + f" ({S(summary['revision'])}" + (", as a pull request" if summary["create_pr"] else "")
                + (", private" if summary["private"] else "") + f"), one commit: {S(repr(summary['commit_message']))}")
        for f in summary["files"]:
            o.print(ui.printable(f"  {f['path']:<48} {ui.human(f['bytes']):>10}" + ("  (generated card)" if f["generated"] else "")),
                    markup=False)
        return
    o.print(f"[green]pushed[/] {len(summary['files'])} files ({ui.human(summary['bytes'])}) to {S(summary['repo'])}: {S(summary.get('url', ''))}")


def demo(d: DemoResult, json_out: bool) -> None:
    if json_out:
        ui.print_json(d.to_json())
        return
    o, res, rep = ui.out, d.converted, d.report
    o.print(f"[bold]1. built[/] a synthetic 3-bit DeepSeek-V3-shaped checkpoint: {S(d.source)}")
    o.print(f"   {len(res.plan.shards)} shards, {ui.human(res.plan.src_shard_bytes)}, {len(res.plan.ckpt.modules)} quantized modules "
            f"(3-bit layers + a 4-bit MTP layer under a bits=3 config), bf16 router/norms/embeddings")
    o.print("[bold]2. converted[/] it to 4-bit GPTQ (w3repack convert):")
    converted(res, False)
    o.print("[bold]3. verified[/]: " + ("[green]identical[/]" if rep.ok else "[red]DIFFERENT[/]")
            + f", {sum(rep.tensors.values())} tensors: " + tensor_counts(rep.tensors))
    o.print("[bold]4. tamper check[/]: one flipped bit in a copy of the output is " + ("[green]caught[/]" if d.flipped else "[red]NOT caught[/]"))
    if d.flipped:
        o.print(ui.printable(f"   {d.flipped}"), markup=False)
    o.print("[bold]serve it[/] on a GPU box with stock vLLM (>= 0.17 detects auto-round by itself):")
    o.print(f"   vllm serve {S(d.output)} --tensor-parallel-size 1 --max-model-len 4096")
    o.print(f"   or: w3repack launch {S(d.output)} --gpus 8 -o serve.sh   (plans memory first)")


# --- serving ----------------------------------------------------------------------------------------------


def paths_plan(report: PathsReport, json_out: bool) -> None:
    """Both serving paths side by side, then the recommended path's memory plan in full."""
    if json_out:
        ui.print_json(report.to_json())
        return
    o = ui.out
    if len(report.paths) > 1:
        o.print(f"[bold]serving paths[/] (source widths: {', '.join(f'{b}-bit' for b in report.source_bits)})")
        rows = [("", *[p.name for p in report.paths]),
                ("weights per GPU", *[f"{p.plan.weights_gib_per_gpu:.2f} GiB" for p in report.paths]),
                ("fits", *["yes" if p.fits else "NO" for p in report.paths]),
                ("max context", *[str(p.plan.max_model_len) for p in report.paths]),
                ("vLLM", *[f">= {p.min_vllm_version}" + ("" if p.runnable else " (not here)") for p in report.paths]),
                ("kernel", *[p.kernel for p in report.paths]),
                ("measured decode", *[_speed(p) for p in report.paths]),
                ("prepare", *[p.prepare[0] if p.prepare else "nothing" for p in report.paths])]
        width = max(len(c) for r in rows for c in r[1:]) + 2
        for r in rows:
            o.print(ui.printable(f"  {r[0]:<17}" + "".join(f"{c:<{width}}" for c in r[1:]).rstrip()), markup=False)
        for p in report.paths:
            for c in p.tp_checks:
                if not c.ok:
                    o.print(f"  [red]{S(p.name)}: {S(c.what)}[/]: {S(c.detail)}")
            if not p.runnable:
                o.print(ui.printable(f"  {p.name}: cannot run: {p.why_not}"), markup=False)
    o.print(f"  recommended       [bold]{S(report.recommended)}[/]: {S(report.reason)}")
    o.print("")
    memory_plan(report.path(report.recommended).plan, False)


def _speed(p: ServingPath) -> str:
    m = p.measured
    if m is None:
        return "baseline" if p.name == "native-3bit" else "not measured here"
    return (f"{m.decode_geomean:.2f}x native (geomean of batches {', '.join(map(str, sorted(m.decode)))}; "
            f"{m.gpu_family}, TP {m.tp}, vLLM {m.vllm}; from {m.source})")


def memory_plan(plan: MemoryPlan, json_out: bool) -> None:
    p = plan.to_json()
    if json_out:
        ui.print_json(p)
        return
    o, g = ui.out, p["gpu"]
    o.print(f"[bold]{S(p['model'])}[/] ({S(p['architecture'])})")
    o.print(ui.printable(f"  GPUs              {p['gpus']} x {g['memory_gib']:g} GiB, cc {g['compute_capability']}"
                         + (f", {g['name']}" if g["name"] else "") + f"  (from {', '.join(sorted(set(g['source'].values()))) or '?'})"),
            markup=False)
    o.print(f"  layout            TP {p['tensor_parallel']} x PP {p['pipeline_parallel']}")
    offload = f" ({p['weights_gib_on_gpu']:.2f} on GPU after offload)" if p["weights_gib_on_gpu"] != p["weights_gib_per_gpu"] else ""
    o.print(f"  weights per GPU   {p['weights_gib_per_gpu']:.2f} GiB" + offload)
    for k, v in p["weights_gib_by_class"].items():
        o.print(ui.printable(f"    {k:<28} {v:8.3f} GiB"), markup=False)
    a = p["allowances_gib"]
    o.print(f"  budget            {p['budget_gib']:.2f} GiB = {p['gpu_memory_utilization']:g} x {p['cuda_memory_gib']:g} GiB "
            f"(the memory CUDA reports; {S(p['cuda_memory_source'])})")
    comm = f", NCCL at TP > 1 {a['tp_comm']} GiB (stated)" if a["tp_comm"] else ""
    if p["kv_measured"]:
        o.print(f"  KV measured       {S(p['kv_measured'])}{comm}")
    else:
        o.print(f"  allowances        activations {a['activations']} GiB ({a['max_num_batched_tokens']} batched tokens), "
                f"CUDA graphs {a['cuda_graphs']} GiB, non-torch {a['non_torch']} GiB{comm}, margin {a['margin']} GiB")
        o.print(f"  calibration       {S(a['calibration'])}")
    o.print(f"  KV cache          {p['kv_bytes_per_token']} bytes/token ({S(p['kv_cache_dtype'])}; attention {p['kv_bytes_per_token_attention']}, "
            f"indexer {p['kv_bytes_per_token_indexer']}), {p['kv_cache_gib']:.2f} GiB per GPU = {p['capacity_tokens']} tokens")
    o.print(f"  max context       {p['max_model_len']} (model max {p['model_max_position_embeddings']})")
    o.print("  fits              " + ("[green]yes[/]" if p["fits"] else f"[red]NO[/]: {S(p['reason'])}"))
    for w in p["warnings"]:
        o.print(f"  [yellow]warning:[/] {S(w)}")
    for alt in p["alternatives"]:
        o.print(ui.printable(f"  alternative: {alt['description']}: {alt['weights_gib_per_gpu']:.2f} GiB weights/GPU, "
                             f"max context {alt['max_model_len']}"), markup=False)
    o.print(ui.printable("  vllm serve MODEL " + " ".join(p["vllm_args"])), markup=False)


def warnings(lines: list[str]) -> None:
    for w in lines:
        ui.err.print(ui.printable(f"warning: {w}"), markup=False)


def launch_written(output: object, launch: Launch) -> None:
    ui.out.print(ui.printable(f"wrote {output}: {launch.path} path, {launch.gpus} GPUs, max context {launch.memory.context}, "
                              f"flags for {launch.label} {launch.version}"
                              + (f"; run `{output} head` on the first node, `{output} worker HEAD_IP` on the others"
                                 if launch.nodes > 1 else "")),
                 markup=False)
    warnings(launch.warnings)


def serve_command(env: dict[str, str], argv: list[str]) -> None:
    """The command as one bash line (``$'...'`` where a word holds a control character)."""
    from repack.serve.shell import display

    e = " ".join(f"{k}={display([v])}" for k, v in env.items())
    ui.out.print((e + " " if e else "") + display(argv), markup=False)


def smoke(rep: SmokeReport, json_out: bool) -> None:
    if json_out:
        ui.print_json(rep.to_json())
        return
    for c in rep.checks:
        ui.out.print(ui.printable(f"{'PASS' if c.ok else 'FAIL'}  {c.name:<40} {c.seconds:7.2f} s  {c.detail}"), markup=False)
    ui.out.print(ui.printable(f"{'passed' if rep.ok else 'FAILED'}: {sum(c.ok for c in rep.checks)} of {len(rep.checks)} checks, "
                              f"{rep.url} ({rep.model})"), markup=False)


def recipes(items: list[dict], json_out: bool) -> None:
    if json_out:
        ui.print_json({"recipes": items})
        return
    for r in items:
        hw = r["hardware"]
        ui.out.print(ui.printable(f"{r['name']:<44} {hw['gpus']} x {hw['gpu_memory_gib']:g} GiB cc {hw['compute_capability']}  "
                                  f"source {r.get('source_repo', '-')}"), markup=False)


# --- rehearsal ----------------------------------------------------------------------------------------------


def progress_line(text: str) -> None:
    ui.err.print(ui.printable(f"rehearse: {text}"), markup=False)


def json_or_lines(obj: dict, json_out: bool) -> None:
    """``rehearse --dry-run``: the rank models, as JSON or a few lines."""
    if json_out:
        ui.print_json(obj)
        return
    t = obj["target"]
    ui.out.print(ui.printable(f"dry run: one rank of TP {obj['tensor_parallel']} on {t['gpu_memory_gib']:g} GiB cards, cc "
                 f"{t['compute_capability']} (nothing built or run)"), markup=False)
    for p in obj["paths"]:
        c = p["rank_config"]
        ui.out.print(f"  {p['name']:<15} rank model {p['rank_weights_gib']:.2f} GiB of weights (plan at TP "
                     f"{obj['tensor_parallel']}: {p['plan_weights_gib']:.2f} GiB per GPU), {ui.human(p['scratch_bytes'])} "
                     f"on disk; heads {c.get('num_attention_heads')}, vocab {c.get('vocab_size')}", markup=False)


def _g(v: object, fmt: str = "{:.2f}") -> str:
    return "–" if v is None else fmt.format(v)


def rehearsal(reh, json_out: bool) -> None:
    """Planned against measured, per path, and the measured speed ratio."""
    d = reh.data
    if json_out:
        ui.print_json(d)
        return
    t, loc = d["target"], d["local"]
    o = ui.out
    o.print(ui.printable(f"rehearsal of {d['model']}: one rank of TP {t['tensor_parallel']} on {t['gpu_memory_gib']:g} GiB cc "
            f"{t['compute_capability']} (budget {t['budget_gib']:.2f} GiB = {t['gpu_memory_utilization']:g} x "
            f"{t['cuda_memory_gib']} GiB), measured on {loc['gpu']}, vLLM {loc['vllm']}, {d['date'][:10]}"), markup=False)
    rows: list[tuple[str, ...]] = [("", *[f"{p['name']} planned / measured" for p in d["paths"]])]

    def row(label: str, f) -> None:
        rows.append((label, *[f(p["planned"], p.get("measured") or {}, (p.get("measured") or {}).get("engine") or {})
                               for p in d["paths"]]))

    row("weights GiB", lambda pl, m, e: f"{_g(pl['weights_gib'])} / {_g(e.get('weights_gib'))}")
    row("non-torch GiB", lambda pl, m, e: f"{_g(pl['allowances_gib'].get('non_torch'))} / {_g(e.get('non_torch_gib'))}")
    row("activations GiB", lambda pl, m, e: f"{_g(pl['allowances_gib'].get('activations'))} / {_g(e.get('peak_activation_gib'))}")
    row("CUDA graphs GiB", lambda pl, m, e: f"{_g(pl['allowances_gib'].get('cuda_graphs'))} / {_g(e.get('cuda_graphs_estimate_gib'))}")
    row("KV cache GiB", lambda pl, m, e: f"{_g(pl['kv_cache_gib'])} / {_g(e.get('kv_cache_gib'))}")
    row("KV cache tokens", lambda pl, m, e: f"{pl['capacity_tokens']} / {_g(m.get('kv_cache_tokens'), '{}')}")
    row("longest context", lambda pl, m, e: f"{pl['max_model_len']} / {_g(m.get('max_model_len'), '{}')}")
    for b in ("1", "8", "32", "128"):
        row(f"decode b{b} tok/s", lambda pl, m, e, b=b: _speed_cell((m.get("decode_tokens_per_s") or {}).get(b)))
    row("prefill tok/s", lambda pl, m, e: _speed_cell(m.get("prefill_tokens_per_s")))
    width = max(len(c) for r in rows for c in r[1:]) + 2
    for r in rows:
        o.print(f"  {r[0]:<19}" + "".join(f"{c:<{width}}" for c in r[1:]).rstrip(), markup=False)
    for p in d["paths"]:
        m = p.get("measured") or {}
        if m.get("error"):
            o.print(ui.printable(f"  {p['name']}: {m['error']}"), markup=False)
        for k in (m.get("engine") or {}).get("kernels", [])[:6]:
            o.print(ui.printable(f"  {p['name']} kernel: {k}"), markup=False)
    ratio = reh.speed_ratio()
    if ratio:
        o.print("  repacked ÷ native decode: " + ", ".join(f"b{b} {r:.2f}" for b, r in ratio.decode.items())
                + (f"; prefill {ratio.prefill:.2f}" if ratio.prefill else ""), markup=False)


def _speed_cell(s: dict | None) -> str:
    return "–" if not s else f"{s['median']:.0f} [{s['min']:.0f}–{s['max']:.0f}]"
