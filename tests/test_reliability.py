"""Never lose data, never leave a half-written model: kills, Ctrl-C, resume, refusals, full disks.

Conversions run as real ``python -m repack convert`` subprocesses; kills are placed by polling DST.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from repack import synth
from tests.helpers import assert_refused, tree_hashes, w3repack_in_process
from tests.helpers import w3repack as cli

STATE = Path(".w3repack") / "state.json"


@pytest.fixture(scope="module")
def big(tmp_path_factory) -> tuple[Path, Path]:
    """A ~37 MB, 10-shard source with every trap, and its uninterrupted conversion."""
    base = tmp_path_factory.mktemp("reliability")
    src = synth.write_checkpoint(base / "src", synth.TinySpec(traps=True, shard_bytes=4 << 20))
    ref = base / "ref"
    r = cli("convert", src, ref, "--workers", "2")
    assert r.returncode == 0, r.stderr
    assert len(shards(ref)) >= 8
    return src, ref


_REF: dict[Path, dict[str, str]] = {}


def ref_hashes(ref: Path) -> dict[str, str]:
    if ref not in _REF:
        _REF[ref] = tree_hashes(ref)
    return _REF[ref]


def shards(root: Path) -> list[str]:
    return sorted(p.name for p in root.glob("*.safetensors"))


def start(src: Path, dst: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "repack", "convert", str(src), str(dst), "--workers", "1", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # as from a terminal, even under `cmd &`
    )


def finished(dst: Path) -> list[str]:
    try:
        return sorted(json.loads((dst / STATE).read_text())["finished"])
    except (OSError, ValueError, KeyError):
        return []


def partials(dst: Path) -> list[Path]:
    return [p for p in dst.rglob("*.partial") if p.is_file()]


def run_until(src: Path, dst: Path, cond, sig=signal.SIGKILL, attempts: int = 5) -> subprocess.Popen:
    """Start a conversion and send ``sig`` the moment ``cond(dst)`` holds; retry if it finished first."""
    for _ in range(attempts):
        shutil.rmtree(dst, ignore_errors=True)
        p = start(src, dst)
        deadline = time.monotonic() + 60
        while p.poll() is None and time.monotonic() < deadline:
            if dst.exists() and cond(dst):
                p.send_signal(sig)
                break
            time.sleep(0.0005)
        p.wait(timeout=30)
        if p.returncode != 0:
            return p
    pytest.fail(f"the conversion always finished before the condition held ({attempts} tries)")


def assert_consistent_after_kill(dst: Path, ref: Path) -> None:
    """Whatever a stopped run left: config.json and the manifest are absent, and every visible file (shards
    under their final names, index, copied files) is already complete."""
    assert not (dst / "config.json").exists() and not (dst / "w3repack.json").exists()
    want = ref_hashes(ref)
    for rel, h in tree_hashes(dst).items():
        if not any(part.startswith(".") for part in Path(rel).parts):
            assert h == want[rel], f"{rel} is under its final name but incomplete"


def assert_clean_result(dst: Path, ref: Path) -> None:
    assert tree_hashes(dst) == ref_hashes(ref)
    assert not (dst / ".w3repack").exists()
    assert not list(dst.rglob("*.partial")) and not list(dst.rglob("*w3repack-tmp"))


def identity(dst: Path, names: list[str]) -> dict[str, tuple[int, int]]:
    return {n: ((dst / n).stat().st_ino, (dst / n).stat().st_mtime_ns) for n in names}


def _sized_partial(d: Path, size: int) -> bool:
    try:
        return any(p.stat().st_size > size for p in partials(d))
    except FileNotFoundError:
        return False


KILL_POINTS = {
    "after-1-shard": lambda d: len(finished(d)) >= 1,
    "after-2-shards": lambda d: len(finished(d)) >= 2,
    "after-3-shards": lambda d: len(finished(d)) >= 3,
    "mid-first-shard": lambda d: _sized_partial(d, 0),
    "mid-shard-after-2": lambda d: len(finished(d)) >= 2 and _sized_partial(d, 1 << 20),
    "after-last-shard": lambda d: (d / "model.safetensors.index.json").exists(),
}


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_sigkill_then_rerun_resumes_byte_identical(point, big, tmp_path):
    src, ref = big
    before = tree_hashes(src)
    dst = tmp_path / "dst"
    p = run_until(src, dst, KILL_POINTS[point])
    assert p.returncode == -signal.SIGKILL
    assert_consistent_after_kill(dst, ref)
    done = finished(dst)
    if point.startswith("mid"):
        assert partials(dst), "the kill did not land mid-shard"
    if point != "mid-first-shard":
        assert done
    kept = identity(dst, done)

    r = cli("convert", src, dst, "--workers", "1", "--json")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["shards_kept"] == len(done) and summary["shards_written"] == summary["shards"] - len(done)
    assert identity(dst, done) == kept, "finished shards were redone"
    assert_clean_result(dst, ref)
    assert tree_hashes(src) == before
    if point == "after-2-shards":
        v = cli("verify", src, dst)
        assert v.returncode == 0, v.stdout + v.stderr


def test_two_kills_in_a_row(big, tmp_path):
    src, ref = big
    dst = tmp_path / "dst"
    run_until(src, dst, KILL_POINTS["after-1-shard"])
    first = finished(dst)
    p = start(src, dst)
    while p.poll() is None and len(finished(dst)) < len(first) + 2:
        time.sleep(0.0005)
    p.kill()
    p.wait()
    assert_consistent_after_kill(dst, ref)
    r = cli("convert", src, dst, "--workers", "2")
    assert r.returncode == 0, r.stderr
    assert_clean_result(dst, ref)


def test_ctrl_c_stops_promptly_and_resumes(big, tmp_path):
    src, ref = big
    before = tree_hashes(src)
    dst = tmp_path / "dst"
    p = start(src, dst)
    while p.poll() is None and len(finished(dst)) < 2:
        time.sleep(0.0005)
    assert p.poll() is None, "finished before it could be interrupted"
    t0 = time.monotonic()
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=30)
    took = time.monotonic() - t0
    assert p.returncode == 130, err
    assert took < 3, took
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("interrupted") and "resume" in lines[0], err
    assert "Traceback" not in err
    assert not partials(dst), "an interrupted run left a half-written shard"
    assert_consistent_after_kill(dst, ref)
    done = finished(dst)
    assert len(done) >= 2
    kept = identity(dst, done)
    r = cli("convert", src, dst, "--workers", "1", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["shards_kept"] == len(done)
    assert identity(dst, done) == kept
    assert_clean_result(dst, ref)
    assert tree_hashes(src) == before


def test_damaged_finished_shard_is_redone(big, tmp_path):
    src, ref = big
    dst = tmp_path / "dst"
    run_until(src, dst, KILL_POINTS["after-3-shards"])
    done = finished(dst)
    victim = dst / done[0]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01
    victim.write_bytes(bytes(data))
    r = cli("convert", src, dst, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["shards_kept"] == len(done) - 1
    assert_clean_result(dst, ref)


def test_rerun_of_finished_conversion_keeps_everything(big, tmp_path):
    src, ref = big
    dst = tmp_path / "dst"
    shutil.copytree(ref, dst)
    ids = identity(dst, shards(dst))
    r = cli("convert", src, dst, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["shards_written"] == 0
    assert identity(dst, shards(dst)) == ids
    assert_clean_result(dst, ref)


def test_manifest_is_deterministic(big, tmp_path):
    src, ref = big
    r = cli("convert", src, tmp_path / "again", "--workers", "1")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "again" / "w3repack.json").read_bytes() == (ref / "w3repack.json").read_bytes()
    assert tree_hashes(tmp_path / "again") == ref_hashes(ref)


def test_leftover_state_dir_alone_is_not_foreign(big, tmp_path):
    """A kill while the very first state file was being written leaves only ``.w3repack/``: that is ours."""
    src, ref = big
    dst = tmp_path / "dst"
    (dst / ".w3repack").mkdir(parents=True)
    (dst / ".w3repack" / ".state.json.w3repack-tmp").write_bytes(b'{"finger')
    r = cli("convert", src, dst)
    assert r.returncode == 0, r.stderr
    assert_clean_result(dst, ref)


# --- refusals -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    return synth.write_checkpoint(tmp_path_factory.mktemp("small") / "src", synth.TinySpec.small(traps=True))


@pytest.fixture
def src_copy(small, tmp_path) -> Path:
    return Path(shutil.copytree(small, tmp_path / "src"))


def test_refuses_destination_equal_to_source(src_copy):
    before = tree_hashes(src_copy)
    assert_refused(cli("convert", src_copy, src_copy), "source itself")
    assert_refused(cli("convert", src_copy, src_copy / "." / "sub" / ".."), "source itself")
    assert tree_hashes(src_copy) == before


def test_refuses_destination_symlinked_to_source(src_copy, tmp_path):
    before = tree_hashes(src_copy)
    link = tmp_path / "link"
    link.symlink_to(src_copy)
    assert_refused(cli("convert", src_copy, link), "source itself")
    assert tree_hashes(src_copy) == before


def test_refuses_destination_inside_source(src_copy):
    before = tree_hashes(src_copy)
    assert_refused(cli("convert", src_copy, src_copy / "out"), "inside the source")
    assert not (src_copy / "out").exists()
    assert tree_hashes(src_copy) == before


def test_refuses_source_inside_destination(src_copy, tmp_path):
    before = tree_hashes(src_copy)
    assert_refused(cli("convert", src_copy, tmp_path), "source", "inside the destination")
    assert_refused(cli("convert", src_copy, tmp_path, "--overwrite"), "inside the destination")
    assert tree_hashes(src_copy) == before


def test_refuses_foreign_destination_unless_overwrite(src_copy, tmp_path):
    before = tree_hashes(src_copy)
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "notes.txt").write_text("mine\n")
    (dst / "config.json").write_text("{}")
    assert_refused(cli("convert", src_copy, dst), str(dst), "not empty", "--overwrite")
    assert sorted(os.listdir(dst)) == ["config.json", "notes.txt"]
    assert (dst / "notes.txt").read_text() == "mine\n"
    assert_refused(cli("convert", src_copy, dst, "--overwrite"), str(dst / "notes.txt"), "did not write")
    assert (dst / "notes.txt").read_text() == "mine\n", "--overwrite removes only what w3repack writes"
    (dst / "notes.txt").unlink()
    r = cli("convert", src_copy, dst, "--overwrite")
    assert r.returncode == 0, r.stderr
    assert cli("verify", src_copy, dst).returncode == 0
    assert tree_hashes(src_copy) == before


def test_refuses_destination_of_a_different_conversion(src_copy, tmp_path):
    dst = tmp_path / "dst"
    assert cli("convert", src_copy, dst).returncode == 0
    before = tree_hashes(dst)
    assert_refused(cli("convert", src_copy, dst, "--quant-method", "gptq"), "different conversion", "--overwrite")
    assert tree_hashes(dst) == before


def test_refuses_destination_that_is_a_file(src_copy, tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    assert_refused(cli("convert", src_copy, f), "not a directory")
    assert f.read_text() == "x"


@pytest.fixture
def tiny_fs(tmp_path):
    """Mount a tmpfs whose size the test chooses; skips where mounting is not permitted."""
    mounts = []

    def make(size: int) -> Path:
        d = tmp_path / f"fs{len(mounts)}"
        d.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(d)], capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a small tmpfs here ({r.stderr.strip() or r.returncode}): needs root")
        mounts.append(d)
        return d

    yield make
    for d in mounts:
        subprocess.run(["umount", "-l", str(d)], capture_output=True)


def test_refuses_when_free_space_is_short(src_copy, tiny_fs):
    before = tree_hashes(src_copy)
    fs = tiny_fs(1 << 20)
    dst = fs / "dst"
    line = assert_refused(cli("convert", src_copy, dst), "not enough free space", "bytes")
    assert "GiB" in line
    assert not dst.exists()
    assert tree_hashes(src_copy) == before


def test_disk_filling_up_mid_run_is_a_clean_refusal_and_resumes(big, tiny_fs):
    src, ref = big
    before = tree_hashes(src)
    need = sum(p.stat().st_size for p in ref.rglob("*") if p.is_file())
    fs = tiny_fs(need + (8 << 20))
    dst = fs / "dst"
    p = start(src, dst)
    while p.poll() is None and not (dst / STATE).exists():
        time.sleep(0.0005)
    filler = fs / "filler"
    with open(filler, "wb") as f:
        os.posix_fallocate(f.fileno(), 0, shutil.disk_usage(fs).free - (1 << 20))
    _, err = p.communicate(timeout=60)
    r = subprocess.CompletedProcess(p.args, p.returncode, "", err)
    assert_refused(r, "no space left", "resume")
    assert_consistent_after_kill(dst, ref)
    assert not partials(dst)
    done = finished(dst)
    filler.unlink()
    r = cli("convert", src, dst, "--workers", "1", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["shards_kept"] == len(done)
    assert_clean_result(dst, ref)
    assert tree_hashes(src) == before


def test_foreign_files_in_an_earlier_run_are_refused_even_with_overwrite(src_copy, tmp_path):
    dst = tmp_path / "dst"
    assert cli("convert", src_copy, dst).returncode == 0
    want = {p.relative_to(dst): p.read_bytes() for p in dst.rglob("*") if p.is_file()}
    (dst / "notes.txt").write_text("mine\n")
    (dst / "sub").mkdir(exist_ok=True)
    (dst / "sub" / "junk.safetensors").write_bytes(b"x")
    line = assert_refused(cli("convert", src_copy, dst), "did not write")
    assert "sub/junk.safetensors" in line or "notes.txt" in line
    assert (dst / "notes.txt").exists()
    assert_refused(cli("convert", src_copy, dst, "--overwrite"), "did not write")
    assert (dst / "notes.txt").exists() and (dst / "sub" / "junk.safetensors").exists()
    (dst / "notes.txt").unlink()
    shutil.rmtree(dst / "sub")
    r = cli("convert", src_copy, dst, "--overwrite", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["shards_written"] == 0
    assert {p.relative_to(dst): p.read_bytes() for p in dst.rglob("*") if p.is_file()} == want


def test_free_space_refusal_without_root(src_copy, tmp_path, monkeypatch):
    """The check runs before any byte is written and names both numbers (disk_usage patched, in process)."""
    from collections import namedtuple

    from repack.checkpoint import open_checkpoint
    from repack.plan import Options, build_plan

    need = build_plan(open_checkpoint(src_copy), Options()).out_total_bytes()
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(1 << 40, 0, need - 1))
    dst = tmp_path / "dst"
    code, _, err_text = w3repack_in_process("convert", src_copy, dst)
    assert code == 2
    err = err_text.strip().splitlines()
    assert len(err) == 1 and "not enough free space" in err[0] and f"{need:,} more bytes" in err[0] and f"{need - 1:,}" in err[0]
    assert not dst.exists() or not any(p.is_file() for p in dst.rglob("*"))
