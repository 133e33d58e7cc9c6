"""The command line as users run it: real subprocesses, exit codes, one-line errors, JSON output."""

import json
import subprocess
import sys

import pytest



def run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "repack", *map(str, args)], capture_output=True, text=True, cwd=cwd)


def test_demo_end_to_end(tmp_path):
    r = run("demo", tmp_path, "--json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["verify"]["ok"] is True and rep["flipped_bit_detected"]
    assert rep["convert"]["3-bit -> 4-bit"] > 0 and rep["convert"]["4-bit passthrough"] > 0
    assert (tmp_path / "deepseek-tiny-w4" / "w3repack.json").exists()


def test_inspect_json_reports_widths_from_shapes(traps_ckpt):
    r = run("inspect", traps_ckpt, "--json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["config_bits"] == 3
    assert set(rep["module_widths"]) == {"2", "3", "4", "8"}
    assert rep["architecture"] == "DeepseekV3ForCausalLM" and rep["symmetric"] is True
    assert rep["convert"]["output_shard_bytes"] > rep["shard_bytes"]
    assert rep["shards"] > 3 and rep["float_tensors"] > 0


def test_convert_verify_and_exit_codes(traps_ckpt, tmp_path):
    dst = tmp_path / "out"
    r = run("convert", traps_ckpt, dst, "--json", "--workers", "2")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["shards_written"] == summary["shards"]
    assert r.stderr == ""  # quiet when piped
    r = run("verify", traps_ckpt, dst, "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["ok"] is True
    shard = sorted(dst.glob("*.safetensors"))[1]
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0x80
    shard.write_bytes(data)
    r = run("verify", traps_ckpt, dst)
    assert r.returncode == 1
    assert "DIFFERENT" in r.stdout and shard.name in r.stdout and "at byte" in r.stdout


def test_bad_input_is_one_line_exit_2(tmp_path):
    cases = [
        ("convert", tmp_path / "missing", tmp_path / "o"),
        ("inspect", tmp_path),
        ("verify", tmp_path / "missing", tmp_path / "o"),
    ]
    for args in cases:
        r = run(*args)
        assert r.returncode == 2, (args, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.stderr


def test_debug_shows_traceback(tmp_path):
    r = run("--debug", "inspect", tmp_path / "missing")
    assert r.returncode != 0 and "Traceback" in r.stderr


@pytest.mark.parametrize("args,says", [
    (["convert"], "Missing"),
    (["convert", "a", "b", "--workers", "99"], "--workers"),
    (["nosuchcommand"], "No such command"),
    (["verify", "a", "b", "--no-such-flag"], "No such option"),
])
def test_usage_error_is_one_plain_line_exit_2(args, says):
    r = run(*args)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], r.stderr
    assert "--debug" not in lines[0] and "Exception" not in lines[0]


def test_console_script_and_version():
    r = run("--version")
    assert r.returncode == 0 and r.stdout.startswith("w3repack ")
