"""SGLang behind :class:`~repack.serve.engines.base.Engine`: :mod:`repack.serve.sglang` (its loader's rules, its
memory rule, argv and script) driven by a planner request.

What a request can ask that this launcher does not plan for SGLang is refused by :meth:`SglangEngine.check` rather
than dropped: the 3-bit path, pipeline stages and nodes, MTP speculation, an fp8 KV cache, a vLLM rehearsal. The
recipe's vLLM settings (utilization, CPU offload, ``extra_args``) do not carry over: SGLang's fraction and offload
are planned by its own rule, and only the arguments given after ``--`` reach it.
"""

from __future__ import annotations

from dataclasses import dataclass

from repack.errors import UserError
from repack.serve import paths, planner
from repack.serve import sglang as sg
from repack.serve.engines.base import Engine, Launch, LaunchMemory, VersionFlags


@dataclass(kw_only=True)
class SglangEngineLaunch(Launch):
    """An SGLang launch: :class:`repack.serve.sglang.SglangLaunch` (argv, memory, reasons) as planned."""

    sglang: sg.SglangLaunch


def own_extra_args(req: planner.Request, recipe: dict | None) -> list[str]:
    """The arguments given after ``--``: ``req.extra_args`` is the recipe's ``extra_args`` (vLLM's) followed by them
    (``launcher.prepare``)."""
    theirs = list(((recipe or {}).get("serve") or {}).get("extra_args") or [])
    if req.extra_args[:len(theirs)] != theirs:
        raise ValueError("internal error: the request's extra args do not start with the recipe's")
    return list(req.extra_args[len(theirs):])


class SglangEngine(Engine):
    name = "sglang"
    label = "SGLang"
    version_option = "--sglang-version"
    default_version = sg.DEFAULT_SGLANG

    def installed(self) -> str | None:
        return sg.installed_sglang()

    def parse_version(self, version: str) -> str:
        return sg.check_version(version)

    def version_flags(self, version: str, model: planner.Model, gpu: planner.Gpu, path: str = paths.REPACKED,
                      speculative: int = 0) -> VersionFlags:
        """No flag depends on the version (from 0.5.10 on); the 3-bit path is refused whatever the version."""
        if path == paths.NATIVE:
            raise UserError("SGLang does not load 3-bit checkpoints: convert to 4 bits (w3repack convert SRC DST) and "
                            "launch the output")
        return VersionFlags(self.parse_version(version), [], sg.MIN_SGLANG)

    def check(self, model: planner.Model, req: planner.Request, path: str = "auto", rehearsal=None) -> None:
        if path == "native":
            raise UserError("--path native --engine sglang: SGLang does not load 3-bit checkpoints; launch the 4-bit "
                            "conversion (w3repack convert SRC DST), or use --engine vllm")
        if req.pp > 1:
            raise UserError(f"--pipeline-parallel {req.pp} / --nodes --engine sglang: the SGLang launcher plans one node "
                            "with tensor parallelism only (use --engine vllm for pipeline stages and nodes)")
        if req.speculative:
            raise UserError("--speculative --engine sglang: MTP speculative decoding is not planned for SGLang "
                            "(--engine vllm serves it)")
        if req.kv_cache_dtype != "auto":
            raise UserError(f"--kv-cache-dtype {req.kv_cache_dtype} --engine sglang: the SGLang launcher plans a KV cache "
                            "in the model dtype only")
        if rehearsal is not None:
            raise UserError("--rehearsal --engine sglang: a rehearsal measures vLLM; SGLang is planned by its own rule")
        sg.check_model(model)

    def plan(self, model: planner.Model, req: planner.Request, *, model_path: str | None = None, path: str = "auto",
             version: str | None = None, force: bool = False, rehearsal=None, trust_remote_code: bool = False,
             nodes: int = 1, recipe: dict | None = None) -> SglangEngineLaunch:
        """The 4-bit model on ``req.tp`` GPUs of one node, weights per GPU from the planner's sharding under SGLang's
        layout (routed experts whole per GPU with ``--ep-size``); UserError if it does not fit, unless ``force``."""
        self.check(model, req, path, rehearsal)
        if nodes > 1:
            raise UserError(f"--nodes {nodes} --engine sglang: the SGLang launcher plans one node (use --engine vllm)")
        f = sg.facts(model)
        ep = req.tp > 1 and (f.moe_quantized or req.ep)
        w = planner.weights_per_gpu(model, req.tp, 1, mtp=False, ep=ep)
        weights = round(max(w.per_stage) / planner.GIB, 3)
        mp = model_path or str(model.root.resolve())
        L = sg.sglang_command(mp, model, weights, req.gpu, req.tp, version=version, context_length=req.max_model_len,
                              consumer_pcie=req.consumer_pcie, env=dict(req.env), extra_args=own_extra_args(req, recipe),
                              trust_remote_code=trust_remote_code, expert_parallel=req.ep)
        if not L.fits and not force:
            raise UserError(f"the SGLang plan does not fit: {L.reason} (--force writes it anyway)")
        m = L.memory
        return SglangEngineLaunch(
            engine=self.name, label=self.label, model_path=mp, argv=list(L.argv), env=dict(L.env), version=L.version,
            min_version=L.min_version, gpus=L.tp, nodes=1, path=paths.REPACKED,
            memory=LaunchMemory(m.weights_gib_per_gpu, m.kv_bytes_per_token, m.kv_pool_gib, m.max_total_tokens,
                                m.context_length, L.fits, L.reason),
            warnings=list(L.warnings), sglang=L)

    def script(self, launch: Launch, recipe: dict | None = None) -> str:
        if not isinstance(launch, SglangEngineLaunch):
            raise TypeError(f"a {launch.label} launch is not an SGLang launch")
        return launch.sglang.script(recipe)
