"""A local checkpoint folder: every shard is there from the start and is only ever opened read-only."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from repack.checkpoint import Checkpoint, open_checkpoint
from repack.errors import UserError
from repack.output import Manifest, Output
from repack.plan import Options, Plan, ShardPlan


@dataclass
class FolderSource:
    """Identity: each shard's size and modification time. A run also compares size, time, inode and device of
    every shard and copied file at its start and end (``changed``)."""

    root: Path
    default_workers: int | None = None
    _seen: dict = field(default_factory=dict, repr=False, init=False)

    @property
    def space_hint(self) -> str:
        return ""

    def label(self) -> str:
        return str(self.root)

    def checkpoint(self, out: Output, options: Options) -> Checkpoint:
        return open_checkpoint(self.root)

    def _stats(self, plan: Plan) -> dict[str, tuple[int, int, int, int] | None]:
        out: dict[str, tuple[int, int, int, int] | None] = {}
        for rel in [s.name for s in plan.shards] + list(plan.extra_files):
            try:
                st = os.stat(self.root / rel)
                out[rel] = (st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev)
            except OSError:
                out[rel] = None
        return out

    def fingerprint(self, plan: Plan) -> dict:
        self._seen = self._stats(plan)
        files = {}
        for s in plan.shards:
            st = self._seen[s.name]
            if st is None or st[0] != s.src_size:
                raise UserError(f"{self.root / s.name}: the source changed after its header was read")
            files[s.name] = [st[0], st[1]]
        return {"source_files": files}

    def changed(self, plan: Plan) -> str | None:
        """The first file (path) whose size, time, inode or device differs from when ``fingerprint`` ran."""
        now = self._stats(plan)
        return next((str(self.root / n) for n, st in now.items() if st != self._seen.get(n)), None)

    def space_needed(self, todo: list[ShardPlan], workers: int) -> list[tuple[Path, int]]:
        return []

    def ensure(self, sp: ShardPlan) -> None:
        pass

    def release(self, plan: Plan, sp: ShardPlan, out: Output) -> None:
        pass

    def finish(self, plan: Plan, out: Output, manifest: Manifest) -> None:
        pass

    def close(self, plan: Plan) -> None:
        pass
