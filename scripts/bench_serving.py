"""Serving benchmark: the 3-bit source served natively vs the converted 4-bit model under each MoE backend.

One run, one vLLM version, one GPU kind. Builds a DeepSeek-V3-shaped 3-bit auto-round checkpoint with real
expert shapes (hidden 7168, expert width 2048, 128 routed experts top-8 + 1 shared, MLA with 128 heads; a
small vocabulary so that the lm_head does not dominate a 4-layer model), converts it with ``w3repack convert``
and serves each path through vLLM's Python API, every engine in its own process, CUDA graphs on (vLLM's
default compilation), prefix caching off. Per path it measures:

* load time (engine construction: weights, compile, graph capture) and the weight memory vLLM reports;
* decode tokens/s at each batch size: ``B * (N - 1) / (t(N) - t(1))`` with ``t(n)`` the wall time of a
  batch of B 64-token prompts generating n tokens; a warm-up, then ``--repeat`` runs of each (median, spread);
* prefill tokens/s: 4 prompts of 2048 new tokens, ``max_tokens=1``, median of ``--repeat``.

Paths: ``native-3bit`` (the source; refused by vLLM < 0.30) and ``repacked-4bit/<backend>`` for each of
``auto``, ``marlin``, ``humming``, ``triton`` that this vLLM accepts (a refusal is recorded, not fatal).
Prints a table of ratios against the native path and writes ``OUT/bench.json`` after every engine.

    PYTHONPATH=/path/to/vllm/site:$PWD python scripts/bench_serving.py --out OUT [--tp 1] [--layers 4]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BACKENDS = ("auto", "marlin", "humming", "triton")
BATCHES = (1, 8, 32, 128)
PROMPT_LEN = 64
PREFILL_LEN, PREFILL_BATCH = 2048, 4
KERNEL_RE = re.compile(r"(Using .*backend|Selected \w+ for|Model loading took|Available KV cache memory|"
                       r"KV cache size|maximum concurrency)", re.I)


# ---------------------------------------------------------------- checkpoint (CPU only)

def bench_spec(layers: int, vocab: int):
    from repack.synth import TinySpec

    return TinySpec(hidden=7168, intermediate=18432, moe_intermediate=2048, layers=layers, first_dense=0,
                    experts=128, topk=8, heads=128, q_lora=1536, kv_lora=512, nope=128, rope=64, v_head=128,
                    vocab=vocab, mtp=False, shard_bytes=4 << 30)


def write_source(root: Path, spec) -> None:
    """The checkpoint of ``synth.deepseek_config(spec)`` with random valid 3-bit codes (``synth.random_tensors``:
    speed does not depend on the values, so tensors of one shape share their bytes)."""
    from repack import synth

    h, bits, gs = spec.hidden, spec.bits, spec.group_size
    tensors: list[tuple[str, str, tuple[int, ...]]] = [("model.embed_tokens.weight", "BF16", (spec.vocab, h))]
    for prefix, n, k, _ in synth._linears(spec):
        layer = int(prefix.split(".")[2])
        if prefix.endswith("self_attn.q_a_proj"):
            p = prefix.rsplit(".", 2)[0]
            tensors += [(f"{p}.input_layernorm.weight", "BF16", (h,)), (f"{p}.post_attention_layernorm.weight", "BF16", (h,)),
                        (f"{p}.self_attn.q_a_layernorm.weight", "BF16", (spec.q_lora,)),
                        (f"{p}.self_attn.kv_a_layernorm.weight", "BF16", (spec.kv_lora,))]
            if layer >= spec.first_dense:
                tensors += [(f"{p}.mlp.gate.weight", "BF16", (spec.experts, h)),
                            (f"{p}.mlp.gate.e_score_correction_bias", "F32", (spec.experts,))]
        tensors += [(f"{prefix}.qweight", "I32", (k * bits // 32, n)), (f"{prefix}.qzeros", "I32", (k // gs, n * bits // 32)),
                    (f"{prefix}.scales", "F16", (k // gs, n))]
    tensors += [("model.norm.weight", "BF16", (h,)), ("lm_head.weight", "BF16", (spec.vocab, h))]
    synth.write_random_checkpoint(root, synth.deepseek_config(spec), tensors, spec.shard_bytes)


def build(work: Path, layers: int, vocab: int) -> dict:
    src, dst = work / f"src3-L{layers}", work / f"dst4-L{layers}"
    t0 = time.monotonic()
    if not (src / "config.json").exists():
        write_source(src, bench_spec(layers, vocab))
    t1 = time.monotonic()
    if not (dst / "w3repack.json").exists():
        subprocess.run([sys.executable, "-m", "repack", "convert", str(src), str(dst), "--overwrite"], check=True,
                       cwd=ROOT, stdout=subprocess.DEVNULL)
    t2 = time.monotonic()
    du = lambda p: sum(f.stat().st_size for f in p.glob("*.safetensors"))  # noqa: E731
    return {"src": str(src), "dst": str(dst), "src_bytes": du(src), "dst_bytes": du(dst),
            "seconds": {"write_source": round(t1 - t0, 1), "convert": round(t2 - t1, 1)}}


# ---------------------------------------------------------------- one engine (child process)

def child(spec: dict) -> dict:
    import torch
    import vllm
    from vllm import LLM, SamplingParams

    kw = dict(model=spec["model"], tensor_parallel_size=spec["tp"], dtype=spec["dtype"], skip_tokenizer_init=True,
              attention_backend="TRITON_MLA", max_model_len=4096, max_num_seqs=max(BATCHES),
              max_num_batched_tokens=PREFILL_LEN * PREFILL_BATCH, enable_prefix_caching=False,
              gpu_memory_utilization=0.85, seed=0)
    if spec["backend"] != "auto":
        kw["moe_backend"] = spec["backend"]
    t0 = time.monotonic()
    llm = LLM(**kw)
    out = {"load_seconds": round(time.monotonic() - t0, 1), "vllm": vllm.__version__, "torch": torch.__version__,
           "gpu": torch.cuda.get_device_name(0), "gpus": torch.cuda.device_count()}
    rng = np.random.default_rng(1)
    vocab = spec["vocab"]

    def batch(b, n):
        return [{"prompt_token_ids": rng.integers(2, vocab, n).tolist()} for _ in range(b)]

    def timed(reqs, n):
        sp = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, detokenize=False)
        t = time.perf_counter()
        llm.generate(reqs, sp, use_tqdm=False)
        return time.perf_counter() - t

    gen, rep = spec["gen_tokens"], spec["repeat"]
    timed(batch(max(BATCHES), PROMPT_LEN), 16)  # warm-up at the largest batch
    decode = {}
    for b in BATCHES:
        timed(batch(b, PROMPT_LEN), gen)
        t1 = [timed(batch(b, PROMPT_LEN), 1) for _ in range(rep)]
        tn = [timed(batch(b, PROMPT_LEN), gen) for _ in range(rep)]
        base = statistics.median(t1)
        rates = sorted(b * (gen - 1) / (t - base) for t in tn)
        decode[str(b)] = {"median": round(statistics.median(rates), 1), "min": round(rates[0], 1),
                          "max": round(rates[-1], 1), "t1_median_s": round(base, 4)}
        print(f"decode batch {b}: {decode[str(b)]}", flush=True)
    timed(batch(PREFILL_BATCH, PREFILL_LEN), 1)
    pre = sorted(PREFILL_BATCH * PREFILL_LEN / timed(batch(PREFILL_BATCH, PREFILL_LEN), 1) for _ in range(rep))
    out["decode_tps"] = decode
    out["prefill_tps"] = {"median": round(statistics.median(pre), 1), "min": round(pre[0], 1), "max": round(pre[-1], 1)}
    return out


def run_child(spec: dict, log: Path, timeout: int) -> dict:
    """One engine in its own process group (repack.serve.child: stopped whole at the deadline)."""
    from repack.serve.child import python_child

    r = python_child(__file__, [json.dumps(spec)], log, timeout, root=ROOT)
    rc: int | str = "timeout" if r.timed_out else (r.rc if r.rc is not None else "timeout")
    text = log.read_text(errors="replace")
    out = dict(r.result or {})
    out.update(rc=rc, wall_seconds=round(r.seconds, 1),
               kernel_lines=sorted({ln.split("] ", 1)[-1].strip()[:200] for ln in text.splitlines() if KERNEL_RE.search(ln)}))
    m = re.findall(r"Model loading took ([\d.]+) GiB", text)
    out["weights_gib"] = float(m[0]) if m else None
    if rc != 0:
        errs = [ln.strip() for ln in text.splitlines() if re.search(r"(Error|Exception|error:)", ln)]
        out["error"] = (errs[-1] if errs else " / ".join(text.strip().splitlines()[-3:]))[:400]
    return out


# ---------------------------------------------------------------- table

def table(report: dict) -> str:
    paths = report["paths"]
    base = paths.get("native-3bit", {})
    bd = base.get("decode_tps", {})
    head = ("| path | load s | weights GiB | " + " | ".join(f"decode b{b} tok/s" for b in BATCHES)
            + " | prefill tok/s |")
    lines = [head, "|" + "---|" * (4 + len(BATCHES))]
    for name, r in paths.items():
        if "decode_tps" not in r:
            lines.append(f"| {name} | – | – | " + " | ".join("–" for _ in BATCHES) + f" | not served: {r.get('error', r.get('rc'))} |")
            continue
        cells = []
        for b in BATCHES:
            d = r["decode_tps"][str(b)]
            ratio = f" ({d['median'] / bd[str(b)]['median']:.2f}×)" if str(b) in bd and name != "native-3bit" else ""
            cells.append(f"{d['median']:.0f} [{d['min']:.0f}–{d['max']:.0f}]{ratio}")
        p = r["prefill_tps"]
        pr = f" ({p['median'] / base['prefill_tps']['median']:.2f}×)" if "prefill_tps" in base and name != "native-3bit" else ""
        lines.append(f"| {name} | {r['load_seconds']} | {r.get('weights_gib')} | " + " | ".join(cells)
                     + f" | {p['median']:.0f}{pr} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path)
    ap.add_argument("--work", type=Path, default=Path("/tmp/w3bench"))
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--paths", default="native-3bit," + ",".join(f"repacked-4bit/{b}" for b in BACKENDS))
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--gen-tokens", type=int, default=64)
    ap.add_argument("--timeout", type=int, default=420, help="seconds per engine")
    ap.add_argument("--deadline", type=int, default=570, help="no engine is started after this many seconds")
    ap.add_argument("--build-only", action="store_true", help="write the checkpoints, run no engine")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        Path(args.child[1]).write_text(json.dumps(child(json.loads(args.child[0]))))
        return 0
    if args.out is None:
        ap.error("--out is required")
    start = time.monotonic()
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    built = build(args.work, args.layers, args.vocab)
    print(f"built: {built}", flush=True)
    if args.build_only:
        return 0
    res_file = args.out / f"bench-tp{args.tp}.json"
    report = json.loads(res_file.read_text()) if res_file.exists() else {}
    report.update(build=built, tp=args.tp, dtype=args.dtype, layers=args.layers, vocab=args.vocab,
                  batches=list(BATCHES), gen_tokens=args.gen_tokens, repeat=args.repeat)
    report.setdefault("paths", {})
    for name in [p for p in args.paths.split(",") if p]:
        left = args.deadline - (time.monotonic() - start)
        if left < 60:
            report["paths"].setdefault(name, {"error": "not run: out of time"})
            continue
        backend = name.split("/", 1)[1] if "/" in name else "auto"
        spec = {"model": built["src"] if name == "native-3bit" else built["dst"], "tp": args.tp, "dtype": args.dtype,
                "backend": backend, "vocab": args.vocab, "gen_tokens": args.gen_tokens, "repeat": args.repeat}
        r = run_child(spec, args.out / f"tp{args.tp}-{name.replace('/', '-')}.log", int(min(args.timeout, left)))
        report["paths"][name] = r
        print(f"{name}: rc={r['rc']} {r.get('wall_seconds')} s {r.get('error', '')}", flush=True)
        res_file.write_text(json.dumps(report, indent=1))
    info: dict = next((r for r in report["paths"].values() if "vllm" in r), {})
    print(f"\nGPU {info.get('gpu')} x{args.tp} (of {info.get('gpus')}), vLLM {info.get('vllm')}, torch {info.get('torch')}, "
          f"{args.dtype}, {args.layers} MoE layers, CUDA graphs on, decode {args.gen_tokens} tokens after "
          f"{PROMPT_LEN}-token prompts, median [min–max] of {args.repeat}; ratio vs native-3bit\n")
    print(table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
