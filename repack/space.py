"""Free space: what a run still has to write (and a source to fetch) against what each device has free."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Sequence

from repack.errors import UserError


def _probe(p: Path) -> Path:
    """The nearest existing folder at or above ``p`` (where free space is measured)."""
    return p if p.exists() else next(q for q in p.resolve().parents if q.exists())


def check_space(dst: Path, need: int, fetch: Sequence[tuple[Path, int]] = (), hint: str = "") -> None:
    """``need`` more bytes in ``dst``, plus ``fetch``: bytes a source must still bring to a folder (e.g. a hub
    cache); needs on one device are added up before they are compared with its free space. ``hint`` is added
    to a refusal that counts bytes to fetch."""
    out_probe = _probe(dst)
    needs: dict[int, tuple[Path, list[int]]] = {os.stat(out_probe).st_dev: (out_probe, [need, 0])}
    for where, n in fetch:
        probe = _probe(where)
        needs.setdefault(os.stat(probe).st_dev, (probe, [0, 0]))[1][1] += n
    for probe, (out_n, fetch_n) in needs.values():
        total = out_n + fetch_n
        free = shutil.disk_usage(probe).free
        if free >= total:
            continue
        if not fetch:
            raise UserError(
                f"not enough free space on {probe}: the output needs {total:,} more bytes ({total / 2**30:.2f} GiB), "
                f"{free:,} bytes ({free / 2**30:.2f} GiB) are free"
            )
        raise UserError(
            f"not enough free space on {probe}: needs {total:,} bytes ({total / 2**30:.2f} GiB: output "
            f"{out_n / 2**30:.2f} GiB, source shards to fetch {fetch_n / 2**30:.2f} GiB), "
            f"{free:,} bytes ({free / 2**30:.2f} GiB) are free" + hint
        )
