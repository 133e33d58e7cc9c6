"""What the memory plan takes from measurements: the memory CUDA can use on a card, and vLLM's allowances.

vLLM 0.33's accounting (``gpu_worker.determine_available_memory``): a snapshot is taken after the CUDA context,
the NCCL communicators, the custom all-reduce buffers and the cuBLAS handles exist; the budget is ``total ×
gpu_memory_utilization`` with ``total`` the memory CUDA reports (``cudaMemGetInfo``, below nvidia-smi's total);
KV cache = budget − (everything allocated after the snapshot: weights, non-torch memory such as kernel modules and
lazily connected NCCL channels, persistent buffers) − the transient peak of a profile run at
``max_num_batched_tokens`` (activations) − the memory CUDA graphs take (profiled, on by default since 0.21).
What was allocated before the snapshot must fit outside the budget, in ``(1 − utilization) × total``.

The allowances below were measured by ``w3repack rehearse`` (docs/benchmarks.md gives the runs); how far the plan
is from each measurement is stated there. Numbers for other vLLM versions, other model families and other shapes
are extrapolations, and the plan says so.
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
    """vLLM allowances of one version and kernel family, per GPU.

    ``non_torch_gib``: allocated after vLLM's snapshot besides weights and activations (kernel modules, workspaces);
    ``activations``: ``act_base_gib + act_gib_per_1k_tokens × max_num_batched_tokens / 1000``, at hidden size
    ``ref_hidden`` and ``ref_topk`` routed experts (scaled linearly with ``hidden × topk`` elsewhere);
    ``cuda_graphs_gib``: at ``ref_layers`` layers and vLLM's default capture sizes (up to 512), scaled with the
    layer count elsewhere; each scaled figure is at least its ``*_min_gib`` (what a small model still takes);
    ``context_gib``: what sits outside the budget on one GPU (CUDA context, cuBLAS handles).
    """

    vllm: str
    kernels: str
    non_torch_gib: float
    act_base_gib: float
    act_gib_per_1k_tokens: float
    cuda_graphs_gib: float
    act_min_gib: float
    graphs_min_gib: float
    context_gib: float
    ref_hidden: int
    ref_topk: int
    ref_layers: int
    measured: bool
    source: str


# Until a rehearsal measures them, the allowances the planner has always stated (not measured).
STATED = Calibration("any", "any", non_torch_gib=0.25, act_base_gib=0.0, act_gib_per_1k_tokens=0.5, cuda_graphs_gib=0.5,
                     act_min_gib=0.5, graphs_min_gib=0.5, context_gib=0.5, ref_hidden=7168, ref_topk=8, ref_layers=61, measured=False,
                     source="stated allowances, not measured")
CALIBRATIONS: tuple[Calibration, ...] = ()

TP_COMM_GIB = 0.25   # NCCL channels connected lazily and custom all-reduce state after the snapshot (TP > 1): stated
TP_PRE_SNAPSHOT_GIB = 0.5  # NCCL communicators and all-reduce buffers before the snapshot (TP > 1): stated
MARGIN_GIB = 0.10    # kept free on top of the allowances: run-to-run variation of vLLM's own profile


def for_version(vllm: str | None, kernels: str) -> Calibration:
    """The measured calibration of ``vllm``'s minor release and ``kernels`` ("humming" or "marlin"), else the
    newest measured one for ``kernels``, else :data:`STATED`."""
    rows = [c for c in CALIBRATIONS if c.kernels == kernels]
    if not rows:
        return STATED
    try:
        want = Version(vllm).release[:2] if vllm else None
    except InvalidVersion:
        want = None
    same = [c for c in rows if want is not None and Version(c.vllm).release[:2] == want]
    return (same or sorted(rows, key=lambda c: Version(c.vllm)))[-1]


def default_batched_tokens(memory_gib: float, name: str | None) -> tuple[int, int]:
    """vLLM 0.33's ``vllm serve`` defaults (``EngineArgs.get_batch_defaults``) for a card: (max_num_batched_tokens,
    max_num_seqs), from NVML's total (nvidia-smi's, ``memory_gib``): 16384 / 1024 from 160 GiB, 8192 / 1024 from 70 GiB
    (not A100), else 2048 / 256."""
    if memory_gib >= 160:
        return 16384, 1024
    if memory_gib >= 70 and "a100" not in (name or "").lower():
        return 8192, 1024
    return 2048, 256
