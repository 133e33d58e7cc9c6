"""vLLM: ``vllm serve`` command lines and launcher scripts from a plan, with flags checked against the vLLM version.

Version rules (docs/formats.md §3): vLLM >= 0.17 maps ``quant_method: auto-round`` to its ``inc`` method by itself,
so no ``--quantization`` is passed (older versions get ``--quantization auto-round``); GPTQ configs are picked up
as ``gptq_marlin`` by every version. 3-bit checkpoints (the native path) need vLLM >= 0.30. No MoE backend is
forced: on sm90 vLLM >= 0.30 picks Humming for 4-bit, which measured as fast as or faster than the native path
(docs/benchmarks.md); a user who wants Marlin passes ``-- --moe-backend marlin``.

:class:`VllmEngine` is this module behind :class:`repack.serve.engines.base.Engine`: its plan is the recommended
(or chosen) serving path of :func:`repack.serve.paths.plan_paths`, its argv :func:`command`, its script :func:`script`.
"""

from __future__ import annotations

from dataclasses import dataclass

from packaging.version import InvalidVersion, Version

from repack.errors import UserError
from repack.serve import paths, planner
from repack.serve import shell as sh
from repack.serve.engines.base import Engine, Launch, LaunchMemory, VersionFlags

__all__ = ["DEFAULT_VLLM", "RAY_PORT", "Selected", "VersionFlags", "VllmEngine", "VllmLaunch", "command", "engine_args",
           "installed_vllm", "parse_version", "script", "select", "version_flags"]

DEFAULT_VLLM = "0.33.0"
RAY_PORT = 6379


def parse_version(v: str) -> Version:
    try:
        return Version(v)
    except (InvalidVersion, ValueError) as e:  # ValueError: a release number of more digits than int() takes
        raise UserError(f"--vllm-version {v!r}: expected a version like 0.33.0") from e


def installed_vllm() -> str | None:
    try:
        from importlib.metadata import PackageNotFoundError, version
    except ImportError:  # pragma: no cover
        return None
    try:
        return version("vllm")
    except PackageNotFoundError:
        return None


def version_flags(version: str, model: planner.Model, gpu: planner.Gpu, path: str = paths.REPACKED,
                  speculative: int = 0) -> VersionFlags:
    """Flags for ``version`` of vLLM; refuses what that version cannot serve (3-bit before 0.30)."""
    v = parse_version(version)
    out = VersionFlags(str(v))
    qm = (model.quant_method or "").lower()
    mins = [Version(paths.NATIVE_MIN_VLLM if path == paths.NATIVE else "0.0")]
    if path == paths.NATIVE and v < Version(paths.NATIVE_MIN_VLLM):
        raise UserError(f"vLLM {v} refuses 3-bit checkpoints (it serves them from {paths.NATIVE_MIN_VLLM} on): "
                        "upgrade vLLM, or convert to 4 bits (w3repack convert SRC DST) and launch the output")
    if qm in ("auto-round", "intel/auto-round", "auto_round"):
        if v < Version("0.17"):
            out.args += ["--quantization", "auto-round"]
            out.notes.append("vLLM < 0.17: --quantization auto-round is passed explicitly")
        else:
            mins.append(Version("0.17"))
    if path == paths.REPACKED and gpu.cc_tuple >= (9, 0) and v >= Version("0.30"):
        out.notes.append(f"vLLM {v} picks its own MoE kernel for 4-bit on sm90 (Humming); measured against the native "
                         "path in docs/benchmarks.md. For Marlin, add after --: --moe-backend marlin")
    if speculative:
        mins.append(Version("0.26"))
    out.min_version = str(max(mins))
    return out


def engine_args(plan: planner.MemoryPlan, flags: VersionFlags, nodes: int = 1, trust_remote_code: bool = False) -> list[str]:
    """What follows ``vllm serve MODEL``: the plan's arguments (the pass-through ones last among them), the
    version's flags, the Ray backend for ``nodes > 1``, ``--trust-remote-code`` only when asked."""
    args = [*plan.vllm_args, *flags.args]
    if nodes > 1:
        args += ["--distributed-executor-backend", "ray"]
    if trust_remote_code:
        args.append("--trust-remote-code")
    return args


def command(model_path: str, plan: planner.MemoryPlan, flags: VersionFlags, nodes: int = 1,
            trust_remote_code: bool = False) -> list[str]:
    """``vllm serve MODEL ...`` as an argv list (nothing in it is parsed again by a shell)."""
    return ["vllm", "serve", model_path, *engine_args(plan, flags, nodes, trust_remote_code)]


def script(model_path: str, plan: planner.MemoryPlan, flags: VersionFlags, nodes: int = 1, recipe: dict | None = None,
           trust_remote_code: bool = False) -> str:
    """A bash launcher: preflight (GPU count and memory, vLLM import and version), then ``exec vllm serve``.
    With ``nodes > 1``: the Ray variant (``serve.sh head`` on the first node, ``serve.sh worker HEAD_IP``
    on the others). Outside text reaches it only through :mod:`repack.serve.shell`; the engine receives
    ``[$VLLM, serve, $MODEL, *engine_args(...)]`` exactly."""
    tp, nodes = int(plan.gpus // max(1, int(nodes))), int(nodes)  # GPUs per node: TP x the stages on one node
    need_mib = int(plan.gpu.memory_gib * 1024 * 0.98)
    env = sh.check_env(dict(plan.env))
    L = ["#!/usr/bin/env bash"]
    L.append(sh.comment(f"Serve {model_path} with stock vLLM. Written by `w3repack launch`; regenerate it rather than edit it."))
    if recipe:
        L.append(sh.comment(f"recipe: {recipe['name']} ({recipe.get('description', '')})"))
    g = plan.gpu
    L.append(sh.comment(f"plan: {nodes} node(s) x {tp} GPUs of {g.memory_gib:g} GiB, cc {g.cc}, "
                        f"TP {plan.tensor_parallel}" + (f" x PP {plan.pipeline_parallel}" if plan.pipeline_parallel > 1 else "")
                        + (" with expert parallelism" if plan.expert_parallel else "")))
    L.append(sh.comment(f"weights {plan.weights_gib_per_gpu:.2f} GiB per GPU ({plan.weights_gib_on_gpu:.2f} GiB on the GPU), "
                        f"KV cache {plan.kv_bytes_per_token} bytes per token, {plan.kv_cache_gib:.2f} GiB per GPU"))
    L.append(sh.comment(f"max context {plan.max_model_len} tokens at --gpu-memory-utilization {plan.gpu_memory_utilization:g} "
                        f"(capacity {plan.capacity_tokens} tokens); fits: {'yes' if plan.fits else 'NO: ' + plan.reason}"))
    L.append(sh.comment(f"flags chosen for vLLM {flags.version}"))
    for w in plan.warnings + flags.notes:
        L.append(sh.comment(f"warning: {w}"))
    L += ["set -euo pipefail", ""]
    if nodes > 1:
        L += ['ROLE="${1:-}"', 'HEAD_IP="${2:-}"',
              'case "$ROLE" in',
              '  head) ;;',
              '  worker) [ -n "$HEAD_IP" ] || { echo "usage: $0 worker HEAD_IP" >&2; exit 2; } ;;',
              f'  *) echo "usage: $0 head (on the first node) | $0 worker HEAD_IP (on the other {nodes - 1})" >&2; exit 2 ;;',
              'esac', ""]
    L += [sh.default("MODEL", model_path),
          'PYTHON="${PYTHON:-python3}"',
          'VLLM="${VLLM:-vllm}"',
          sh.assign("NEED_GPUS", str(tp)),
          sh.assign("NEED_MIB", str(need_mib)),
          sh.assign("MIN_VLLM", flags.min_version),
          sh.assign("FLAGS_VLLM", flags.version)]
    if nodes > 1:
        L += [sh.assign("NODES", str(nodes)), f'RAY_PORT="${{RAY_PORT:-{RAY_PORT}}}"']
    L += ["",
          *sh.PREFLIGHT_GPUS,
          'VLLM_VERSION="$("$PYTHON" -c \'import vllm; print(vllm.__version__)\' 2>/dev/null)" \\',
          '  || die "cannot import vllm with $PYTHON (pip install vllm, or set PYTHON=/path/to/venv/bin/python)"',
          'VLLM_VERSION="${VLLM_VERSION%%+*}"',
          'version_ge "$VLLM_VERSION" "$MIN_VLLM" || die "vLLM $VLLM_VERSION is older than $MIN_VLLM, which these flags need"',
          '[ "$VLLM_VERSION" = "$FLAGS_VLLM" ] || echo "preflight: note: vLLM $VLLM_VERSION installed, flags chosen for '
          '$FLAGS_VLLM; regenerate with --vllm-version $VLLM_VERSION if it refuses them" >&2',
          'command -v "$VLLM" >/dev/null 2>&1 || die "$VLLM not on PATH (set VLLM=/path/to/venv/bin/vllm)"']
    if nodes > 1:
        L.append('command -v ray >/dev/null 2>&1 || die "ray not on PATH (pip install ray)"')
    L.append('echo "preflight: ${#MEM_MIB[@]} GPUs, vLLM $VLLM_VERSION: ok" >&2')
    L.append("")
    for k, v in env.items():
        L.append(sh.export(k, v))
    if env:
        L.append("")
    if nodes > 1:
        L += ['if [ "$ROLE" = worker ]; then',
              '  exec ray start --address="$HEAD_IP:$RAY_PORT" --block',
              'fi',
              'ray start --head --port="$RAY_PORT"',
              'TOTAL=$((NODES * NEED_GPUS))',
              'for _ in $(seq 1 120); do',
              '  HAVE="$("$PYTHON" -c \'import ray; ray.init(address="auto", logging_level="ERROR"); '
              'print(int(ray.cluster_resources().get("GPU", 0)))\' 2>/dev/null || echo 0)"',
              '  [ "$HAVE" -ge "$TOTAL" ] && break',
              '  echo "waiting for workers: $HAVE of $TOTAL GPUs in the Ray cluster" >&2',
              '  sleep 5',
              'done',
              '[ "$HAVE" -ge "$TOTAL" ] || die "only $HAVE of $TOTAL GPUs joined the Ray cluster"']
    L += sh.command_lines([sh.Var("VLLM"), "serve", sh.Var("MODEL"), *engine_args(plan, flags, nodes, trust_remote_code)])
    return "\n".join(L) + "\n"


@dataclass
class Selected:
    report: paths.PathsReport
    path: paths.ServingPath
    flags: VersionFlags

    @property
    def plan(self) -> planner.MemoryPlan:
        return self.path.plan


def select(model: planner.Model, req: planner.Request, wanted: str = "auto", vllm_version: str | None = None,
           force: bool = False, rehearsal=None) -> Selected:
    """The path to launch and its flags; refuses a path that needs a conversion first, cannot run on this vLLM,
    or does not fit (unless ``force``). ``rehearsal``: measured KV cache and speed (``w3repack rehearse``)."""
    version = vllm_version or installed_vllm() or DEFAULT_VLLM
    parse_version(version)  # one error: line for what is not a version, before anything compares it
    report = paths.plan_paths(model, req, vllm_version=version, rehearsal=rehearsal)
    path = paths.choose(report, wanted)
    if not path.runnable:
        raise UserError(f"{model.root}: the {path.name} path cannot run: {path.why_not}")
    if path.prepare:
        why = f" (recommended: {report.reason})" if wanted == "auto" else ""
        raise UserError(f"{model.root}: the {path.name} path{why} serves a converted folder: run `{path.prepare[0]}`, "
                        "then launch DST" + ("" if wanted != "auto" else "; or choose a path with --path"))
    if not path.fits and not force:
        p = path.plan
        alts = "; ".join(f"{a['description']} (max context {a['max_model_len']})" for a in p.alternatives[:4])
        fails = "; ".join(c.detail for c in path.tp_checks if not c.ok)
        raise UserError(f"the plan does not fit: {p.reason or fails}" + (f". Alternatives: {alts}" if alts else "")
                        + " (--force writes it anyway)")
    flags = version_flags(version, model, req.gpu, path.name, req.speculative)
    from repack.serve.launcher import dense_topk  # launcher re-exports this module

    topk = dense_topk(model)
    if topk and path.plan.max_model_len > topk:
        flags.notes.append(f"dense-attention fallback: exact up to index_topk={topk} tokens of context, an approximation "
                           "of DeepSeek-V3.2's sparse attention beyond (--dense-context cap limits the context to it)")
    return Selected(report, path, flags)


@dataclass(kw_only=True)
class VllmLaunch(Launch):
    """A vLLM launch: the serving path chosen and its flags (``selected``), whether ``--trust-remote-code`` is passed."""

    selected: Selected
    trust_remote_code: bool = False


class VllmEngine(Engine):
    name = "vllm"
    label = "vLLM"
    version_option = "--vllm-version"
    default_version = DEFAULT_VLLM

    def installed(self) -> str | None:
        return installed_vllm()

    def parse_version(self, version: str) -> str:
        return str(parse_version(version))

    def version_flags(self, version: str, model: planner.Model, gpu: planner.Gpu, path: str = paths.REPACKED,
                      speculative: int = 0) -> VersionFlags:
        return version_flags(version, model, gpu, path, speculative)

    def check(self, model: planner.Model, req: planner.Request, path: str = "auto", rehearsal=None) -> None:
        """Nothing is refused before planning: which path can run, needs a conversion or fits is :func:`select`'s."""
        if path not in ("auto", "native", "repacked"):
            raise UserError(f"--path {path}: expected auto, native or repacked")

    def plan(self, model: planner.Model, req: planner.Request, *, model_path: str | None = None, path: str = "auto",
             version: str | None = None, force: bool = False, rehearsal=None, trust_remote_code: bool = False,
             nodes: int = 1, recipe: dict | None = None) -> VllmLaunch:
        self.check(model, req, path, rehearsal)
        sel = select(model, req, path, version, force, rehearsal)
        mp = model_path or str(model.root.resolve())
        p = sel.plan
        return VllmLaunch(
            engine=self.name, label=self.label, model_path=mp,
            argv=command(mp, p, sel.flags, nodes, trust_remote_code), env=dict(p.env),
            version=sel.flags.version, min_version=sel.flags.min_version, gpus=p.gpus, nodes=nodes, path=sel.path.name,
            memory=LaunchMemory(p.weights_gib_per_gpu, p.kv_bytes_per_token, p.kv_cache_gib, p.capacity_tokens,
                                p.max_model_len, p.fits, p.reason),
            warnings=p.warnings + sel.flags.notes, selected=sel, trust_remote_code=trust_remote_code)

    def script(self, launch: Launch, recipe: dict | None = None) -> str:
        if not isinstance(launch, VllmLaunch):
            raise TypeError(f"a {launch.label} launch is not a vLLM launch")
        sel = launch.selected
        return script(launch.model_path, sel.plan, sel.flags, launch.nodes, recipe, launch.trust_remote_code)
