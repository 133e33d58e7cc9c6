"""Fake GPU tools and engines on PATH for launcher scripts run by real bash: ``nvidia-smi``, ``python3`` (SGLang's
interpreter, and the version probes of both engines), ``vllm`` and ``ray``. Each fake engine writes the argv it
received NUL-separated (and its environment with ``env -0``), which tests compare byte for byte with the argv
intended."""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path


def fake_tools(d: Path, gpus: int = 1, mib: int = 24576, vllm: str = "0.26.0", sglang: str = "0.5.19") -> tuple[dict, Path]:
    """Fake GPU tools and engines in ``d/bin``; engines record into ``d/rec``. Returns (environment, rec)."""
    b, rec = d / "bin", d / "rec"
    b.mkdir(parents=True)
    rec.mkdir()
    q = shlex.quote
    tools = {
        "nvidia-smi": f"for i in $(seq 1 {gpus}); do echo {mib}; done",
        "python3": ('if [ "$1" = -c ]; then\n'
                    f'  case "$2" in *ray*) echo {gpus * 16} ;; *sglang*) echo {sglang} ;; *) echo {vllm} ;; esac\n'
                    '  exit 0\nfi\n'
                    f'printf "%s\\0" "$@" > {q(str(rec / "python3.argv"))}\nenv -0 > {q(str(rec / "python3.env"))}'),
        "vllm": f'printf "%s\\0" "$@" > {q(str(rec / "vllm.argv"))}\nenv -0 > {q(str(rec / "vllm.env"))}',
        "ray": f'printf "%s\\0" "$@" >> {q(str(rec / "ray.argv"))}',
    }
    for name, body in tools.items():
        (b / name).write_text("#!/bin/bash\n" + body + "\n")
        (b / name).chmod(0o755)
    return {"PATH": f"{b}:/usr/bin:/bin", "LC_ALL": "C"}, rec


def recorded(rec: Path, name: str) -> list[bytes]:
    return (rec / f"{name}.argv").read_bytes().split(b"\0")[:-1]


def recorded_env(rec: Path, name: str) -> dict[bytes, bytes]:
    pairs = (e.partition(b"=") for e in (rec / f"{name}.env").read_bytes().split(b"\0")[:-1])
    return {k: v for k, _, v in pairs}


def b(s: str) -> bytes:
    return s.encode("utf-8", "surrogateescape")


def run_script(script: Path, env: dict, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0, script.read_bytes()[:2000]
    return subprocess.run(["bash", str(script), *args], capture_output=True, env=env, cwd=cwd, timeout=60)
