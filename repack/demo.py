"""The whole job on a generated model: build a small 3-bit DeepSeek-V3-shaped checkpoint, convert it, verify
it, and check that a flipped bit in a copy of the output is caught."""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from repack import synth
from repack.convert import Result, convert
from repack.errors import UserError
from repack.output import MANIFEST_NAME
from repack.plan import Options
from repack.run import RunConfig
from repack.ui import snake_keys
from repack.verify import Report, verify


@dataclass
class DemoResult:
    source: Path
    output: Path
    converted: Result
    report: Report
    flipped: str | None  # verify's line about the flipped bit; None if it was not caught

    @property
    def ok(self) -> bool:
        return self.report.ok and self.flipped is not None

    def to_json(self) -> dict:
        return {"source": str(self.source), "output": str(self.output), "convert": snake_keys(self.converted.plan.counts()),
                "verify": self.report.to_json(), "flipped_bit_detected": self.flipped}


def run_demo(root: Path | None = None) -> DemoResult:
    """Everything under ``root`` (default: a new temporary folder); a DST there that is not ours is refused."""
    root = root or Path(tempfile.mkdtemp(prefix="w3repack-demo-"))
    src, dst = root / "deepseek-tiny-w3", root / "deepseek-tiny-w4"
    if dst.exists() and not (dst / MANIFEST_NAME).exists() and any(dst.iterdir()):
        raise UserError(f"{dst} exists and is not a w3repack output; choose another DIR")
    synth.write_checkpoint(src, synth.TinySpec(traps=False))
    res = convert(src, dst, Options(), RunConfig(overwrite=True))
    return DemoResult(src, dst, res, verify(src, dst), flip_check(src, dst))


def flip_check(src: Path, dst: Path) -> str | None:
    """Copy DST, flip one bit in the middle of the largest shard, and return verify's line naming it."""
    with tempfile.TemporaryDirectory(prefix="w3repack-flip-") as tmp:
        copy = Path(tmp) / "copy"
        shutil.copytree(dst, copy)
        shard = max(copy.glob("*.safetensors"), key=lambda p: p.stat().st_size)
        data = bytearray(shard.read_bytes())
        data[len(data) * 2 // 3] ^= 0x10
        shard.write_bytes(data)
        rep = verify(src, copy)
        return None if rep.ok else rep.differences[0].line().replace(str(copy), "<copy>")
