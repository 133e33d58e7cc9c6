"""What vLLM reports about one engine: its log lines (INFO, plus the DEBUG lines of ``vllm.v1.worker.gpu_worker``
that :data:`LOGGING_CONFIG` turns on) and its ``/metrics`` cache-config labels. Read from vLLM 0.33.0.

Memory lines (GiB with two decimals, vLLM's ``format_gib``): ``Model loading took W GiB memory and S seconds``;
the profile result ``Total non KV cache memory: N GiB; torch peak memory increase: P GiB; total consumed (from
mem_get_info): T GiB; weights memory: W GiB`` (so the activation peak is ``N - T`` and what else was allocated after
the snapshot is ``T - W``); ``--gpu-memory-utilization=A is equivalent to --gpu-memory-utilization=B without CUDA
graph memory profiling`` (the CUDA-graph estimate is ``(A - B) x total``); ``Available KV cache memory: K GiB``;
``GPU KV cache size: N tokens``; ``Auto-fit max_model_len: ...``; ``Graph capturing finished in S secs, took G GiB``.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

GIB = 1 << 30

# vLLM's logging replaced by a config that keeps its INFO lines and adds the worker's memory DEBUG lines.
LOGGING_CONFIG = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(levelname)s %(asctime)s [%(name)s] %(message)s"}},
    "handlers": {"out": {"class": "logging.StreamHandler", "formatter": "plain", "level": "DEBUG",
                         "stream": "ext://sys.stdout"}},
    "loggers": {"vllm": {"handlers": ["out"], "level": "INFO", "propagate": False},
                "vllm.v1.worker.gpu_worker": {"handlers": ["out"], "level": "DEBUG", "propagate": False}},
}

_NUM = r"([\d.]+)"
LOADING = re.compile(rf"Model loading took {_NUM} ?GiB memory and {_NUM} seconds")
PROFILE = re.compile(rf"Total non KV cache memory: {_NUM} ?GiB; torch peak memory increase: {_NUM} ?GiB; "
                     rf"total consumed \(from mem_get_info\): {_NUM} ?GiB; weights memory: {_NUM} ?GiB")
CG_UTIL = re.compile(rf"--gpu-memory-utilization={_NUM} is equivalent to --gpu-memory-utilization={_NUM} without")
AVAILABLE = re.compile(rf"Available KV cache memory: {_NUM} ?GiB")
KV_TOKENS = re.compile(r"KV cache size: ([\d,]+) tokens")
AUTO_FIT = re.compile(r"Auto-fit max_model_len: (?:reduced from \d+ to (\d+)|full model context length (\d+) fits)")
CAPTURE = re.compile(rf"Graph capturing finished in {_NUM} secs, took {_NUM} ?GiB")
SNAPSHOT = re.compile(rf"worker init memory snapshot: .*?free_memory={_NUM}GiB, total_memory={_NUM}GiB, "
                      rf"\w+_memory={_NUM}GiB")
ESTIMATED_MAX = re.compile(r"the estimated maximum model length is (\d+)")
SUMMARY = re.compile(rf"Actual usage is {_NUM} GiB for consumed memory \(weights \+ non-torch\), {_NUM} GiB for peak "
                     rf"activation, and {_NUM} GiB for CUDAGraph memory")
WRAPPER = re.compile(r"Engine core initialization failed|See root cause above")
KERNEL = re.compile(r"(Using \S.*(?:backend|[Kk]ernel)\b.*|Selected \w+ for \w+.*|Using \w+ (?:attention|MLA) .*)")
ERROR = re.compile(r"\b(\w*Error|Exception)\b: (.+)")


@dataclass
class EngineReport:
    """What one vLLM engine said about itself (None: not in its log)."""

    weights_gib: float | None = None
    load_seconds: float | None = None
    non_kv_cache_gib: float | None = None
    total_consumed_gib: float | None = None
    peak_activation_gib: float | None = None      # non-KV - total consumed: the profile run's transient peak
    non_torch_gib: float | None = None            # total consumed - weights: allocated after the snapshot
    cuda_graphs_estimate_gib: float | None = None  # what the KV cache was reduced by for CUDA graphs
    cuda_graphs_profiled_gib: float | None = None  # the capture vLLM runs to estimate CUDA-graph memory
    cuda_graphs_captured_gib: float | None = None  # the capture after the KV cache is allocated
    capture_seconds: float | None = None
    summary_peak_activation_gib: float | None = None  # vLLM's own summary: activations + CUDA-graph estimate
    kv_cache_gib: float | None = None
    kv_cache_tokens: int | None = None
    max_model_len: int | None = None
    init_free_gib: float | None = None
    init_cuda_gib: float | None = None            # in use before the snapshot (CUDA context, cuBLAS handles, NCCL)
    total_gib: float | None = None
    estimated_max_model_len: int | None = None    # from a refusal: the longest context the KV cache would hold
    kernels: list[str] = field(default_factory=list)
    error: str | None = None

    def to_json(self) -> dict:
        return asdict(self)


def _f(m: re.Match | None, i: int = 1) -> float | None:
    return float(m.group(i)) if m else None


def parse(text: str, total_gib: float | None = None) -> EngineReport:
    """An :class:`EngineReport` from a log; ``total_gib``: the memory CUDA reports (for the CUDA-graph estimate,
    when the log's own snapshot line is missing)."""
    r = EngineReport()
    if m := LOADING.search(text):
        r.weights_gib, r.load_seconds = float(m.group(1)), float(m.group(2))
    if m := SNAPSHOT.search(text):
        r.init_free_gib, r.total_gib, r.init_cuda_gib = float(m.group(1)), float(m.group(2)), float(m.group(3))
    total = r.total_gib or total_gib
    if m := PROFILE.search(text):
        r.non_kv_cache_gib, r.total_consumed_gib = float(m.group(1)), float(m.group(3))
        r.peak_activation_gib = round(r.non_kv_cache_gib - r.total_consumed_gib, 2)
        r.non_torch_gib = round(r.total_consumed_gib - float(m.group(4)), 2)
    if (m := CG_UTIL.search(text)) and total:
        r.cuda_graphs_estimate_gib = round((float(m.group(1)) - float(m.group(2))) * total, 3)
    captures = CAPTURE.findall(text)
    if captures:
        r.capture_seconds, r.cuda_graphs_captured_gib = float(captures[-1][0]), float(captures[-1][1])
        if len(captures) > 1:
            r.cuda_graphs_profiled_gib = float(captures[0][1])
    if m := SUMMARY.search(text):
        r.summary_peak_activation_gib = float(m.group(2))
    r.kv_cache_gib = _f(AVAILABLE.search(text))
    if m := KV_TOKENS.search(text):
        r.kv_cache_tokens = int(m.group(1).replace(",", ""))
    if m := AUTO_FIT.search(text):
        r.max_model_len = int(m.group(1) or m.group(2))
    if m := ESTIMATED_MAX.search(text):
        r.estimated_max_model_len = int(m.group(1))
    seen: list[str] = []
    for line in text.splitlines():
        k = KERNEL.search(line)
        if k and k.group(1).strip()[:200] not in seen:
            seen.append(k.group(1).strip()[:200])
    r.kernels = seen
    errors = [m.group(0) for line in text.splitlines() if (m := ERROR.search(line)) and "Traceback" not in line]
    causes = [e for e in errors if not WRAPPER.search(e)]  # the root cause, not the front end's "see above"
    r.error = (causes or errors)[-1][:500] if errors else None
    return r


def cache_config_info(metrics: str) -> dict[str, str]:
    """The labels of ``vllm:cache_config_info`` in a Prometheus ``/metrics`` page (``num_gpu_blocks``,
    ``block_size``, ...)."""
    for line in metrics.splitlines():
        if line.startswith("vllm:cache_config_info{"):
            body = line[len("vllm:cache_config_info{"):line.rindex("}")]
            return dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', body))
    return {}
