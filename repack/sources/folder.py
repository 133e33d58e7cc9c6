"""A local checkpoint folder: every shard is there from the start and is only ever opened read-only."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from repack.checkpoint import Checkpoint, open_checkpoint
from repack.output import Manifest, Output
from repack.plan import Options, Plan, ShardPlan


@dataclass
class FolderSource:
    """Identity: each shard's size and modification time."""

    root: Path
    default_workers: int | None = None

    @property
    def space_hint(self) -> str:
        return ""

    def label(self) -> str:
        return str(self.root)

    def checkpoint(self, out: Output, options: Options) -> Checkpoint:
        return open_checkpoint(self.root)

    def fingerprint(self, plan: Plan) -> dict:
        files = {}
        for s in plan.shards:
            st = os.stat(self.root / s.name)
            files[s.name] = [st.st_size, st.st_mtime_ns]
        return {"source_files": files}

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
