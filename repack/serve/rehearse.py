"""Rehearse a deployment on one GPU: build one tensor-parallel rank as a one-GPU model, let stock vLLM load it
under the target's budget with the flags ``launch`` would write, and record what vLLM itself reports.

The rank model of each serving path is the model that path serves (the conversion's output, planned from the
source's headers: the dense-attention form below sm90, the MTP layer with ``--speculative``) cut to one rank by
:mod:`repack.serve.sharding` (the rules the planner uses), every layer, random valid codes. vLLM runs as ``vllm
serve`` in a process group of its own (:mod:`repack.serve.child`), with ``--gpu-memory-utilization`` scaled so that
its budget is the target's (utilization × the target card's CUDA memory ÷ this GPU's), the target's ``vllm serve``
defaults for batched tokens and sequences pinned (they depend on the card), ``--max-model-len auto`` (vLLM ≥ 0.33
then reports the longest context its KV cache holds), CUDA graphs on, and, where the target is below sm90, the
kernels vLLM picks there (Triton MLA; Marlin for 4-bit). Speed comes from :mod:`repack.serve.loadgen` over loopback.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from packaging.version import InvalidVersion, Version

from repack.errors import FormatError, UserError
from repack.serve import calibration, child, loadgen, paths, planner, sharding, vllm_log
from repack.serve.arch import Layout, spec_for

SCHEMA_VERSION = 1
GIB = 1 << 30
BATCHES = (1, 8, 32, 128)
PROMPT_LEN, GEN_TOKENS = 64, 64
PREFILL_LEN, PREFILL_BATCH = 2048, 4
REPEAT = 3
SERVED_NAME = "rehearsal"
AUTO_MAX_LEN_FROM = Version("0.33.0")  # read from vLLM 0.33.0: --max-model-len accepts "auto" (auto-fit)
SM90_ONLY_KERNELS = ("MacheteLinearKernel", "CutlassW4A8LinearKernel")
PATH_NAMES = {"native": paths.NATIVE, "repacked": paths.REPACKED}

PROBE = r"""
import json, torch
if not torch.cuda.is_available():
    print(json.dumps({"error": "torch sees no CUDA GPU"}))
else:
    free, total = torch.cuda.mem_get_info(0)
    major, minor = torch.cuda.get_device_capability(0)
    print(json.dumps({"name": torch.cuda.get_device_name(0), "free": free, "total": total,
                      "cc": f"{major}.{minor}", "torch": torch.__version__, "count": torch.cuda.device_count()}))
"""


# ---------------------------------------------------------------- what is rehearsed

@dataclass(frozen=True)
class Target:
    """The deployment one rank of which is rehearsed: ``tp`` GPUs like ``gpu`` under ``vllm serve`` defaults."""

    tp: int
    gpu: planner.Gpu
    utilization: float
    max_num_batched_tokens: int
    max_num_seqs: int
    kv_cache_dtype: str
    speculative: int
    max_model_len: int | None

    @property
    def card(self) -> calibration.CardMemory:
        return self.gpu.card

    @property
    def budget_bytes(self) -> int:
        return int(self.card.cuda_gib * self.utilization * GIB)

    def to_json(self) -> dict:
        g = self.gpu
        return {"tensor_parallel": self.tp, "gpu_memory_gib": g.memory_gib, "compute_capability": g.cc, "gpu_name": g.name,
                "cuda_memory_gib": self.card.cuda_gib, "cuda_memory_source": self.card.source,
                "gpu_memory_utilization": self.utilization, "budget_gib": round(self.budget_bytes / GIB, 3),
                "max_num_batched_tokens": self.max_num_batched_tokens, "max_num_seqs": self.max_num_seqs,
                "kv_cache_dtype": self.kv_cache_dtype, "speculative": self.speculative, "max_model_len": self.max_model_len}


def target_of(req: planner.Request) -> Target:
    tokens, seqs = calibration.default_batched_tokens(req.gpu.memory_gib, req.gpu.name)
    return Target(req.tp, req.gpu, req.utilization, req.max_num_batched_tokens or tokens, seqs, req.kv_cache_dtype,
                  req.speculative, req.max_model_len)


@dataclass
class RankPath:
    """One serving path, planned at TP N, and the one-GPU model of one of its ranks."""

    path: paths.ServingPath
    rank: sharding.RankModel
    rank_weights_gib: float
    plan_weights_gib: float

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def scratch_bytes(self) -> int:
        """Bytes the rank model takes on disk (tensor data, plus headers and configs)."""
        return self.rank.nbytes + len(self.rank.tensors) * 256 + (1 << 20)

    def dry_json(self) -> dict:
        return {"name": self.name, "rank_config": self.rank.config, "rank_weights_gib": round(self.rank_weights_gib, 3),
                "plan_weights_gib": self.plan_weights_gib, "scratch_bytes": self.scratch_bytes}


def prepare(model: planner.Model, req: planner.Request, which: str, vllm_version: str,
            dense_attention: bool | None = None) -> tuple[paths.PathsReport, list[RankPath]]:
    """The serving paths of ``model`` for ``req`` and the rank model of each one asked for (``which``: native,
    repacked or both); UserError where a path cannot run or ``req.tp`` does not split the model.
    ``dense_attention``: serve a DeepSeek-V3.2 model in its dense-attention form (None: below sm90 only)."""
    if req.pp > 1 or req.ep:
        raise UserError("rehearse builds tensor-parallel ranks only (no pipeline stages, no expert parallelism): "
                        "leave out --nodes / --pipeline-parallel / --expert-parallel")
    report = paths.plan_paths(model, req, vllm_version=vllm_version, dense_attention=dense_attention)
    names = [p.name for p in report.paths]
    wanted = names if which == "both" else [PATH_NAMES[which]]
    if any(w not in names for w in wanted):
        raise UserError(f"{model.root}: the model has one serving path ({names[0]}); --path {which} does not apply")
    out = []
    for p in report.paths:
        if p.name not in wanted:
            continue
        if not p.runnable:
            if which != "both":
                raise UserError(f"the {p.name} path cannot run: {p.why_not}")
            continue
        m = p.model or model
        rank = sharding.rank_model(m.spec, m.tensors, Layout(req.tp))
        rank_model = planner.Model(m.root, rank.config, [(n, d, s, sharding_bytes(d, s)) for n, d, s in rank.tensors])
        w = planner.weights_per_gpu(rank_model, 1, 1, mtp=bool(req.speculative))
        out.append(RankPath(p, rank, w.per_stage[0] / GIB, p.plan.weights_gib_per_gpu))
    if not out:
        raise UserError("no serving path of this model can run here: " + "; ".join(p.why_not for p in report.paths))
    return report, out


def sharding_bytes(dtype: str, shape: tuple[int, ...]) -> int:
    from repack.safetensors_io import DTYPE_SIZES

    n = DTYPE_SIZES[dtype]
    for d in shape:
        n *= d
    return n


def dry_run(req: planner.Request, ranks: list[RankPath]) -> dict:
    return {"schema_version": SCHEMA_VERSION, "tensor_parallel": req.tp, "target": target_of(req).to_json(),
            "paths": [r.dry_json() for r in ranks]}


# ---------------------------------------------------------------- the local GPU

@dataclass(frozen=True)
class LocalGpu:
    name: str
    cc: str
    free_bytes: int
    total_bytes: int
    torch: str
    vllm: str

    def to_json(self) -> dict:
        return {"gpu": self.name, "compute_capability": self.cc, "cuda_memory_gib": round(self.total_bytes / GIB, 3),
                "free_gib": round(self.free_bytes / GIB, 3), "torch": self.torch, "vllm": self.vllm}


def probe_local(python: str, work: Path) -> LocalGpu:
    """This machine's first GPU (through torch in ``python``) and vLLM; UserError when either is missing."""
    from repack.serve.launcher import installed_vllm

    vllm = installed_vllm()
    if vllm is None:
        raise UserError("vLLM is not installed in this Python (pip install 'w3repack[serve]'): rehearse runs the "
                        "installed stock vLLM")
    log = work / "probe.log"
    r = child.run([python, "-c", PROBE], log, timeout=180)
    try:
        info = json.loads(r.log_tail.strip().splitlines()[-1]) if r.rc == 0 else {}
    except (ValueError, IndexError):
        info = {}
    if not info or "error" in info:
        why = info.get("error") or (r.log_tail.strip().splitlines() or ["torch did not start"])[-1][:200]
        raise UserError(f"no usable GPU here ({why}): rehearse runs vLLM on a local CUDA GPU")
    return LocalGpu(info["name"], info["cc"], int(info["free"]), int(info["total"]), info["torch"], vllm)


# ---------------------------------------------------------------- one engine

def engine_args(rp: RankPath, target: Target, local: LocalGpu, vllm: str, rank_dir: Path,
                port: int) -> tuple[list[str], dict[str, str], list[str]]:
    """``vllm serve`` arguments for the rank model (after ``serve``), extra environment, and notes on what differs
    from the command line ``launch`` writes for the target (the plan's arguments, engine arguments after ``--``
    included, and the version's flags)."""
    from repack.serve.launcher import version_flags

    m = rp.path.model
    flags = version_flags(vllm, m, target.gpu, rp.name, target.speculative).args if m is not None else []
    plan_args = [*rp.path.plan.vllm_args, *flags]
    util = target.budget_bytes / local.total_bytes
    try:
        auto = Version(vllm) >= AUTO_MAX_LEN_FROM
    except InvalidVersion:
        auto = False
    out: list[str] = []
    i = 0
    while i < len(plan_args):
        a = plan_args[i]
        if a in ("--tensor-parallel-size", "--pipeline-parallel-size"):
            i += 2
            continue
        if a == "--gpu-memory-utilization":
            out += [a, f"{util:.6f}"]
            i += 2
            continue
        if a == "--max-model-len" and auto:
            i += 2
            continue
        out.append(a)
        i += 1
    notes = [f"--tensor-parallel-size 1 (one rank of TP {target.tp}); --gpu-memory-utilization {util:.6f} of this "
             f"{local.name} = the target's {target.utilization:g} x {target.card.cuda_gib} GiB"]
    given = set(out)
    if auto:
        out += ["--max-model-len", "auto"]
        notes.append("--max-model-len auto: vLLM reports the longest context its KV cache holds")
    if "--max-num-batched-tokens" not in given:
        out += ["--max-num-batched-tokens", str(target.max_num_batched_tokens)]
    if "--max-num-seqs" not in given:
        out += ["--max-num-seqs", str(target.max_num_seqs)]
    notes.append(f"the target's vllm serve defaults pinned: --max-num-batched-tokens {target.max_num_batched_tokens} "
                 f"--max-num-seqs {target.max_num_seqs}")
    env: dict[str, str] = {}
    if target.gpu.cc_tuple < (9, 0) <= planner.Gpu(1, 1.0, local.cc).cc_tuple:
        disabled = list(SM90_ONLY_KERNELS)
        if rp.path.model is not None and rp.path.model.mla and "--attention-backend" not in given:
            out += ["--attention-backend", "TRITON_MLA"]
        if rp.name == paths.REPACKED:
            disabled.append("HummingLinearKernel")
            if "--moe-backend" not in given:
                out += ["--moe-backend", "marlin"]
        env["VLLM_DISABLED_KERNELS"] = ",".join(disabled)
        notes.append(f"kernels as cc {target.gpu.cc} picks them: " + " ".join(a for a in out if a in ("TRITON_MLA", "marlin"))
                     + f" VLLM_DISABLED_KERNELS={env['VLLM_DISABLED_KERNELS']}")
    out = [str(rank_dir), *out, "--skip-tokenizer-init", "--served-model-name", SERVED_NAME, "--host", "127.0.0.1",
           "--port", str(port)]
    return out, env, notes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class PathRun:
    """One path's rehearsal: the engine's own report and the speeds measured against it."""

    name: str
    argv: list[str]
    env: dict[str, str]
    notes: list[str]
    served: bool = False
    exit: dict = field(default_factory=dict)
    engine: vllm_log.EngineReport = field(default_factory=vllm_log.EngineReport)
    kv_cache_tokens: int | None = None       # num_gpu_blocks x block_size, from /metrics
    num_gpu_blocks: int | None = None
    block_size: int | None = None
    max_model_len: int | None = None         # from /v1/models: the longest context vLLM accepts
    decode: dict[str, dict] = field(default_factory=dict)
    prefill: dict | None = None
    skipped: list[str] = field(default_factory=list)
    error: str | None = None
    seconds: float = 0.0

    def to_json(self) -> dict:
        return {"argv": self.argv, "env": self.env, "notes": self.notes, "served": self.served, "exit": self.exit,
                "engine": self.engine.to_json(), "kv_cache_tokens": self.kv_cache_tokens,
                "num_gpu_blocks": self.num_gpu_blocks, "block_size": self.block_size, "max_model_len": self.max_model_len,
                "decode_tokens_per_s": self.decode, "prefill_tokens_per_s": self.prefill, "skipped": self.skipped,
                "error": self.error, "seconds": round(self.seconds, 1)}


def run_path(rp: RankPath, target: Target, local: LocalGpu, work: Path, python: str, timeout: float,
             log: Path, keep: bool) -> PathRun:
    """Write the rank model under ``work``, serve it, read vLLM's report, measure speed; the model is removed
    again unless ``keep``."""
    rank_dir = work / f"rank-{rp.name}"
    if rank_dir.is_symlink() or (rank_dir.exists() and not (rank_dir / "config.json").is_file()):
        raise UserError(f"--work: {rank_dir} exists and is not a rank model rehearse wrote; move it away")
    if rank_dir.exists():
        shutil.rmtree(rank_dir)
    from repack.synth import write_random_checkpoint

    start = time.monotonic()
    try:
        write_random_checkpoint(rank_dir, rp.rank.config, rp.rank.tensors)
        port = free_port()
        args, env_extra, notes = engine_args(rp, target, local, local.vllm, rank_dir, port)
        argv = [python, "-m", "vllm.entrypoints.cli.main", "serve", *args]
        cfg = work / "vllm-logging.json"
        _write_file(cfg, json.dumps(vllm_log.LOGGING_CONFIG).encode())
        env = {**os.environ, **rp.path.plan.env, **env_extra, "VLLM_LOGGING_CONFIG_PATH": str(cfg),
               "PYTHONUNBUFFERED": "1"}
        run = PathRun(rp.name, ["vllm", "serve", *args], {**rp.path.plan.env, **env_extra}, notes)
        deadline = start + timeout
        vocab = int(rp.rank.config.get("vocab_size") or 1024)
        client = loadgen.Client("127.0.0.1", port, SERVED_NAME, vocab, timeout=300.0)
        with child.Child(argv, log, env) as c:
            if loadgen.wait_ready(client, c.alive, deadline):
                run.served = True
                try:
                    measure(run, client, target, deadline)
                except (loadgen.LoadError, OSError) as e:
                    run.error = f"while measuring: {e}"[:500]
            elif c.alive():
                run.error = f"not serving after {timeout:.0f} s (--timeout)"
            rc = c.proc.poll()
            run.exit = {"rc": rc, "stopped_by_rehearse": rc is None}
        run.engine = vllm_log.parse(log.read_text(errors="replace"), local.total_bytes / GIB)
        if not run.served and run.error is None:
            last = child.tail(log, 300).strip().splitlines()
            run.error = run.engine.error or (last[-1] if last else "the engine exited without a word")
        run.seconds = time.monotonic() - start
        return run
    finally:
        if not keep:
            shutil.rmtree(rank_dir, ignore_errors=True)


def measure(run: PathRun, client: loadgen.Client, target: Target, deadline: float) -> None:
    models = json.loads(client.get("/v1/models"))
    data = models.get("data") or [{}]
    run.max_model_len = data[0].get("max_model_len")
    info = vllm_log.cache_config_info(client.get("/metrics"))
    if info.get("num_gpu_blocks", "").isdigit() and info.get("block_size", "").isdigit():
        run.num_gpu_blocks, run.block_size = int(info["num_gpu_blocks"]), int(info["block_size"])
        run.kv_cache_tokens = run.num_gpu_blocks * run.block_size
    room = run.kv_cache_tokens or (1 << 40)
    for b in BATCHES:
        if b > target.max_num_seqs or b * (PROMPT_LEN + GEN_TOKENS) > room:
            run.skipped.append(f"decode batch {b}: the KV cache holds {room} tokens / {target.max_num_seqs} sequences")
            continue
        if time.monotonic() > deadline - 30:
            run.skipped.append(f"decode batch {b}: out of time")
            continue
        run.decode[str(b)] = client.decode(b, PROMPT_LEN, GEN_TOKENS, REPEAT).to_json()
    n = min(PREFILL_LEN, (run.max_model_len or PREFILL_LEN + 1) - 1)
    if PREFILL_BATCH * (n + 1) > room or time.monotonic() > deadline - 30:
        run.skipped.append("prefill: KV cache too small or out of time")
    else:
        run.prefill = {**client.prefill(PREFILL_BATCH, n, REPEAT).to_json(), "batch": PREFILL_BATCH, "prompt_tokens": n}


# ---------------------------------------------------------------- the rehearsal file

def now() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


@dataclass
class Rehearsal:
    """``rehearsal.json``: target, local GPU, and per path the plan, the rank model and what vLLM measured."""

    data: dict

    @classmethod
    def load(cls, path: Path) -> Rehearsal:
        from repack.checkpoint import load_json

        d = load_json(path, "rehearsal")
        if not isinstance(d, dict) or d.get("schema_version") != SCHEMA_VERSION or not isinstance(d.get("paths"), list):
            raise FormatError(f"{path}: not a w3repack rehearsal (schema_version {SCHEMA_VERSION} with paths)")
        for p in d["paths"]:
            if not isinstance(p, dict) or p.get("name") not in (paths.NATIVE, paths.REPACKED):
                raise FormatError(f"{path}: a path entry without a known name")
        if not isinstance(d.get("target"), dict) or not isinstance(d.get("local"), dict):
            raise FormatError(f"{path}: no target or local GPU record")
        for p in d["paths"]:
            why = _bad_entry(p)
            if why:
                raise FormatError(f"{path}: path {p['name']}: {why}")
        return cls(d)

    @property
    def where(self) -> str:
        loc = self.data["local"]
        return f"rehearsal on {loc.get('gpu')}, vLLM {loc.get('vllm')}, {str(self.data.get('date', '?'))[:10]}"

    def check(self, req: planner.Request) -> None:
        """UserError naming the first fact in which ``req`` differs from the rehearsed target."""
        t, mine = self.data["target"], target_of(req).to_json()
        for key in ("tensor_parallel", "gpu_memory_gib", "compute_capability", "gpu_memory_utilization",
                    "max_num_batched_tokens", "kv_cache_dtype", "speculative"):
            if t.get(key) != mine[key]:
                raise UserError(f"--rehearsal: it rehearsed {key} {t.get(key)!r}, this plan has {mine[key]!r}; "
                                "rehearse again with the same options")

    def entry(self, name: str) -> dict | None:
        return next((p for p in self.data["paths"] if p["name"] == name), None)

    def measured_kv(self, name: str, req: planner.Request, architecture: str) -> planner.MeasuredKV | None:
        """vLLM's KV cache for path ``name`` of a plan for ``req`` serving ``architecture`` (the served model's: a
        DeepSeek-V3.2 model's dense-attention form is DeepseekV3ForCausalLM); UserError where they differ."""
        self.check(req)
        p = self.entry(name)
        served = ((p or {}).get("rank_config") or {}).get("architectures") or ["?"]
        if p is not None and served[0] != architecture:
            raise UserError(f"--rehearsal: it served {name} as {served[0]}, this plan serves {architecture} (the "
                            "dense-attention form is DeepseekV3ForCausalLM: --dense-attention / --sparse-attention)")
        m = (p or {}).get("measured") or {}
        eng = m.get("engine") or {}
        if not m.get("served") or eng.get("kv_cache_gib") is None or not m.get("kv_cache_tokens"):
            return None
        usable = m["kv_cache_tokens"] - (m.get("block_size") or 0)  # one block stays in vLLM's pool
        return planner.MeasuredKV(float(eng["kv_cache_gib"]), int(usable), self.where)

    def speed_ratio(self) -> paths.Measured | None:
        """The repacked path's decode and prefill speed over the native path's, where both were measured."""
        nat, rep = self.entry(paths.NATIVE), self.entry(paths.REPACKED)
        if not nat or not rep:
            return None
        dn = (nat.get("measured") or {}).get("decode_tokens_per_s") or {}
        dr = (rep.get("measured") or {}).get("decode_tokens_per_s") or {}
        common = [b for b in dn if b in dr and dn[b].get("median")]
        if not common:
            return None
        pn = (nat.get("measured") or {}).get("prefill_tokens_per_s") or {}
        pr = (rep.get("measured") or {}).get("prefill_tokens_per_s") or {}
        loc = self.data["local"]
        kernels = "; ".join(k for k in ((rep.get("measured") or {}).get("engine") or {}).get("kernels", []) if "MoE" in k)
        return paths.Measured(paths.gpu_family(str(loc.get("compute_capability", "0.0"))), int(self.data["target"]["tensor_parallel"]),
                              str(loc.get("vllm")), kernels or "vLLM's choice",
                              {int(b): round(dr[b]["median"] / dn[b]["median"], 3) for b in common},
                              round(pr["median"] / pn["median"], 3) if pr.get("median") and pn.get("median") else 0.0,
                              source=self.where + " (rank shapes)",
                              arch=spec_for(rep.get("rank_config") or {}).name)


def _bad_entry(p: dict) -> str | None:
    """What is wrong with the parts of a path entry that plan and launch read (types and ranges), or None."""
    import math

    def num(v: object, hi: float) -> bool:
        return v is None or (not isinstance(v, bool) and isinstance(v, (int, float)) and 0 <= v <= hi
                             and math.isfinite(v))

    def speed(v: object) -> bool:  # 0 (none measured) or at least 1e-6 tokens/s: the ratios of two stay finite
        med = v.get("median") if isinstance(v, dict) else None
        return v is None or (isinstance(v, dict) and num(med, 1e12) and not (med and med < 1e-6))

    rc = p.get("rank_config")
    if rc is not None and not (isinstance(rc, dict) and isinstance(rc.get("architectures", []), list)
                               and all(isinstance(a, str) for a in rc.get("architectures", []))):
        return "rank_config is not a config with a list of architectures"
    m = p.get("measured")
    if m is None:
        return None
    if not isinstance(m, dict):
        return "measured is not an object"
    eng = m.get("engine")
    if eng is not None and not (isinstance(eng, dict) and num(eng.get("kv_cache_gib"), 1 << 20)
                                and isinstance(eng.get("kernels", []), list)
                                and all(isinstance(k, str) for k in eng.get("kernels", []))):
        return "measured.engine is not an object with kv_cache_gib a number in [0, 1048576] and a list of kernels"
    for key in ("kv_cache_tokens", "block_size"):
        v = m.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 1 << 53):
            return f"measured.{key} is {str(v)[:40]!r}, not an integer in [0, 2^53]"
    dec = m.get("decode_tokens_per_s")
    if dec is not None and not (isinstance(dec, dict) and all(isinstance(b, str) and b.isascii() and b.isdigit()
                                                               and len(b) <= 6 and speed(v) for b, v in dec.items())):
        return "measured.decode_tokens_per_s is not batch sizes to {median: tokens per second}"
    if not speed(m.get("prefill_tokens_per_s")):
        return "measured.prefill_tokens_per_s is not {median: tokens per second}"
    return None


def record(rp: RankPath, run: PathRun | None) -> dict:
    p = rp.path.plan
    return {"name": rp.name, "rank_config": rp.rank.config, "rank_weights_gib": round(rp.rank_weights_gib, 3),
            "plan_weights_gib": rp.plan_weights_gib, "scratch_bytes": rp.scratch_bytes,
            "planned": {"weights_gib": p.weights_gib_per_gpu, "kv_cache_gib": p.kv_cache_gib,
                        "capacity_tokens": p.capacity_tokens, "max_model_len": p.max_model_len, "fits": rp.path.fits,
                        "allowances_gib": p.allowances_gib, "kv_bytes_per_token": p.kv_bytes_per_token,
                        "vllm_args": p.vllm_args},
            "measured": run.to_json() if run else None}


def rehearse(model_label: str, model: planner.Model, req: planner.Request, ranks: list[RankPath], work: Path,
             output: Path, timeout: float, keep: bool, append: Rehearsal | None = None,
             python: str | None = None, progress=None, dense_attention: bool = False) -> Rehearsal:
    """Run every rank in ``ranks`` (one engine at a time), writing ``output`` after each; the rehearsal."""
    python = python or sys.executable
    if work.is_symlink() or (work.exists() and not work.is_dir()):
        raise UserError(f"--work {work}: not a folder (a link or a file is there); give a folder for the rank models")
    work.mkdir(parents=True, exist_ok=True)
    work = work.resolve()
    need = sum(r.scratch_bytes for r in ranks) if keep else max(r.scratch_bytes for r in ranks)
    free = shutil.disk_usage(work).free
    if free < need + GIB:
        raise UserError(f"{work}: {free / GIB:.1f} GiB free, the rank model{'s' if keep and len(ranks) > 1 else ''} "
                        f"need {need / GIB:.1f} GiB (and 1 GiB to spare): use --work on a larger disk")
    local = probe_local(python, work)
    target = target_of(req)
    if local.free_bytes < target.budget_bytes + GIB // 2:
        raise UserError(f"the local {local.name} has {local.free_bytes / GIB:.2f} GiB free; the target's budget is "
                        f"{target.budget_bytes / GIB:.2f} GiB ({target.utilization:g} x {target.card.cuda_gib} GiB) plus "
                        "0.5 GiB for the CUDA context: free the GPU or rehearse a smaller target")
    data = {"schema_version": SCHEMA_VERSION, "tool": _tool_version(), "date": now(), "model": model_label,
            "architecture": (model.config.get("architectures") or ["?"])[0], "target": target.to_json(),
            "dense_attention": dense_attention,
            "local": local.to_json(), "paths": []}
    if append is not None:
        if (append.data["target"], append.data.get("model"), bool(append.data.get("dense_attention"))) != (
                data["target"], model_label, dense_attention):
            raise UserError(f"--append: {output} is a rehearsal of another model or target")
        data["paths"] = [p for p in append.data["paths"] if p["name"] not in {r.name for r in ranks}]
    for rp in ranks:
        if progress:
            progress(f"{rp.name}: writing the rank model ({rp.scratch_bytes / GIB:.2f} GiB) and starting vLLM")
        run = run_path(rp, target, local, work, python, timeout, work / f"vllm-{rp.name}.log", keep)
        data["paths"].append(record(rp, run))
        data["paths"].sort(key=lambda p: p["name"])
        _write(output, data)
        if progress:
            progress(f"{rp.name}: " + ("served" if run.served else f"not served: {run.error}"))
    return Rehearsal(data)


def _write(path: Path, data: dict) -> None:
    """``rehearsal.json`` (the first write creates it, later ones replace it whole)."""
    _write_file(path, (json.dumps(data, indent=1) + "\n").encode(), "--output")


def _write_file(path: Path, data: bytes, option: str = "--work") -> None:
    """A file rehearse writes, never through a link (:func:`repack.serve.shell.write_script`)."""
    from repack.serve.shell import write_script

    write_script(path, data, overwrite=True, mode=0o644, option=option)


def _tool_version() -> str:
    from repack import __version__

    return f"w3repack {__version__}"

