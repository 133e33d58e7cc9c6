"""How a run goes, apart from what it converts: workers, overwrite, hashing, progress, stop.

Each shard in flight holds 20 MiB of buffers (convert and verify alike), so MAX_WORKERS bounds peak resident
memory near 400 MiB whatever the machine and the checkpoint.
"""

from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass
from typing import Callable, ContextManager

Progress = Callable[[int], None]
ProgressFactory = Callable[[str, int], ContextManager[Progress]]
MAX_WORKERS = 16


@contextlib.contextmanager
def no_progress(label: str, total: int):
    yield lambda n: None


@dataclass(frozen=True)
class RunConfig:
    """``workers``: shards in flight (None: the source's default, else one per core). ``hashes=False`` skips the
    sha256 of source and output shards (same bytes; the manifest records None). ``progress(label, total)`` gives
    a byte counter. ``stop`` ends the workers within a chunk once set."""

    workers: int | None = None
    overwrite: bool = False
    hashes: bool = True
    progress: ProgressFactory = no_progress
    stop: threading.Event | None = None


def cores() -> int:
    """CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def default_workers() -> int:
    """One shard in flight per core (at least two), at most MAX_WORKERS.

    A shard's reads and writes run on its own read-ahead and writer threads, so one computing thread per core
    keeps the cores busy.
    """
    return max(2, min(MAX_WORKERS, cores()))


def effective_workers(requested: int | None, jobs: int) -> int:
    """Threads for ``jobs`` shards: the request (or the default), at most MAX_WORKERS and at most one per shard."""
    return max(1, min(requested or default_workers(), MAX_WORKERS, jobs))
