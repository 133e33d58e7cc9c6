"""Console output: JSON and tables on stdout; progress and warnings on stderr.

Progress of long work (convert, verify, hub downloads) on every kind of stderr:

- a terminal: rich bars (bytes, MiB/s, ETA), with a second bar for a hub shard being fetched;
- anything else (a pipe, a log file, systemd): plain lines, once the work has run for ``interval`` seconds
  (``W3REPACK_PROGRESS_INTERVAL``, default 5): one every ``interval`` seconds (bytes, rate, ETA, the shard
  being fetched) and one per finished shard; short runs print nothing;
- ``-q``: nothing; ``-v``: plain lines from the start, and one when a hub shard starts and ends arriving.

Units everywhere: bytes with binary prefixes (KiB, MiB, GiB), rates in MiB/s.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
)
from rich.text import Text

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

SCHEMA_VERSION = 1
VERBOSITY = {"level": 0}  # -1 quiet, 0 normal, 1 verbose
_ACTIVE: list[Reporter] = []


def printable(s: str, keep: str = "") -> str:
    """``s`` with every non-printable character (newlines, terminal escapes, other controls, lone surrogates)
    written as its Python escape, except those in ``keep``: what outside text becomes before it is printed."""
    return "".join(c if c.isprintable() or c in keep else c.encode("unicode_escape", "backslashreplace").decode("ascii")
                   for c in s)


def safe(x: object) -> str:
    """Outside text for a line printed with Rich markup: printable, and its ``[`` taken literally."""
    return escape(printable(str(x)))


def set_verbosity(level: int) -> None:
    VERBOSITY["level"] = level


def human(n: float) -> str:
    """Bytes with binary prefixes: ``512 B``, ``1.50 MiB``, ``3.20 GiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n} B"


def rate(nbytes: float, seconds: float) -> str:
    """A rate in MiB/s."""
    return f"{nbytes / 2**20 / max(seconds, 1e-9):.1f} MiB/s"


def mib_per_s(nbytes: float, seconds: float) -> float:
    return round(nbytes / 2**20 / max(seconds, 1e-9), 1)


def _eta(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def snake(label: str) -> str:
    """A display label as a stable snake_case JSON key: ``3-bit -> 4-bit`` -> ``3_bit_to_4_bit``."""
    import re

    return re.sub(r"[^a-z0-9]+", "_", label.lower().replace("->", " to ")).strip("_")


def snake_keys(d: dict) -> dict:
    return {snake(str(k)): v for k, v in d.items()}


def print_json(obj: object) -> None:
    """JSON on stdout; an object gets ``schema_version`` first (its keys are stable snake_case)."""
    if isinstance(obj, dict):
        obj = {"schema_version": SCHEMA_VERSION, **{k: v for k, v in obj.items() if k != "schema_version"}}
    sys.stdout.write(json.dumps(obj, indent=2, default=str, allow_nan=False) + "\n")
    sys.stdout.flush()


def interval() -> float:
    try:
        return max(0.05, float(os.environ.get("W3REPACK_PROGRESS_INTERVAL", "5")))
    except ValueError:
        return 5.0


class Reporter:
    """Thread-safe byte counter of one job; draws it as configured (see the module docstring)."""

    def __init__(self, label: str, total: int, mode: str, shards: int | None = None):
        self.label, self.total, self.mode, self.shards = label, total, mode, shards
        self.done = 0
        self.shards_done = 0
        self.t0 = time.monotonic()
        self.lock = threading.Lock()
        self.fetch: tuple[str, int, int] | None = None  # (name, bytes arrived, size)
        self.bar: Progress | None = None
        self.task: TaskID | None = None
        self.fetch_task: TaskID | None = None
        self.stop = threading.Event()
        self.verbose = VERBOSITY["level"] > 0
        self.talking = self.verbose  # plain mode: lines start once the job has run for `interval` seconds

    def __call__(self, n: int) -> None:
        with self.lock:
            self.done += n
            if self.bar is not None and self.task is not None:
                self.bar.advance(self.task, n)

    # --- plain lines --------------------------------------------------------------------------------------

    def _line(self, text: str) -> None:
        sys.stderr.write(printable(f"{time.strftime('%H:%M:%S')} {self.label}: {text}") + "\n")
        sys.stderr.flush()

    def status_line(self) -> str:
        with self.lock:
            done, fetch = self.done, self.fetch
        took = time.monotonic() - self.t0
        pct = f" ({100 * done / self.total:.0f}%)" if self.total else ""
        speed = done / max(took, 1e-9)
        eta = f", ETA {_eta((self.total - done) / speed)}" if speed > 0 and self.total > done else ""
        text = f"{human(done)} of {human(self.total)}{pct}, {rate(done, took)}{eta}"
        if fetch is not None:
            text += f"; fetching {fetch[0]}: {human(fetch[1])} of {human(fetch[2])}"
        return text

    def _ticker(self) -> None:
        every = interval()
        while not self.stop.wait(every):
            self.talking = True
            self._line(self.status_line())

    # --- events -------------------------------------------------------------------------------------------

    def shard_done(self, name: str) -> None:
        with self.lock:
            self.shards_done += 1
            n = self.shards_done
        if self.mode == "plain" and self.talking:
            of = f" of {self.shards}" if self.shards else ""
            self._line(f"shard {n}{of} done: {name}; {self.status_line()}")

    def fetch_start(self, name: str, size: int) -> None:
        with self.lock:
            self.fetch = (name, 0, size)
        if self.bar is not None:
            self.fetch_task = self.bar.add_task(f"fetch {safe(name)}", total=size)
        elif self.mode == "plain" and self.verbose:
            self._line(f"fetching {name} ({human(size)})")

    def fetch_bytes(self, arrived: int) -> None:
        with self.lock:
            if self.fetch is not None:
                self.fetch = (self.fetch[0], arrived, self.fetch[2])
        if self.bar is not None and self.fetch_task is not None:
            self.bar.update(self.fetch_task, completed=arrived)

    def fetch_end(self, seconds: float) -> None:
        with self.lock:
            fetch, self.fetch = self.fetch, None
        if self.bar is not None and self.fetch_task is not None:
            self.bar.remove_task(self.fetch_task)
            self.fetch_task = None
        if fetch is not None and self.mode == "plain" and (self.verbose or (self.talking and seconds > 1)):
            self._line(f"fetched {fetch[0]} ({human(fetch[2])}) in {seconds:.1f} s, {rate(fetch[2], seconds)}")


class SpeedColumn(ProgressColumn):
    """The rate in MiB/s (rich's own column uses decimal MB/s)."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("?" if speed is None else f"{speed / 2**20:.1f} MiB/s", style="progress.data.speed")


def _mode(enabled: bool | None) -> str:
    if enabled is False or VERBOSITY["level"] < 0:
        return "off"
    return "bar" if err.is_terminal else "plain"


@contextlib.contextmanager
def byte_progress(label: str, total: int, enabled: bool | None = None, shards: int | None = None) -> Iterator[Reporter]:
    """Yield a :class:`Reporter`: call it with a byte count; ``shard_done(name)`` after each shard."""
    rep = Reporter(label, total, _mode(enabled), shards)
    _ACTIVE.append(rep)
    threads: list[threading.Thread] = []
    try:
        if rep.mode == "bar":
            with Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(binary_units=True),
                SpeedColumn(), TimeRemainingColumn(), console=err, transient=True,
            ) as p:
                rep.bar, rep.task = p, p.add_task(safe(label), total=total)
                yield rep
            return
        if rep.mode == "plain":
            threads.append(threading.Thread(target=rep._ticker, daemon=True, name="w3repack-progress"))
            threads[0].start()
        yield rep
    finally:
        rep.stop.set()
        _ACTIVE.remove(rep)


@contextlib.contextmanager
def fetching(name: str, size: int, arrived: Callable[[], int], poll_s: float = 0.2) -> Iterator[None]:
    """Report a hub download of ``name`` to the job in progress: ``arrived()`` is polled for the bytes so far."""
    rep = _ACTIVE[-1] if _ACTIVE else None
    if rep is None or rep.mode == "off":
        yield
        return
    stop = threading.Event()
    t0 = time.monotonic()

    def poll() -> None:
        while not stop.wait(poll_s):
            with contextlib.suppress(OSError):
                rep.fetch_bytes(arrived())

    rep.fetch_start(name, size)
    t = threading.Thread(target=poll, daemon=True, name="w3repack-fetch-progress")
    t.start()
    try:
        yield
    finally:
        stop.set()
        rep.fetch_bytes(size)
        rep.fetch_end(time.monotonic() - t0)


def incomplete_bytes(folder: Path) -> int:
    """Bytes in ``folder``'s ``*.incomplete`` files: what huggingface_hub has received of the downloads in flight."""
    n = 0
    for p in folder.glob("*.incomplete"):
        with contextlib.suppress(OSError):
            n += p.stat().st_size
    return n
