"""End-to-end GPU check of both serving paths: the 3-bit source served natively, and the converted 4-bit model.

Builds the tiny synthetic DeepSeek checkpoint (``repack.synth``), or takes a 3-bit AutoRound export given by
``--fixture DIR`` (any family in ``FAMILIES``: the tiny ones ``tests/autoround_fixtures.py --gpu`` builds on a CPU
host), and converts it. Then, each vLLM engine in its own subprocess, through vLLM's Python API:

* the 3-bit source (``w3-*``): vLLM < 0.30 must refuse it (``bits=3 ... not supported``); vLLM >= 0.30 must
  serve it (Humming kernels) and match the float reference;
* the converted model (``w4-*``) under the backend this vLLM picks by itself, and (vLLM >= 0.30) with
  ``moe_backend="marlin"`` (``w4marlin-*``): both must match the float reference; the MoE kernel must be
  Marlin where vLLM has no other choice (< 0.30, or below sm90) and where Marlin was asked for;
* the float reference: every quantized module's ``weight`` is the exact float32 dequantization of the 3-bit
  source (``codec.dequantize``), independent of the converter;
* a fixture with an MTP layer (``model.layers.L``: GLM-4.5, DeepSeek-V3 with ``:mtp``): the converted model with
  MTP speculation (``w4mtp-*``, the family's method, one draft token), strict against the float reference and the
  run without speculation; the 3-bit source (``w3mtp-*``) and the ``--target native`` output (``nativemtp-*``) with
  the same speculation, for information.

The attention backend is the family's (``FAMILIES``: TRITON_MLA for DeepSeek MLA, TRITON_ATTN for GQA models).

The kernels each engine logged (MoE backend, linear kernels) are recorded. Prompts: short ones, one longer
than a prefill chunk (``max_num_batched_tokens`` 256, chunked prefill), the same long prompt again (prefix-cache
hit) and salted (no hit); greedy tokens and log-probs compared. Needs a CUDA GPU and vLLM importable.

    PYTHONPATH=/path/to/vllm/site:$PWD python scripts/gpu_check.py --out OUT [--tp 1,2] [--dtypes float16,bfloat16]
    PYTHONPATH=/path/to/vllm/site:$PWD python scripts/gpu_check.py --out OUT --fixture FIXTURES/glm4_moe-w3g128
    python scripts/gpu_check.py --out OUT --fixture DIR --build-only     # CPU part only: conversions and reference

Prints a pass/fail table, writes ``OUT/results.json``, ``OUT/summary.txt`` and ``OUT/engines.log``;
exits 1 on any failure.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CHUNK = 256          # max_num_batched_tokens: a 700-token prompt takes 3 scheduler steps
LONG = 700
TOL = {"float16": 0.05, "bfloat16": 0.15}  # max |logprob diff| of the chosen tokens, in nats
MARLIN_LINE = "Using 'MARLIN' WNA16 MoE backend"
REFUSAL_RE = re.compile(r"NotImplementedError.*bits=3")
KERNEL_RE = re.compile(r"(Using \S.*(MoE )?backend|Selected \w+ for \w+)")
NATIVE_FROM = (0, 30)  # the first vLLM release that serves 3-bit auto-round checkpoints (Humming kernels)
# engines run for information: their failures and differences are reported, never fail the run (the 3-bit source
# with MTP speculation fails for DeepSeek in vLLM 0.33, docs/validation.md; the native target's MTP run is new)
INFO_ENGINES = ("w3mtp", "nativemtp")


@dataclass(frozen=True)
class Family:
    """How this check serves one model family (by ``config.json`` ``model_type``) on a host without FlashInfer/FA2.

    ``mtp_method``: vLLM's speculative method for an MTP layer at ``model.layers.L``. In vLLM 0.33 the family
    names are deprecated aliases of ``"mtp"`` (``config/speculative.py``), which builds the draft from the target's
    config (``hf_config_override``: ``Glm4MoeForCausalLM`` -> ``Glm4MoeMTPModel``, ``models/glm4_moe_mtp.py``)."""

    attention_backend: str
    mtp_method: str | None = None


FAMILIES = {
    "deepseek_v3": Family("TRITON_MLA", "deepseek_mtp"),
    "glm4_moe": Family("TRITON_ATTN", "glm4_moe_mtp"),
    "qwen3_moe": Family("TRITON_ATTN"),
    "qwen2_moe": Family("TRITON_ATTN"),
    "qwen3_next": Family("TRITON_ATTN"),
}


@dataclass(frozen=True)
class Built:
    """The checkpoints of one run: ``native`` (``--target native``) only where the source has an MTP layer."""

    family: str
    src: Path
    dst: Path
    ref: Path
    native: Path | None
    mtp_layers: int
    vocab: int
    seconds: dict

    def paths(self) -> dict:
        return {"family": self.family, "src": str(self.src), "dst": str(self.dst), "ref": str(self.ref),
                "native": str(self.native) if self.native else None, "mtp_layers": self.mtp_layers,
                "vocab": self.vocab, "seconds": self.seconds}


class CheckError(Exception):
    """Bad input to the check (``--fixture``): one ``error:`` line, exit 2."""


def vllm_version() -> tuple[int, ...] | None:
    from importlib.metadata import PackageNotFoundError, version

    from packaging.version import Version

    try:
        return Version(version("vllm")).release
    except PackageNotFoundError:
        return None


def kernel_lines(text: str) -> list[str]:
    """The distinct kernel-selection lines of an engine log, without their logging prefix."""
    out: list[str] = []
    for ln in text.splitlines():
        m = KERNEL_RE.search(ln)
        if m and ln[m.start():].strip() not in out:
            out.append(ln[m.start():].strip()[:160])
    return out


# ---------------------------------------------------------------- checkpoints (CPU only)

def build(work: Path, fixture: Path | None = None) -> Built:
    """Write the 3-bit source (synthetic, or ``fixture`` as it is), the converted 4-bit model and the float
    reference under ``work``; for a source with an MTP layer also its ``--target native`` output."""
    from repack.convert import convert
    from repack.errors import UserError
    from repack.plan import Options

    t0 = time.monotonic()
    if fixture is None:
        from repack.synth import TinySpec, write_checkpoint

        src = work / "src3"
        if not (src / "config.json").exists():
            write_checkpoint(src, TinySpec())
    else:
        src = fixture.resolve()
        work = work / src.name
    family, vocab, mtp = describe_source(src)
    dst, ref, native = work / "dst4", work / "ref", (work / "native" if mtp and fixture is not None else None)
    t1 = time.monotonic()
    try:
        if fixture is not None:  # tiny: rebuilt every run, so a reused work folder never holds another fixture's
            for d in (dst, ref, native):
                if d is not None and d.exists():
                    shutil.rmtree(d)
        if not (dst / "w3repack.json").exists():
            convert(src, dst, Options())
        if native is not None:
            convert(src, native, Options(target="native", kv_b_float=False))
    except UserError as e:
        raise CheckError(str(e)) from e
    t2 = time.monotonic()
    if not (ref / "config.json").exists():
        write_reference(src, ref)
    t3 = time.monotonic()
    return Built(family, src, dst, ref, native, mtp, vocab,
                 {"source": round(t1 - t0, 2), "convert": round(t2 - t1, 2), "reference": round(t3 - t2, 2)})


def describe_source(src: Path) -> tuple[str, int, int]:
    """(family, vocab size, MTP layers that have tensors) of a checkpoint folder; ``CheckError`` if unusable.

    MTP layers count only with tensors: transformers 5 writes ``num_nextn_predict_layers: 1`` into every
    ``glm4_moe`` config, MTP weights or not."""
    cfg_path = src / "config.json"
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as e:
        raise CheckError(f"{cfg_path}: not a readable config ({e.__class__.__name__}: {e})") from e
    family = cfg.get("model_type")
    if family not in FAMILIES:
        raise CheckError(f"{cfg_path}: model_type {family!r} has no entry in this check (known: {', '.join(FAMILIES)})")
    if (cfg.get("quantization_config") or {}).get("bits") != 3:
        raise CheckError(f"{cfg_path}: not a 3-bit checkpoint (quantization_config bits "
                         f"{(cfg.get('quantization_config') or {}).get('bits')!r})")
    n, k = cfg.get("num_hidden_layers"), cfg.get("num_nextn_predict_layers") or 0
    names = set(_weight_map(src))
    mtp = sum(any(x.startswith(f"model.layers.{i}.") for x in names) for i in range(n, n + k)) if isinstance(n, int) else 0
    return family, int(cfg["vocab_size"]), mtp


def _weight_map(src: Path) -> dict:
    """Tensor name -> shard: the index's, or, for a single-file checkpoint, that file's header."""
    from repack.safetensors_io import read_header

    index = src / "model.safetensors.index.json"
    if index.exists():
        return json.loads(index.read_text())["weight_map"]
    out = {}
    for f in sorted(src.glob("*.safetensors")):
        out.update({name: f.name for name in read_header(f).tensors})
    return out


def write_reference(src: Path, ref: Path) -> None:
    """Float model of ``src`` (sharded or one file): each quantized module's ``weight`` is its exact float32
    dequantization (4-bit MTP modules included), every other tensor copied; config without quantization_config."""
    from repack import codec
    from repack.safetensors_io import build_header, read_array, read_header, to_float32

    ref.mkdir(parents=True, exist_ok=True)
    index = {"weight_map": _weight_map(src)}
    shards = sorted(set(index["weight_map"].values()))
    weight_map, total = {}, 0
    for shard in shards:
        hdr = read_header(src / shard)
        fd = os.open(src / shard, os.O_RDONLY)
        try:
            arrays = {t.name: (t.dtype, read_array(fd, hdr, t)) for t in hdr.ordered()}
        finally:
            os.close(fd)
        out = []
        for name, (dtype, arr) in arrays.items():
            if name.endswith(".qweight"):
                p = name[: -len(".qweight")]
                qz = _find(src, index, p + ".qzeros", arrays)
                sdt, sc = _find(src, index, p + ".scales", arrays, with_dtype=True)
                bits = 32 * qz.shape[1] // sc.shape[1]
                k = arr.shape[0] * 32 // bits
                w = codec.dequantize(arr, qz, to_float32(sc, sdt), bits, k // sc.shape[0])
                out.append((p + ".weight", "F32", w.astype(np.float32)))
            elif name.endswith((".qzeros", ".scales", ".g_idx")):
                continue
            else:
                out.append((name, dtype, arr))
        prefix, _ = build_header([(n, d, tuple(a.shape)) for n, d, a in out], {"format": "pt"})
        with open(ref / shard, "wb") as f:
            f.write(prefix)
            for n, _, a in out:
                f.write(np.ascontiguousarray(a).tobytes())
                total += a.nbytes
                weight_map[n] = shard
    (ref / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))
    cfg = json.loads((src / "config.json").read_text())
    cfg.pop("quantization_config", None)
    (ref / "config.json").write_text(json.dumps(cfg, indent=2))
    if (src / "generation_config.json").exists():
        (ref / "generation_config.json").write_text((src / "generation_config.json").read_text())


def _find(src, index, name, arrays, with_dtype=False):
    """A tensor from the current shard, or from the shard the index names (modules may straddle shards)."""
    from repack.safetensors_io import read_array, read_header

    if name in arrays:
        dtype, arr = arrays[name]
    else:
        path = src / index["weight_map"][name]
        hdr = read_header(path)
        fd = os.open(path, os.O_RDONLY)
        try:
            t = hdr.tensors[name]
            dtype, arr = t.dtype, read_array(fd, hdr, t)
        finally:
            os.close(fd)
    return (dtype, arr) if with_dtype else arr


def prompts(vocab: int = 1024) -> dict:
    rng = np.random.default_rng(1234)
    ids = lambda n: rng.integers(2, vocab, size=n).tolist()  # noqa: E731
    long = ids(LONG)
    return {
        "round1": {"short_4": ids(4), "short_17": ids(17), "short_61": ids(61), "long_700": long},
        "round2": {"long_700_cached": long, "long_700_plus_40": long + ids(40)},
        # same two prompts, batched, with a cache salt: no prefix hit (tells batch effects from cache effects)
        "round3": {"long_700_salted": long, "long_700_plus_40_salted": long + ids(40)},
    }


# ---------------------------------------------------------------- engine children (one per subprocess)

def _engine(spec: dict):
    from vllm import LLM

    extra: dict = {"moe_backend": spec["moe_backend"]} if spec.get("moe_backend") else {}
    if spec.get("speculative"):
        extra["speculative_config"] = dict(spec["speculative"])
        extra["disable_log_stats"] = False  # the acceptance counters of LLM.get_metrics()
    if spec.get("kv_cache_gib"):  # a fixed KV cache: no profiling, so engines sharing one GPU do not see each other
        extra["kv_cache_memory_bytes"] = int(spec["kv_cache_gib"] * 2**30)
    return LLM(model=spec["model"], tensor_parallel_size=spec.get("tp", 1), dtype=spec.get("dtype", "float16"),
               enforce_eager=True, skip_tokenizer_init=True, attention_backend=spec.get("attention_backend", "TRITON_MLA"),
               max_model_len=2048, max_num_seqs=8, max_num_batched_tokens=CHUNK, enable_chunked_prefill=True,
               enable_prefix_caching=True, gpu_memory_utilization=spec.get("gpu_memory_utilization", 0.5), seed=0,
               **extra)


def spec_metrics(llm) -> dict:
    """Speculative-decoding counters from ``LLM.get_metrics()`` (an engine built with ``disable_log_stats=False``)."""
    out = {}
    for m in llm.get_metrics():
        if "spec_decode" not in m.name:
            continue
        if hasattr(m, "values"):
            out[m.name] = list(m.values)
        elif hasattr(m, "value"):
            out[m.name] = m.value
    return out


def counter(metrics: dict, key: str) -> float | None:
    vals = [v for k, v in metrics.items() if k.removesuffix("_total").endswith(key) and not isinstance(v, list)]
    return vals[0] if vals else None


def _moe_methods(model) -> dict:
    """Quant method class of every FusedMoE layer and a few linears (runs inside the vLLM worker)."""
    out = {}
    for name, m in model.named_modules():
        qm = getattr(m, "quant_method", None)
        if qm is None:
            continue
        cls = type(m).__name__
        if "MoE" in cls or "Experts" in cls or name.endswith(("kv_b_proj", "o_proj")):
            desc = f"{cls}: {type(qm).__name__}"
            for attr in ("backend", "moe_backend", "wna16_backend", "kernel", "quant_config"):
                v = getattr(qm, attr, None)
                if v is not None and attr != "quant_config":
                    desc += f" {attr}={getattr(v, 'value', v)}"
            out[name] = desc
    return out


def child_generate(spec: dict) -> dict:
    import torch
    import vllm
    from vllm import SamplingParams

    t0 = time.monotonic()
    llm = _engine(spec)
    load_s = time.monotonic() - t0
    info = {"gpu": torch.cuda.get_device_name(0), "gpus": torch.cuda.device_count(), "vllm": vllm.__version__,
            "cc": list(torch.cuda.get_device_capability(0)),
            "torch": torch.__version__, "load_seconds": round(load_s, 1)}
    try:
        from importlib.metadata import version as _version

        info["humming"] = _version("humming-kernels")
    except Exception:  # noqa: BLE001 - vLLM < 0.30 ships no Humming
        info["humming"] = None
    try:
        import importlib  # by reference through an importable name, so TP>1 workers can unpickle it
        try:
            fn = importlib.import_module("scripts.gpu_check")._moe_methods
        except ImportError:
            fn = _moe_methods
        info["methods"] = llm.apply_model(fn)[0]
    except Exception as e:  # noqa: BLE001 - optional detail; the log line is the primary check
        info["methods_error"] = f"{type(e).__name__}: {e}"[:500]
    sp = SamplingParams(temperature=0.0, max_tokens=spec["max_tokens"], logprobs=5, detokenize=False,
                        ignore_eos=True)
    results = {}
    for rnd in ("round1", "round2", "round3"):
        names = list(spec["prompts"][rnd])
        reqs = [{"prompt_token_ids": spec["prompts"][rnd][n]} for n in names]
        if rnd == "round3":
            reqs = [dict(r, cache_salt=n) for r, n in zip(reqs, names)]
        outs = llm.generate(reqs, sp, use_tqdm=False)
        for n, o in zip(names, outs):
            c = o.outputs[0]
            results[n] = {
                "tokens": list(c.token_ids),
                "logprobs": [{str(t): float(lp.logprob) for t, lp in d.items()} for d in c.logprobs],
                "num_cached_tokens": getattr(o, "num_cached_tokens", None),
                "prompt_len": len(o.prompt_token_ids),
            }
    out: dict = {"info": info, "results": results}
    if spec.get("speculative"):
        try:
            m = spec_metrics(llm)
            out["spec_metrics"] = m
            out["acceptance"] = {"drafts": counter(m, "num_draft_tokens"), "accepted": counter(m, "num_accepted_tokens")}
        except Exception as e:  # noqa: BLE001 - counters are information, not the check
            out["metrics_error"] = f"{type(e).__name__}: {e}"[:500]
    return out


def run_child(mode: str, spec: dict, log: Path, timeout: int) -> dict:
    """Run one engine in a fresh Python process; its whole output goes to ``log``."""
    from repack.serve.child import python_child

    r = python_child(__file__, [mode, json.dumps(spec)], log, timeout, {"VLLM_ALLOW_INSECURE_SERIALIZATION": "1"}, ROOT)
    rc: int | str = "timeout" if r.timed_out or r.rc is None else r.rc
    text = log.read_text(errors="replace")
    out = dict(r.result or {})
    out.update(rc=rc, seconds=round(r.seconds, 1), log=text)
    return out


# ---------------------------------------------------------------- launcher + smoke (needs repack.serve)

CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} . {% endfor %}"
                 "{% if add_generation_prompt %}assistant :{% endif %}")


def write_tokenizer(model: Path, vocab_size: int) -> None:
    """A word-level tokenizer (``tokenizers``) covering the smoke test's words, padded to the model's vocab."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from repack.serve import smoke

    text = smoke.long_prompt(64) + " user assistant Reply with one word : hello . " + CHAT_TEMPLATE
    words = []
    for w, _ in pre_tokenizers.Whitespace().pre_tokenize_str(text):
        if w not in words:
            words.append(w)
    names = ["<s>", "</s>", "<unk>"] + words
    names += [f"w{i}" for i in range(len(names), vocab_size)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(names)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(model / "tokenizer.json"))
    (model / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "model_max_length": 4096, "chat_template": CHAT_TEMPLATE}, indent=1))
    (model / "chat_template.jinja").write_text(CHAT_TEMPLATE)


def serve_and_smoke(model: Path, gpus: int, work: Path, port: int, timeout: int, backend: str = "TRITON_MLA",
                    vocab: int = 1024) -> dict:
    """``w3repack launch`` a bash launcher, start it, wait for the server, run ``w3repack smoke``, stop it.

    vLLM is reached through ``VLLM=`` (a launcher option) pointing at a wrapper that adds only what this
    host needs: the family's Triton attention ``backend`` (no FlashInfer), eager mode, a 256-token prefill chunk (so the smoke
    test's long prompt spans several chunks on a GPU whose default chunk is larger) and the port.
    """
    import urllib.request

    rec: dict = {"gpus": gpus, "port": port}
    script = work / f"serve-{gpus}.sh"
    p = subprocess.run([sys.executable, "-m", "repack", "launch", str(model), "--gpus", str(gpus), "-o", str(script)],
                       capture_output=True, text=True, cwd=ROOT)
    rec["launch"] = {"rc": p.returncode, "output": (p.stdout + p.stderr).strip()[-600:]}
    if p.returncode:
        return rec
    rec["script"] = script.read_text()
    wrapper = work / "vllm-wrapper.sh"
    wrapper.write_text("#!/usr/bin/env bash\n"
                       f'exec "${{PYTHON:-python3}}" -m vllm.entrypoints.cli.main "$@" --attention-backend {backend} '
                       f"--enforce-eager --max-num-batched-tokens {CHUNK} --port {port}\n")
    wrapper.chmod(0o755)
    log = work / "logs" / f"serve-{gpus}.log"
    pypath = os.pathsep.join(x for x in (os.environ.get("PYTHONPATH"), str(ROOT)) if x)
    env = dict(os.environ, VLLM=str(wrapper), PYTHON=sys.executable, PYTHONPATH=pypath)
    t0 = time.monotonic()
    url = f"http://127.0.0.1:{port}"
    from repack.serve.child import Child

    with Child(["bash", str(script)], log, env, grace=30.0) as proc:  # the group is stopped on leaving
        up = False
        while time.monotonic() - t0 < timeout and proc.alive():
            try:
                with urllib.request.urlopen(url + "/v1/models", timeout=5) as r:
                    up = r.status == 200
            except OSError:
                pass
            if up:
                break
            time.sleep(2)
        rec["up"], rec["startup_seconds"] = up, round(time.monotonic() - t0, 1)
        if up:
            sm = subprocess.run([sys.executable, "-m", "repack", "smoke", url, "--json"], capture_output=True,
                                text=True, cwd=ROOT, env=env, timeout=300)
            rec["smoke_rc"] = sm.returncode
            try:
                rec["smoke"] = json.loads(sm.stdout)
            except json.JSONDecodeError:
                rec["smoke_output"] = (sm.stdout + sm.stderr)[-1500:]
            rec["greedy"] = server_greedy(url, prompts(vocab))
    text = log.read_text(errors="replace")
    rec["marlin_line"] = MARLIN_LINE in text
    rec["log_tail"] = "\n".join(text.splitlines()[-300:])
    return rec


def server_greedy(url: str, pr: dict, max_tokens: int = 24) -> dict:
    """Greedy completions of the check's own token-id prompts through the server (bf16: the config's dtype)."""
    import urllib.request

    with urllib.request.urlopen(url + "/v1/models", timeout=10) as r:
        model = json.loads(r.read())["data"][0]["id"]
    out: dict[str, dict] = {}
    for name in ("short_17", "long_700", "long_700_plus_40"):
        body = {"model": model, "prompt": pr["round1"].get(name) or pr["round2"][name], "max_tokens": max_tokens,
                "temperature": 0, "logprobs": 5, "return_tokens_as_token_ids": True, "ignore_eos": True}
        req = urllib.request.Request(url + "/v1/completions", json.dumps(body).encode(), {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                lp = json.loads(r.read())["choices"][0]["logprobs"]
        except OSError as e:
            out[name] = {"error": str(e)[:300]}
            continue
        tid = lambda t: t.split(":", 1)[1]  # noqa: E731 - "token_id:N"
        out[name] = {"tokens": [int(tid(t)) for t in lp["tokens"]],
                     "logprobs": [{tid(k): v for k, v in d.items()} | {tid(t): c}
                                  for t, c, d in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"])]}
    return out


# ---------------------------------------------------------------- comparison

def compare(a: dict, b: dict, tol: float) -> dict:
    """Greedy tokens of ``a`` against ``b``; log-prob diff of the chosen tokens up to the first split."""
    ta, tb = a["tokens"], b["tokens"]
    n = min(len(ta), len(tb))
    split = next((i for i in range(n) if ta[i] != tb[i]), None)
    upto = n if split is None else split
    diffs = [abs(a["logprobs"][i][str(ta[i])] - b["logprobs"][i][str(tb[i])]) for i in range(upto)]
    r = {"tokens_equal": split is None and len(ta) == len(tb), "first_split": split, "n": n,
         "max_lp_diff": max(diffs, default=0.0)}
    if split is not None:  # how close ``b`` was to a tie where the two split (None: a's token not in b's top 5)
        lb = b["logprobs"][split]
        r["margin_at_split"] = lb[str(tb[split])] - lb[str(ta[split])] if str(ta[split]) in lb else None
    return r


def judge(run: dict, refs: dict[str, dict], tol: float) -> dict:
    """Compare ``run`` with every reference run of the same prompt ids; keep the best.

    ``exact``: tokens equal one reference run and every chosen-token log-prob within ``tol``. ``tie``: the
    reference's own margin between its token and ours at the first split is within ``tol`` (a near tie in
    the argmax), log-probs within ``tol`` before it. Anything else is a mismatch.
    """
    best = None
    for name, ref in refs.items():
        c = compare(run, ref, tol)
        c["against"] = name
        if c["tokens_equal"] and c["max_lp_diff"] <= tol:
            c["verdict"] = "exact"
        elif c["first_split"] is not None and c["max_lp_diff"] <= tol and c["margin_at_split"] is not None \
                and c["margin_at_split"] <= tol:
            c["verdict"] = "tie"
        else:
            c["verdict"] = "mismatch"
        rank = ({"exact": 2, "tie": 1, "mismatch": 0}[c["verdict"]], c["first_split"] if c["first_split"] is not None else 99,
                name.startswith("tp1"))
        if best is None or rank > best[0]:
            best = (rank, c)
    assert best is not None
    return best[1]


def describe(c: dict, tol: float) -> str:
    s = {"exact": "tokens equal", "tie": "near tie", "mismatch": "tokens DIFFER"}[c["verdict"]]
    s += f" vs {c['against']} ({c['n']} tokens)"
    if c["first_split"] is not None:
        m = c.get("margin_at_split")
        s += f", split at {c['first_split']} (reference margin {'n/a (not in its top 5)' if m is None else f'{m:.4f}'})"
    return s + f", max |dlogprob| {c['max_lp_diff']:.4f} (tol {tol})"


def expectations(version: tuple[int, ...] | None, cc: tuple[int, int] | None) -> dict:
    """What this vLLM version must do with each path (the pass/fail definition per version)."""
    native = version is not None and tuple(version[:2]) >= NATIVE_FROM
    return {"native_served": native,
            # the converted model's MoE must be Marlin where vLLM has no faster choice for it
            "w4_marlin_by_default": not native or cc is None or cc < (9, 0)}


def evaluate(engines: dict, pr: dict, strict: set, expect: dict | None = None) -> list[dict]:
    """Pass/fail rows from the engines' records (``--from-results`` re-runs only this)."""
    rows: list[dict] = []
    expect = expect or {"native_served": False, "w4_marlin_by_default": True}

    def row(check, ok, detail, hard=True):
        status = "PASS" if ok else ("FAIL" if hard else "WARN")
        rows.append({"check": check, "pass": bool(ok) or not hard, "status": status, "detail": detail})

    flat = {n: ids for rnd in pr.values() for n, ids in rnd.items()}
    same = {n: [m for m in flat if flat[m] == ids] for n, ids in flat.items()}  # prompts with equal ids
    if "refuse" in engines:  # records of the older script
        r = engines["refuse"]
        row("vLLM refuses the 3-bit source", bool(r.get("refusal_line")) and not r.get("loaded", True),
            (r.get("refusal_line") or f"rc={r.get('rc')} loaded={r.get('loaded')}")[:220])
    names = [n for n in engines if n not in ("refuse", "serve")]
    for name in names:
        r = engines[name]
        ok = r.get("rc") == 0 and "results" in r
        kernels = "; ".join(r.get("kernel_lines", [])) or "none logged"
        if ok and r.get("speculative"):
            acc = r.get("acceptance") or {}
            rows.append({"check": f"{name} MTP acceptance", "pass": True, "status": "INFO",
                         "detail": f"{acc.get('accepted')} of {acc.get('drafts')} draft tokens accepted"
                                   if acc.get("drafts") else f"no counters ({r.get('metrics_error', 'none reported')})"})
        if name.startswith(INFO_ENGINES):
            method = (r.get("speculative") or {}).get("method")
            rows.append({"check": f"{name} serves (information)", "pass": True, "status": "INFO",
                         "detail": (f"{method} speculation: load {r.get('info', {}).get('load_seconds')} s" if ok
                                    else f"{method} speculation fails: rc={r.get('rc')} | {r.get('log_tail', '')}")[:300]})
            continue
        if name.startswith("w3") and not expect["native_served"]:
            row(f"{name}: this vLLM refuses the 3-bit source", not ok and bool(r.get("refusal_line")),
                (r.get("refusal_line") or f"rc={r.get('rc')} | {r.get('log_tail', '')}")[:220])
            continue
        row(f"{name} serves", ok, f"rc={r.get('rc')}, load {r.get('info', {}).get('load_seconds')} s, "
            f"engine total {r.get('seconds')} s{'' if ok else ' | ' + r.get('log_tail', '')}")
        if not ok:
            continue
        if name.startswith("w3"):
            row(f"{name} kernels (Humming expected)", "humming" in kernels.lower(), kernels[:300])
        elif name.startswith("w4marlin") or (name.startswith("w4") and expect["w4_marlin_by_default"]):
            row(f"{name} MoE layers on Marlin", r.get("marlin_line", False),
                f"log: {MARLIN_LINE!r} {'seen' if r.get('marlin_line') else 'MISSING'}; kernels: {kernels[:240]}")
        elif name.startswith("w4"):
            row(f"{name} kernels (vLLM's own choice)", "MoE backend" in kernels, kernels[:300])
    for name in names:
        r = engines[name]
        if "results" not in r:
            continue
        dtype, res = name.rsplit("-", 1)[1], r["results"]
        info = name.startswith(INFO_ENGINES)
        hard, tol = dtype in strict and not info, TOL[dtype]
        if name.startswith(("w3", "w4", "native")):
            ref = engines.get(f"ref-{dtype}", {}).get("results")
            if ref:
                for p in res:
                    c = judge(res[p], {m: ref[m] for m in same[p] if m in ref}, tol)
                    row(f"{name} vs float ref: {p}", c["verdict"] != "mismatch", describe(c, tol), hard)
            tp = int(name.split("-")[1][2:])
            base = None if not name.startswith("w4-") else next((engines[n]["results"] for n in names if n.startswith("w4-tp") and n.endswith(dtype)
                         and int(n.split("-")[1][2:]) < tp and "results" in engines[n]), None)
            if name.startswith("w4mtp"):  # speculation must not change the greedy tokens of the same model
                base = engines.get(f"w4-tp1-{dtype}", {}).get("results")
            if base:  # a run of either counts: the float reference itself takes both branches at a near tie
                for p in res:
                    cands = {f"tp1 {m}": base[m] for m in same[p] if m in base}
                    cands.update({f"ref {m}": ref[m] for m in same[p] if ref and m in ref})
                    c = judge(res[p], cands, tol)
                    row(f"{name} vs w4-tp1-{dtype} (or float ref): {p}", c["verdict"] != "mismatch", describe(c, tol), hard)
            hit = res["long_700_cached"]["num_cached_tokens"]
            row(f"{name} prefix-cache hit on the repeated long prompt", bool(hit), f"num_cached_tokens={hit}", not info)
            if "long_700_salted" in res:
                salted = res["long_700_salted"]["num_cached_tokens"]
                row(f"{name} no hit with a cache salt", not salted, f"num_cached_tokens={salted}", not info)
        for p in ("long_700_cached", "long_700_salted"):  # batch/cache invariance of one engine: information
            if p in res:
                c = compare(res[p], res["long_700"], tol)
                rows.append({"check": f"{name} invariance: {p} equals long_700", "pass": True,
                             "status": "same" if c["tokens_equal"] else "INFO",
                             "detail": "identical tokens" if c["tokens_equal"] else f"split at {c['first_split']}"})
    for key, sv in engines.get("serve", {}).items():
        row(f"{key}: w3repack launch wrote the launcher", sv["launch"]["rc"] == 0, sv["launch"]["output"][-160:].strip())
        if sv["launch"]["rc"]:
            continue
        row(f"{key}: server up", sv.get("up", False), f"{sv.get('startup_seconds')} s; MoE on Marlin: "
            f"{'log line seen' if sv.get('marlin_line') else 'NOT seen'}"
            + ("" if sv.get("up") else " | " + " / ".join(sv.get("log_tail", "").splitlines()[-3:])[-300:]))
        if sv.get("up"):
            checks = (sv.get("smoke") or {}).get("checks")
            if not checks:
                row(f"{key}: w3repack smoke", False, f"rc={sv.get('smoke_rc')} {sv.get('smoke_output', '')[-300:]}")
            for ch in checks or []:
                row(f"{key}: smoke {ch.get('name')}", bool(ch.get("ok")), str(ch.get("detail"))[:200])
            flat = {n: ids for rnd in pr.values() for n, ids in rnd.items()}
            for p, got in (sv.get("greedy") or {}).items():
                if "error" in got:
                    row(f"{key}: greedy {p} through the server", False, got["error"][:200])
                    continue
                cands = {f"{e} {m}": engines[e]["results"][m] for e in ("w4-tp1-bfloat16", "ref-bfloat16")
                         if "results" in engines.get(e, {}) for m in engines[e]["results"] if flat.get(m) == flat[p]}
                if cands:
                    c = judge(got, cands, TOL["bfloat16"])
                    row(f"{key}: greedy {p} through the server (bf16) vs Python API", c["verdict"] != "mismatch",
                        describe(c, TOL["bfloat16"]), "bfloat16" in strict)
    return rows


# ---------------------------------------------------------------- main

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=None, help="checkpoints go here (default OUT/../gpu_check_work)")
    ap.add_argument("--tp", default="1", help="tensor-parallel sizes for the 4-bit model, e.g. 1,2")
    ap.add_argument("--dtypes", default="float16", help="e.g. float16,bfloat16")
    ap.add_argument("--strict", default="float16",
                    help="dtypes whose token/log-prob comparisons fail the run; others print WARN (see docs/validation.md)")
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--skip-native", action="store_true", help="do not try the 3-bit source")
    ap.add_argument("--timeout", type=int, default=400, help="seconds per engine")
    ap.add_argument("--from-results", type=Path, help="re-judge a results.json of an earlier run (no GPU)")
    ap.add_argument("--serve-gpus", default="", help="also launch + smoke the converted model at these GPU counts, e.g. 1")
    ap.add_argument("--port", type=int, default=8011)
    ap.add_argument("--fixture", type=Path, help="a 3-bit AutoRound export folder (tests/autoround_fixtures.py --gpu) "
                    f"instead of the synthetic model; families: {', '.join(FAMILIES)}")
    ap.add_argument("--mtp-method", default=None, help="speculative method for a fixture's MTP layer "
                    "(default: the family's; vLLM 0.33 also takes 'mtp')")
    ap.add_argument("--build-only", action="store_true", help="write the checkpoints and the reference, run no engine")
    ap.add_argument("--engines", default="", help="comma-separated engine-name prefixes to run, e.g. ref,w4-,w4mtp "
                    "(default: all)")
    ap.add_argument("--budget", type=int, default=0, help="seconds for all engines; engines that would start "
                    "with less than 40 s left are skipped and listed (default: no limit)")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.5,
                    help="per engine; lower it to run several checks on one GPU at once")
    ap.add_argument("--kv-cache-gib", type=float, default=0.0,
                    help="a fixed KV cache per engine instead of vLLM's profiled one (checks sharing one GPU)")
    args = ap.parse_args()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    strict = set(args.strict.split(","))
    if args.from_results:
        report = json.loads(args.from_results.read_text())
        pr = prompts(report.get("paths", {}).get("vocab") or 1024)
        _backfill(report["engines"], args.from_results.parent / "engines.log")
    else:
        if args.fixture is not None and not args.fixture.is_dir():
            print(f"error: --fixture {args.fixture}: no such folder", file=sys.stderr)
            return 2
        try:
            built = build(args.work or out.parent / "gpu_check_work", args.fixture)
        except CheckError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"built {built.family} in {built.dst.parent}: {built.seconds}", flush=True)
        if args.build_only:
            (out / "results.json").write_text(json.dumps({"paths": built.paths(), "engines": {}}, indent=1) + "\n")
            return 0
        pr = prompts(built.vocab)
        report = run_engines(args, out, pr, built)
    engines = report["engines"]
    info: dict = next((e["info"] for e in engines.values() if isinstance(e, dict) and "info" in e), {})
    version = tuple(report.get("vllm_release") or vllm_version() or ())
    expect = expectations(version or None, tuple(info["cc"]) if info.get("cc") else None)
    rows = evaluate(engines, pr, strict, expect)
    report.update(checks=rows, strict=sorted(strict), tolerance=TOL, expectations=expect)
    if report.get("skipped"):
        rows.append({"check": "engines skipped (budget)", "pass": True, "status": "INFO",
                     "detail": ", ".join(report["skipped"])})
    report["environment"] = {k: info.get(k) for k in ("gpu", "gpus", "cc", "vllm", "torch", "humming")}
    failed = [r for r in rows if r["status"] == "FAIL"]
    judged = [r for r in rows if r["status"] in ("PASS", "FAIL", "WARN")]
    report["passed"] = not failed and bool(judged)
    count = {s: sum(r["status"] == s for r in rows) for s in ("PASS", "WARN", "FAIL", "same", "INFO")}
    lines = [f"GPU {info.get('gpu')} x{info.get('gpus')}, vLLM {info.get('vllm')}, torch {info.get('torch')}; "
             f"strict dtypes {sorted(strict)}", f"{'result':6}  check", "-" * 100]
    lines += [f"{r['status']:6}  {r['check']}: {r['detail']}" for r in rows]
    lines += ["-" * 100, ", ".join(f"{v} {k}" for k, v in count.items()) + (" -> PASSED" if report["passed"] else " -> FAILED")]
    summary = "\n".join(lines)
    print("\n" + summary)
    (out / "summary.txt").write_text(summary + "\n")
    (out / "results.json").write_text(json.dumps(report, indent=1) + "\n")
    return 0 if report["passed"] else 1


def _backfill(engines: dict, log: Path) -> None:
    """Records from an older version of this script: read the Marlin/refusal lines from its engines.log."""
    if not log.exists():
        return
    for part in log.read_text(errors="replace").split("===== ")[1:]:
        name, text = part.split(" ", 1)[0], part
        if name in engines:
            engines[name].setdefault("marlin_line", MARLIN_LINE in text)
            if name == "refuse":
                engines[name].setdefault("refusal_line", next(
                    (ln.strip() for ln in text.splitlines() if "NotImplementedError" in ln and "bits=3" in ln), ""))


def engine_jobs(built: Built, dtypes: list[str], tps: list[int], max_tokens: int, pr: dict, native: bool,
                skip_native: bool = False, mtp_method: str | None = None) -> list[tuple[str, str, dict]]:
    """(name, mode, spec) of every engine, in run order. MTP runs (one draft token) only for a fixture with an
    MTP layer (``built.native`` set) and a family with a method; the 3-bit and native ones only from vLLM 0.30."""
    fam = FAMILIES[built.family]
    method = mtp_method or fam.mtp_method
    mtp = {"method": method, "num_speculative_tokens": 1} if built.native is not None and method else None
    jobs = []
    for dtype in dtypes:
        spec = {"dtype": dtype, "max_tokens": max_tokens, "prompts": pr, "attention_backend": fam.attention_backend}
        jobs.append((f"ref-{dtype}", "generate", dict(spec, model=str(built.ref), tp=1)))
        if not skip_native:
            jobs.append((f"w3-tp1-{dtype}", "generate", dict(spec, model=str(built.src), tp=1)))
        jobs += [(f"w4-tp{t}-{dtype}", "generate", dict(spec, model=str(built.dst), tp=t)) for t in tps]
        if native:  # vLLM picks its own MoE backend for 4-bit from 0.30 on: Marlin too, when asked for
            jobs.append((f"w4marlin-tp1-{dtype}", "generate", dict(spec, model=str(built.dst), tp=1, moe_backend="marlin")))
        if mtp:
            jobs.append((f"w4mtp-tp1-{dtype}", "generate", dict(spec, model=str(built.dst), tp=1, speculative=mtp)))
            if native and not skip_native:
                jobs.append((f"w3mtp-tp1-{dtype}", "generate", dict(spec, model=str(built.src), tp=1, speculative=mtp)))
                jobs.append((f"nativemtp-tp1-{dtype}", "generate", dict(spec, model=str(built.native), tp=1, speculative=mtp)))
    return jobs


def run_engines(args, out: Path, pr: dict, built: Built) -> dict:
    """Run every engine of ``built`` in its own process, keep their records and log tails (``logs`` beside them)."""
    work = built.dst.parent
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    dtypes, tps = [d for d in args.dtypes.split(",") if d], [int(x) for x in args.tp.split(",")]
    version = vllm_version()
    native = version is not None and tuple(version[:2]) >= NATIVE_FROM
    jobs = engine_jobs(built, dtypes, tps, args.max_tokens, pr, native, args.skip_native, args.mtp_method)
    wanted = tuple(x for x in args.engines.split(",") if x)
    jobs = [(n, m, dict(sp, gpu_memory_utilization=args.gpu_memory_utilization, kv_cache_gib=args.kv_cache_gib)) for n, m, sp in jobs
            if not wanted or n.startswith(wanted)]
    deadline = time.monotonic() + args.budget if args.budget else None
    engines: dict = {}
    report = {"paths": built.paths(), "chunk_tokens": CHUNK, "max_tokens": args.max_tokens, "engines": engines,
              "vllm_release": list(version) if version else None}
    with open(out / "engines.log", "w") as elog:
        for name, mode, spec in jobs:
            left = args.timeout if deadline is None else int(deadline - time.monotonic())
            if left < 40:
                report.setdefault("skipped", []).append(name)
                continue
            r = run_child(mode, spec, logs / f"{name}.log", min(args.timeout, left))
            text = r.pop("log")
            r["marlin_line"] = MARLIN_LINE in text
            r["kernel_lines"] = kernel_lines(text)
            r["log_tail"] = " / ".join(text.strip().splitlines()[-3:])[-300:]
            r["refusal_line"] = next((ln.strip()[:300] for ln in text.splitlines() if REFUSAL_RE.search(ln)), "")
            if spec.get("speculative"):
                r["speculative"] = spec["speculative"]
            engines[name] = r
            print(f"{name}: rc={r['rc']} {r['seconds']} s; {'; '.join(r['kernel_lines'])[:200]}", flush=True)
            tail = text.splitlines()[-300:]
            elog.write(f"===== {name} (last {len(tail)} lines) =====\n" + "\n".join(tail) + "\n")
            elog.flush()
            (out / "results.json").write_text(json.dumps(report, indent=1) + "\n")  # partial, until the end
        for n in [int(x) for x in args.serve_gpus.split(",") if x]:
            # the smoke test's words as tokens (a fixture's own word-level tokenizer has none of them)
            if args.fixture is not None or not (built.dst / "tokenizer.json").exists():
                write_tokenizer(built.dst, built.vocab)
            sv = serve_and_smoke(built.dst, n, work, args.port + n, args.timeout,
                                 FAMILIES[built.family].attention_backend, built.vocab)
            tail = sv.pop("log_tail", "")
            sv["log_tail"] = "\n".join(tail.splitlines()[-3:])
            engines.setdefault("serve", {})[f"serve-{n}gpu"] = sv
            print(f"serve-{n}gpu: up={sv.get('up')} smoke rc={sv.get('smoke_rc')}", flush=True)
            elog.write(f"===== serve-{n}gpu =====\n{tail}\n")
    return report


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        mode, spec, res = sys.argv[2], json.loads(sys.argv[3]), Path(sys.argv[4])
        result = {"generate": child_generate}[mode](spec)
        res.write_text(json.dumps(result))
        sys.exit(0)
    sys.exit(main())
