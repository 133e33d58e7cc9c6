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
