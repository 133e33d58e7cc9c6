"""Hostile inputs on the serving side, one or more tests per cause of the serving review (issue 26): launcher
scripts that ran what they were never given, recipes by path, ``-o`` through links and special files, smoke
without real deadlines, push through links, Rich markup and non-finite numbers in untrusted input.

Launcher scripts are run by real bash with fakes of ``nvidia-smi``, ``python3``, ``vllm`` and ``ray`` on PATH;
each fake engine writes the argv it received NUL-separated (and its environment with ``env -0``), which the tests
compare byte for byte with the argv intended. Smoke runs against real HTTP servers on 127.0.0.1 (threads here).
"""

from __future__ import annotations

import dataclasses
import http.server
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from repack import synth
from repack.convert import convert
from repack.errors import UserError
from repack.plan import Options
from repack.serve import launcher, planner
from repack.serve import sglang as sg
from tests.fakeengines import b, fake_tools, recorded, recorded_env, run_script
from tests.helpers import assert_refused
from tests.helpers import w3repack as cli

GPU = ["--gpus", "1", "--gpu-memory", "24", "--compute-capability", "8.6"]
RECIPES = ("deepseek-v3.2-reap-345b-w3a16-8x3090", "deepseek-v3.2-reap-345b-w3a16-8xa100-40g")
HOSTILE = ["\n", "'", '"', "$(touch PWNED)", "`touch PWNED`", "}", "${HOME}", "-dash", "--x$(touch PWNED)", "a b",
           ";touch PWNED;", "\\", "*", "~", "!", "#", "\r", "\t", "\x1b[31m", "$'", "--", "-", "é", "\u2028", "=", "|"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A converted 4-bit tiny DeepSeek checkpoint (2 layers, MLA): what launch and serve take."""
    root = tmp_path_factory.mktemp("tiny")
    synth.write_checkpoint(root / "w3", synth.TinySpec.small())
    convert(root / "w3", root / "w4", Options())
    return root / "w4"


@pytest.fixture(scope="module")
def tiny_model(tiny) -> planner.Model:
    return planner.load_model(tiny)


def copy_model(tiny: Path, dst: Path) -> Path:
    shutil.copytree(tiny, dst)
    return dst


def no_canary(root: Path) -> None:
    assert not [p for p in root.rglob("PWNED*")], "an injected command ran"


# --- 1. launchers: one escaping layer, exact argv ------------------------------------------------------------

CHARS = st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",))
text = st.lists(st.one_of(st.sampled_from(HOSTILE), st.text(CHARS, max_size=6)), max_size=4).map("".join)
env_key = st.from_regex(r"[A-Za-z0-9_]{0,8}", fullmatch=True).map(lambda k: "W3T_" + k)  # clear of bash's own names
PROPERTY = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                          HealthCheck.too_slow])


def _vllm_plan(tiny_model, extra, nodes=1):
    m, req, _ = launcher.prepare(str(tiny_model.root), 1, 24.0, "8.6", probe=False, model=tiny_model, nodes=nodes,
                                 extra_args=extra)
    return launcher.select(m, req, "auto", "0.26.0")


@PROPERTY
@given(name=text, extra=st.lists(text, max_size=6), env=st.dictionaries(env_key, text, max_size=3),
       rname=text, rdesc=text)
def test_vllm_script_hands_the_engine_exactly_the_intended_argv(tiny_model, name, extra, env, rname, rdesc):
    """Model folder names, pass-through args in flag and value position, [env] values and recipe names with
    newlines, quotes, ``$(...)``, backticks, ``}``, leading dashes: the fake vllm gets the argv byte for byte."""
    sel = _vllm_plan(tiny_model, extra)
    plan = dataclasses.replace(sel.plan, env=env)
    model_path = "/models/" + name
    text_ = launcher.script(model_path, plan, sel.flags, 1, {"name": rname, "description": rdesc})
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        tools, rec = fake_tools(d)
        (d / "work").mkdir()
        script = d / "serve.sh"
        script.write_bytes(b(text_))
        r = run_script(script, tools, cwd=d / "work")
        assert r.returncode == 0, r.stderr.decode(errors="replace")
        want = launcher.command(model_path, plan, sel.flags)[1:]
        got = recorded(rec, "vllm")
        assert got == [b(a) for a in want]
        assert got[1] == b(model_path) and (not extra or got[-len(extra):] == [b(a) for a in extra])
        seen = recorded_env(rec, "vllm")
        assert all(seen.get(b(k)) == b(v) for k, v in env.items()), (env, seen)
        assert list((d / "work").iterdir()) == []
        lines = text_.split("\n")
        assert lines[1].startswith("# Serve ") and lines[2].startswith("# recipe: ") and lines[3].startswith("# plan: ")


@PROPERTY
@given(name=text, extra=st.lists(text, max_size=6), env=st.dictionaries(env_key, text, max_size=3), rname=text)
def test_sglang_script_hands_the_server_exactly_the_intended_argv(tiny_model, name, extra, env, rname):
    model_path = "/models/" + name
    L = sg.sglang_command(model_path, tiny_model, 0.1, planner.Gpu(1, 24.0, "8.6"), version="0.5.19",
                          extra_args=extra, env=env)
    text_ = L.script({"name": rname, "description": rname})
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        tools, rec = fake_tools(d)
        (d / "work").mkdir()
        script = d / "serve.sh"
        script.write_bytes(b(text_))
        r = run_script(script, tools, cwd=d / "work")
        assert r.returncode == 0, r.stderr.decode(errors="replace")
        got = recorded(rec, "python3")
        assert got == [b(a) for a in L.argv[1:]]
        assert got[:4] == [b"-m", b"sglang.launch_server", b"--model-path", b(model_path)]
        assert not extra or got[-len(extra):] == [b(a) for a in extra]
        seen = recorded_env(rec, "python3")
        assert all(seen.get(b(k)) == b(v) for k, v in env.items())
        assert list((d / "work").iterdir()) == []


def test_multi_node_script_head_and_worker_get_exact_argv(tiny_model, tmp_path):
    extra = ["--x$(touch PWNED)", "v", "--a b", "it's", "}"]
    sel = _vllm_plan(tiny_model, extra, nodes=2)
    model_path = "/m/we\nird'}$(touch PWNED)"
    script = tmp_path / "serve.sh"
    script.write_bytes(b(launcher.script(model_path, sel.plan, sel.flags, 2)))
    tools, rec = fake_tools(tmp_path / "t")
    (tmp_path / "w").mkdir()
    r = run_script(script, tools, "head", cwd=tmp_path / "w")
    assert r.returncode == 0, r.stderr
    want = launcher.command(model_path, sel.plan, sel.flags, 2)[1:]
    assert recorded(rec, "vllm") == [b(a) for a in want]
    assert want[-2:] == ["--distributed-executor-backend", "ray"] and want[-7:-2] == extra
    r = run_script(script, tools, "worker", "10.0.0.7", cwd=tmp_path / "w")
    assert r.returncode == 0, r.stderr
    assert recorded(rec, "ray")[-3:] == [b"start", b"--address=10.0.0.7:6379", b"--block"]
    no_canary(tmp_path)


@pytest.mark.parametrize("name", ["we\nird", "it's", "a}b", "$(touch PWNED)", "`touch PWNED`", "-dash",
                                  "x\n$(touch PWNED)\n# y", "sp ace"])
def test_launch_cli_with_a_hostile_folder_name_runs_exactly_what_was_given(tiny, tmp_path, name):
    """End to end: ``w3repack launch`` on a folder so named, pass-through args in flag and value position; the
    script passes bash -n and the fake engine gets [serve, absolute path, planned flags, the extra args]."""
    plain = copy_model(tiny, tmp_path / "plain")
    hostile = copy_model(tiny, tmp_path / name)
    extra = ["--x$(touch PWNED)", "v", "--port", "$(touch PWNED)", "'--a b'", ";", "--k=`touch PWNED`"]
    out = {}
    for label, folder in (("plain", plain), ("hostile", hostile)):
        s = tmp_path / f"{label}.sh"
        r = cli("launch", "./" + folder.name, "-o", s, *GPU, "--vllm-version", "0.26.0", "--", *extra, cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        tools, rec = fake_tools(tmp_path / f"tools-{label}")
        (tmp_path / f"w-{label}").mkdir()
        rr = run_script(s, tools, cwd=tmp_path / f"w-{label}")
        assert rr.returncode == 0, rr.stderr
        out[label] = recorded(rec, "vllm")
    got, ref = out["hostile"], out["plain"]
    assert got[:2] == [b"serve", b(str(hostile.resolve()))]
    assert got[2:] == ref[2:] and got[-len(extra):] == [b(a) for a in extra]
    no_canary(tmp_path)


def test_launch_cli_keeps_a_folder_name_that_is_not_utf8(tiny, tmp_path):
    """A name of bytes that are not UTF-8 reaches the engine as those bytes (before: exit 3 writing the script)."""
    folder = os.fsencode(tmp_path) + b"/bad\xff\xfename"
    shutil.copytree(tiny, os.fsdecode(folder))
    s = tmp_path / "s.sh"
    r = subprocess.run([sys.executable, "-m", "repack", "launch", folder, "-o", str(s), *GPU], capture_output=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    tools, rec = fake_tools(tmp_path / "t")
    assert run_script(s, tools).returncode == 0
    assert recorded(rec, "vllm")[1] == folder


def test_sglang_launch_cli_with_a_hostile_folder_name(tiny, tmp_path):
    hostile = copy_model(tiny, tmp_path / "sg\n'}$(touch PWNED)")
    s = tmp_path / "s.sh"
    extra = ["--x$(touch PWNED)", "v"]
    r = cli("launch", hostile, "-o", s, *GPU, "--engine", "sglang", "--sglang-version", "0.5.19", "--", *extra)
    assert r.returncode == 0, r.stderr
    tools, rec = fake_tools(tmp_path / "t")
    (tmp_path / "w").mkdir()
    assert run_script(s, tools, cwd=tmp_path / "w").returncode == 0
    got = recorded(rec, "python3")
    assert got[:4] == [b"-m", b"sglang.launch_server", b"--model-path", b(str(hostile.resolve()))]
    assert got[-2:] == [b(a) for a in extra]
    no_canary(tmp_path)


def toml_str(s: str) -> str:
    """A TOML basic string (written here, independently of the code under test)."""
    out = []
    for c in s:
        if c in '"\\':
            out.append("\\" + c)
        elif ord(c) < 0x20 or ord(c) == 0x7F:
            out.append(f"\\u{ord(c):04x}")
        else:
            out.append(c)
    return '"' + "".join(out) + '"'


def recipe_toml(name: str | None = "mine", env: dict | None = None, hardware: str = "", serve: str = "",
                top: str = "", description: str = "a recipe") -> str:
    lines = ([f"name = {toml_str(name)}"] if name is not None else []) + [f"description = {toml_str(description)}", top,
                                                                          "[hardware]", "gpus = 1",
             "gpu_memory_gib = 24.0", 'compute_capability = "8.6"', hardware, "[serve]", serve, "[env]"]
    lines += [f"{toml_str(k)} = {toml_str(v)}" for k, v in (env or {}).items()]
    return "\n".join(lines) + "\n"


def test_recipe_file_env_and_name_reach_the_engine_exactly(tiny, tmp_path):
    env = {"NCCL_P2P_DISABLE": "1", "X1": "$(touch PWNED)\n'\"`touch PWNED`}", "Y_": "-dash"}
    f = tmp_path / "r.toml"
    f.write_text(recipe_toml("x\ntouch PWNED\n", env, description="\n$(touch PWNED)"))
    s = tmp_path / "s.sh"
    r = cli("launch", tiny, "-o", s, "--recipe-file", f, "--vllm-version", "0.26.0")
    assert r.returncode == 0, r.stderr
    text_ = s.read_text()
    assert "# recipe: x\\ntouch PWNED\\n (\\n$(touch PWNED))" in text_
    tools, rec = fake_tools(tmp_path / "t")
    (tmp_path / "w").mkdir()
    assert run_script(s, tools, cwd=tmp_path / "w").returncode == 0
    seen = recorded_env(rec, "vllm")
    assert {k: seen[b(k)] for k in env} == {k: b(v) for k, v in env.items()}
    no_canary(tmp_path)


@pytest.mark.parametrize("key", ["A B", "X;touch PWNED", "1A", "A-B", "", "A=B", "PATH", "MODEL"])
def test_recipe_env_key_that_is_not_a_safe_name_is_refused(tiny, tmp_path, key):
    f = tmp_path / "r.toml"
    f.write_text(recipe_toml(env={key: "v"}))
    for cmd in (["launch", tiny, "-o", tmp_path / "s.sh"], ["plan", tiny], ["serve", tiny, "--dry-run"]):
        line = assert_refused(cli(*cmd, "--recipe-file", f), "[env]")
        assert repr(key)[1:-1] in line or key in line, line
    assert not (tmp_path / "s.sh").exists()
    no_canary(tmp_path)


def test_env_key_checked_where_the_script_is_built(tiny_model, tmp_path):
    sel = _vllm_plan(tiny_model, [])
    with pytest.raises(UserError, match="X;touch"):
        launcher.script("/m", dataclasses.replace(sel.plan, env={"X;touch PWNED": "1"}), sel.flags)
    with pytest.raises(UserError, match="A B"):
        sg.sglang_command("/m", tiny_model, 0.1, planner.Gpu(1, 24.0, "8.6"), version="0.5.19", env={"A B": "1"}).script()
    with pytest.raises(UserError, match="NUL"):
        launcher.script("/m", dataclasses.replace(sel.plan, env={"A": "x\x00y"}), sel.flags)


# --- 2. recipes: shipped names only, or an explicit file checked as strictly ----------------------------------


def test_recipe_by_path_is_refused_even_when_the_file_is_a_valid_recipe(tiny, tmp_path):
    evil = tmp_path / "evil.toml"
    evil.write_text(recipe_toml(env={"X": "1"}))
    for name in (str(tmp_path / "evil"), "../../../" + str(tmp_path / "evil").lstrip("/"), "./evil", "a/b", "..",
                 "nope", "", "x\ny"):
        line = assert_refused(cli("plan", tiny, "--recipe", name, cwd=tmp_path), "not a shipped recipe", *RECIPES)
        assert "\n" not in line
    r = cli("plan", tiny, "--recipe-file", evil, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["env"] == {"X": "1"}
    assert_refused(cli("plan", tiny, "--recipe", RECIPES[0], "--recipe-file", evil), "--recipe-file")


@pytest.mark.parametrize("body,needle", [
    (recipe_toml(top="surprise = 1"), "surprise"),
    (recipe_toml(hardware="gpu_count = 8"), "gpu_count"),
    (recipe_toml(serve="max_model_len = 4096.5"), "max_model_len"),
    (recipe_toml(serve='max_model_len = "4096"'), "max_model_len"),
    (recipe_toml(serve="gpu_memory_utilization = nan"), "gpu_memory_utilization"),
    (recipe_toml(serve="gpu_memory_utilization = 1.5"), "gpu_memory_utilization"),
    (recipe_toml(serve="cpu_offload_gb = inf"), "cpu_offload_gb"),
    (recipe_toml(serve="cpu_offload_gb = -1.0"), "cpu_offload_gb"),
    (recipe_toml(serve="extra_args = ['--a', 1]"), "extra_args"),
    (recipe_toml(serve="enforce_eager = 1"), "enforce_eager"),
    (recipe_toml(serve='kv_cache_dtype = "int2"'), "kv_cache_dtype"),
    (recipe_toml(serve="unknown = true"), "unknown"),
    (recipe_toml(top="notes = 'not a list'"), "notes"),
    (recipe_toml(env={"A": "x\x00y"}), "NUL"),
    (recipe_toml().replace("gpus = 1", "gpus = true"), "gpus"),
    (recipe_toml().replace("gpus = 1", "gpus = 100000000"), "gpus"),
    (recipe_toml().replace("gpu_memory_gib = 24.0", "gpu_memory_gib = nan"), "gpu_memory_gib"),
    (recipe_toml().replace("gpu_memory_gib = 24.0", "gpu_memory_gib = 1e300"), "gpu_memory_gib"),
    (recipe_toml().replace('compute_capability = "8.6"', "compute_capability = 8.6"), "compute_capability"),
    (recipe_toml().replace("gpus = 1\n", ""), "needs gpus"),
    ('name = "x"\nserve = 3\n[hardware]\ngpus = 1\ngpu_memory_gib = 24.0\ncompute_capability = "8.6"\n', "[serve] must be a table"),
    ("name = \n", "not valid TOML"),
    (b"\xff\xfe".decode("latin-1"), "not UTF-8"),
])
def test_recipe_file_is_checked_key_by_key(tiny, tmp_path, body, needle):
    f = tmp_path / "r.toml"
    f.write_bytes(body.encode("latin-1") if needle == "not UTF-8" else body.encode())
    assert_refused(cli("plan", tiny, "--recipe-file", f), "--recipe-file", needle)


def test_recipe_file_must_be_a_small_regular_file(tiny, tmp_path):
    fifo = tmp_path / "fifo.toml"
    os.mkfifo(fifo)
    assert_refused(cli("plan", tiny, "--recipe-file", fifo, timeout=60), "not a regular file")
    assert_refused(cli("plan", tiny, "--recipe-file", tmp_path), "not a regular file")
    big = tmp_path / "big.toml"
    with open(big, "wb") as fh:
        fh.truncate(2 << 30)  # sparse: 2 GiB apparent
    assert_refused(cli("plan", tiny, "--recipe-file", big), "bytes")
    assert_refused(cli("plan", tiny, "--recipe-file", tmp_path / "none.toml"), "no such file")


# --- 3. launch -o: no links followed, no silent overwrite, 755 only on what it created ---------------------


def _launch_o(tiny, out, *more, **kw):
    return cli("launch", tiny, "-o", out, *GPU, *more, timeout=60, **kw)


def test_output_through_a_symlink_is_refused_and_the_target_untouched(tiny, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    victim.chmod(0o600)
    link = tmp_path / "serve.sh"
    link.symlink_to(victim)
    for more in ([], ["--overwrite"]):
        assert_refused(_launch_o(tiny, link, *more), "symbolic link")
        assert victim.read_text() == "precious\n" and stat.S_IMODE(victim.stat().st_mode) == 0o600
    dangling = tmp_path / "dangling.sh"
    dangling.symlink_to(tmp_path / "created-through-link")
    assert_refused(_launch_o(tiny, dangling), "symbolic link")
    assert not (tmp_path / "created-through-link").exists()


def test_output_that_is_a_fifo_folder_device_or_in_a_missing_folder_is_refused(tiny, tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    assert_refused(_launch_o(tiny, fifo), "FIFO")
    assert_refused(_launch_o(tiny, tmp_path), "folder")
    assert_refused(_launch_o(tiny, tmp_path / "missing" / "serve.sh"), "does not exist")
    (tmp_path / "file").write_text("x")
    assert_refused(_launch_o(tiny, tmp_path / "file" / "serve.sh"), "not a folder")
    if os.geteuid() == 0:
        dev = tmp_path / "null"
        os.mknod(dev, 0o600 | stat.S_IFCHR, os.makedev(1, 3))
        for more in ([], ["--overwrite"]):
            assert_refused(_launch_o(tiny, dev, *more), "character device")
        assert stat.S_IMODE(dev.lstat().st_mode) == 0o600


def test_existing_output_is_kept_unless_overwrite_and_never_written_through(tiny, tmp_path):
    m = copy_model(tiny, tmp_path / "m")
    cfg = m / "config.json"
    before = cfg.read_bytes()
    assert_refused(_launch_o(m, cfg), "exists", "--overwrite")
    assert cfg.read_bytes() == before
    tmp_path = tmp_path / "o"
    tmp_path.mkdir()
    out = tmp_path / "serve.sh"
    out.write_text("mine\n")
    out.chmod(0o600)
    other = tmp_path / "hardlink"
    os.link(out, other)
    assert_refused(_launch_o(tiny, out), "exists", "--overwrite")
    assert out.read_text() == "mine\n"
    r = _launch_o(tiny, out, "--overwrite")
    assert r.returncode == 0, r.stderr
    assert out.read_text().startswith("#!/usr/bin/env bash\n") and stat.S_IMODE(out.stat().st_mode) == 0o755
    assert other.read_text() == "mine\n" and stat.S_IMODE(other.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hardlink", "serve.sh"]


def test_created_output_is_755_whatever_the_umask(tiny, tmp_path):
    out = tmp_path / "serve.sh"
    r = subprocess.run([sys.executable, "-m", "repack", "launch", str(tiny), "-o", str(out), *GPU],
                       capture_output=True, text=True, timeout=120, preexec_fn=lambda: os.umask(0o077))
    assert r.returncode == 0, r.stderr
    assert stat.S_IMODE(out.stat().st_mode) == 0o755


# --- 5. smoke: wall-clock deadlines, http(s) only, no redirects, no credentials, sanitized text -----------


class Recorder(http.server.BaseHTTPRequestHandler):
    """Answers like a working model; logs every request line and Authorization header it gets."""

    log: list
    models = ["tiny"]
    reply = None

    def log_message(self, *a):
        pass

    def _send(self, code, obj, headers=()):
        raw = json.dumps(obj).encode()
        self.send_response(code)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def do_GET(self):
        self.log.append(("GET", self.path, self.headers.get("Authorization")))
        self._send(200, {"data": [{"id": m} for m in self.models]})

    def do_POST(self):
        self.log.append(("POST", self.path, self.headers.get("Authorization")))
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.reply is not None:
            text_ = self.reply
        elif "messages" in body:
            text_ = body["messages"][0]["content"].split(":", 1)[1]
        else:
            text_ = " 7, 8" if body["prompt"].startswith("1, 2") else " paper boats"
        key = "message" if "messages" in body else "text"
        self._send(200, {"choices": [{key: {"content": text_} if key == "message" else text_}]})


@pytest.fixture
def servers():
    started = []

    def start(handler, **attrs):
        h = type("H", (handler,), {"log": [], **attrs})
        s = http.server.ThreadingHTTPServer(("127.0.0.1", 0), h)
        s.daemon_threads = True
        threading.Thread(target=s.serve_forever, daemon=True).start()
        started.append(s)
        return f"http://127.0.0.1:{s.server_address[1]}", h

    yield start
    for s in started:
        s.shutdown()
        s.server_close()


STOP = threading.Event()


class Trickle(Recorder):
    """``GET /v1/models`` answers; every POST answers one body byte every 0.5 s (for at most 60 s)."""

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Content-Length", "1000000")
        self.end_headers()
        try:
            for _ in range(120):
                if STOP.wait(0.5):
                    return
                self.wfile.write(b" ")
                self.wfile.flush()
        except OSError:
            pass


class TrickleHeaders(Recorder):
    def do_GET(self):
        try:
            for c in b"HTTP/1.1 200 OK\r\nX-Slow: " + b"a" * 200:
                if STOP.wait(0.5):
                    return
                self.wfile.write(bytes([c]))
                self.wfile.flush()
        except OSError:
            pass


def test_smoke_cuts_off_a_server_trickling_bytes_at_the_deadline(servers):
    """A body (or the headers) arriving one byte every 0.5 s never trips an idle timeout; the deadline cuts it."""
    STOP.clear()
    try:
        url, _ = servers(Trickle)
        t0 = time.monotonic()
        r = cli("smoke", url, "--long-tokens", 100, "--timeout", 1.5, "--total-timeout", 4, timeout=40)
        took = time.monotonic() - t0
        assert r.returncode == 1, r.stdout + r.stderr
        assert "timed out" in r.stdout and "total time limit" in r.stdout and took < 15, (took, r.stdout)
        url, _ = servers(TrickleHeaders)
        t0 = time.monotonic()
        r = cli("smoke", url, "--timeout", 2, timeout=40)
        took = time.monotonic() - t0
        assert_refused(r, "server unreachable", "within 2 s")
        assert took < 15, took
    finally:
        STOP.set()


class Redirect(Recorder):
    target = ""

    def do_GET(self):
        self.log.append(("GET", self.path, self.headers.get("Authorization")))
        self._send(302, {}, [("Location", self.target + "/v1/models")])


def test_smoke_follows_no_redirect_and_sends_the_key_nowhere_else(servers):
    other, other_h = servers(Recorder)
    url, h = servers(Redirect, target=other)
    r = cli("smoke", url, env={**os.environ, "OPENAI_API_KEY": "sk-secret"})
    assert r.returncode == 1, r.stdout + r.stderr
    assert "HTTP 302" in r.stdout and other_h.log == []
    assert h.log == [("GET", "/v1/models", "Bearer sk-secret")]


@pytest.mark.parametrize("url", ["file:///etc/passwd", "data:text/plain,hello", "ftp://127.0.0.1/", "gopher://x/",
                                 "127.0.0.1:8000", "http://", "http://h:99999/", "http://h/?q=1", "http://h/#f",
                                 "http://a b/", "http://h/\x1b[31m", "http://127.0.0.1:0"])
def test_smoke_takes_http_and_https_urls_only(url):
    r = cli("smoke", url, timeout=30)
    line = assert_refused(r, "smoke URL")
    assert "\x1b" not in r.stderr and "unreachable" not in line


def test_smoke_refuses_credentials_in_the_url_before_any_connection(servers):
    url, h = servers(Recorder)
    for u in (url.replace("//", "//alice:s3cr3t@"), url.replace("//", "//s3cr3t@")):
        r = cli("smoke", u, timeout=30)
        assert_refused(r, "credentials")
        assert "s3cr3t" not in r.stdout + r.stderr and "alice" not in r.stderr
    assert h.log == []
    r = cli("smoke", url, env={**os.environ, "OPENAI_API_KEY": "sk-x\r\nX-Evil: 1"}, timeout=30)
    assert_refused(r, "OPENAI_API_KEY")
    assert "sk-x" not in r.stderr and h.log == []


def test_smoke_https_is_accepted_as_a_scheme():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert_refused(cli("smoke", f"https://127.0.0.1:{port}", timeout=30), "server unreachable")


def test_smoke_prints_server_text_without_terminal_escapes(servers):
    evil = "\x1b[2J\x1b]0;pwned\x07red\x1b[31m[/]"
    url, _ = servers(Recorder, models=[evil], reply=evil + " 7 paper boats violet harbor seventeen lanterns")
    r = cli("smoke", url, "--long-tokens", 100, timeout=60)
    out = r.stdout + r.stderr
    assert "\x1b" not in out and "\x07" not in out, out
    assert "\\x1b[2J" in r.stdout and r.returncode in (0, 1)
    r = cli("smoke", url, "--json", "--long-tokens", 100, timeout=60)
    assert json.loads(r.stdout)["model"] == evil


# --- 6. push: regular files inside the folder only ---------------------------------------------------------


@pytest.fixture
def out_copy(converted, tmp_path) -> Path:
    return Path(shutil.copytree(converted[1], tmp_path / "out", symlinks=True))


@pytest.mark.parametrize("plant", ["file", "folder", "inner", "fifo"])
def test_push_refuses_links_and_special_files(out_copy, monkeypatch, plant):
    import huggingface_hub

    from repack import push

    calls = []

    class FakeApi:
        def __init__(self, *a, **kw):
            calls.append("init")

        def create_repo(self, *a, **kw):
            calls.append("create_repo")

        def create_branch(self, *a, **kw):
            calls.append("create_branch")

        def create_commit(self, *a, **kw):
            calls.append(("create_commit", [op.path_in_repo for op in a[1]]))

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    if plant == "file":
        (out_copy / "passwd.txt").symlink_to("/etc/passwd")
    elif plant == "folder":
        (out_copy / "etc").symlink_to("/etc")
    elif plant == "inner":
        (out_copy / "copy.json").symlink_to(out_copy / "config.json")
    else:
        os.mkfifo(out_copy / "pipe")
    with pytest.raises(UserError, match="symbolic link|not a regular file"):
        push.push(out_copy, "me/x")
    assert calls == []
    r = cli("push", "me/x", out_copy, "--dry-run", "--json", timeout=60)
    assert_refused(r, str(out_copy))
    assert "root:" not in r.stdout


def test_push_still_uploads_every_regular_file(out_copy):
    (out_copy / ".w3repack").mkdir(exist_ok=True)
    (out_copy / ".w3repack" / "link").symlink_to("/etc/passwd")  # hidden: never uploaded, so not refused
    r = cli("push", "me/x", out_copy, "--dry-run", "--json")
    assert r.returncode == 0, r.stderr
    files = {f["path"] for f in json.loads(r.stdout)["files"]}
    assert {p.name for p in out_copy.glob("*.safetensors")} <= files and "config.json" in files


# --- 7. markup, non-finite numbers, absolute model path, trust-remote-code --------------------------------


def test_folder_names_with_markup_and_escapes_print_literally(tiny, converted, tmp_path):
    m = copy_model(tiny, tmp_path / "[/]x[bold]\x1b[31m")
    r = cli("plan", m, *GPU)
    assert r.returncode == 0, r.stderr
    assert "[/]x[bold]" in r.stdout and "\x1b" not in r.stdout + r.stderr
    src = Path(shutil.copytree(converted[0], tmp_path / "[red]src[/]"))
    r = cli("inspect", src)
    assert r.returncode == 0, r.stderr
    assert "[red]src[/]" in r.stdout


@pytest.mark.parametrize("cmd,option,value", [
    ("plan", "--gpu-memory", "nan"), ("plan", "--gpu-memory", "inf"), ("plan", "--gpu-memory", "-inf"),
    ("plan", "--gpu-memory", "1e300"), ("plan", "--gpu-memory", "0"),
    ("plan", "--gpu-memory-utilization", "nan"), ("plan", "--gpu-memory-utilization", "1.5"),
    ("plan", "--cpu-offload-gb", "inf"), ("plan", "--cpu-offload-gb", "nan"), ("plan", "--cpu-offload-gb", "-1"),
    ("plan", "--gpus", "1000000"), ("plan", "--max-model-len", str(10 ** 12)), ("plan", "--nodes", "1000000"),
    ("launch", "--gpu-memory", "nan"), ("launch", "--cpu-offload-gb", "1e300"),
    ("serve", "--gpu-memory-utilization", "nan"),
    ("smoke", "--timeout", "nan"), ("smoke", "--timeout", "inf"), ("smoke", "--timeout", "1e300"),
    ("smoke", "--total-timeout", "nan"), ("smoke", "--long-tokens", str(10 ** 9)),
])
def test_non_finite_and_absurd_numbers_are_refused(tiny, tmp_path, cmd, option, value):
    args = {"plan": [tiny, "--json"], "launch": [tiny, "-o", tmp_path / "s.sh"], "serve": [tiny, "--dry-run"],
            "smoke": ["http://127.0.0.1:9"]}[cmd]
    opts = {} if cmd == "smoke" else dict(zip(GPU[::2], GPU[1::2]))
    opts[option] = value
    r = cli(cmd, *args, *[x for kv in opts.items() for x in kv], timeout=60)
    line = assert_refused(r, option)
    assert "unreachable" not in line
    assert not (tmp_path / "s.sh").exists()


def test_plan_json_is_strict_json(tiny):
    r = cli("plan", tiny, *GPU, "--gpu-memory-utilization", "0.5", "--cpu-offload-gb", "0", "--json")
    assert r.returncode == 0, r.stderr

    def refuse(c):
        raise AssertionError(f"{c} in JSON output")
    json.loads(r.stdout, parse_constant=refuse)


def test_serve_hands_the_engine_an_absolute_model_path(tiny, tmp_path):
    copy_model(tiny, tmp_path / "-dash")
    tools, rec = fake_tools(tmp_path / "t")
    extra = ["--x$(touch PWNED)", "v", "it's"]
    r = cli("serve", "./-dash", *GPU, "--", *extra, cwd=tmp_path, env={**os.environ, "PATH": tools["PATH"]})
    assert r.returncode == 0, r.stderr
    got = recorded(rec, "vllm")
    assert got[:2] == [b"serve", b(str((tmp_path / "-dash").resolve()))]
    assert got[-3:] == [b(a) for a in extra]
    r = cli("serve", "./-dash", *GPU, "--dry-run", "--", "a\nb", cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.count("\n") == 1 and str(tmp_path / "-dash") in r.stdout
    assert r.stdout.rstrip().endswith("$'a\\x0ab'")
    no_canary(tmp_path)


def test_sglang_trust_remote_code_only_when_asked(tiny, tmp_path):
    m = copy_model(tiny, tmp_path / "m")
    cfg = json.loads((m / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM"}
    (m / "config.json").write_text(json.dumps(cfg))
    s = tmp_path / "s.sh"
    r = cli("launch", m, "-o", s, *GPU, "--engine", "sglang", "--sglang-version", "0.5.19")
    assert r.returncode == 0, r.stderr
    assert "--trust-remote-code" not in s.read_text().split("exec ")[-1]
    assert "auto_map" in r.stderr and "--trust-remote-code" in r.stderr
    r = cli("launch", m, "-o", s, *GPU, "--engine", "sglang", "--sglang-version", "0.5.19", "--trust-remote-code",
            "--overwrite")
    assert r.returncode == 0, r.stderr
    tools, rec = fake_tools(tmp_path / "t")
    assert run_script(s, tools).returncode == 0
    assert b"--trust-remote-code" in recorded(rec, "python3")


# --- 8. numbers as text: versions and compute capabilities of many digits, recipes nested deeply -------------

MANY = "9" * 5000  # more digits than int() converts


@pytest.mark.parametrize("args, needle", [
    (["plan", "--vllm-version", MANY], "--vllm-version"),
    (["launch", "--vllm-version", MANY], "--vllm-version"),
    (["launch", "--engine", "sglang", "--sglang-version", MANY], "SGLang version"),
    (["plan", "--compute-capability", MANY + ".0"], "--compute-capability"),
    (["plan", "--compute-capability", "\u0668.\u0666"], "--compute-capability"),  # Arabic-Indic 8.6
])
def test_versions_and_capabilities_that_int_cannot_take_are_refused(tiny, tmp_path, args, needle):
    opts = dict(zip(GPU[::2], GPU[1::2]))
    cmd, *more = args
    opts.update(zip(more[::2], more[1::2]))
    out = ["-o", tmp_path / "s.sh"] if cmd == "launch" else []
    assert_refused(cli(cmd, tiny, *out, *[x for kv in opts.items() for x in kv]), needle)
    assert not (tmp_path / "s.sh").exists()


@pytest.mark.parametrize("body, needle", [
    (recipe_toml().replace('compute_capability = "8.6"', 'compute_capability = "\u0668.\u0666"'), "compute_capability"),
    ("a = " + "[" * 100000 + "]" * 100000 + "\n", "nested too deeply"),
    ("a = " + "{x = " * 3000 + "1" + "}" * 3000 + "\n", "nested too deeply"),
])
def test_recipe_file_of_odd_digits_or_deep_nesting_is_refused(tiny, tmp_path, body, needle):
    f = tmp_path / "r.toml"
    f.write_text(body)
    assert_refused(cli("plan", tiny, "--recipe-file", f), "--recipe-file", needle)


# --- 9. --rehearsal: what plan and launch read from it is checked for type and range --------------------------


def _rehearsal() -> dict:
    """The tiny model's rehearsal, as if served and measured on both paths (the repack twice as fast)."""
    d = json.loads((Path(__file__).parents[1] / "docs" / "rehearsals" / "tiny-3090-repacked-vllm-0.33.0.json").read_text())
    m = d["paths"][0]["measured"]
    m.update(served=True, kv_cache_tokens=9656944, block_size=16, prefill_tokens_per_s={"median": 1000.0},
             decode_tokens_per_s={"1": {"median": 100.0}, "8": {"median": 500.0}})
    nat = json.loads(json.dumps(d["paths"][0]))
    nat["name"] = "native-3bit"
    for s in nat["measured"]["decode_tokens_per_s"].values():
        s["median"] /= 2
    d["paths"].append(nat)
    return d


@pytest.mark.parametrize("where, value", [
    ("measured", "x"), ("measured.engine", 5), ("measured.engine.kv_cache_gib", "abc"),
    ("measured.engine.kv_cache_gib", 1e308), ("measured.engine.kv_cache_gib", 10 ** 40),
    ("measured.engine.kv_cache_gib", -1), ("measured.kv_cache_tokens", "abc"), ("measured.kv_cache_tokens", -5),
    ("measured.block_size", "x"), ("measured.decode_tokens_per_s", 5), ("measured.decode_tokens_per_s", {"1": 5}),
    ("measured.decode_tokens_per_s", {"1": {"median": "x"}}), ("measured.decode_tokens_per_s", {"1": {"median": -1}}),
    ("measured.decode_tokens_per_s", {"1": {"median": 10 ** 400}}), ("measured.prefill_tokens_per_s", "x"),
    ("measured.prefill_tokens_per_s", {"median": "x"}), ("rank_config", "x"), ("rank_config.architectures", [1]),
    ("native:measured.decode_tokens_per_s", {"1": {"median": 1e-320}, "8": {"median": 1e-320}}),
    ("native:measured.prefill_tokens_per_s", {"median": 1e-320}),
])
def test_rehearsal_of_wrong_types_or_ranges_is_refused(tiny, tmp_path, where, value):
    """Each value once ended in an internal error (exit 3) in plan or launch, or a plan of infinite speed."""
    d = _rehearsal()
    entry = d["paths"][1 if where.startswith("native:") else 0]
    *parents, last = where.removeprefix("native:").split(".")
    for k in parents:
        entry = entry[k]
    entry[last] = value
    f = tmp_path / "rehearsal.json"
    f.write_text(json.dumps(d))
    args = [*GPU, "--vllm-version", "0.33.0", "--rehearsal", f]
    assert_refused(cli("plan", tiny, *args, "--json"), str(f), last)
    assert_refused(cli("launch", tiny, "-o", tmp_path / "s.sh", *args), str(f), last)
    assert not (tmp_path / "s.sh").exists()


def test_rehearsal_well_formed_is_taken(tiny, tmp_path):
    f = tmp_path / "rehearsal.json"
    f.write_text(json.dumps(_rehearsal()))
    r = cli("plan", tiny, *GPU, "--vllm-version", "0.33.0", "--rehearsal", f, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["kv_measured"].startswith("rehearsal on ")


@pytest.mark.parametrize("value", ["inf", "nan", "1e300", "0.5"])
def test_rehearse_timeout_must_be_a_finite_bound(tiny, tmp_path, value):
    """A timeout that never expires would leave a hung engine running: refused before anything is built."""
    work = tmp_path / "w"
    assert_refused(cli("rehearse", tiny, *GPU, "--work", work, "--timeout", value), "--timeout")
    assert not work.exists()
