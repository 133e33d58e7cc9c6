"""Child processes that can be stopped whole: an engine server, or a script's ``--child`` run.

Each child starts in a session (and process group) of its own, with stdout and stderr in one log file. Stopping
it (on its deadline, on an error in the parent, or at the end of a ``with`` block) signals the whole group,
SIGTERM first, then SIGKILL after ``grace`` seconds, so that no grandchild survives: vLLM's EngineCore and its
workers, for one, would otherwise keep their GPU memory after the server process is gone.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

TAIL_BYTES = 4000


def tail(path: Path, limit: int = TAIL_BYTES) -> str:
    """The last ``limit`` bytes of a log, as text."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - limit))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


class Child:
    """A process group running ``argv``; a context manager that stops the group on exit."""

    def __init__(self, argv: list[str], log: Path, env: dict[str, str] | None = None, cwd: Path | None = None,
                 grace: float = 10.0):
        self.argv, self.log, self.grace = list(argv), log, grace
        self.started = time.monotonic()
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)  # never a link
        with os.fdopen(fd, "wb") as f:
            self.proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=env, cwd=cwd, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait(self, timeout: float) -> int | None:
        """The exit status, or None if still running after ``timeout`` seconds."""
        try:
            return self.proc.wait(timeout=max(0.0, timeout))
        except subprocess.TimeoutExpired:
            return None

    def stop(self) -> None:
        """Signal the whole group: SIGTERM, then SIGKILL after ``grace`` seconds (also when the leader has exited,
        since its children may not have)."""
        for sig, wait in ((signal.SIGTERM, self.grace), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(self.proc.pid, sig)
            except (ProcessLookupError, PermissionError):
                break
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline and _group_alive(self.proc.pid):
                self.proc.poll()
                time.sleep(0.1)
            if not _group_alive(self.proc.pid):
                break
        self.proc.poll()

    def __enter__(self) -> Child:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _group_alive(pgid: int) -> bool:
    """Whether a live process is left in group ``pgid``: zombies (exited, not yet reaped) do not count."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    proc = Path("/proc")
    if not proc.is_dir():
        return True
    for d in proc.iterdir():
        if not d.name.isdigit():
            continue
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if len(fields) > 2 and fields[0] != "Z" and int(fields[2]) == pgid:
            return True
    return False


@dataclass(frozen=True)
class ChildResult:
    """How a child ended: ``rc`` (None when it was stopped at its deadline), its JSON result (None if it wrote
    none), the log and its tail."""

    rc: int | None
    timed_out: bool
    seconds: float
    result: dict | None
    log: Path
    log_tail: str

    def to_json(self) -> dict:
        return {"rc": self.rc, "timed_out": self.timed_out, "seconds": round(self.seconds, 1), "log": str(self.log)}


def run(argv: list[str], log: Path, timeout: float, env: dict[str, str] | None = None,
        result_file: Path | None = None, cwd: Path | None = None) -> ChildResult:
    """Run ``argv`` to its end or its deadline (then the whole group is stopped); read ``result_file`` (JSON)."""
    if result_file is not None:
        result_file.unlink(missing_ok=True)
    with Child(argv, log, env, cwd) as c:
        rc = c.wait(timeout)
    result = None
    if result_file is not None and result_file.is_file():
        try:
            result = json.loads(result_file.read_text())
        except (OSError, ValueError):
            result = None
    return ChildResult(rc, rc is None, time.monotonic() - c.started, result if isinstance(result, dict) else None,
                       log, tail(log))


def python_child(script: str | Path, args: list[str], log: Path, timeout: float, env: dict[str, str] | None = None,
                 root: Path | None = None) -> ChildResult:
    """``python SCRIPT --child ARGS... RESULT.json`` as a stoppable child: the GPU scripts' one engine per process.

    The result file is ``log`` with suffix ``.json``; ``root`` (the repository) goes on ``PYTHONPATH`` so the child
    imports this checkout; output is unbuffered."""
    import sys

    result = log.with_suffix(".json")
    pypath = os.pathsep.join(x for x in (os.environ.get("PYTHONPATH"), str(root) if root else None) if x)
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **({"PYTHONPATH": pypath} if pypath else {}), **(env or {})}
    return run([sys.executable, str(script), "--child", *args, str(result)], log, timeout, full_env, result)
