"""The command line as users run it: real subprocesses, exit codes, one-line errors, JSON output."""

import contextlib
import io
import json

import pytest

from tests.helpers import w3repack as run
from tests.helpers import w3repack_in_process


def test_demo_end_to_end(tmp_path):
    r = run("demo", tmp_path, "--json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["verify"]["ok"] is True and rep["flipped_bit_detected"]
    assert rep["schema_version"] == 1
    assert rep["convert"]["3_bit_to_4_bit"] > 0 and rep["convert"]["4_bit_passthrough"] > 0
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
    assert r.returncode == 2 and "Traceback" in r.stderr


def test_internal_error_has_its_own_exit_code(monkeypatch, traps_ckpt):
    """A bug is not bad input: exit 3, one line that says so; --debug shows the traceback."""
    from repack.cli import _errors

    try:
        raise ZeroDivisionError("x")
    except ZeroDivisionError as e:
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            assert _errors.exit_for(e, debug=True) == 3
        assert "Traceback" in err.getvalue() and err.getvalue().rstrip().endswith("run with --debug for a traceback)")
    assert _errors.exit_for(ZeroDivisionError("x"), debug=False) == _errors.EXIT_INTERNAL == 3
    assert _errors.exit_for(_errors.UserError("bad"), debug=False) == 2
    assert _errors.exit_for(_errors.Mismatch("differs"), debug=False) == 1
    assert _errors.exit_for(_errors.NothingToDo("done"), debug=False) == 0
    monkeypatch.setattr("repack.report.inspect_report", lambda *a: 1 / 0)
    code, _, err = w3repack_in_process("inspect", traps_ckpt)
    lines = err.strip().splitlines()
    assert code == 3 and len(lines) == 1 and lines[0].startswith("internal error: ZeroDivisionError"), err


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
