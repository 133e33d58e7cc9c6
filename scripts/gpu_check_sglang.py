"""GPU check with stock SGLang: tiny synthetic 3-bit DeepSeek-V3 -> refused -> converted -> served -> compared.

Builds the checkpoints the way ``scripts/gpu_check.py`` does (3-bit source, ``w3repack convert`` output, float
reference of the exactly dequantized 3-bit weights), then, each in its own ``sglang.launch_server`` on loopback:

1. the launcher refuses the 3-bit source (``repack.serve.sglang.check_model``: one ``error:`` line);
2. each engine of :data:`ENGINES` serves greedy completions of token-id prompts through ``/generate``: the float
   reference (float16); the converted model with the argv ``repack.serve.sglang.sglang_command`` writes, in both
   config styles (``auto-round``, the default, and ``--quant-method gptq``); the same argv in bfloat16; the 3-bit
   source under ``--quantization humming``. Greedy tokens and chosen-token log-probs are judged against the
   reference as in ``gpu_check.py`` (0.05 nats in float16, 0.15 in bfloat16; near ties reported as such);
3. ``python -m repack smoke`` runs against the OpenAI-compatible API of the launcher's engines;
4. ``scripts/sglang_trace`` (first on the servers' ``PYTHONPATH``) records the quant-method class of every MoE
   layer each server built: the kernel it ran, named by SGLang's own classes.

Prompts: 4, 17 and 61 tokens, 700 tokens (three 256-token prefill chunks), the 700 again (prefix-cache hit) and
700 + 40. Everything is bounded by ``--deadline`` seconds (default 360); results go to ``OUT/results.json`` after
every step, server logs to ``OUT/*.log``. Exit 0 all passed, 1 any failure or timeout.

    PYTHONPATH=$(cat /tmp/sgsite/PYTHONPATH):$PWD python3 scripts/gpu_check_sglang.py --out OUT [--engines ref,w4-] [--deadline S]

Stock SGLang for an offline host: ``tools/sglang-offline/``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CHUNK = 256
TOL = {"float16": 0.05, "bfloat16": 0.15}  # as gpu_check.py
# (name, checkpoint, dtype, argv appended after the launcher's, run smoke): the launcher's argv for the converted
# model (auto-round config style, then GPTQ style), the same in bfloat16, and the 3-bit source under Humming.
ENGINES = [
    ("ref-float16", "ref", "float16", [], False),
    ("w4-float16", "dst", "float16", [], True),
    ("w4gptq-float16", "gptq", "float16", [], True),
    ("w3humming-float16", "src", "float16", ["--quantization", "humming"], False),
    ("w4-bfloat16", "dst", "bfloat16", ["--dtype", "bfloat16"], False),
]


class Deadline:
    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


def save(out: Path, report: dict) -> None:
    (out / "results.json").write_text(json.dumps(report, indent=1) + "\n")


def _post(url: str, body: dict, timeout: float) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def generate(url: str, ids: list[int], max_tokens: int, timeout: float) -> dict:
    """Greedy tokens and top-5 log-probs of one token-id prompt through SGLang's native ``/generate``."""
    r = _post(url + "/generate", {"input_ids": ids, "return_logprob": True, "top_logprobs_num": 5,
                                  "sampling_params": {"temperature": 0, "max_new_tokens": max_tokens, "ignore_eos": True}},
              timeout)
    meta = r["meta_info"]
    toks = [int(t[1]) for t in meta["output_token_logprobs"]]
    lps = []
    for chosen, top in zip(meta["output_token_logprobs"], meta["output_top_logprobs"]):
        d = {str(int(t[1])): float(t[0]) for t in top}
        d[str(int(chosen[1]))] = float(chosen[0])
        lps.append(d)
    return {"tokens": toks, "logprobs": lps, "cached_tokens": meta.get("cached_tokens"), "prompt_len": len(ids)}


def start(argv: list[str], log: Path, env: dict) -> subprocess.Popen:
    with open(log, "w") as f:
        return subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def wait_up(url: str, proc: subprocess.Popen, dl: Deadline) -> bool:
    while dl.left() > 0 and proc.poll() is None:
        try:
            with urllib.request.urlopen(url + "/health_generate", timeout=10) as r:
                if r.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(2)
    return False


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def read_trace(trace: Path) -> dict:
    """Counts of quant-method descriptions the traced SGLang processes recorded (``scripts/sglang_trace``)."""
    counts: dict = {}
    if trace.exists():
        for ln in trace.read_text().splitlines():
            rec = json.loads(ln)
            for k, v in rec.get("modules", {"trace error: " + rec.get("error", "?"): 1}).items():
                counts[k] = counts.get(k, 0) + v
    return counts


def tail(log: Path, n: int = 3) -> str:
    return " / ".join(log.read_text(errors="replace").strip().splitlines()[-n:])[-400:] if log.exists() else ""


def serve_and_generate(name: str, argv: list[str], port: int, out: Path, env: dict, pr: dict, dl: Deadline,
                       max_tokens: int, smoke_tokens: int = 0, started: tuple | None = None) -> dict:
    """Start one server (or take ``started``: its process and start time), run the prompts (round by round),
    optionally smoke, stop it."""
    url = f"http://127.0.0.1:{port}"
    log = out / f"{name}.log"
    rec: dict = {"argv": argv}
    proc, t0 = started or (start(argv, log, env), time.monotonic())
    try:
        rec["up"] = wait_up(url, proc, dl)
        rec["startup_seconds"] = round(time.monotonic() - t0, 1)
        if not rec["up"]:
            rec["error"] = ("timeout" if proc.poll() is None else f"exited rc={proc.returncode}") + ": " + tail(log)
            return rec
        res: dict = {}
        for rnd in ("round1", "round2"):
            for p, ids in pr[rnd].items():
                if dl.left() < 5:
                    rec["error"] = "deadline during generation"
                    return rec | {"results": res}
                try:
                    res[p] = generate(url, ids, max_tokens, min(120, dl.left()))
                except (OSError, KeyError, ValueError) as e:
                    res[p] = {"error": f"{type(e).__name__}: {e}"[:300]}
        rec["results"] = res
        if smoke_tokens and dl.left() > 10:
            sm = subprocess.run([sys.executable, "-m", "repack", "smoke", url, "--json", "--long-tokens", str(smoke_tokens),
                                 "--timeout", "60"], capture_output=True, text=True, cwd=ROOT, env=env,
                                timeout=max(5, dl.left() - 5))
            rec["smoke_rc"] = sm.returncode
            try:
                rec["smoke"] = json.loads(sm.stdout)
            except json.JSONDecodeError:
                rec["smoke_output"] = (sm.stdout + sm.stderr)[-1500:]
    except subprocess.TimeoutExpired:
        rec["error"] = "smoke timed out"
    finally:
        stop(proc)
        text = log.read_text(errors="replace") if log.exists() else ""
        rec["marlin_seen"] = "marlin" in text.lower()
        rec["log_tail"] = tail(log, 5)
    return rec


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=None, help="checkpoints (default OUT/../gpu_check_sglang_work)")
    ap.add_argument("--port", type=int, default=30011)
    ap.add_argument("--deadline", type=float, default=360.0, help="seconds for the whole check")
    ap.add_argument("--attention-backend", default="triton", help="passed after the launcher's flags (triton: no FA3 needed)")
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--engines", default="", help="comma-separated name prefixes of ENGINES to run (default all)")
    ap.add_argument("--parallel", type=float, default=0.0, metavar="FRACTION",
                    help="start every engine at once, each on its own port with --mem-fraction-static FRACTION")
    ap.add_argument("--cuda-graph", action="store_true", help="keep CUDA graphs (slower start); default --disable-cuda-graph")
    args = ap.parse_args()
    dl = Deadline(args.deadline)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    report: dict = {"checks": []}

    def row(check: str, ok: bool, detail: str) -> None:
        report["checks"].append({"check": check, "status": "PASS" if ok else "FAIL", "detail": detail})
        print(f"{'PASS' if ok else 'FAIL':5} {check}: {detail}", flush=True)
        save(out, report)

    from repack.errors import UserError
    from repack.serve import planner
    from repack.serve import sglang as sg
    from repack.synth import TinySpec
    from scripts.gpu_check import build, describe, judge, prompts, write_tokenizer

    work = args.work or out.parent / "gpu_check_sglang_work"
    work.mkdir(parents=True, exist_ok=True)
    built = build(work)
    paths = built.paths()
    gptq = work / "dst4gptq"
    if not (gptq / "w3repack.json").exists():
        from repack.convert import convert
        from repack.plan import Options

        convert(built.src, gptq, Options(quant_method="gptq"))
    paths["gptq"] = str(gptq)
    for key in ("dst", "ref", "gptq", "src"):
        if not (Path(paths[key]) / "tokenizer.json").exists():
            write_tokenizer(Path(paths[key]), TinySpec().vocab)
    report["paths"] = paths
    try:
        import torch

        report["environment"] = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name(0),
                                 "sglang": sg.installed_sglang()}
    except Exception as e:  # noqa: BLE001 - informational
        report["environment"] = {"error": str(e)[:200], "sglang": sg.installed_sglang()}
    save(out, report)

    gpu = planner.nvidia_smi() or planner.Gpu(1, 80.0, "9.0")
    gpu = planner.Gpu(1, gpu.memory_gib, gpu.cc, gpu.name)
    try:
        sg.check_model(planner.load_model(paths["src"]))
        row("launcher refuses the 3-bit source", False, "no error raised")
    except UserError as e:
        row("launcher refuses the 3-bit source", "3 bits" in str(e), f"error: {e}"[:220])

    extra = ["--attention-backend", args.attention_backend, "--chunked-prefill-size", str(CHUNK),
             "--grammar-backend", "none", "--sampling-backend", "pytorch"] + ([] if args.cuda_graph else ["--disable-cuda-graph"])
    trace_dir = ROOT / "scripts" / "sglang_trace"
    pypath = os.pathsep.join(x for x in (str(trace_dir), os.environ.get("PYTHONPATH"), str(ROOT)) if x)
    pr = prompts()
    engines: dict = {}
    report["engines"] = engines
    ref: dict = {}
    wanted = [e for e in ENGINES if not args.engines or any(e[0].startswith(p) for p in args.engines.split(","))]
    launches: dict = {}
    for i, (name, key, _dtype, more, _smoke) in enumerate(wanted):
        if key not in paths:
            continue
        base = paths["dst"] if key in ("src", "ref") else paths[key]  # the argv of dst, path swapped, for those
        model = planner.load_model(base)
        w = planner.weights_per_gpu(model, 1, 1).per_stage[0] / sg.GIB
        port = args.port + (i if args.parallel else 0)
        share = ["--mem-fraction-static", f"{args.parallel:g}"] if args.parallel else []
        try:
            launch = sg.sglang_command(base, model, w, gpu, 1, python=sys.executable, port=port,
                                       context_length=2048, dtype="float16", extra_args=extra + more + share)
        except UserError as e:  # the launcher refuses this SGLang for the model: a verdict, not a crash
            row(f"{name} launcher", False, f"error: {e}"[:300])
            continue
        argv = list(launch.argv)
        argv[len(sg.HEAD)] = paths[key]
        trace = out / f"{name}.trace.jsonl"
        env = dict(os.environ, PYTHONPATH=pypath, PYTHONUNBUFFERED="1", W3REPACK_SGLANG_TRACE=str(trace))
        launches[name] = (argv, port, env, trace)
    started = {n: (start(a, out / f"{n}.log", e), time.monotonic()) for n, (a, _p, e, _t) in launches.items()} \
        if args.parallel else {}
    for name, key, dtype, _more, smoke in wanted:
        if name not in launches:
            row(f"{name} served", False, f"not launched: no {key} checkpoint, or the launcher refused it (above)")
            continue
        if dl.left() < 30:
            row(f"{name} served", False, "no time left")
            if name in started:
                stop(started[name][0])
            continue
        argv, port, env, trace = launches[name]
        eng = engines[name] = serve_and_generate(name, argv, port, out, env, pr, dl, args.max_tokens,
                                                 smoke_tokens=1500 if smoke else 0, started=started.get(name))
        eng["quant_methods"] = read_trace(trace)
        row(f"{name} served", bool(eng.get("up")) and "results" in eng,
            f"startup {eng.get('startup_seconds')} s; " + "; ".join(f"{k} x{v}" for k, v in eng["quant_methods"].items())
            + (f"; {eng['error']}" if eng.get("error") else ""))
        if key == "ref":
            ref = eng.get("results", {})
            continue
        got_all = eng.get("results", {})
        tol = TOL[dtype]
        flat = {n: ids for rnd in pr.values() for n, ids in rnd.items()}
        for p, got in got_all.items():
            if "error" in got:
                row(f"{name} vs float ref: {p}", False, got["error"])
                continue
            refs = {m: ref[m] for m in ref if flat.get(m) == flat[p] and "error" not in ref[m]}
            if not refs:
                row(f"{name} vs float ref: {p}", False, "no reference run of these ids")
                continue
            c = judge(got, refs, tol)
            eng.setdefault("verdicts", {})[p] = c
            row(f"{name} vs float ref: {p}", c["verdict"] != "mismatch", describe(c, tol))
        if got_all:
            hit = (got_all.get("long_700_cached") or {}).get("cached_tokens")
            row(f"{name} prefix-cache hit on the repeated long prompt", bool(hit), f"cached_tokens={hit}")
        if smoke:
            checks = (eng.get("smoke") or {}).get("checks")
            if not checks:
                row(f"{name} w3repack smoke", False, f"rc={eng.get('smoke_rc')} {eng.get('smoke_output', '')[-300:]}")
            for ch in checks or []:
                row(f"{name} smoke {ch.get('name')}", bool(ch.get("ok")), str(ch.get("detail"))[:200])
    failed = [r for r in report["checks"] if r["status"] == "FAIL"]
    report["passed"] = not failed and any(" vs float ref" in r["check"] for r in report["checks"])
    save(out, report)
    print(f"{len(report['checks']) - len(failed)} passed, {len(failed)} failed", flush=True)
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
