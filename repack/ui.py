"""Console output: progress on a terminal (stderr), quiet when piped; JSON and tables on stdout."""

from __future__ import annotations

import contextlib
import json
import sys
import threading

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n} B"


def print_json(obj: object) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")
    sys.stdout.flush()


@contextlib.contextmanager
def byte_progress(label: str, total: int, enabled: bool | None = None):
    """Yield a thread-safe ``advance(nbytes)`` callback; draws bytes, bytes/s and ETA on a terminal."""
    if enabled is None:
        enabled = err.is_terminal
    if not enabled:
        yield lambda n: None
        return
    lock = threading.Lock()
    with Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(binary_units=True),
        TransferSpeedColumn(), TimeRemainingColumn(), console=err, transient=True,
    ) as p:
        task = p.add_task(label, total=total)

        def advance(n: int) -> None:
            with lock:
                p.advance(task, n)

        yield advance
