"""plan and ops: which op each tensor gets, output shapes and sizes, from headers alone."""

from __future__ import annotations

import json

from repack import codec
from repack.checkpoint import open_checkpoint
from repack.ops import OPS, Op, rows4
from repack.plan import Options, build_plan
from repack.safetensors_io import DTYPE_SIZES


def test_ops_and_output_shapes(traps_ckpt):
    ckpt = open_checkpoint(traps_ckpt)
    plan = build_plan(ckpt, Options())
    seen = set()
    for sp in plan.shards:
        for o in sp.ops:
            seen.add(o.op)
            m, t = o.module, o.src
            if o.op is Op.TRANSCODE:
                assert m.bits in (2, 3) and t.name.endswith(".qweight") and o.out_shape == (m.k // 8, m.n)
                assert o.out_nbytes * m.bits == t.nbytes * 4
            elif o.op is Op.ZEROS:
                assert o.out_shape == (t.shape[0], m.n // 8) and o.out_dtype == "I32"
            elif o.op is Op.DEQUANT:
                assert o.out_name == m.prefix + ".weight" and o.out_shape == (m.n, m.k) and o.out_dtype == "F32"
                assert m.prefix in plan.float_modules
            elif o.op is Op.DROP:
                assert o.out_name is None and m.prefix in plan.float_modules
            else:
                assert (o.out_name, o.out_dtype, o.out_shape) == (t.name, t.dtype, t.shape)
                assert m is None or m.bits in (4, 8) or t.name.endswith((".scales", ".g_idx", ".bias"))
    assert seen == set(Op)


def test_sizes_index_and_determinism(traps_ckpt):
    ckpt = open_checkpoint(traps_ckpt)
    a, b = build_plan(ckpt, Options()), build_plan(ckpt, Options())
    assert [s.prefix for s in a.shards] == [s.prefix for s in b.shards]
    for sp in a.shards:
        emitted = [o for o in sp.ops if o.out_name]
        assert sp.out_size == len(sp.prefix) + sum(o.out_nbytes for o in emitted)
        assert len(sp.prefix) % 8 == 0 and sp.src_size == (traps_ckpt / sp.name).stat().st_size
    assert a.index["metadata"]["total_size"] == a.out_shard_bytes - sum(len(s.prefix) for s in a.shards)
    assert set(a.index["weight_map"].values()) == {s.name for s in a.shards}
    cfg = json.loads(a.metadata_files()["config.json"])
    assert cfg["quantization_config"]["bits"] == 4
    assert list(a.metadata_files())[-1] == "config.json", "config.json is written last"
    assert a.output_files() >= {s.name for s in a.shards} | set(a.extra_files) | {"config.json"}


def test_float_options_off_means_no_dequant(traps_ckpt):
    plan = build_plan(open_checkpoint(traps_ckpt), Options(kv_b_float=False, indexer_float=False, mtp_float=False))
    assert not plan.float_modules
    assert all(o.op not in (Op.DEQUANT, Op.DROP) for s in plan.shards for o in s.ops)
    assert "dequantized to float32" not in plan.counts()


def test_row_arithmetic_matches_the_codec():
    for bits in (2, 3):
        rows = codec.words_per_block(bits) * 5
        assert rows4(rows, bits) * 8 == rows * 32 // bits  # 8 codes per 4-bit word
    assert set(OPS) == set(Op) and DTYPE_SIZES["I32"] == 4
