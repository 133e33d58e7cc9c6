"""What the memory plan takes from measurements: the memory CUDA can use on a card, and vLLM's allowances.

vLLM 0.33's accounting (``gpu_worker.determine_available_memory``): a snapshot is taken after the CUDA context,
the NCCL communicators, the custom all-reduce buffers and the cuBLAS handles exist; the budget is ``total ×
gpu_memory_utilization`` with ``total`` the memory CUDA reports (``cudaMemGetInfo``, below nvidia-smi's total);
KV cache = budget − (everything allocated after the snapshot: weights, non-torch memory such as kernel modules and
lazily connected NCCL channels, persistent buffers) − the transient peak of a profile run at
``max_num_batched_tokens`` (activations) − the memory CUDA graphs take (profiled, on by default since 0.21).
What was allocated before the snapshot must fit outside the budget, in ``(1 − utilization) × total``.

The allowances below were measured by ``w3repack rehearse`` (docs/benchmarks.md gives the runs and how far the
plan is from each). Numbers for other vLLM versions, model families and shapes are interpolations or
extrapolations from those runs, and the plan says which.
"""

from __future__ import annotations

from dataclasses import dataclass

from packaging.version import InvalidVersion, Version

GIB = 1 << 30
MIB = 1 << 20


@dataclass(frozen=True)
class CardMemory:
    """``cuda_gib``: the total CUDA reports for a card whose nvidia-smi total is ``smi_mib``; ``source``: where
    that figure comes from."""

    name: str
    smi_mib: int
    cuda_gib: float
    source: str


KNOWN_CARDS = (
    CardMemory("NVIDIA H200", 143771, 139.80, "measured: cudaMemGetInfo on an H200, 2026-12"),
    CardMemory("NVIDIA GeForce RTX 3090", 24576, 23.56,
               "as reported for an RTX 3090 (cudaMemGetInfo); not measured by this project, which has no Ampere GPU"),
)
UNKNOWN_DEFICIT_GIB = 0.60  # the largest gap between nvidia-smi's total and CUDA's among KNOWN_CARDS (H200: 0.60)


def card_memory(memory_gib: float, name: str | None = None) -> CardMemory:
    """The CUDA-visible memory of a card with nvidia-smi total ``memory_gib`` (GiB): a known card's figure when the
    total matches one (within 0.5%), else the total less :data:`UNKNOWN_DEFICIT_GIB` (an estimate)."""
    for c in KNOWN_CARDS:
        if abs(memory_gib * 1024 - c.smi_mib) <= 0.005 * c.smi_mib:
            return c
    return CardMemory(name or f"{memory_gib:g} GiB card", round(memory_gib * 1024), round(memory_gib - UNKNOWN_DEFICIT_GIB, 3),
                      f"estimate: nvidia-smi's total less {UNKNOWN_DEFICIT_GIB} GiB (the largest gap among measured cards)")


@dataclass(frozen=True)
class Calibration:
    """vLLM's allowances per GPU for one version, weight-kernel family and GPU class, measured by a rehearsal.

    ``non_torch_gib``: allocated after vLLM's snapshot besides the weights (workspaces, kernel modules);
    ``act_gib``: the transient peak of the profile run at ``act_tokens`` batched tokens; ``cuda_graphs_gib``: vLLM's
    CUDA-graph estimate (default capture sizes, up to 512); ``context_gib``: in use before the snapshot (CUDA context,
    cuBLAS handles), which must fit outside the budget. All at ``ref_layers`` layers of hidden size ``ref_hidden``.
    """

    vllm: str
    kernels: str
    sm90: bool
    non_torch_gib: float
    act_gib: float
    act_tokens: int
    cuda_graphs_gib: float
    context_gib: float
    source: str
    ref_layers: int = 61
    ref_hidden: int = 7168
    measured: bool = True
    native: bool = True  # measured on the 3-bit path (False: the 4-bit repack)


H200_REHEARSALS = "rehearsals of the DeepSeek-V3.2-REAP-345B TP-8 rank on an H200, vLLM 0.33.0, 2026-12-02"
CALIBRATIONS: tuple[Calibration, ...] = (
    Calibration("0.33.0", "humming", False, non_torch_gib=2.31, act_gib=0.54, act_tokens=2048, cuda_graphs_gib=1.03,
                context_gib=0.70, source=H200_REHEARSALS + " (8 x RTX 3090 target: sm86 kernels, Triton MLA)"),
    Calibration("0.33.0", "marlin", False, non_torch_gib=2.43, act_gib=0.54, act_tokens=2048, cuda_graphs_gib=1.05,
                context_gib=0.70, source=H200_REHEARSALS + " (8 x RTX 3090 target: sm86 kernels, Triton MLA)",
                native=False),
    Calibration("0.33.0", "humming", True, non_torch_gib=1.30, act_gib=0.80, act_tokens=8192, cuda_graphs_gib=2.46,
                context_gib=0.70, source=H200_REHEARSALS + " (8 x H200 target, dense attention)"),
    Calibration("0.33.0", "humming", True, non_torch_gib=1.51, act_gib=0.79, act_tokens=8192, cuda_graphs_gib=2.47,
                context_gib=0.70, source=H200_REHEARSALS + " (8 x H200 target, dense attention, the 4-bit repack)",
                native=False),
)
# The smallest model rehearsed (synth.TinySpec: 2 layers of hidden size 1024, Marlin, the 3090 target): what any model
# takes at least. Between it and the reference rank the allowances are interpolated in layers x hidden size.
SMALL = Calibration("0.33.0", "marlin", False, non_torch_gib=0.16, act_gib=0.11, act_tokens=2048, cuda_graphs_gib=0.20,
                    context_gib=0.70, source="rehearsal of a 2-layer model (hidden 1024) on an H200, vLLM 0.33.0",
                    ref_layers=2, ref_hidden=1024)
# Activation peak per batched token, from the two reference points (2048 tokens on the 3090 target, 8192 on the H200).
ACT_GIB_PER_TOKEN = (0.80 - 0.54) / (8192 - 2048)

TP_COMM_GIB = 0.25   # NCCL channels connected lazily after the snapshot (TP > 1): stated, not measured (one GPU)
TP_PRE_SNAPSHOT_GIB = 0.5  # NCCL communicators and all-reduce buffers before the snapshot (TP > 1): stated
MARGIN_GIB = 0.02    # vLLM reports each figure to 0.01 GiB: three of them rounded


def for_version(vllm: str | None, kernels: str, sm90: bool, native: bool = True) -> Calibration:
    """The calibration of ``vllm``'s minor release (else the newest measured) for ``kernels`` and the path
    (``native``: 3-bit) on this GPU class; the same class with the other kernels or path where that was not measured."""
    try:
        want = Version(vllm).release[:2] if vllm else None
    except InvalidVersion:
        want = None
    rows = sorted(CALIBRATIONS, key=lambda c: (Version(c.vllm).release[:2] == want, c.kernels == kernels,
                                              c.native == native, c.sm90 == sm90, Version(c.vllm)))
    best = [c for c in rows if c.sm90 == sm90] or rows
    return best[-1]


def scaled(cal: Calibration, layers: int, hidden: int, tokens: int) -> tuple[float, float, float]:
    """(non-torch, activations, CUDA graphs) GiB for a model of ``layers`` x ``hidden`` at ``tokens`` batched
    tokens: linear in ``layers x hidden`` between :data:`SMALL` and the calibrated rank (beyond it, extrapolated), the
    activations also linear in the batched tokens."""
    x0, x1 = SMALL.ref_layers * SMALL.ref_hidden, cal.ref_layers * cal.ref_hidden
    f = (layers * hidden - x0) / (x1 - x0)

    def at(small: float, ref: float) -> float:
        return max(small, small + (ref - small) * f)

    act_ref = cal.act_gib + ACT_GIB_PER_TOKEN * (tokens - cal.act_tokens)
    return (at(SMALL.non_torch_gib, cal.non_torch_gib), at(SMALL.act_gib, max(SMALL.act_gib, act_ref)),
            at(SMALL.cuda_graphs_gib, cal.cuda_graphs_gib))


def describe(cal: Calibration, layers: int, hidden: int) -> str:
    exact = (layers, hidden) == (cal.ref_layers, cal.ref_hidden)
    return (f"vLLM {cal.vllm}, {cal.kernels} kernels, {'sm90' if cal.sm90 else 'below sm90'}: "
            + ("as measured in " if exact else "interpolated in layers x hidden size from ") + cal.source)


def default_batched_tokens(memory_gib: float, name: str | None) -> tuple[int, int]:
    """vLLM 0.33's ``vllm serve`` defaults (``EngineArgs.get_batch_defaults``) for a card: (max_num_batched_tokens,
    max_num_seqs), from NVML's total (nvidia-smi's, ``memory_gib``): 16384 / 1024 from 160 GiB, 8192 / 1024 from 70 GiB
    (not A100), else 2048 / 256."""
    if memory_gib >= 160:
        return 16384, 1024
    if memory_gib >= 70 and "a100" not in (name or "").lower():
        return 8192, 1024
    return 2048, 256
