import shutil
from pathlib import Path

import pytest

from repack import synth


@pytest.fixture(scope="session")
def traps_ckpt(tmp_path_factory) -> Path:
    """Multi-shard 3-bit checkpoint with every trap: 2/4/8-bit modules under bits=3, split modules,
    bf16/f32 scales, g_idx, bias, 4-bit MTP layer, float router, extra files in a subfolder."""
    root = tmp_path_factory.mktemp("traps") / "src"
    spec = synth.TinySpec.small(traps=True, extra_files={"tokenizer_config.json": "{}\n", "extra/notes.txt": "hi\n"})
    return synth.write_checkpoint(root, spec)


@pytest.fixture
def src_copy(traps_ckpt, tmp_path) -> Path:
    dst = tmp_path / "src"
    shutil.copytree(traps_ckpt, dst)
    return dst


@pytest.fixture(scope="session")
def converted(traps_ckpt, tmp_path_factory) -> tuple[Path, Path]:
    """``traps_ckpt`` and its conversion with default options (two workers). Tests copy it before changing it."""
    from repack.convert import convert
    from repack.plan import Options
    from repack.run import RunConfig

    dst = tmp_path_factory.mktemp("converted") / "w4"
    convert(traps_ckpt, dst, Options(), RunConfig(workers=2))
    return traps_ckpt, dst
