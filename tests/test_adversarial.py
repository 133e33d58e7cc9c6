"""Hostile inputs, one or more tests per cause of the hostile-input review (issue 16): links planted in DST or
SRC, special files, concurrent runs, tampered outputs, colliding names, metadata made to cost unbounded work.

Every test writes only under its own temporary folders; outcomes are checked on real files, links, FIFOs,
locks and subprocesses.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from repack import synth
from tests.helpers import assert_refused, tree_hashes
from tests.helpers import w3repack as cli

INDEX = "model.safetensors.index.json"


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    return synth.write_checkpoint(tmp_path_factory.mktemp("adv") / "src", synth.TinySpec.small(traps=True))


@pytest.fixture
def src(small, tmp_path) -> Path:
    return Path(shutil.copytree(small, tmp_path / "src"))


@pytest.fixture(scope="module")
def done(small, tmp_path_factory) -> Path:
    dst = tmp_path_factory.mktemp("adv-done") / "dst"
    r = cli("convert", small, dst)
    assert r.returncode == 0, r.stderr
    return dst


@pytest.fixture
def out(done, tmp_path) -> Path:
    return Path(shutil.copytree(done, tmp_path / "dst", symlinks=True))


def shard_names(root: Path) -> list[str]:
    return sorted(p.name for p in root.glob("*.safetensors"))


def edit_json(path: Path, fn) -> None:
    obj = json.loads(path.read_text())
    obj = fn(obj) or obj
    path.write_text(json.dumps(obj, indent=2))


def verify_code(src: Path, dst: Path) -> tuple[int, str]:
    r = cli("verify", src, dst)
    return r.returncode, r.stdout + r.stderr


# --- 1. writes outside DST through planted links ------------------------------------------------------------


def test_state_folder_planted_as_a_link_is_refused_and_nothing_is_written_through_it(src, tmp_path):
    dst, outside = tmp_path / "dst", tmp_path / "outside"
    dst.mkdir()
    outside.mkdir()
    (dst / ".w3repack").symlink_to(outside)
    assert_refused(cli("convert", src, dst), ".w3repack", "symlink")
    assert list(outside.iterdir()) == []


def write_state(src: Path, dst: Path, finished: dict[str, str | None]) -> None:
    """The state file of an unfinished run of ``convert src dst`` (default options) with ``finished`` shards."""
    from repack.checkpoint import open_checkpoint
    from repack.convert import fingerprint
    from repack.plan import Options, build_plan
    from repack.sources.folder import FolderSource

    fp = fingerprint(build_plan(open_checkpoint(src), Options()), FolderSource(src))
    (dst / ".w3repack").mkdir(parents=True, exist_ok=True)
    (dst / ".w3repack" / "state.json").write_text(json.dumps(
        {"fingerprint": fp, "finished": {n: {"sha256": h, "source_sha256": None} for n, h in finished.items()}}))


def test_partial_file_planted_as_a_link_is_never_written_through(src, tmp_path):
    dst, victim = tmp_path / "dst", tmp_path / "victim.txt"
    victim.write_text("precious\n")
    write_state(src, dst, {})
    for name in shard_names(src):
        (dst / ".w3repack" / f"{name}.partial").symlink_to(victim)
    (dst / ".w3repack" / ".state.json.w3repack-tmp").symlink_to(victim)
    r = cli("convert", src, dst)
    assert r.returncode == 0, r.stderr
    assert victim.read_text() == "precious\n"
    assert verify_code(src, dst)[0] == 0


def test_final_name_planted_as_a_link_in_a_resumable_destination_is_refused(src, tmp_path):
    dst, victim = tmp_path / "dst", tmp_path / "victim.txt"
    victim.write_text("precious\n")
    p = subprocess.Popen([sys.executable, "-m", "repack", "convert", str(src), str(dst), "--workers", "1"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    while p.poll() is None and not (dst / ".w3repack" / "state.json").exists():
        time.sleep(0.0005)
    p.send_signal(signal.SIGKILL)
    p.wait()
    if (dst / "w3repack.json").exists():
        pytest.skip("the run finished before it could be killed")
    (dst / "config.json").unlink(missing_ok=True)
    (dst / "config.json").symlink_to(victim)
    r = cli("convert", src, dst)
    assert r.returncode == 2 and "config.json" in r.stderr, r.stderr
    assert victim.read_text() == "precious\n"


# --- 2. secrets copied out of SRC ---------------------------------------------------------------------------


def test_a_copied_file_linked_outside_the_source_is_refused(src, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("token\n")
    (src / "tokenizer.json").symlink_to(secret)
    assert_refused(cli("convert", src, tmp_path / "dst"), "tokenizer.json", "outside the source")
    assert not any("token" in p.read_text(errors="replace") for p in (tmp_path / "dst").rglob("*") if p.is_file())


def test_a_folder_linked_outside_the_source_is_refused(src, tmp_path):
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "id_rsa").write_text("key\n")
    (src / "more").symlink_to(tmp_path / "elsewhere")
    assert_refused(cli("convert", src, tmp_path / "dst"), "more", "outside the source")


def test_a_folder_linked_inside_the_source_is_copied(src, tmp_path):
    (src / "extra").mkdir()
    (src / "extra" / "notes.txt").write_text("hi\n")
    (src / "alias").symlink_to("extra")
    r = cli("convert", src, tmp_path / "dst")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "dst" / "alias" / "notes.txt").read_text() == "hi\n"
    assert verify_code(src, tmp_path / "dst")[0] == 0


# --- 3/4/5. verify passes tampered outputs ------------------------------------------------------------------


@pytest.mark.parametrize("extra", ["chat_template.jinja", "modeling_evil.py", "pytorch_model.bin",
                                   ".hidden.safetensors", ".w3repack/state.json", "sub/", "link"])
def test_verify_reports_any_file_convert_did_not_write(small, out, extra):
    if extra == "link":
        (out / "link").symlink_to(out / "config.json")
    elif extra.endswith("/"):
        (out / extra).mkdir()
    else:
        (out / extra).parent.mkdir(exist_ok=True)
        (out / extra).write_text("x")
    code, text = verify_code(small, out)
    assert code == 1 and extra.rstrip("/").split("/")[0] in text, text


@pytest.mark.parametrize("edit", ["int-to-float", "false-to-0", "duplicate-key", "reformatted"])
def test_verify_compares_json_as_written_types_included(small, out, edit):
    p = out / "config.json"
    text = p.read_text()
    if edit == "int-to-float":
        text = text.replace('"num_hidden_layers": 2,', '"num_hidden_layers": 2.0,', 1)
    elif edit == "false-to-0":
        text = text.replace("false", "0", 1)
    elif edit == "duplicate-key":
        text = text.replace("{", '{\n  "model_type": "llama",', 1)
    else:
        text = json.dumps(json.loads(text))
    assert text != p.read_text()
    p.write_text(text)
    code, out_text = verify_code(small, out)
    assert code == 1 and "config.json" in out_text, out_text


@pytest.mark.parametrize("edit", ["count-to-float", "duplicate-key"])
def test_verify_compares_the_manifest_values_types_included(small, out, edit):
    p = out / "w3repack.json"
    text = p.read_text()
    if edit == "count-to-float":
        man = json.loads(text)
        key = next(iter(man["counts"]))
        text = text.replace(f'"{key}": {man["counts"][key]}', f'"{key}": {man["counts"][key]}.0', 1)
    else:
        text = text.replace("{", '{\n  "complete": false,', 1)
    assert text != p.read_text()
    p.write_text(text)
    code, out_text = verify_code(small, out)
    assert code == 1 and "w3repack.json" in out_text, out_text


@pytest.mark.parametrize("manifest", [
    lambda m: {**m, "options": {**m["options"], "target": 5}},
    lambda m: {**m, "options": {**m["options"], "target": "nope"}},
    lambda m: {**m, "options": {**m["options"], "kv_b_float": "yes"}},
    lambda m: [m],
    lambda m: "[" * 100000 + "]" * 100000,
])
def test_a_malformed_manifest_is_a_difference_naming_it(small, out, manifest):
    p = out / "w3repack.json"
    new = manifest(json.loads(p.read_text()))
    p.write_text(new if isinstance(new, str) else json.dumps(new))
    r = cli("verify", small, out)
    assert r.returncode == 1 and "w3repack.json" in r.stdout + r.stderr, (r.returncode, r.stderr[-500:])
    assert "Traceback" not in r.stderr


# --- 6. two runs into one DST -------------------------------------------------------------------------------


def test_a_second_run_into_a_destination_in_use_is_refused_naming_the_holder(tmp_path):
    src = synth.write_checkpoint(tmp_path / "src", synth.TinySpec(traps=True, shard_bytes=4 << 20))
    dst = tmp_path / "dst"
    first = subprocess.Popen([sys.executable, "-m", "repack", "convert", str(src), str(dst), "--workers", "1"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while first.poll() is None and not (dst / ".w3repack" / "state.json").exists():
        time.sleep(0.0005)
    first.send_signal(signal.SIGSTOP)
    try:
        if first.poll() is not None:
            pytest.skip("the first run finished before it could be paused")
        r = cli("convert", src, dst, "--workers", "1")
        assert_refused(r, "in use by another w3repack run", f"pid {first.pid}")
    finally:
        first.send_signal(signal.SIGCONT)
    _, err = first.communicate(timeout=120)
    assert first.returncode == 0, err
    assert verify_code(src, dst)[0] == 0


def test_the_lock_is_an_flock_seen_by_any_process(src, tmp_path):
    """A plain ``flock`` on ``.w3repack/lock`` from another process keeps a run out."""
    dst = tmp_path / "dst"
    (dst / ".w3repack").mkdir(parents=True)
    (dst / ".w3repack" / "lock").write_text("pid 1 on elsewhere\n")
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time\n"
                               f"f = open({str(dst / '.w3repack' / 'lock')!r}, 'r+')\n"
                               "fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        assert_refused(cli("convert", src, dst), "in use by another w3repack run", "pid 1 on elsewhere")
        assert not (dst / "config.json").exists()
    finally:
        holder.kill()
        holder.wait()
    with open(dst / ".w3repack" / "lock", "r+") as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released with its holder
    assert cli("convert", src, dst).returncode == 0


# --- 7/8. --overwrite and what is kept ----------------------------------------------------------------------


def test_overwrite_removes_only_what_w3repack_wrote(src, tmp_path):
    dst = tmp_path / "dst"
    assert cli("convert", src, dst, "--quant-method", "gptq").returncode == 0
    (dst / "notes.txt").write_text("mine\n")
    (dst / "photos").mkdir()
    (dst / "photos" / "a.jpg").write_bytes(b"jpg")
    line = assert_refused(cli("convert", src, dst, "--overwrite"), "did not write")
    assert "notes.txt" in line or "photos/a.jpg" in line
    assert (dst / "notes.txt").read_text() == "mine\n" and (dst / "photos" / "a.jpg").read_bytes() == b"jpg"
    assert (dst / "w3repack.json").exists()


def test_overwrite_of_a_different_run_removes_its_files_and_nothing_else(src, tmp_path):
    dst = tmp_path / "dst"
    assert cli("convert", src, dst, "--quant-method", "gptq").returncode == 0
    r = cli("convert", src, dst, "--overwrite")
    assert r.returncode == 0, r.stderr
    assert verify_code(src, dst)[0] == 0


def test_an_unhashed_finished_shard_is_kept_only_if_it_verifies(src, tmp_path):
    dst, ref = tmp_path / "dst", tmp_path / "ref"
    assert cli("convert", src, ref).returncode == 0
    assert cli("convert", src, dst, "--no-hash").returncode == 0
    (dst / "w3repack.json").unlink()  # an unfinished run: the shards are recorded finished, without sha256
    write_state(src, dst, {n: None for n in shard_names(src)})
    victim = dst / shard_names(dst)[0]
    raw = bytearray(victim.read_bytes())
    raw[-1] ^= 0x01
    victim.write_bytes(bytes(raw))
    r = cli("convert", src, dst, "--no-hash", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["shards_written"] == 1
    assert victim.read_bytes() == (ref / victim.name).read_bytes()
    assert verify_code(src, dst)[0] == 0


# --- 9. SRC and DST by device and inode ---------------------------------------------------------------------


def test_a_bind_mount_alias_of_the_source_is_refused_as_destination(src, tmp_path):
    alias = tmp_path / "alias"
    alias.mkdir()
    r = subprocess.run(["mount", "--bind", str(src), str(alias)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot bind-mount here ({r.stderr.strip() or r.returncode}): needs root")
    try:
        before = tree_hashes(src)
        assert_refused(cli("convert", src, alias, "--overwrite"), "is the source itself")
        assert tree_hashes(src) == before
    finally:
        subprocess.run(["umount", "-l", str(alias)], capture_output=True)


# --- 10. names ----------------------------------------------------------------------------------------------


def _rename_shard(src: Path, new: str) -> None:
    old = shard_names(src)[0]
    (src / new).parent.mkdir(parents=True, exist_ok=True)
    os.rename(src / old, src / new)
    edit_json(src / INDEX, lambda ix: ix["weight_map"].update({t: new for t, s in ix["weight_map"].items() if s == old}))


@pytest.mark.parametrize("name", ["w3repack.json", ".w3repack/x.safetensors", "./x.safetensors", "a//x.safetensors",
                                  "sub/../x.safetensors"])
def test_shard_names_that_are_reserved_or_not_normalized_are_refused(src, tmp_path, name):
    _rename_shard(src, name)
    r = cli("convert", src, tmp_path / "dst")
    if name == "w3repack.json":  # the shard is read as the manifest it is named like: not one, so no output
        assert_refused(r, str(src / "w3repack.json"), "unreadable manifest", "reserves")
        assert "nothing to convert" not in r.stdout + r.stderr
    else:
        assert_refused(r, INDEX, repr(name))
    assert not (tmp_path / "dst").exists()


def test_a_manifest_named_last_shard_is_refused_not_taken_for_an_output(src, tmp_path):
    """The index points its last shard at ``w3repack.json``: the file is there under the manifest's name but is
    a safetensors shard; convert and convert --dry-run refuse it, naming it, and write nothing."""
    last = shard_names(src)[-1]
    os.rename(src / last, src / "w3repack.json")
    edit_json(src / INDEX, lambda ix: ix["weight_map"].update({t: "w3repack.json" for t, s in ix["weight_map"].items()
                                                               if s == last}))
    assert sorted(set(json.loads((src / INDEX).read_text())["weight_map"].values()))[-1] == "w3repack.json"
    for args in (["convert", src, tmp_path / "dst"], ["convert", src, tmp_path / "dst", "--dry-run"]):
        assert_refused(cli(*args), str(src / "w3repack.json"), "unreadable manifest")
    assert not (tmp_path / "dst").exists()


def _manifest_of_output(out: Path) -> bytes:
    return (out / "w3repack.json").read_bytes()


@pytest.mark.parametrize("content, says", [
    (lambda out: b"", "unreadable manifest"),
    (lambda out: b"{not json", "unreadable manifest"),
    (lambda out: json.dumps({"tool": "w3repack", "complete": True}).encode(), "no options object"),
    # a real manifest, of the output of this very source: its output shards have the source's names, not sizes
    (_manifest_of_output, "not the manifest of this folder"),
    (lambda out: json.dumps({**json.loads(_manifest_of_output(out)), "complete": False}).encode(), "not mark the conversion complete"),
    (lambda out: json.dumps({**json.loads(_manifest_of_output(out)), "output_shards": []}).encode(), "records no output shard"),
])
def test_a_source_holding_w3repack_json_counts_as_an_output_only_if_it_is_its_manifest(src, done, tmp_path, content, says):
    """w3repack.json in a source makes it "already a w3repack output" only if it parses as a manifest that
    describes the folder; anything else is one error naming the file, exit 2, nothing written."""
    (src / "w3repack.json").write_bytes(content(done))
    line = assert_refused(cli("convert", src, tmp_path / "dst"), str(src / "w3repack.json"), says)
    assert "nothing to convert" not in line
    assert not (tmp_path / "dst").exists()


def test_an_output_copied_elsewhere_is_still_nothing_to_convert(out, tmp_path):
    r = cli("convert", out, tmp_path / "again")
    assert r.returncode == 0 and "nothing to convert" in r.stdout, r.stderr
    (out / shard_names(out)[0]).write_bytes(b"short")  # a shard no longer the size the manifest records
    assert_refused(cli("convert", out, tmp_path / "again"), str(out / "w3repack.json"), shard_names(out)[0], "bytes")
    assert not (tmp_path / "again").exists()


def _add_tensor(shard: Path, name: str, dtype: str, shape: tuple[int, ...], data: bytes) -> None:
    raw = shard.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    end = max(v["data_offsets"][1] for k, v in header.items() if k != "__metadata__")
    header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [end, end + len(data)]}
    h = json.dumps(header).encode()
    shard.write_bytes(struct.pack("<Q", len(h)) + h + raw[8 + n:] + data)


def test_a_source_tensor_named_like_an_emitted_float_weight_is_refused(src, tmp_path):
    index = json.loads((src / INDEX).read_text())
    prefix = "model.layers.0.self_attn.kv_b_proj"
    shard = index["weight_map"][prefix + ".qweight"]
    _add_tensor(src / shard, prefix + ".weight", "F32", (2,), b"\0" * 8)
    edit_json(src / INDEX, lambda ix: ix["weight_map"].update({prefix + ".weight": shard}))
    assert_refused(cli("convert", src, tmp_path / "dst"), shard, prefix + ".weight", "twice")


# --- 11. bounded work on hostile metadata -------------------------------------------------------------------


def test_a_catastrophic_override_regex_is_matched_in_bounded_time(src, tmp_path):
    for f in ("config.json", "quantization_config.json"):
        if f == "config.json":
            edit_json(src / f, lambda c: c["quantization_config"].setdefault("extra_config", {}).update(
                {"(.*)*x": {"bits": 3}}))
        else:
            edit_json(src / f, lambda c: c.setdefault("extra_config", {}).update({"(.*)*x": {"bits": 3}}))
    for args in (("inspect", src), ("convert", src, tmp_path / "dst")):
        r = cli(*args, timeout=60)
        assert r.returncode == 0, r.stderr
    assert cli("verify", src, tmp_path / "dst", timeout=60).returncode == 0


def test_an_override_regex_that_cannot_be_bounded_is_refused_naming_the_file(src, tmp_path):
    edit_json(src / "config.json", lambda c: c["quantization_config"].setdefault("extra_config", {}).update(
        {r"(a)\1": {"bits": 3}}))
    assert_refused(cli("inspect", src, timeout=60), "config.json", "extra_config")


def test_index_reading_is_linear_in_its_shard_names(src, tmp_path):
    edit_json(src / INDEX, lambda ix: ix["weight_map"].update(
        {f"t{i}": f"m-{i:06d}.safetensors" for i in range(200_000)}))
    t0 = time.monotonic()
    assert_refused(cli("inspect", src, timeout=60), INDEX, "missing")
    assert time.monotonic() - t0 < 30


@pytest.mark.parametrize("where", ["config.json", INDEX])
def test_deep_json_nesting_is_one_error_naming_the_file(src, where):
    edit_json(src / where, lambda c: c.update({"deep": "X"}))
    text = (src / where).read_text().replace('"X"', "[" * 100_000 + "]" * 100_000)
    (src / where).write_text(text)
    assert_refused(cli("inspect", src), where)


def test_a_config_that_breaks_planning_is_one_error_naming_it(src, tmp_path):
    edit_json(src / "config.json", lambda c: c["quantization_config"].setdefault("extra_config", {}).update(
        {"model.layers.0.mlp.gate": {"bits": "16"}}))
    assert_refused(cli("convert", src, tmp_path / "dst", "--quant-method", "gptq"), "config.json")


# --- 12. special files in SRC -------------------------------------------------------------------------------


def test_a_fifo_in_the_source_is_refused_not_waited_on(src, tmp_path):
    os.mkfifo(src / "pipe.txt")
    assert_refused(cli("convert", src, tmp_path / "dst", timeout=60), "pipe.txt", "not a regular file")


def test_a_link_to_a_device_is_refused(src, tmp_path):
    (src / "zeros.bin").symlink_to("/dev/zero")
    assert_refused(cli("convert", src, tmp_path / "dst", timeout=60), "zeros.bin")
    assert not (tmp_path / "dst" / "zeros.bin").exists()


def test_a_fifo_as_a_shard_is_refused(src, tmp_path):
    name = shard_names(src)[0]
    (src / name).unlink()
    os.mkfifo(src / name)
    assert_refused(cli("convert", src, tmp_path / "dst", timeout=60), name)


def test_an_unreadable_source_folder_is_refused_not_skipped(src, tmp_path):
    """As root, run without the capabilities that read every folder (root would otherwise read it)."""
    (src / "private").mkdir()
    (src / "private" / "notes.txt").write_text("x")
    os.chmod(src / "private", 0)
    cmd = [sys.executable, "-m", "repack", "convert", str(src), str(tmp_path / "dst")]
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("root without setpriv: every folder is readable")
        cmd = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", *cmd]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    finally:
        os.chmod(src / "private", 0o755)
    assert_refused(r, "private", "cannot read")


# --- 13. SRC changing during the run ------------------------------------------------------------------------


def test_a_source_shard_changed_during_the_run_is_detected(src, tmp_path):
    import contextlib

    from repack.convert import convert
    from repack.errors import UserError
    from repack.run import RunConfig

    victim = src / shard_names(src)[-1]
    changed = threading.Event()

    @contextlib.contextmanager
    def progress(label, total):
        def advance(n):
            if not changed.is_set():
                changed.set()
                data = bytearray(victim.read_bytes())
                data[-1] ^= 0x01
                tmp = victim.with_name("tmp")
                tmp.write_bytes(bytes(data))
                os.replace(tmp, victim)
        yield advance

    with pytest.raises(UserError, match="source changed during the conversion"):
        convert(src, tmp_path / "dst", run=RunConfig(workers=1, progress=progress))
    assert changed.is_set() and not (tmp_path / "dst" / "w3repack.json").exists()


# --- 14. --delete-source-shards stays inside the repo's cache ---------------------------------------------------


def test_deleting_a_cached_shard_never_deletes_outside_the_repo_cache(tmp_path):
    from repack.sources.hub import delete_cached

    repo_cache = tmp_path / "hub" / "models--acme--x"
    snap = repo_cache / "snapshots" / "c0ffee"
    snap.mkdir(parents=True)
    (repo_cache / "blobs").mkdir()
    elsewhere = tmp_path / "mine" / "blobs"
    elsewhere.mkdir(parents=True)
    (elsewhere / "thesis.safetensors").write_text("years of work")
    (snap / "model.safetensors").symlink_to(elsewhere / "thesis.safetensors")
    delete_cached(snap, repo_cache, "model.safetensors")
    assert (elsewhere / "thesis.safetensors").read_text() == "years of work"
    assert not os.path.lexists(snap / "model.safetensors")
    (repo_cache / "blobs" / "abc").write_text("blob")
    (snap / "model.safetensors").symlink_to("../../blobs/abc")
    delete_cached(snap, repo_cache, "model.safetensors")
    assert not (repo_cache / "blobs" / "abc").exists()


# --- 15. network bounds -------------------------------------------------------------------------------------


def test_a_header_fetch_from_a_server_that_never_stops_is_cut_off(tmp_path):
    import http.server

    class Endless(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if "/resolve/" not in self.path:
                self.send_response(404)
                self.end_headers()
                return
            self.send_response(200)  # ignores Range, sends no length and never ends
            self.end_headers()
            head = json.dumps({"t": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}).encode()
            try:
                self.wfile.write(struct.pack("<Q", len(head)) + head)
                while True:
                    self.wfile.write(b"\0" * 65536)
            except OSError:
                pass

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Endless)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    env = {**os.environ, "HF_ENDPOINT": f"http://127.0.0.1:{srv.server_address[1]}", "HF_HOME": str(tmp_path / "hf")}
    code = ("from repack.hubclient import fetch_header_prefix\n"
            "print(len(fetch_header_prefix('acme/x', '0' * 40, 'model.safetensors')))")
    try:
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    finally:
        srv.shutdown()
    assert r.returncode == 0, r.stderr[-2000:]
    head = json.dumps({"t": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}).encode()
    assert r.stdout.strip() == str(8 + len(head))
