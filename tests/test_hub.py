"""Hub in, hub out, offline: a real huggingface_hub cache layout in a temporary HF_HOME, HF_HUB_OFFLINE=1.

Conversions run as ``python -m repack`` subprocesses so the cache settings apply as they would for a user.
"""

from __future__ import annotations

import hashlib
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
from repack.plan import Options
from repack.verify import verify

REPO = "acme/tiny-w3"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
CARD = """---
license: mit
base_model: deepseek-ai/DeepSeek-V3
tags:
- deepseek
- autoround
model-index:
- name: x
  results: []
---

# tiny 3-bit
"""


def build_cache(hf_home: Path, src: Path, repo: str = REPO, commit: str = COMMIT) -> Path:
    """Lay ``src`` out as huggingface_hub does: blobs/<sha256>, snapshots/<commit>/<file> -> ../../blobs, refs/main."""
    base = hf_home / "hub" / ("models--" + repo.replace("/", "--"))
    snap = base / "snapshots" / commit
    (base / "blobs").mkdir(parents=True, exist_ok=True)
    (base / "refs").mkdir(parents=True, exist_ok=True)
    (base / "refs" / "main").write_text(commit)
    for p in sorted(src.rglob("*")):
        if not p.is_file():
            continue
        rel = p.relative_to(src)
        sha = hashlib.sha256(p.read_bytes()).hexdigest()
        blob = base / "blobs" / sha
        if not blob.exists():
            shutil.copyfile(p, blob)
        link = snap / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return snap


def env(hf_home: Path) -> dict:
    e = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    e.update(HF_HOME=str(hf_home), HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1", NO_COLOR="1")
    return e


def cli(hf_home: Path, *args, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "repack", *map(str, args)], env=env(hf_home),
                          capture_output=True, text=True, timeout=timeout)


def shard_names(src: Path) -> list[str]:
    return sorted(p.name for p in src.glob("*.safetensors"))


def shard_blobs(hf_home: Path, src: Path) -> list[Path]:
    base = hf_home / "hub" / ("models--" + REPO.replace("/", "--")) / "blobs"
    return [base / hashlib.sha256((src / n).read_bytes()).hexdigest() for n in shard_names(src)]


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> tuple[Path, Path]:
    """A 10-shard 3-bit source with every trap and a card with YAML metadata, and its local conversion."""
    base = tmp_path_factory.mktemp("hub")
    src = synth.write_checkpoint(base / "src", synth.TinySpec(traps=True, shard_bytes=4 << 20,
                                                              extra_files={"tokenizer_config.json": "{}\n"}))
    (src / "README.md").write_text(CARD)
    ref = base / "ref"
    r = subprocess.run([sys.executable, "-m", "repack", "convert", str(src), str(ref)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert len(shard_names(src)) >= 8
    return src, ref


@pytest.fixture
def hf_home(source, tmp_path) -> Path:
    home = tmp_path / "hf"
    build_cache(home, source[0])
    return home


def assert_same_shards(dst: Path, ref: Path) -> None:
    for n in shard_names(ref):
        assert (dst / n).read_bytes() == (ref / n).read_bytes(), n


def test_parse_repo_id(tmp_path, monkeypatch):
    from repack.hubclient import parse_repo_id

    assert parse_repo_id("org/name") == ("org/name", None)
    assert parse_repo_id("org/name@v1.0") == ("org/name", "v1.0")
    assert parse_repo_id("org/name@refs/pr/3") == ("org/name", "refs/pr/3")
    assert parse_repo_id("/abs/path") is None and parse_repo_id("./rel/x") is None and parse_repo_id("a/b/c") is None
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "local").mkdir(parents=True)
    assert parse_repo_id("org/local") is None


def test_convert_from_cache_deletes_source_shards(source, hf_home, tmp_path):
    src, ref = source
    blobs = shard_blobs(hf_home, src)
    assert all(b.is_file() for b in blobs)
    dst = tmp_path / "out"
    r = cli(hf_home, "convert", REPO, dst, "--delete-source-shards", "--json")
    assert r.returncode == 0, r.stderr
    assert_same_shards(dst, ref)
    assert not any(b.exists() for b in blobs)
    snap = hf_home / "hub" / "models--acme--tiny-w3" / "snapshots" / COMMIT
    assert not list(snap.glob("*.safetensors")) and (snap / "config.json").is_file()
    man = json.loads((dst / "w3repack.json").read_text())
    assert man["source"]["hub"] == {"repo": REPO, "revision": "main", "commit": COMMIT}
    assert not (dst / ".w3repack").exists()
    rep = verify(src, dst)
    assert rep.ok, rep.differences[0].line()


def test_revision_resolves_and_inspect_reads_cache(source, hf_home, tmp_path):
    r = cli(hf_home, "inspect", f"{REPO}@{COMMIT}", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["shards"] == len(shard_names(source[0]))
    r = cli(hf_home, "convert", f"{REPO}@nope", tmp_path / "x")
    assert r.returncode == 2 and r.stderr.startswith("error:") and "HF_HUB_OFFLINE" in r.stderr
    r = cli(hf_home, "convert", f"{REPO}@main", tmp_path / "x", "--revision", COMMIT)
    assert r.returncode == 2 and "contradicts" in r.stderr
    r = cli(hf_home, "convert", source[0], tmp_path / "y", "--delete-source-shards")
    assert r.returncode == 2 and "hub sources only" in r.stderr


def test_sigkill_mid_run_then_resume(source, hf_home, tmp_path):
    src, ref = source
    dst = tmp_path / "out"
    state = dst / ".w3repack" / "state.json"
    cmd = [sys.executable, "-m", "repack", "convert", REPO, str(dst), "--delete-source-shards", "--workers", "1"]
    p = subprocess.Popen(cmd, env=env(hf_home), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while p.poll() is None and time.monotonic() < deadline:
        try:
            if len(json.loads(state.read_text())["finished"]) >= 2:
                p.send_signal(signal.SIGKILL)
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.0005)
    p.communicate(timeout=30)
    assert p.returncode == -signal.SIGKILL, "finished before it could be killed"
    assert not (dst / "w3repack.json").exists()
    gone = [b for b in shard_blobs(hf_home, src) if not b.exists()]
    assert 1 <= len(gone) < len(shard_names(src))
    assert (dst / ".w3repack" / "hub-headers").is_dir()

    r = cli(hf_home, "convert", REPO, dst, "--delete-source-shards", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["shards_kept"] >= 1 and out["shards_written"] + out["shards_kept"] == out["shards"]
    assert_same_shards(dst, ref)
    left = [b.name for b in shard_blobs(hf_home, src) if b.exists()]
    assert not left, f"cached source blobs left after the resumed run: {left}"
    rep = verify(src, dst)
    assert rep.ok, rep.differences[0].line()

    r = cli(hf_home, "convert", REPO, dst, "--delete-source-shards")
    assert r.returncode == 0 and "already a finished conversion" in r.stdout and "nothing to do" in r.stdout, r.stderr
    man = json.loads((dst / "w3repack.json").read_text())
    assert man["verify"]["ok"] is True and man["verify"]["shards"] == man["verify"]["of_shards"] == out["shards"]
    assert sum(man["verify"]["tensors_checked"].values()) > 0
    r = cli(hf_home, "push", "me/tiny-w4", dst, "--dry-run")
    assert r.returncode == 0, r.stderr
    n = out["shards"]
    assert "**identical**" in r.stdout and f"before the source shard was deleted; {n} of {n} shards" in r.stdout
    r = cli(hf_home, "convert", REPO, dst, "--delete-source-shards", "--quant-method", "gptq")
    assert r.returncode == 2 and "with other options" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_missing_shard_offline_is_refused_before_any_work(source, hf_home, tmp_path):
    src = source[0]
    snap = hf_home / "hub" / "models--acme--tiny-w3" / "snapshots" / COMMIT
    victim = shard_names(src)[-1]
    (snap / victim).unlink()
    dst = tmp_path / "out"
    r = cli(hf_home, "convert", REPO, dst)
    assert r.returncode == 2, r.stderr
    assert victim in r.stderr and "HF_HUB_OFFLINE" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not dst.exists()


def test_space_check_counts_output_and_shards_to_fetch(source, hf_home, tmp_path, monkeypatch):
    import repack.sources.hub as hub
    import repack.space
    from repack.convert import fingerprint
    from repack.errors import UserError
    from repack.output import Output
    from repack.plan import build_plan
    from repack.safetensors_io import read_prefix

    src = source[0]
    snap = hf_home / "hub" / "models--acme--tiny-w3" / "snapshots" / COMMIT
    for n in shard_names(src):
        (snap / n).unlink()
    monkeypatch.setattr(hub, "offline", lambda: True)
    hdr_dir = tmp_path / "out" / ".w3repack" / "hub-headers"
    hdr_dir.mkdir(parents=True)
    for n in shard_names(src):
        (hdr_dir / n).write_bytes(read_prefix(src / n)[0])
    out = Output(tmp_path / "out")
    for delete in (True, False):
        hs = hub.HubSource(snap, None, REPO, None, COMMIT, delete)
        plan = build_plan(hs.checkpoint(out, Options()), Options())
        assert [s.src_size for s in plan.shards] == [(src / n).stat().st_size for n in shard_names(src)]
        assert fingerprint(plan, hs)["source_hub"] == {"repo": REPO, "commit": COMMIT}
        biggest = max(s.src_size for s in plan.shards)
        free = plan.out_total_bytes() + biggest + 1
        usage = shutil._ntuple_diskusage(free * 10, free * 9, free)
        monkeypatch.setattr(repack.space.shutil, "disk_usage", lambda p, usage=usage: usage)
        fetch = hs.space_needed(plan.shards, 1)
        if delete:
            repack.space.check_space(out.path, plan.out_total_bytes(), fetch, hs.space_hint)
        else:
            with pytest.raises(UserError, match="delete-source-shards"):
                repack.space.check_space(out.path, plan.out_total_bytes(), fetch, hs.space_hint)


@pytest.fixture(scope="module")
def hub_converted(source, tmp_path_factory) -> Path:
    home = tmp_path_factory.mktemp("hfhome")
    build_cache(home, source[0])
    dst = tmp_path_factory.mktemp("pushsrc") / "out"
    r = cli(home, "convert", REPO, dst)
    assert r.returncode == 0, r.stderr
    return dst


def test_push_dry_run_card_and_operations(hub_converted, tmp_path):
    converted = hub_converted
    before = {p: p.stat().st_mtime_ns for p in converted.rglob("*")}
    r = cli(tmp_path / "hf", "push", "me/tiny-w4", converted, "--private", "--dry-run", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["dry_run"] and out["private"] and out["repo"] == "me/tiny-w4"
    files = {f["path"]: f for f in out["files"]}
    for n in shard_names(converted):
        assert files[n]["bytes"] == (converted / n).stat().st_size
    for n in ("config.json", "model.safetensors.index.json", "w3repack.json", "tokenizer_config.json"):
        assert n in files
    assert files["README.md"]["generated"] and not any(p.startswith(".") for p in files)
    assert {p: p.stat().st_mtime_ns for p in converted.rglob("*")} == before

    card = out["card"]
    head, body = card.split("---\n", 2)[1:]
    assert "license: mit" in head and "base_model: deepseek-ai/DeepSeek-V3" in head and "model-index" not in head
    for tag in ("deepseek", "autoround", "w3repack", "gptq", "4-bit"):
        assert f"- {tag}\n" in head
    assert f"[{REPO}](https://huggingface.co/{REPO})" in body and COMMIT in body
    assert "## Memory plan" in body and "| GPUs" in body
    assert "vllm serve me/tiny-w4 --tensor-parallel-size" in body
    man = json.loads((converted / "w3repack.json").read_text())
    for s in man["output_shards"]:
        assert s["sha256"] in body
    for f in man["source"]["files"]:
        assert f["sha256"] in body
    assert "`mit`" in body


def test_card_carries_verify_summary_and_degrades_without_source_card(hub_converted, tmp_path):
    converted = hub_converted
    from repack import card

    text = card.build_card(converted, "me/x", verify_report={"ok": True, "tensors_checked": {"transcoded": 7, "copied": 3}})
    assert "**identical**, 10 tensors" in text
    bare = tmp_path / "bare"
    shutil.copytree(converted, bare)
    (bare / "README.md").unlink()
    text = card.build_card(bare, "me/x")
    assert "base_model: acme/tiny-w3" in text and "names no license" in text and "- w3repack" in text


def test_push_refuses_unfinished_output(source, tmp_path):
    r = cli(tmp_path / "hf", "push", "me/x", source[0], "--dry-run")
    assert r.returncode == 2 and "not a finished w3repack output" in r.stderr


def test_headers_by_range_request_when_no_shard_is_cached(source, tmp_path):
    """Planning reads only each shard's header over HTTP (Range) from HF_ENDPOINT; no shard is downloaded."""
    import http.server
    import threading

    src = source[0]
    seen: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            prefix = f"/{REPO}/resolve/{COMMIT}/"
            name = self.path[len(prefix):] if self.path.startswith(prefix) else ""
            if not (src / name).is_file() or "range" not in {k.lower() for k in self.headers}:
                self.send_response(404)
                self.end_headers()
                return
            a, b = self.headers["Range"].split("=")[1].split("-")
            data = (src / name).read_bytes()[int(a): int(b) + 1]
            seen.append(self.headers["Range"])
            self.send_response(206)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        home = tmp_path / "hf"
        snap = build_cache(home, src)
        for n in shard_names(src):
            (snap / n).unlink()
        code = (
            "import json,sys; from pathlib import Path; from repack.sources.hub import HubSource\n"
            "from repack.output import Output; from repack.plan import Options, build_plan\n"
            f"snap=Path({str(snap)!r})\n"
            "hs=HubSource(snap, None, '%s', None, '%s')\n"
            "plan=build_plan(hs.checkpoint(Output(Path(sys.argv[1])), Options()), Options())\n"
            "print(json.dumps({s.name: s.src_size for s in plan.shards}))\n" % (REPO, COMMIT)
        )
        e = env(home)
        e.update(HF_HUB_OFFLINE="0", HF_ENDPOINT=f"http://127.0.0.1:{srv.server_address[1]}")
        r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "out")], env=e, capture_output=True, text=True, timeout=60)
    finally:
        srv.shutdown()
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {n: (src / n).stat().st_size for n in shard_names(src)}
    assert len(seen) == len(shard_names(src)) and all(s.startswith("bytes=0-") for s in seen)
    assert not list(snap.glob("*.safetensors"))


def test_delete_cached_blob_first_and_shared_blobs_kept(tmp_path):
    from repack.sources.hub import delete_cached

    repo = tmp_path / "models--acme--x"
    (repo / "blobs").mkdir(parents=True)
    a, b = repo / "snapshots" / "aaa", repo / "snapshots" / "bbb"
    a.mkdir(parents=True)
    b.mkdir(parents=True)
    for blob, data in (("s1", b"one"), ("s2", b"two!")):
        (repo / "blobs" / blob).write_bytes(data)
    (a / "x.safetensors").symlink_to("../../blobs/s1")
    (a / "y.safetensors").symlink_to("../../blobs/s2")
    (b / "y.safetensors").symlink_to("../../blobs/s2")  # the same blob in another revision
    assert delete_cached(a, repo, "x.safetensors") == 3
    assert not (repo / "blobs" / "s1").exists() and not (a / "x.safetensors").is_symlink()
    assert delete_cached(a, repo, "y.safetensors") == 0
    assert (repo / "blobs" / "s2").exists() and not (a / "y.safetensors").is_symlink()
    # killed between blob and link: the dangling link is removed on the next run
    (a / "x.safetensors").symlink_to("../../blobs/s1")
    assert delete_cached(a, repo, "x.safetensors") == 0 and not (a / "x.safetensors").is_symlink()


def test_stale_partial_downloads_are_removed_fresh_ones_kept(source, hf_home, tmp_path):
    blobs = hf_home / "hub" / ("models--" + REPO.replace("/", "--")) / "blobs"
    stale, fresh = blobs / "abc.1234abcd.incomplete", blobs / "def.5678ef01.incomplete"
    stale.write_bytes(b"\0" * 1000)
    fresh.write_bytes(b"\0" * 10)
    old = time.time() - 3600
    os.utime(stale, (old, old))
    r = cli(hf_home, "convert", REPO, tmp_path / "out")
    assert r.returncode == 0, r.stderr
    assert not stale.exists() and fresh.exists()


def test_interrupt_does_not_wait_for_a_stuck_download(tmp_path, monkeypatch):
    """A worker blocked in ``Source.ensure`` (a hub download never checks the stop flag) must not hold up Ctrl-C."""
    import signal as sig
    import threading

    from repack import convert as convert_mod
    from repack.convert import convert
    from repack.plan import Options
    from repack.run import RunConfig
    from repack.sources.folder import FolderSource

    class Stuck(FolderSource):
        def ensure(self, sp):
            release.wait(60)

    monkeypatch.setattr(convert_mod, "STOP_GRACE_S", 1.0)

    src = synth.write_checkpoint(tmp_path / "src", synth.TinySpec.small(shard_bytes=64 << 10))
    release = threading.Event()
    sig.signal(sig.SIGALRM, lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    sig.setitimer(sig.ITIMER_REAL, 0.3)
    t0 = time.monotonic()
    try:
        with pytest.raises(KeyboardInterrupt):
            convert(Stuck(src), tmp_path / "dst", Options(), RunConfig(workers=2))
        took = time.monotonic() - t0
    finally:
        release.set()
        sig.setitimer(sig.ITIMER_REAL, 0)
        sig.signal(sig.SIGALRM, sig.SIG_DFL)
    assert took < 3, took
