"""Per-rank shapes: what one tensor-parallel rank holds of every tensor, from an :class:`ArchSpec` and a layout.

The one place both the planner (weights per GPU) and the rehearsal (a one-GPU model of one rank) read. For each
tensor the spec names a :class:`Split`; the split dim follows from the tensor's part:

- quantized ``qweight [K*b/32, N]``, ``qzeros [K/g, N*b/32]``, ``scales [K/g, N]``: dim 1 for column-like splits
  (column, kv_heads, vocab), dim 0 for row; ``g_idx [K]``: dim 0 for row, whole otherwise;
- float ``weight [N, K]``: dim 0 for column-like, dim 1 for row; a 1-D tensor (``bias``, a 1-D ``weight``): dim 0
  for column-like, whole for row (vLLM's row-parallel bias is whole on every rank).

A rank holds ``fraction`` of the split dim: ``1/tp`` (column, row), ``max(1, kv/tp)/kv`` (kv_heads), or the padded
vocabulary slice over the vocabulary (vocab). When that is not a whole number of rows, the tensor has a
``problem`` and no rank shape: the planner still counts its share of bytes, the rehearsal refuses to build it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

from repack.serve.arch import ArchSpec, Layout, Split, vocab_rows

QUANT_PARTS = ("qweight", "qzeros", "scales", "g_idx")
COLUMN_LIKE = (Split.COLUMN, Split.KV_HEADS, Split.VOCAB)


@dataclass(frozen=True)
class RankTensor:
    """One tensor of the full model and what one rank holds of it."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    split: Split
    dim: int | None          # the dim that is split (None: whole)
    fraction: Fraction       # share of that dim one rank holds; of the ranks holding it whole, for an expert-parallel expert

    @property
    def module(self) -> str:
        return self.name.rpartition(".")[0]

    @property
    def part(self) -> str:
        return self.name.rpartition(".")[2]

    @property
    def quantized(self) -> bool:
        return self.part in QUANT_PARTS

    @property
    def problem(self) -> str | None:
        """Why one rank cannot hold a whole number of rows of the split dim (None: it can)."""
        if self.dim is None or self.fraction == 1:
            return None
        rows = self.shape[self.dim] * self.fraction
        if rows.denominator != 1 or rows < 1:
            return (f"{self.name} {list(self.shape)}: dim {self.dim} ({self.shape[self.dim]}) split {self.split.value} "
                    f"gives {float(rows):g} per rank")
        return None

    @property
    def rank_shape(self) -> tuple[int, ...] | None:
        if self.problem:
            return None
        if self.dim is None:
            return self.shape
        s = list(self.shape)
        s[self.dim] = int(s[self.dim] * self.fraction)
        return tuple(s)

    def share(self, nbytes: float) -> float:
        """The rank's part of ``nbytes`` (bytes of the whole tensor, in whatever dtype it is held): an
        expert-parallel expert counts ``1/tp`` on every rank, the average of whole and absent."""
        return nbytes * self.fraction.numerator / self.fraction.denominator


def _dim(split: Split, part: str, ndim: int) -> int | None:
    if split in (Split.REPLICATED, Split.EXPERT) or ndim == 0:
        return None
    column = split in COLUMN_LIKE
    if part in ("qweight", "qzeros", "scales"):
        return 1 if column else 0
    if part == "g_idx":
        return None if column else 0
    if ndim == 1:
        return 0 if column else None
    return 0 if column else 1


def _fraction(spec: ArchSpec, split: Split, n: int, tp: int) -> Fraction:
    """Share of the split dim one rank holds; ``n``: the module's output width (rows of the LM head)."""
    if split is Split.VOCAB:
        return Fraction(vocab_rows(n, tp), n) if n else Fraction(1, tp)
    if split is Split.KV_HEADS:
        kv = spec.kv_head_count
        return Fraction(spec.kv_heads_per_rank(tp), kv)
    return Fraction(1, tp)


def shard(spec: ArchSpec, tensors: list[tuple[str, str, tuple[int, ...], int]], layout: Layout) -> list[RankTensor]:
    """Every tensor of ``tensors`` ((name, dtype, shape, bytes), as headers give them) with its split on one rank."""
    tp = layout.tp
    width: dict[str, int] = {}  # module -> output width N, from scales (quantized) or the weight's rows
    for name, _, shape, _ in tensors:
        module, _, part = name.rpartition(".")
        if part == "scales" and len(shape) == 2:
            width[module] = shape[1]
        elif part == "weight" and shape and module not in width:
            width[module] = shape[0]
    out = []
    for name, dtype, shape, _ in tensors:
        module, _, part = name.rpartition(".")
        split = spec.split(module, layout)
        dim = _dim(split, part, len(shape)) if tp > 1 or split is Split.VOCAB else None
        if split is Split.EXPERT:
            frac = Fraction(1, tp)
        else:
            frac = _fraction(spec, split, width.get(module, shape[0] if shape else 0), tp) if dim is not None else Fraction(1)
        out.append(RankTensor(name, dtype, tuple(shape), split, dim, frac))
    return out


@dataclass(frozen=True)
class RankModel:
    """A one-GPU model with one rank's shapes: ``config`` (config.json) and ``tensors`` ((name, dtype, shape))."""

    config: dict
    tensors: list[tuple[str, str, tuple[int, ...]]]

    @property
    def nbytes(self) -> int:
        from repack.safetensors_io import DTYPE_SIZES

        return sum(DTYPE_SIZES[d] * math.prod(s) for _, d, s in self.tensors)


def rank_model(spec: ArchSpec, tensors: list[tuple[str, str, tuple[int, ...], int]], layout: Layout) -> RankModel:
    """The one-rank model of ``tensors`` under ``spec``: UserError listing what ``layout`` cannot split."""
    from repack.errors import UserError

    problems = layout_problems(spec, tensors, layout)
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise UserError(f"TP {layout.tp} does not split this model into whole ranks: " + "; ".join(problems[:3]) + more)
    local = spec.experts // layout.tp if layout.ep else None
    rank = shard(spec, tensors, layout)
    keep = [t for t in rank if local is None or t.split is not Split.EXPERT or _expert(t.name) < local]
    return RankModel(spec.rank_config(layout), [(t.name, t.dtype, t.rank_shape or ()) for t in keep])


def _expert(name: str) -> int:
    from repack.serve.arch.base import EXPERT_RE

    m = EXPERT_RE.search(name)
    return int(m.group(1)) if m else 0


def layout_problems(spec: ArchSpec, tensors: list[tuple[str, str, tuple[int, ...], int]], layout: Layout,
                    marlin: bool = False, rank: list[RankTensor] | None = None) -> list[str]:
    """What keeps ``layout`` from holding whole ranks: config-level divisibility, then each tensor whose split dim
    does not give a whole number of rows (packed words, quantization groups); with ``marlin``, also 4-bit modules
    whose per-rank N is not a multiple of 64 or K of 128 (Marlin's smallest tile), one line per module kind."""
    problems = spec.divisibility(layout)
    rank = rank if rank is not None else shard(spec, tensors, layout)
    seen: set[str] = set()
    for t in rank:
        p = t.problem
        if p and _kind(t.name) not in seen:
            seen.add(_kind(t.name))
            problems.append(p)
    if marlin:
        shapes = {n: sh for n, _, sh, _ in tensors}
        for t in rank:
            if t.part != "scales" or len(t.shape) != 2 or t.split in (Split.REPLICATED, Split.VOCAB):
                continue
            qz, qw = shapes.get(t.module + ".qzeros"), shapes.get(t.module + ".qweight")
            shape = t.rank_shape
            if not qz or not qw or shape is None or not t.shape[1] or 32 * qz[1] // t.shape[1] != 4:
                continue
            k, n = shape[0] * (qw[0] * 8 // t.shape[0]), shape[1]  # rank groups x group size, rank N
            kind = "marlin " + _kind(t.name)
            if (n % 64 or k % 128) and kind not in seen:
                seen.add(kind)
                problems.append(f"{t.module}: {n} x {k} (N x K) per rank is not a multiple of Marlin's tiles (N 64, K 128)")
    return problems


def _kind(name: str) -> str:
    """A tensor name with layer and expert numbers taken out: one line per kind of module."""
    import re

    return re.sub(r"\.\d+\.", ".N.", name.rpartition(".")[0])
