"""What serving needs to know about a model family, from config.json and tensor names alone.

An :class:`ArchSpec` says how vLLM shards each tensor over tensor-parallel ranks (:meth:`ArchSpec.split`), how
many KV-cache bytes a token costs per layer on one rank, which layers are MTP (next-n) layers, and what the
config of one rank looks like (:meth:`ArchSpec.rank_config`). The planner (weights and KV per GPU) and the
rehearsal (a one-GPU model of one rank) read the same spec through :mod:`repack.serve.sharding`, so the two cannot
disagree. This generic spec holds the rules vLLM applies to dense and MoE decoder models (Llama, Qwen, Mixtral
names); families register subclasses in :mod:`repack.serve.arch`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

from repack.errors import FormatError

LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")
EXPERT_RE = re.compile(r"\.experts\.(\d+)\.")
VOCAB_PAD = 64  # vLLM's VocabParallelEmbedding pads the vocabulary to a multiple of 64 before splitting it


class Split(str, Enum):
    """How one linear (or embedding) is laid out over tensor-parallel ranks.

    ``column``: the output dim N is split (gate/up, q/k/v, MLA q_b/kv_b); ``row``: the input dim K is split
    (down, o_proj); ``vocab``: the rows of an embedding or LM head, padded to :data:`VOCAB_PAD` first;
    ``kv_heads``: a column split by whole KV heads, each rank holding at least one (heads replicated when there
    are fewer than ranks); ``expert``: a routed expert under expert parallelism, whole on one rank of ``tp``;
    ``replicated``: every rank holds it whole.
    """

    COLUMN = "column"
    ROW = "row"
    VOCAB = "vocab"
    KV_HEADS = "kv_heads"
    EXPERT = "expert"
    REPLICATED = "replicated"


@dataclass(frozen=True)
class Layout:
    """Tensor parallel ``tp`` (ranks one layer is split over), pipeline parallel ``pp`` (layer ranges), ``ep``:
    vLLM's ``--enable-expert-parallel`` (routed experts whole, spread over the ``tp`` ranks; attention and shared
    experts still split by TP)."""

    tp: int = 1
    pp: int = 1
    ep: bool = False


def positive_int(config: dict, key: str, default: int | None = None, where: str = "config.json") -> int:
    """``config[key]`` as a positive int (``default`` when absent); a FormatError naming the key otherwise."""
    v = config.get(key, default)
    if v is None:
        raise FormatError(f"{where}: {key} is missing")
    if isinstance(v, bool) or not isinstance(v, int) or v < 1 or v > 1 << 40:
        raise FormatError(f"{where}: {key} is {v!r}, expected a positive integer")
    return v


def marlin_warning(family: str, result: str) -> str:
    """The planner's warning for a repack that vLLM runs on Marlin, from one family's failed GPU check."""
    return (f"vLLM runs this 4-bit MoE on Marlin here (below sm90, or --moe-backend marlin); a converted tiny {family} "
            f"under Marlin on vLLM 0.33.0 {result} (under Humming it matched on 8 of 8; docs/validation.md): check this "
            "model's output on Marlin before relying on it, or serve the 3-bit source natively")


class ArchSpec:
    """The generic rules (see the module docstring). Subclasses override the class sets and hooks."""

    name = "generic"
    architectures: tuple[str, ...] = ()
    column = frozenset({"q_proj", "k_proj", "v_proj", "qkv_proj", "gate_proj", "up_proj", "gate_up_proj", "w1", "w3",
                        "c_fc", "c_attn", "query_key_value", "fc1", "wqkv"})
    row = frozenset({"o_proj", "down_proj", "w2", "dense", "c_proj", "fc2", "out_proj", "wo"})
    vocab = frozenset({"embed_tokens", "lm_head", "head", "wte", "word_embeddings", "embed_in", "embed_out"})
    replicated = frozenset({"gate", "router"})
    kv_heads = frozenset({"k_proj", "v_proj"})
    # config keys of widths that tensor parallelism splits, and of head counts
    split_widths = ("intermediate_size", "moe_intermediate_size", "shared_expert_intermediate_size")
    expert_count_keys: tuple[str, ...] = ("n_routed_experts", "num_experts", "num_local_experts")
    mla = False
    # a GPU check of this family's 4-bit output under vLLM's Marlin MoE kernels that did not pass (docs/validation.md)
    marlin_caveat: str | None = None

    def __init__(self, config: dict):
        self.config = config
        self._splits: dict[tuple[str, bool], Split] = {}

    # ---------------------------------------------------------------- tensors

    def split(self, module: str, layout: Layout | None = None) -> Split:
        """How the module ``module`` (a tensor name without its last part) is sharded under ``layout``."""
        key = (module, bool(layout and layout.ep))
        if key not in self._splits:
            self._splits[key] = self.module_split(module, key[1])
        return self._splits[key]

    def module_split(self, module: str, ep: bool) -> Split:
        """:meth:`split` uncached: families override this."""
        if ep and EXPERT_RE.search(module + "."):
            return Split.EXPERT
        parts = module.split(".")
        leaf = parts[-1]
        if "norm" in leaf or leaf in self.replicated:
            return Split.REPLICATED
        if leaf in self.vocab:
            return Split.VOCAB
        if leaf in self.kv_heads and not self.mla:
            return Split.KV_HEADS
        if leaf in self.column:
            return Split.COLUMN
        if leaf in self.row:
            return Split.ROW
        return Split.REPLICATED

    def layer_of(self, tensor: str) -> int | None:
        m = LAYER_RE.search(tensor)
        return int(m.group(1)) if m else None

    @property
    def layers(self) -> int:
        return positive_int(self.config, "num_hidden_layers")

    def speculative_method(self, vllm: str | None) -> str | None:
        """vLLM's ``--speculative-config`` method for this family's MTP layer (None: the family has none)."""
        return None

    @property
    def experts(self) -> int:
        """Routed experts per MoE layer (0 for a dense model)."""
        for key in self.expert_count_keys:
            v = self.config.get(key)
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                return v
        return 0

    def mtp_layers(self) -> int:
        """MTP (next-n) layers the config declares after the decoder layers."""
        v = self.config.get("num_nextn_predict_layers", 0)
        return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else 0

    def is_mtp(self, tensor: str) -> bool:
        layer = self.layer_of(tensor)
        return layer is not None and layer >= self.layers

    # ---------------------------------------------------------------- attention

    @property
    def heads(self) -> int:
        return positive_int(self.config, "num_attention_heads")

    @property
    def kv_head_count(self) -> int:
        return positive_int(self.config, "num_key_value_heads", self.heads)

    @property
    def head_dim(self) -> int:
        hd = self.config.get("head_dim")
        if hd is not None:
            return positive_int(self.config, "head_dim")
        hidden = positive_int(self.config, "hidden_size")
        if hidden % self.heads:
            raise FormatError(f"config.json: hidden_size {hidden} is not a multiple of num_attention_heads {self.heads}")
        return hidden // self.heads

    def kv_heads_per_rank(self, tp: int) -> int:
        """KV heads one rank holds: ``kv_heads / tp``, at least one (vLLM replicates heads over ranks when there
        are fewer KV heads than ranks)."""
        return max(1, self.kv_head_count // tp)

    def kv_bytes_per_layer(self, tp: int, kv_dtype: str, dtype_bytes: int) -> tuple[int, int]:
        """(attention KV bytes, extra per-layer cache bytes) per token per layer on one rank: keys and values of
        the rank's KV heads."""
        fp8 = kv_dtype.startswith("fp8")
        return 2 * self.kv_heads_per_rank(tp) * self.head_dim * (1 if fp8 else dtype_bytes), 0

    # ---------------------------------------------------------------- one rank

    def divisibility(self, layout: Layout) -> list[str]:
        """What ``layout.tp`` does not divide (attention heads, KV heads, split widths), in words; [] if all."""
        tp = layout.tp
        out = []
        if layout.ep and self.experts % tp:
            out.append(f"{self.experts} routed experts are not divisible over {tp} expert-parallel ranks")
        if self.heads % tp:
            out.append(f"num_attention_heads {self.heads} is not divisible by TP {tp}")
        kv = self.kv_head_count
        if not self.mla and kv % tp and tp % kv:
            out.append(f"num_key_value_heads {kv} and TP {tp}: neither divides the other")
        qc = self.config.get("quantization_config")
        group = qc.get("group_size") if isinstance(qc, dict) else None
        for key in self.split_widths:
            v = self.config.get(key)
            if layout.ep and key == "moe_intermediate_size":
                continue  # whole experts per rank
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                continue
            if v % tp:
                out.append(f"{key} {v} is not divisible by TP {tp}")
            elif isinstance(group, int) and group > 0 and (v // tp) % group:
                out.append(f"{key} {v} / TP {tp} = {v // tp} per rank is not a multiple of the quantization group size {group}")
        return out

    def rank_config(self, layout: Layout) -> dict:
        """config.json of a one-GPU model holding exactly one rank's shapes: heads and split widths divided by
        ``tp``, KV heads as one rank holds them, the vocabulary as one rank's padded slice, all layers."""
        tp = layout.tp
        c = dict(self.config)
        c["num_attention_heads"] = self.heads // tp
        if "num_key_value_heads" in c or not self.mla:
            c["num_key_value_heads"] = self.heads // tp if self.mla else self.kv_heads_per_rank(tp)
        for key in self.split_widths:
            v = c.get(key)
            if layout.ep and key == "moe_intermediate_size":
                continue
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                c[key] = v // tp
        if layout.ep:
            for key in self.expert_count_keys:
                if isinstance(c.get(key), int) and not isinstance(c[key], bool) and c[key] > 0:
                    c[key] = c[key] // tp
        if isinstance(c.get("vocab_size"), int):
            c["vocab_size"] = vocab_rows(c["vocab_size"], tp)
        return c


def vocab_rows(vocab: int, tp: int) -> int:
    """Rows of an embedding one rank holds: the vocabulary padded to :data:`VOCAB_PAD`, split over ``tp``."""
    padded = -(-vocab // VOCAB_PAD) * VOCAB_PAD
    return -(-padded // tp)
