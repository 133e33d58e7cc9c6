"""output: the manifest as the only reader and writer of w3repack.json; what prepare keeps; space checks."""

from __future__ import annotations

import json
import os
from collections import namedtuple
from pathlib import Path

import pytest

from repack import space
from repack.errors import UserError
from repack.output import (
    MANIFEST_NAME,
    STATE_DIR,
    FileRecord,
    Manifest,
    ManifestError,
    Output,
    OutputStateError,
    RunState,
    ShardHashes,
    finished_output,
)

Usage = namedtuple("Usage", "total used free")


def test_manifest_round_trip_is_byte_stable(converted):
    path = converted[1] / MANIFEST_NAME
    man = Manifest.load(converted[1])
    assert man is not None and man.complete and man.shard_hashes
    assert json.dumps(man.to_json(), indent=2) + "\n" == path.read_text()
    assert man.finished()[man.output_shards[0].name] == ShardHashes(man.output_shards[0].sha256, man.source_files[0].sha256)


def test_manifest_is_lenient_except_for_options(tmp_path):
    (tmp_path / MANIFEST_NAME).write_text(json.dumps({"options": {}, "output_shards": [1, {"name": "a", "size": 3}],
                                                      "source": "x", "complete": "yes"}))
    man = Manifest.load(tmp_path)
    assert man.output_shards == [FileRecord("a", 3, None)] and man.source_files == [] and not man.complete
    with pytest.raises(UserError, match="not complete"):
        finished_output(tmp_path)
    (tmp_path / MANIFEST_NAME).write_text(json.dumps({"complete": True}))
    with pytest.raises(ManifestError, match="no options"):
        Manifest.load(tmp_path)
    (tmp_path / MANIFEST_NAME).unlink()
    assert Manifest.load(tmp_path) is None
    with pytest.raises(UserError, match="not a finished w3repack output"):
        finished_output(tmp_path)


def write_shard(out: Output, name: str, data: bytes) -> None:
    part = out.open_partial(name)
    assert part.path == out.path / STATE_DIR / f"{name}.partial" and part.path.is_file()
    os.write(part.fd, data)
    os.close(part.fd)
    out.commit_shard(name, ShardHashes(None, None))


def run_once(dst: Path, fp: dict, files: dict[str, bytes]) -> Output:
    out = Output(dst)
    out.prepare(fp, {n: len(d) for n, d in files.items()}, set(files), overwrite=True)
    out.start(fp, {})
    for name, data in files.items():
        write_shard(out, name, data)
    return out


def prepare(dst: Path, *args, **kw) -> dict:
    """One run's ``prepare``, its lock released after."""
    out = Output(dst)
    try:
        return out.prepare(*args, **kw)
    finally:
        out.release()


def test_prepare_keeps_only_what_the_same_run_finished(tmp_path):
    dst, fp = tmp_path / "dst", {"run": 1}
    sizes = {"a": 3, "b": 4}
    assert prepare(dst, fp, sizes, set(sizes), overwrite=False) == {}
    run_once(dst, fp, {"a": b"abc"}).release()
    assert not (dst / STATE_DIR / "a.partial").exists() and (dst / "a").read_bytes() == b"abc"
    assert prepare(dst, fp, sizes, set(sizes), overwrite=False, hashes=True) == {}, "unhashed: redone"
    assert prepare(dst, fp, sizes, set(sizes), overwrite=False, hashes=False) == {"a": ShardHashes(None, None)}
    with pytest.raises(UserError, match="a different conversion"):
        prepare(dst, {"run": 2}, sizes, set(sizes), overwrite=False)
    (dst / "junk").write_text("x")
    for overwrite in (False, True):
        with pytest.raises(UserError, match="did not write.*junk"):
            prepare(dst, fp, sizes, set(sizes), overwrite=overwrite, hashes=False)
    (dst / "junk").unlink()
    assert prepare(dst, {"run": 2}, sizes, set(sizes), overwrite=True) == {}
    assert [p.name for p in dst.iterdir()] == [STATE_DIR] and not (dst / STATE_DIR / "state.json").exists()


def test_prepare_refuses_files_not_from_w3repack(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"x")
    with pytest.raises(UserError, match="files that are not from w3repack"):
        prepare(tmp_path, {}, {}, set(), overwrite=False)
    with pytest.raises(UserError, match="not a directory"):
        prepare(tmp_path / "model.safetensors", {}, {}, set(), overwrite=False)


def test_finish_writes_the_manifest_and_drops_the_state(tmp_path):
    out = run_once(tmp_path / "dst", {"run": 1}, {"a": b"abc"})
    out.save_record("hub-headers", "a", b"head")
    assert out.record("hub-headers", "a") == b"head" and out.record("hub-headers", "b") is None
    man = Manifest({"run": 1}, {}, "/src", [], [FileRecord("a", 3, None)], [], {}, [], 3, False)
    out.finish(man)
    assert not (tmp_path / "dst" / STATE_DIR).exists()
    assert Manifest.load(tmp_path / "dst") == man


def test_space_checks_add_up_what_shares_a_device(tmp_path, monkeypatch):
    monkeypatch.setattr(space.shutil, "disk_usage", lambda p: Usage(1 << 40, 0, 1000))
    dst = tmp_path / "new" / "dst"
    space.check_space(dst, 1000)
    with pytest.raises(UserError, match=r"output needs 1,001 more bytes.*1,000 bytes"):
        space.check_space(dst, 1001)
    space.check_space(dst, 600, [(tmp_path / "cache", 400)])
    with pytest.raises(UserError, match=r"needs 1,001 bytes.*source shards to fetch.*; hint$"):
        space.check_space(dst, 600, [(tmp_path / "cache", 401)], "; hint")


def test_a_run_goes_through_its_states_in_order(tmp_path):
    dst, fp = tmp_path / "dst", {"run": 1}
    out = Output(dst)
    assert out.state is RunState.NEW and out.record("hub-headers", "a") is None and not dst.exists()
    out.prepare(fp, {"a": 3}, {"a"}, overwrite=False)
    assert out.state is RunState.PREPARED and (dst / STATE_DIR / "lock").is_file()
    out.start(fp, {})
    assert out.state is RunState.WRITING and out.finished("a") is None
    write_shard(out, "a", b"abc")
    assert out.finished("a") == ShardHashes(None, None)
    out.finish(Manifest(fp, {}, "src", [], [FileRecord("a", 3, None)], [], {}, [], 3, False))
    assert out.state is RunState.FINISHED and sorted(p.name for p in dst.iterdir()) == ["a", MANIFEST_NAME]
    out.release()
    assert out.state is RunState.FINISHED


@pytest.mark.parametrize("step, at, want", [
    ("start", "new", "PREPARED"),
    ("open_partial", "prepared", "WRITING"),
    ("commit_shard", "prepared", "WRITING"),
    ("write_file", "new", "WRITING"),
    ("save_record", "prepared", "WRITING"),
    ("finish", "prepared", "WRITING"),
    ("prepare", "prepared", "NEW"),
    ("prepare", "writing", "NEW"),
    ("start", "writing", "PREPARED"),
    ("open_partial", "finished", "WRITING"),
    ("write_file", "aborted", "WRITING"),
    ("finished", "aborted", "WRITING"),
])
def test_a_step_out_of_order_is_refused_naming_both_states(tmp_path, step, at, want):
    """A misuse is a bug of the caller: OutputStateError (not a UserError), naming the state needed and the
    state the run is in; nothing is written."""
    dst, fp = tmp_path / "dst", {"run": 1}
    out = Output(dst)
    if at != "new":
        out.prepare(fp, {}, set(), overwrite=False)
    if at in ("writing", "finished", "aborted"):
        out.start(fp, {})
    if at == "finished":
        out.finish(Manifest(fp, {}, "src", [], [], [], {}, [], 0, False))
    if at == "aborted":
        out.release()
    assert out.state.value == at
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    calls = {"start": lambda: out.start(fp, {}), "open_partial": lambda: out.open_partial("a"),
             "commit_shard": lambda: out.commit_shard("a", ShardHashes(None, None)),
             "write_file": lambda: out.write_file("config.json", b"{}"),
             "save_record": lambda: out.save_record("hub-headers", "a", b"x"),
             "finish": lambda: out.finish(Manifest(fp, {}, "src", [], [], [], {}, [], 0, False)),
             "prepare": lambda: out.prepare(fp, {}, set(), overwrite=False), "finished": lambda: out.finished("a")}
    with pytest.raises(OutputStateError) as e:
        calls[step]()
    assert not isinstance(e.value, UserError)
    assert str(e.value) == f"{dst}: {step} needs the run {want}, but it is {at.upper()}"
    assert out.state.value == at
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before


def test_release_ends_a_run_in_any_state(tmp_path):
    """``release`` is safe in ``finally`` whatever happened: a held lock is dropped (ABORTED), else nothing."""
    out = Output(tmp_path / "new")
    out.release()
    assert out.state is RunState.NEW and not (tmp_path / "new").exists()
    (tmp_path / "model.safetensors").write_bytes(b"x")
    out = Output(tmp_path)
    with pytest.raises(UserError, match="files that are not from w3repack"):
        out.prepare({}, {}, set(), overwrite=False)
    assert out.state is RunState.LOCKED
    out.release()
    assert out.state is RunState.ABORTED
    again = Output(tmp_path)
    with pytest.raises(UserError, match="files that are not from w3repack"):  # not "in use by another run"
        again.prepare({}, {}, set(), overwrite=False)
    again.release()
