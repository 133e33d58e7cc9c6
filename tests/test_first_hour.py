"""A newcomer's first hour (issue 17), through the real entry point (``python -m repack`` subprocesses): help and
global flags, the local-path/hub-id rule, nothing-to-convert, hub inspect and dry run from headers alone, push
with ``hf upload``'s arguments, no local paths in what is uploaded, JSON schema, units, progress on piped stderr,
and Ctrl-C during a hub download (a real hub endpoint on 127.0.0.1, HF_ENDPOINT pointing at it).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from repack import synth
from tests.fakehub import FakeHub
from tests.helpers import w3repack as run

ROOT = Path(__file__).resolve().parent.parent
REPO = "acme/tiny-w3"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
SNAKE = re.compile(r"^[a-z0-9_]+$")


def hub_env(home: Path, endpoint: str | None = None, offline: bool = False, **extra: str) -> dict:
    e = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "W3REPACK_PROGRESS"))}
    e.update(HF_HOME=str(home), HF_HUB_DISABLE_TELEMETRY="1", NO_COLOR="1", HF_HUB_OFFLINE="1" if offline else "0")
    if endpoint:
        e["HF_ENDPOINT"] = endpoint
    e.update(extra)
    return e


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def big_shards(tmp_path_factory) -> Path:
    """A 3-bit source whose largest shard (16 MiB) is more than huggingface_hub's 10 MiB download chunk."""
    return synth.write_checkpoint(tmp_path_factory.mktemp("big") / "src", synth.TinySpec(shard_bytes=16 << 20))


# --- help, bare command, global flags ---------------------------------------------------------------------


@pytest.mark.parametrize("args", [["-h"], ["--help"], ["convert", "-h"], ["inspect", "-h"], ["verify", "-h"], ["push", "-h"],
                                  ["plan", "-h"], ["smoke", "-h"], ["demo", "-h"], ["recipes", "-h"]])
def test_h_is_help_everywhere(args):
    r = run(*args)
    assert r.returncode == 0 and "Usage" in r.stdout and r.stderr == "", (args, r.stderr)


def test_bare_command_prints_help_and_exits_0():
    r = run()
    assert r.returncode == 0 and "Usage" in r.stdout and "Commands" in r.stdout
    assert "error" not in r.stderr.lower() and r.stderr.strip() == ""


@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_debug_works_anywhere(tmp_path, where):
    args = ["inspect", str(tmp_path / "missing")]
    args.insert({"first": 0, "middle": 1, "last": 2}[where], "--debug")
    r = run(*args)
    assert r.returncode == 2 and "Traceback" in r.stderr and "source not found" in r.stderr, r.stderr
    r = run("inspect", str(tmp_path / "missing"))
    assert r.returncode == 2 and "Traceback" not in r.stderr


# --- which SRC is a path, which a hub repo --------------------------------------------------------------


def test_missing_local_path_is_named_at_once(tmp_path):
    (tmp_path / "foo").mkdir()
    env = hub_env(tmp_path / "hf", endpoint=f"http://127.0.0.1:{closed_port()}")
    for src in ("foo/bar", "./nope/x", "nope/a/b", str(tmp_path / "abs" / "x"), "~/no-such-w3repack-dir/x"):
        t0 = time.monotonic()
        r = run("convert", src, tmp_path / "out", env=env, cwd=tmp_path)
        took = time.monotonic() - t0
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and "source not found" in lines[0] and src in lines[0], (src, r.stderr)
        assert took < 10, (src, took)
        assert not (tmp_path / "out").exists()
    r = run("inspect", "foo/bar", env=env, cwd=tmp_path)
    assert "as ./foo exists here" in r.stderr


def test_hub_id_fails_fast_when_the_hub_cannot_be_reached(tmp_path):
    """``org/name`` with no local ``org/`` is a hub id: an unreachable endpoint or offline mode says so at once
    (not after huggingface_hub's retries)."""
    for env, says in ((hub_env(tmp_path / "hf", endpoint=f"http://127.0.0.1:{closed_port()}"), "cannot be reached"),
                      (hub_env(tmp_path / "hf", offline=True), "HF_HUB_OFFLINE")):
        t0 = time.monotonic()
        r = run("convert", "someorg/somemodel", tmp_path / "out", env=env, cwd=tmp_path)
        took = time.monotonic() - t0
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: someorg/somemodel") and says in lines[0], r.stderr
        assert took < 10, took


# --- inputs that need no conversion -----------------------------------------------------------------------


def test_input_that_needs_no_conversion_says_so(converted, tmp_path):
    _, out = converted
    r = run("convert", out, tmp_path / "again")
    assert r.returncode == 0 and "already a w3repack output" in r.stdout and "nothing to convert" in r.stdout, r.stdout + r.stderr
    assert not (tmp_path / "again").exists()
    plain = tmp_path / "plain4"
    shutil.copytree(out, plain)
    (plain / "w3repack.json").unlink()
    r = run("convert", plain, tmp_path / "again")
    assert r.returncode == 0 and "needs no conversion" in r.stdout and "already 4" in r.stdout, r.stdout + r.stderr
    assert not (tmp_path / "again").exists()
    r = run("inspect", plain, "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["needs_conversion"] is False
    r = run("inspect", plain)
    assert "nothing to convert" in r.stdout


# --- hub: headers only, progress, Ctrl-C ------------------------------------------------------------------


def test_inspect_and_dry_run_on_a_hub_repo_fetch_no_shard(traps_ckpt, tmp_path):
    with FakeHub(traps_ckpt, REPO, COMMIT) as hub:
        env = hub_env(tmp_path / "hf", endpoint=hub.url)
        r = run("inspect", REPO, "--json", env=env)
        assert r.returncode == 0, r.stderr
        rep = json.loads(r.stdout)
        assert rep["path"] == f"{REPO}@{COMMIT}" and rep["shards"] == len(list(traps_ckpt.glob("*.safetensors")))
        assert rep["needs_conversion"] is True and rep["schema_version"] == 1
        dst = tmp_path / "dry"
        r = run("convert", REPO, dst, "--dry-run", "--json", env=env)
        assert r.returncode == 0, r.stderr
        d = json.loads(r.stdout)
        assert d["dry_run"] and d["free_space_ok"] and d["bytes_to_fetch"] == d["source_bytes"] > 0
        assert d["output_bytes"] > d["source_bytes"] and d["module_classes"]["3_bit_to_4_bit"] > 0
        r = run("convert", REPO, dst, "--dry-run", env=env)
        assert r.returncode == 0 and "free space: enough" in r.stdout and "to fetch from the hub" in r.stdout
        assert hub.full_gets() == [], hub.full_gets()
    assert not dst.exists()
    assert not list((tmp_path / "hf").rglob("*.safetensors"))


def test_ctrl_c_during_a_hub_download_exits_at_once_and_fetches_nothing_more(big_shards, tmp_path):
    """SIGINT while a shard arrives slowly: exit 130 within 2 s; no further shard request reaches the hub."""
    names = {p.name for p in big_shards.glob("*.safetensors")}
    assert len(names) >= 3
    with FakeHub(big_shards, REPO, COMMIT, slow=names, delay=0.05, chunk=64 << 10) as hub:
        cmd = [sys.executable, "-m", "repack", "convert", REPO, str(tmp_path / "out"), "--workers", "2"]
        # SIGINT as a terminal's Ctrl-C delivers it: a test run started in the background (``pytest &``, or by a
        # runner that ignores SIGINT) passes SIG_IGN on, and Python then ignores Ctrl-C for good
        p = subprocess.Popen(cmd, env=hub_env(tmp_path / "hf", endpoint=hub.url), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        deadline = time.monotonic() + 60
        while not hub.full_gets() and time.monotonic() < deadline and p.poll() is None:
            time.sleep(0.01)
        assert hub.full_gets(), "no shard download started"
        time.sleep(0.5)
        before = len(hub.full_gets())
        t0 = time.monotonic()
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=30)
        took = time.monotonic() - t0
        time.sleep(2.0)
        after = hub.full_gets()
    assert p.returncode == 130, (p.returncode, err[-2000:])
    assert took < 2.0, took
    assert len(after) == before == 1, after
    assert "interrupted" in err and "Traceback" not in err
    assert not (tmp_path / "out" / "w3repack.json").exists()


def test_progress_lines_on_piped_stderr_for_a_hub_download(big_shards, tmp_path):
    """stderr a pipe: a plain line every interval (bytes, MiB/s, ETA, the shard arriving, with its bytes so far)
    and one per finished shard; the JSON on stdout stays clean; -q silences it."""
    names = {p.name for p in big_shards.glob("*.safetensors")}
    with FakeHub(big_shards, REPO, COMMIT, slow=names, delay=0.02, chunk=128 << 10) as hub:
        env = hub_env(tmp_path / "hf", endpoint=hub.url, W3REPACK_PROGRESS_INTERVAL="0.3")
        r = run("convert", REPO, tmp_path / "out", "--json", "--workers", "1", env=env, timeout=300)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["shards_written"] == len(names)
        lines = r.stderr.strip().splitlines()
        status = [ln for ln in lines if re.search(r"convert: [\d.]+ \w?i?B of [\d.]+ MiB \(\d+%\), [\d.]+ MiB/s", ln)]
        assert len(status) >= 3, r.stderr
        arriving = [re.search(r"fetching (\S+): ([\d.]+) (\w+) of", ln) for ln in lines]
        assert any(m and float(m.group(2)) > 0 and m.group(3) == "MiB" for m in arriving), r.stderr
        assert any("ETA" in ln for ln in status), r.stderr
        done = [ln for ln in lines if re.search(r"shard \d+ of \d+ done: model-\d+-of-\d+\.safetensors", ln)]
        assert len(done) == len(names), r.stderr
        assert "MB/s" not in r.stderr

        r = run("convert", REPO, tmp_path / "out2", "-q", env=env, timeout=300)
        assert r.returncode == 0 and r.stderr == "", r.stderr
        assert "MiB/s" in r.stdout and "MB/s" not in r.stdout


def test_progress_verbose_and_quiet_on_a_local_convert(traps_ckpt, tmp_path):
    r = run("convert", traps_ckpt, tmp_path / "a", "-v")
    assert r.returncode == 0, r.stderr
    n = len(list(traps_ckpt.glob("*.safetensors")))
    assert len(re.findall(r"convert: shard \d+ of \d+ done", r.stderr)) == n, r.stderr
    r = run("verify", "-v", traps_ckpt, tmp_path / "a")
    assert r.returncode == 0 and len(re.findall(r"verify: shard \d+ of \d+ done", r.stderr)) == n, r.stderr
    r = run("verify", traps_ckpt, tmp_path / "a", "--quiet")
    assert r.returncode == 0 and r.stderr == ""
    r = run("convert", traps_ckpt, tmp_path / "b")  # a short run on a pipe prints no progress at all
    assert r.returncode == 0 and r.stderr == ""


# --- push, uploaded manifest, JSON, units -----------------------------------------------------------------


def test_push_takes_hf_upload_arguments(converted, tmp_path):
    _, out = converted
    r = run("push", "me/tiny-w4", out, "--dry-run", "--json", "--revision", "w4", "--create-pr", "--commit-message", "hi",
            "--token", "hf_not_used", "--private")
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert (s["repo"], s["revision"], s["create_pr"], s["commit_message"], s["private"]) == ("me/tiny-w4", "w4", True, "hi", True)
    assert s["schema_version"] == 1 and "hf_not_used" not in r.stdout
    r = run("push", out, "me/tiny-w4", "--dry-run")
    assert r.returncode == 2 and "repo id first" in r.stderr and f"w3repack push me/tiny-w4 {out}" in r.stderr, r.stderr
    (tmp_path / "tiny-w4").symlink_to(out)
    r = run("push", "me/tiny-w4", "--dry-run", "--json", cwd=tmp_path)  # LOCAL_PATH defaults to ./NAME
    assert r.returncode == 0 and json.loads(r.stdout)["repo"] == "me/tiny-w4", r.stderr
    r = run("push", "me/other", "--dry-run", cwd=tmp_path)
    assert r.returncode == 2 and "no LOCAL_PATH" in r.stderr


def test_no_local_path_in_what_is_uploaded(traps_ckpt, tmp_path):
    dst = tmp_path / "out"
    r = run("convert", traps_ckpt, dst)
    assert r.returncode == 0, r.stderr
    text = (dst / "w3repack.json").read_text()
    assert str(traps_ckpt.parent) not in text and str(tmp_path) not in text and "/tmp" not in text
    assert json.loads(text)["source"]["path"] == traps_ckpt.name
    r = run("push", "me/x", dst, "--dry-run", "--json")
    card = json.loads(r.stdout)["card"]
    assert str(traps_ckpt.parent) not in card and str(tmp_path) not in card


def test_json_outputs_have_schema_version_and_snake_case_keys(traps_ckpt, tmp_path):
    outs = {}
    for name, args in (("inspect", ["inspect", traps_ckpt]), ("convert", ["convert", traps_ckpt, tmp_path / "o"]),
                       ("verify", ["verify", traps_ckpt, tmp_path / "o"]), ("recipes", ["recipes"]),
                       ("demo", ["demo", tmp_path / "demo"])):
        r = run(*args, "--json")
        assert r.returncode == 0, (name, r.stderr)
        outs[name] = json.loads(r.stdout)
        assert next(iter(outs[name])) == "schema_version" and outs[name]["schema_version"] == 1, name
        assert all(SNAKE.match(k) for k in outs[name]), (name, list(outs[name]))
    r = run("plan", tmp_path / "o", "--gpus", 1, "--gpu-memory", 24, "--compute-capability", "8.6", "--json")
    assert r.returncode == 0, r.stderr
    plan = json.loads(r.stdout)
    assert next(iter(plan)) == "schema_version" and plan["schema_version"] == 1
    assert {"paths", "recommended", "fits", "weights_gib_per_gpu"} <= set(plan) and all(SNAKE.match(k) for k in plan)
    assert all(SNAKE.match(k) for k in outs["convert"]["module_classes"])
    assert all(SNAKE.match(k) for k in outs["inspect"]["convert"]["module_classes"])
    assert all(SNAKE.match(k) for k in outs["demo"]["convert"])
    assert all(SNAKE.match(k) for k in outs["verify"]["tensors_checked"])
    assert "mib_per_s" in outs["convert"] and "mb_per_s" not in outs["convert"]


def test_verify_summary_uses_words_not_op_names(converted):
    src, out = converted
    r = run("verify", src, out)
    assert r.returncode == 0 and "identical" in r.stdout
    assert "byte-identical" in r.stdout and "transcode " not in r.stdout and "dequant " not in r.stdout


# --- README -----------------------------------------------------------------------------------------------


def test_readme_says_what_the_test_extras_pull():
    """The torch pin of the test extras and the README agree, and the README says how to get the CPU build."""
    pyproject = (ROOT / "pyproject.toml").read_text()
    pin = re.search(r'"torch==([\d.]+)"', pyproject)
    readme = (ROOT / "README.md").read_text()
    assert pin and f"torch=={pin.group(1)}" in readme
    assert f"pip install torch=={pin.group(1)} --index-url https://download.pytorch.org/whl/cpu" in readme
    assert "so no CUDA build is pulled" not in readme
    assert "does not fit" in readme and "RTX 3090" in readme


def test_progress_is_a_bar_on_a_terminal(big_shards, tmp_path):
    """stderr a terminal (a pty): a rich bar with binary units and MiB/s; stdout keeps the summary."""
    import pty
    import select

    master, slave = pty.openpty()
    env = dict(os.environ, COLUMNS="120", TERM="xterm")
    env.pop("NO_COLOR", None)
    p = subprocess.Popen([sys.executable, "-m", "repack", "convert", str(big_shards), str(tmp_path / "out")],
                         stdout=subprocess.PIPE, stderr=slave, env=env, cwd=ROOT)
    os.close(slave)
    seen = b""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(master, 65536)
            except OSError:
                break
            if not chunk:
                break
            seen += chunk
        elif p.poll() is not None:
            break
    out = p.communicate(timeout=60)[0]
    os.close(master)
    assert p.returncode == 0
    text = re.sub(rb"\x1b\[[0-9;?]*[A-Za-z]", b"", seen).decode("utf-8", "replace")
    assert "convert" in text and "━" in text and "MiB" in text, text[:500]
    assert " MB/s" not in text
    assert b"converted" in out
