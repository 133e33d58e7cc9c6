"""verify: the report on a manifest that is missing or unreadable, and the byte offset of a difference."""

from __future__ import annotations

import json
import shutil

import pytest

from repack.checkpoint import open_checkpoint
from repack.ops import Found, Op
from repack.plan import Options, build_plan
from repack.verify import verify, verify_shard


@pytest.fixture
def out(converted, tmp_path):
    return shutil.copytree(converted[1], tmp_path / "out")


def test_missing_and_unreadable_manifest_are_reported_not_raised(converted, out):
    src = converted[0]
    man = json.loads((out / "w3repack.json").read_text())
    (out / "w3repack.json").write_text(json.dumps({**man, "options": {**man["options"], "no_such_option": 1}}))
    rep = verify(src, out)
    assert not rep.ok and "unreadable manifest" in rep.differences[0].line()
    (out / "w3repack.json").write_text("{")
    assert "unreadable manifest" in verify(src, out).differences[0].line()
    (out / "w3repack.json").unlink()
    rep = verify(src, out)
    assert not rep.ok and rep.differences[0].message.startswith("missing")


@pytest.mark.parametrize("op", [Op.TRANSCODE, Op.ZEROS, Op.COPY, Op.DEQUANT])
def test_verify_shard_names_the_exact_byte(converted, out, op):
    src = converted[0]
    plan = build_plan(open_checkpoint(src), Options())
    sp, o = next((s, o) for s in plan.shards for o in s.ops if o.op is op and o.out_nbytes >= 8)
    begin, end = sp.out_offsets[o.out_name]
    at = sp.data_offset + begin + (end - begin) // 2 + 1
    data = bytearray((out / sp.name).read_bytes())
    data[at] ^= 0x01
    (out / sp.name).write_bytes(data)
    counts: dict[str, int] = {}
    with pytest.raises(Found) as f:
        verify_shard(plan, sp, out, counts, lambda n: None)
    d = f.value.diff
    assert d.tensor == o.out_name and d.file == str(out / sp.name)
    if op is Op.DEQUANT:
        assert d.offset // 4 == at // 4  # the float32 holding the flipped byte
    else:
        assert d.offset == at
    assert verify(src, out).differences[0].line() == d.line()


def test_counts_per_op(converted):
    rep = verify(*converted)
    assert rep.ok and rep.hashes_checked == len(build_plan(open_checkpoint(converted[0]), Options()).shards)
    assert set(rep.tensors) == {op.value for op in Op}
