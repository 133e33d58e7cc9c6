"""Two ways to serve a 3-bit checkpoint with stock vLLM, planned side by side, and the one to take.

* ``native-3bit``: vLLM >= 0.30 serves the 3-bit auto-round source itself (Humming kernels). What it cannot load
  is fixed first by ``w3repack convert --target native`` (quantized V3.2 indexer, MTP layer widths); the plan is
  of that output.
* ``repacked-4bit``: the ``w3repack convert`` output (4-bit GPTQ; Marlin below sm90, Humming or Marlin on sm90).

Each path's memory plan comes from ``planner`` over the tensors the conversion would write (``plan.build_plan``
on the source's headers: no byte is read or written). Speed comes from a rehearsal (``--rehearsal``), else from
``MEASURED``: ratios measured by rehearsals at the shapes of one rank (docs/benchmarks.md), used only for the GPU
family and tensor-parallel size they were measured at (the shapes decide the answer: a 4-layer full-width model
and a TP-8 rank of the same model gave opposite ratios). The recommendation: a path that cannot run is out (vLLM
version, engine, MTP speculation, fit); of two that fit, the repack only when it was measured faster by more than
``FASTER`` (geometric mean of the decode ratios), else the native path, which needs less memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from packaging.version import Version

from repack.serve import planner

NATIVE = "native-3bit"
REPACKED = "repacked-4bit"
NATIVE_MIN_VLLM = "0.30.0"  # first release that serves 3-bit auto-round checkpoints (Humming)
REPACKED_MIN_VLLM = "0.26.0"  # oldest release this project validated the 4-bit output on
FASTER = 1.10
MARLIN_TILE_N, MARLIN_TILE_K = 64, 128  # Marlin's minimum thread tile: per-rank N and K must be multiples


@dataclass(frozen=True)
class Measured:
    """Decode and prefill tokens/s of the repacked path ÷ the native path at the shapes of one rank of ``tp`` of a
    model family (``arch``: the ArchSpec name), on a GPU family."""

    gpu_family: str
    tp: int
    vllm: str
    backend: str
    decode: dict[int, float]
    prefill: float
    source: str = "docs/benchmarks.md"
    arch: str = "deepseek"

    @property
    def decode_geomean(self) -> float:
        return math.exp(sum(math.log(r) for r in self.decode.values()) / len(self.decode))

    def to_json(self) -> dict:
        return {"gpu_family": self.gpu_family, "tensor_parallel": self.tp, "vllm": self.vllm, "backend": self.backend,
                "decode_ratio_by_batch": {str(k): v for k, v in self.decode.items()},
                "decode_ratio_geomean": round(self.decode_geomean, 3), "prefill_ratio": self.prefill,
                "source": self.source}


# Repacked ÷ native at the shapes of one rank, from rehearsals with both paths served on one GPU in one session
# (medians of 3; docs/benchmarks.md gives the spreads: at batch 32 they overlap, so that ratio is noise-level).
MEASURED: tuple[Measured, ...] = (
    Measured("sm90", 8, "0.33.0", "Humming (vLLM's choice: HUMMING WNA16 MoE, Humming/Machete linear)",
             decode={1: 0.891, 8: 0.855, 32: 1.111, 128: 0.823}, prefill=0.996,
             source="docs/benchmarks.md: rehearsal of the DeepSeek-V3.2-REAP-345B TP-8 rank for 8 x H200 (dense "
                    "attention), one H200, vLLM 0.33.0, 2026-12-02"),
)


def gpu_family(cc: str) -> str:
    major, _, minor = cc.partition(".")
    return f"sm{major}{minor or '0'}"


def measured_for(cc: str, tp: int, arch: str) -> Measured | None:
    """The rank-shape measurement of this model family on this GPU family at this tensor-parallel size, if any."""
    return next((m for m in MEASURED if m.gpu_family == gpu_family(cc) and m.tp == tp and m.arch == arch), None)


@dataclass
class TpCheck:
    what: str
    ok: bool
    detail: str

    def to_json(self) -> dict:
        return {"what": self.what, "ok": self.ok, "detail": self.detail}


@dataclass
class ServingPath:
    name: str
    plan: planner.MemoryPlan
    min_vllm_version: str
    kernel: str
    prepare: list[str]
    runnable: bool = True
    why_not: str = ""
    measured: Measured | None = None
    tp_checks: list[TpCheck] = field(default_factory=list)
    model: planner.Model | None = field(default=None, repr=False)  # the model this path serves (headers only)

    @property
    def fits(self) -> bool:
        """The plan's one verdict: memory and a layout that splits the model into whole ranks."""
        return self.plan.fits

    def to_json(self) -> dict:
        p = self.plan
        return {"name": self.name, "weights_gib_per_gpu": p.weights_gib_per_gpu, "fits": self.fits,
                "max_model_len": p.max_model_len, "min_vllm_version": self.min_vllm_version,
                "vllm_args": p.vllm_args, "kernel": self.kernel, "prepare": self.prepare,
                "runnable": self.runnable, "why_not": self.why_not, "reason": p.reason,
                "kv_cache_gib": p.kv_cache_gib, "capacity_tokens": p.capacity_tokens,
                "measured_speed": self.measured.to_json() if self.measured else None,
                "tp_checks": [c.to_json() for c in self.tp_checks]}


@dataclass
class PathsReport:
    source_bits: list[int]
    paths: list[ServingPath]
    recommended: str
    reason: str

    def path(self, name: str) -> ServingPath:
        return next(p for p in self.paths if p.name == name)

    def to_json(self) -> dict:
        """The recommended path's memory plan (the keys ``plan`` always had) plus ``paths`` and ``recommended``."""
        rec = self.path(self.recommended)
        return {**rec.plan.to_json(), "fits": rec.fits, "source_bits": self.source_bits,
                "paths": [p.to_json() for p in self.paths], "recommended": self.recommended,
                "recommendation_reason": self.reason}


def is_low_bit(model: planner.Model) -> bool:
    """Quantized below 4 bits anywhere (widths from shapes, as the converter reads them)."""
    return any(b < 4 for b in planner.quant_bits(model))


def virtual_output(model: planner.Model, **options) -> tuple[planner.Model, bool]:
    """The model ``w3repack convert`` would write from ``model`` with these options (headers only), and whether
    it differs from the source at all (a conversion is needed)."""
    from repack.checkpoint import open_checkpoint
    from repack.plan import Options, build_plan

    key = tuple(sorted(options.items()))
    if key in model.derived:
        return model.derived[key]
    p = build_plan(model.ckpt or open_checkpoint(model.root), Options(**options))  # type: ignore[arg-type]
    tensors = [(o.out_name, o.out_dtype, tuple(o.out_shape or ()), o.out_nbytes)
               for s in p.shards for o in s.ops if o.out_name is not None and o.out_dtype is not None]
    changed = p.config != model.config or any(o.op.value != "copy" for s in p.shards for o in s.ops)
    model.derived[key] = planner.Model(model.root, p.config, tensors), changed
    return model.derived[key]


def tp_checks(model: planner.Model, tp: int, bits: int, marlin: bool = True, ep: bool = False) -> list[TpCheck]:
    """Whether each rank's slice of attention heads and of every split MLP holds whole quantization groups,
    whole packed words (``bits``-bit codes along K) and, for 4 bits on Marlin, whole Marlin tiles; under expert
    parallelism the routed experts are whole and not checked. The plan's verdict comes from the same rules applied
    to every tensor (``sharding.layout_problems``)."""
    c = model.config
    out = []
    heads = int(c.get("num_attention_heads") or 0)
    if heads:
        out.append(TpCheck("attention heads", heads % tp == 0, f"{heads} heads / TP {tp}"
                           + ("" if heads % tp == 0 else ": not divisible")))
    qc = c.get("quantization_config") or {}
    group = int(qc.get("group_size") or 128) if isinstance(qc, dict) else 128
    word = 32 if bits == 3 else 32 // bits if bits else 8  # codes per packing unit along K
    for key, what in (("moe_intermediate_size", "expert"), ("intermediate_size", "dense MLP")):
        if ep and key == "moe_intermediate_size":
            continue
        inter = int(c.get(key) or 0)
        if not inter:
            continue
        if inter % tp:
            out.append(TpCheck(f"{what} width", False, f"{inter} / TP {tp}: not divisible"))
            continue
        per = inter // tp
        fails = [f"{per} is not a multiple of the group size {group}" if group > 0 and per % group else "",
                 f"{per} does not hold whole {bits}-bit words ({word} codes)" if per % word else ""]
        if bits == 4 and marlin:
            fails.append(f"{per} is not a multiple of Marlin's tiles (N {MARLIN_TILE_N}, K {MARLIN_TILE_K})"
                         if per % MARLIN_TILE_N or per % MARLIN_TILE_K else "")
        fails = [f for f in fails if f]
        out.append(TpCheck(f"{what} slice per rank", not fails, f"{inter} / TP {tp} = {per}" + ("; " + "; ".join(fails) if fails else "")))
    return out


def kernel(path: str, cc: str, vllm: str | None) -> str:
    v = Version(vllm) if vllm else None
    sm90 = planner.Gpu(1, 1.0, cc).cc_tuple >= (9, 0)
    if path == NATIVE:
        return "Humming (JIT-compiled at first load)" if v is None or v >= Version(NATIVE_MIN_VLLM) else "none: refused"
    if sm90 and (v is None or v >= Version("0.30.0")):
        return "Humming by default on sm90 (MoE and dense); Marlin with --moe-backend marlin"
    return "Marlin"


def plan_paths(model: planner.Model, req: planner.Request, *, vllm_version: str | None = None,
               engine: str = "vllm", dense_attention: bool | None = None, rehearsal=None) -> PathsReport:
    """Both paths for a 3-bit source (one for a model already in 4 bits), and the recommendation.

    ``rehearsal`` (a :class:`repack.serve.rehearse.Rehearsal` of this model and target): each path it measured gets
    vLLM's own KV cache figure and the measured speed ratio instead of the calibrated ones."""
    bits = sorted(planner.quant_bits(model))
    dense = dense_attention if dense_attention is not None else (model.v32 and req.gpu.cc_tuple < (9, 0))
    v = Version(vllm_version) if vllm_version else None
    req = replace(req, vllm_version=req.vllm_version or vllm_version)
    dense = bool(dense and model.v32)
    flags = " --dense-attention" if dense else ""
    note = (f"planned with the dense-attention fallback (GPUs below sm90 have no V3.2 sparse-attention backend): "
            f"exact up to index_topk={model.config.get('index_topk')} tokens of context, an approximation beyond")

    def path(name: str, m: planner.Model, prep: list[str], bits_: int) -> ServingPath:
        kv = rehearsal.measured_kv(name, req, (m.config.get("architectures") or ["?"])[0]) if rehearsal else None
        p = planner.plan(m, req, native=name == NATIVE, measured=kv)
        if dense:
            p.warnings.append(note)
        speed = rehearsal.speed_ratio() if rehearsal is not None and name == REPACKED else None
        return ServingPath(name, p, NATIVE_MIN_VLLM if name == NATIVE else REPACKED_MIN_VLLM,
                           kernel(name, req.gpu.cc, vllm_version), prep,
                           measured=None if name == NATIVE else speed or measured_for(req.gpu.cc, req.tp, m.spec.name),
                           tp_checks=tp_checks(m, req.tp, bits_, planner.kernels(req, name == NATIVE) == "marlin", req.ep),
                           model=m)

    if not is_low_bit(model):
        m4, prep = (virtual_output(model, dense_attention=True)[0], [f"w3repack convert MODEL DST{flags}"]) if dense \
            else (model, [])
        return PathsReport(bits, [path(REPACKED, m4, prep, 4)], REPACKED, "the model is already 4-bit: one path")
    common = {"dense_attention": dense}
    native_model, native_prep = virtual_output(model, target="native", kv_b_float=False, **common)
    repacked_model, _ = virtual_output(model, **common)
    native = path(NATIVE, native_model, [f"w3repack convert SRC DST --target native{flags}"] if native_prep else [], 3)
    repacked = path(REPACKED, repacked_model, [f"w3repack convert SRC DST{flags}"], 4)
    if v is not None and v < Version(NATIVE_MIN_VLLM):
        native.runnable, native.why_not = False, f"vLLM {vllm_version} refuses 3-bit checkpoints (needs >= {NATIVE_MIN_VLLM})"
    if engine != "vllm":
        native.runnable, native.why_not = False, f"{engine} does not load 3-bit checkpoints"
    if req.speculative:
        native.runnable, native.why_not = False, ("MTP speculative decoding fails on the 3-bit source in stock vLLM "
                                                  "(measured on 0.33.0: the 4-bit MTP layer is read as 3-bit)")
    return PathsReport(bits, [native, repacked], *recommend(native, repacked))


def recommend(native: ServingPath, repacked: ServingPath) -> tuple[str, str]:
    if not native.runnable:
        return REPACKED, native.why_not
    if native.fits and not repacked.fits:
        return NATIVE, (f"only the native path fits: {native.plan.weights_gib_per_gpu:.1f} GiB of weights per GPU "
                        f"against {repacked.plan.weights_gib_per_gpu:.1f} ({repacked.plan.reason or 'tensor-parallel split'})")
    if repacked.fits and not native.fits:
        return REPACKED, f"only the repacked path fits ({native.plan.reason or 'tensor-parallel split'})"
    if not native.fits:
        return NATIVE, "neither path fits as planned; the native path needs less memory (see the alternatives)"
    m = repacked.measured
    if m and m.decode_geomean > FASTER:
        return REPACKED, (f"measured {m.decode_geomean:.2f}x the native decode speed on {m.gpu_family} at TP {m.tp} "
                          f"(vLLM {m.vllm}); both fit")
    extra = native.plan.max_model_len - repacked.plan.max_model_len
    speed = (f"measured decode speed within {FASTER:.2f}x on {m.gpu_family} at TP {m.tp} (ratios "
             + ", ".join(f"batch {b}: {r:.2f}" for b, r in m.decode.items()) + ")") if m else \
        ("no speed measured at this rank's shapes on this GPU family (`w3repack rehearse --path both` measures it "
         "and `--rehearsal` uses it)")
    return NATIVE, f"{speed}; the native path needs less memory" + (f" ({extra} more tokens of context)" if extra > 0 else "")


def choose(report: PathsReport, wanted: str) -> ServingPath:
    """The path to launch: ``auto`` (the recommendation), ``native`` or ``repacked``."""
    name = {"auto": report.recommended, "native": NATIVE, "repacked": REPACKED}[wanted]
    names = [p.name for p in report.paths]
    if name not in names:
        return report.paths[0]
    return report.path(name)

