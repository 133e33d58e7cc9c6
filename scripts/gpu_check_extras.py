"""GPU check of the engine extras: DeepSeek MTP speculative decoding and the V3.2 dense-attention fallback.

MTP (``TinySpec(mtp=True)``, a 4-bit MTP layer under a ``bits: 3`` config): the converted model is served with and
without ``speculative_config={"method": "deepseek_mtp", "num_speculative_tokens": 1}`` (CUDA graphs on), decode
tokens/s at batch 1 and 8 on the same prompts, the acceptance counters from ``LLM.get_metrics()``, and greedy
tokens compared (with log-probs: a split passes only as a near tie of the run without speculation). The 3-bit
source (expected to fail) and the ``--target native`` output are served under the same flags.

V3.2 dense fallback (``TinySpec(v32=True)``): converted with ``dense_attention`` (repack and native targets), served,
and compared with an exact float reference (float32 dequantization of the 3-bit source, DeepSeek-V3 config, no
indexer). The sparse V3.2 path of the plain conversion is tried too, for information.

Every engine runs in its own subprocess with a timeout; ``OUT/results.json`` and ``OUT/engines.log`` are rewritten
after each engine, so a killed run keeps what finished. Engines run in priority order within ``--budget`` seconds.

    PYTHONPATH=/path/to/vllm/site:$PWD VLLM_USE_FLASHINFER_SAMPLER=0 python scripts/gpu_check_extras.py --out OUT
    python scripts/gpu_check_extras.py --out OUT --build-only      # CPU part only: checkpoints and reference

Exit 1 if a strict check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scripts.gpu_check import counter, describe, judge, spec_metrics, write_reference  # noqa: E402

DTYPE = "float16"
TOL = 0.05  # nats, float16 (docs/validation.md)
SPEC = {"method": "deepseek_mtp", "num_speculative_tokens": 1}
DECODE_TOKENS = 96


# ---------------------------------------------------------------- checkpoints (CPU only)

def build(work: Path) -> dict:
    """Sources, conversions and the dense float reference under ``work``; returns their paths and timings."""
    from repack.convert import convert
    from repack.plan import Options
    from repack.run import RunConfig
    from repack.synth import TinySpec, write_checkpoint

    t0 = time.monotonic()
    paths = {k: work / k for k in ("mtp_src", "mtp_w4", "mtp_native", "v32_src", "v32_dense_w4", "v32_dense_native",
                                   "v32_w4", "v32_dense_ref")}
    if not (paths["mtp_src"] / "config.json").exists():
        write_checkpoint(paths["mtp_src"], TinySpec(mtp=True))
    if not (paths["v32_src"] / "config.json").exists():
        write_checkpoint(paths["v32_src"], TinySpec(v32=True))
    jobs = [
        ("mtp_src", "mtp_w4", Options()),
        ("mtp_src", "mtp_native", Options(target="native", kv_b_float=False)),
        ("v32_src", "v32_dense_w4", Options(dense_attention=True)),
        ("v32_src", "v32_dense_native", Options(target="native", kv_b_float=False, dense_attention=True)),
        ("v32_src", "v32_w4", Options()),
    ]
    for s, d, opts in jobs:
        if not (paths[d] / "w3repack.json").exists():
            convert(paths[s], paths[d], opts, RunConfig(overwrite=True))
    if not (paths["v32_dense_ref"] / "config.json").exists():
        write_dense_reference(paths["v32_src"], paths["v32_dense_ref"])
    return {"paths": {k: str(v) for k, v in paths.items()}, "build_seconds": round(time.monotonic() - t0, 1)}


def dense_reference_config(cfg: dict) -> dict:
    """DeepSeek-V3 config of a V3.2 float model, written out here (not by the converter): V3 architecture and
    model_type, no ``index_*`` key, no quantization_config."""
    out = {k: v for k, v in cfg.items() if not k.startswith("index_") and k != "quantization_config"}
    out["architectures"] = ["DeepseekV3ForCausalLM"]
    out["model_type"] = "deepseek_v3"
    return out


def write_dense_reference(src: Path, ref: Path) -> None:
    """``gpu_check.write_reference`` (exact float32 weights of the 3-bit source), then the V3 config and no indexer."""
    from repack.safetensors_io import build_header, read_array, read_header

    write_reference(src, ref)
    (ref / "config.json").write_text(json.dumps(dense_reference_config(json.loads((src / "config.json").read_text())), indent=2))
    index = json.loads((ref / "model.safetensors.index.json").read_text())
    for shard in sorted(set(index["weight_map"].values())):
        hdr = read_header(ref / shard)
        if not any(".indexer." in n for n in hdr.tensors):
            continue
        fd = os.open(ref / shard, os.O_RDONLY)
        try:
            keep = [(t.name, t.dtype, read_array(fd, hdr, t)) for t in hdr.ordered() if ".indexer." not in t.name]
        finally:
            os.close(fd)
        prefix, _ = build_header([(n, d, tuple(a.shape)) for n, d, a in keep], {"format": "pt"})
        tmp = ref / (shard + ".tmp")
        with open(tmp, "wb") as f:
            f.write(prefix)
            for _, _, a in keep:
                f.write(np.ascontiguousarray(a).tobytes())
        os.replace(tmp, ref / shard)
    wm = {n: s for n, s in index["weight_map"].items() if ".indexer." not in n}
    index["weight_map"] = wm
    total = 0
    for shard in sorted(set(wm.values())):
        total += sum(t.nbytes for t in read_header(ref / shard).tensors.values())
    index["metadata"]["total_size"] = total
    (ref / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def prompts(vocab: int = 1024) -> dict:
    """Token-id prompts: 8 for decode speed (batch 1 uses the first), 3 short ones for the V3.2 checks
    (each with its 24 new tokens under the synthetic index_topk of 64)."""
    rng = np.random.default_rng(4321)
    ids = lambda n: rng.integers(2, vocab, size=n).tolist()  # noqa: E731
    return {"decode": [ids(16) for _ in range(8)], "short": {"short_4": ids(4), "short_17": ids(17), "short_33": ids(33)}}


# ---------------------------------------------------------------- engine children

def _engine(spec: dict):
    from vllm import LLM

    kw = dict(model=spec["model"], dtype=DTYPE, skip_tokenizer_init=True, attention_backend="TRITON_MLA",
              max_model_len=1024, max_num_seqs=8, gpu_memory_utilization=0.5, seed=0,
              enforce_eager=not spec.get("graphs", False), disable_log_stats=not spec.get("spec"))
    if spec.get("graphs"):
        kw["compilation_config"] = {"max_cudagraph_capture_size": 32}
    if spec.get("spec"):
        kw["speculative_config"] = dict(SPEC)
    return LLM(**kw)


def child_generate(spec: dict) -> dict:
    import torch
    import vllm
    from vllm import SamplingParams

    t0 = time.monotonic()
    llm = _engine(spec)
    info = {"gpu": torch.cuda.get_device_name(0), "vllm": vllm.__version__, "torch": torch.__version__,
            "load_seconds": round(time.monotonic() - t0, 1)}
    out: dict = {"info": info}
    pr = spec["prompts"]
    greedy = SamplingParams(temperature=0.0, max_tokens=24, logprobs=5, detokenize=False, ignore_eos=True)
    names = list(pr["short"])
    reqs = [{"prompt_token_ids": pr["short"][n]} for n in names]
    try:
        outs = llm.generate(reqs, greedy, use_tqdm=False)
    except Exception as e:  # noqa: BLE001 - log-probs under speculation: record and retry without
        out["logprobs_error"] = f"{type(e).__name__}: {e}"[:500]
        outs = llm.generate(reqs, SamplingParams(temperature=0.0, max_tokens=24, detokenize=False, ignore_eos=True),
                            use_tqdm=False)
    out["results"] = {n: {"tokens": list(o.outputs[0].token_ids),
                          "logprobs": [{str(t): float(lp.logprob) for t, lp in d.items()} for d in o.outputs[0].logprobs or []]}
                      for n, o in zip(names, outs)}
    if spec.get("speed"):
        sp = SamplingParams(temperature=0.0, max_tokens=DECODE_TOKENS, detokenize=False, ignore_eos=True)
        speed, tokens = {}, {}
        for batch in (1, 8):
            reqs = [{"prompt_token_ids": p} for p in pr["decode"][:batch]]
            llm.generate(reqs, sp, use_tqdm=False)  # warm-up
            times = []
            for _ in range(spec.get("repeats", 5)):
                t = time.perf_counter()
                outs = llm.generate(reqs, sp, use_tqdm=False)
                times.append(time.perf_counter() - t)
            n = sum(len(o.outputs[0].token_ids) for o in outs)
            speed[str(batch)] = {"tokens_per_s": round(n / statistics.median(times), 1),
                                 "runs_tokens_per_s": [round(n / x, 1) for x in times]}
            tokens[str(batch)] = [list(o.outputs[0].token_ids) for o in outs]
        out["decode"] = speed
        out["decode_tokens"] = tokens
    if spec.get("spec"):
        try:
            m = spec_metrics(llm)
            out["spec_metrics"] = m
            drafts, accepted = counter(m, "num_draft_tokens"), counter(m, "num_accepted_tokens")
            if drafts and accepted is not None:
                out["acceptance_rate"] = round(accepted / drafts, 4)
        except Exception as e:  # noqa: BLE001 - metrics are information, not the check
            out["metrics_error"] = f"{type(e).__name__}: {e}"[:500]
    return out


def run_child(spec: dict, log: Path, timeout: int) -> dict:
    """One engine in a fresh Python process; its output goes to ``log``."""
    from repack.serve.child import python_child

    r = python_child(__file__, [json.dumps(spec)], log, timeout, {"VLLM_ALLOW_INSECURE_SERIALIZATION": "1"}, ROOT)
    rc: int | str = "timeout" if r.timed_out or r.rc is None else r.rc
    text = log.read_text(errors="replace")
    out = dict(r.result or {})
    out.update(rc=rc, seconds=round(r.seconds, 1), error_line=error_line(text) if rc != 0 else "",
               log_tail="\n".join(text.splitlines()[-40:]))
    return out


GENERIC_ERRORS = ("Engine core initialization failed", "EngineCore failed", "EngineDeadError", "Worker failed")


def error_line(text: str) -> str:
    """The root exception line of a log (``SomeError: message``): the last one that is not vLLM's generic wrapper."""
    lines = [ln.strip() for ln in text.splitlines()]
    found = []
    for ln in lines:
        head = ln.split(":", 1)[0].split(" ")[-1]
        if ":" in ln and head.endswith(("Error", "Exception")):
            found.append(ln)
    specific = [ln for ln in found if not any(g in ln for g in GENERIC_ERRORS)]
    if specific or found:
        return (specific or found)[-1][:400]
    return next((ln for ln in reversed(lines) if ln), "")[:400]


# ---------------------------------------------------------------- plan of engines and judgement

def engines_plan(paths: dict, pr: dict) -> list[tuple[str, dict]]:
    """(name, spec) in priority order."""
    base = {"prompts": pr}
    return [
        ("mtp-w4", dict(base, model=paths["mtp_w4"], graphs=True, speed=True)),
        ("mtp-w4-spec", dict(base, model=paths["mtp_w4"], graphs=True, speed=True, spec=True)),
        ("v32-dense-ref", dict(base, model=paths["v32_dense_ref"])),
        ("v32-dense-w4", dict(base, model=paths["v32_dense_w4"])),
        ("v32-dense-native", dict(base, model=paths["v32_dense_native"])),
        ("mtp-src-spec", dict(base, model=paths["mtp_src"], spec=True)),
        ("mtp-native-spec", dict(base, model=paths["mtp_native"], spec=True)),
        ("mtp-native", dict(base, model=paths["mtp_native"])),
        ("v32-sparse-w4", dict(base, model=paths["v32_w4"])),
    ]


def evaluate(engines: dict) -> list[dict]:
    rows: list[dict] = []

    def row(check, status, detail):
        rows.append({"check": check, "status": status, "detail": detail})

    def served(name, strict=True):
        r = engines.get(name)
        if r is None:
            row(f"{name} serves", "SKIP", "not run (budget or --only)")
            return None
        ok = r.get("rc") == 0 and "results" in r
        row(f"{name} serves", "PASS" if ok else ("FAIL" if strict else "INFO"),
            f"load {r.get('info', {}).get('load_seconds')} s, total {r.get('seconds')} s" if ok
            else f"rc={r.get('rc')}: {r.get('error_line')}")
        return r if ok else None

    def same(name, a, b, strict=True, label="greedy"):
        for p in a["results"]:
            ra, rb = a["results"][p], b["results"][p]
            if ra["logprobs"] and rb["logprobs"]:
                c = judge(ra, {"ref": rb}, TOL)
                ok, detail = c["verdict"] != "mismatch", describe(c, TOL)
            else:
                ok = ra["tokens"] == rb["tokens"]
                detail = "tokens equal (no log-probs)" if ok else f"tokens differ at {compare_tokens(ra['tokens'], rb['tokens'])}"
            row(f"{name}: {label} {p}", "PASS" if ok else ("FAIL" if strict else "WARN"), detail)

    base, spec = served("mtp-w4"), served("mtp-w4-spec")
    if base and spec:
        same("mtp-w4-spec vs mtp-w4", spec, base)
        for b in ("1", "8"):
            tb, ts = base["decode_tokens"][b], spec["decode_tokens"][b]
            eq = sum(x == y for x, y in zip(tb, ts))
            row(f"mtp-w4-spec vs mtp-w4: decode tokens at batch {b}", "PASS" if eq == len(tb) else "WARN",
                f"{eq}/{len(tb)} sequences identical over {DECODE_TOKENS} tokens"
                + ("" if eq == len(tb) else f"; first split {[compare_tokens(x, y) for x, y in zip(tb, ts)]}"))
            sb, ss = base["decode"][b]["tokens_per_s"], spec["decode"][b]["tokens_per_s"]
            row(f"decode tokens/s at batch {b} (CUDA graphs)", "INFO",
                f"without MTP {sb}, with MTP {ss}, speed-up x{ss / sb:.2f}")
        row("MTP acceptance rate", "INFO", f"{spec.get('acceptance_rate')} (counters {spec.get('spec_metrics') or spec.get('metrics_error')})")
    src = engines.get("mtp-src-spec")
    if src is not None:
        row("3-bit source with deepseek_mtp", "INFO", "serves" if src.get("rc") == 0 else f"fails: {src.get('error_line')}")
    nspec, nbase = served("mtp-native-spec", strict=False), served("mtp-native", strict=False)
    if nspec and nbase:
        same("mtp-native-spec vs mtp-native", nspec, nbase, strict=False)
    ref = served("v32-dense-ref")
    for name in ("v32-dense-w4", "v32-dense-native"):
        r = served(name)
        if r and ref:
            same(f"{name} vs float dense reference", r, ref, strict=name.endswith("w4"))
    sparse = served("v32-sparse-w4", strict=False)
    if sparse and engines.get("v32-dense-w4", {}).get("results"):
        same("v32-sparse-w4 vs v32-dense-w4 (under index_topk)", sparse, engines["v32-dense-w4"], strict=False)
    return rows


def compare_tokens(a: list, b: list) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))


def table(rows: list[dict], env: dict) -> str:
    lines = [f"GPU {env.get('gpu')}, vLLM {env.get('vllm')}, torch {env.get('torch')}", f"{'result':6}  check", "-" * 100]
    lines += [f"{r['status']:6}  {r['check']}: {r['detail']}" for r in rows]
    count = {s: sum(r["status"] == s for r in rows) for s in ("PASS", "FAIL", "WARN", "INFO", "SKIP")}
    failed = count["FAIL"] > 0 or count["PASS"] == 0
    lines += ["-" * 100, ", ".join(f"{v} {k}" for k, v in count.items()) + (" -> FAILED" if failed else " -> PASSED")]
    return "\n".join(lines)


def save(out: Path, report: dict) -> None:
    rows = evaluate(report["engines"])
    env: dict = next((e["info"] for e in report["engines"].values() if "info" in e), {})
    report.update(checks=rows, environment=env,
                  passed=not any(r["status"] == "FAIL" for r in rows) and any(r["status"] == "PASS" for r in rows))
    (out / "results.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "summary.txt").write_text(table(rows, env) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=None, help="checkpoints (default OUT/../gpu_check_extras_work)")
    ap.add_argument("--budget", type=int, default=330, help="seconds for all engines; later ones are skipped")
    ap.add_argument("--timeout", type=int, default=150, help="seconds per engine")
    ap.add_argument("--only", default="", help="comma-separated engine names (default: all)")
    ap.add_argument("--build-only", action="store_true", help="write the checkpoints and the reference, run no engine")
    args = ap.parse_args()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    work = args.work or out.parent / "gpu_check_extras_work"
    (work / "logs").mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    built = build(work)
    print(f"built in {work}: {built['build_seconds']} s", flush=True)
    report = {"build": built, "engines": {}, "budget_s": args.budget}
    if args.build_only:
        (out / "results.json").write_text(json.dumps(report, indent=1) + "\n")
        return 0
    only = {x for x in args.only.split(",") if x}
    deadline = t0 + args.budget
    with open(out / "engines.log", "w") as elog:
        for name, spec in engines_plan(built["paths"], prompts()):
            if only and name not in only:
                continue
            left = int(deadline - time.monotonic())
            if left < 30:
                report.setdefault("skipped", []).append(name)
                continue
            r = run_child(spec, work / "logs" / f"{name}.log", min(args.timeout, left))
            report["engines"][name] = r
            print(f"{name}: rc={r['rc']} {r['seconds']} s {r.get('error_line', '')[:160]}", flush=True)
            elog.write(f"===== {name} =====\n{r['log_tail']}\n")
            elog.flush()
            save(out, report)
    save(out, report)
    print("\n" + (out / "summary.txt").read_text())
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        spec, res = json.loads(sys.argv[2]), Path(sys.argv[3])
        res.write_text(json.dumps(child_generate(spec)))
        sys.exit(0)
    sys.exit(main())
