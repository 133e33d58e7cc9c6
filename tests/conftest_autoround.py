"""pytest plugin: session-cached AutoRound fixtures and converter runs.

Not a conftest itself (tests/conftest.py belongs to the package's own tests).  Use it either by
``pytest_plugins = ["conftest_autoround"]`` in tests/conftest.py, or by importing the fixtures into a
test module (``from conftest_autoround import autoround_fixture, autoround_converted``), as
tests/test_interop_autoround.py does.  Importing this module needs neither torch nor auto_round.

Fixtures
--------
``autoround_fixture(family, group_size, **build_kwargs) -> Path``
    A checkpoint made by AutoRound (see autoround_fixtures.build_fixture), built once per session under
    ``tmp_path_factory``.  Set ``W3REPACK_AR_FIXTURE_CACHE=/some/dir`` to keep them across sessions
    (keyed by the build arguments and the installed torch/auto-round/transformers versions).
``autoround_converted(src, **options) -> Path``
    ``src`` converted by ``python -m repack convert``, once per session per (src, options).
    Options map to flags through ``CONVERTER_FLAGS``; ``None``/``False`` values are left out.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))

# keyword -> flag of `repack convert`; a str value is passed as the flag's argument, True as a bare flag.
CONVERTER_FLAGS = {
    "quant_method": "--quant-method",  # "auto-round" | "gptq"
    "no_kv_b_float": "--no-kv-b-float",
}


def converter_command() -> list[str]:
    return [sys.executable, "-m", "repack", "convert"]


def converter_args(**options) -> list[str]:
    args = []
    for key, val in sorted(options.items()):
        if val is None or val is False:
            continue
        flag = CONVERTER_FLAGS.get(key, "--" + key.replace("_", "-"))
        args += [flag] if val is True else [flag, str(val)]
    return args


def run_converter(src: Path, dst: Path, **options) -> subprocess.CompletedProcess:
    cmd = converter_command() + [str(src), str(dst)] + converter_args(**options)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env.setdefault("HF_HUB_OFFLINE", "1")
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise AssertionError(
            f"converter failed (exit {proc.returncode}): {shlex.join(cmd)}\n"
            f"--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-4000:]}"
        )
    return proc


def _fixture_key(family: str, group_size: int, build_kwargs: dict) -> str:
    import autoround_fixtures as arf

    blob = json.dumps(
        {"family": family, "gs": group_size, "kw": build_kwargs, "v": arf.installed_versions(), "rev": 2},
        sort_keys=True,
        default=str,
    )
    return f"{arf.spec_dirname(family, group_size)}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


@pytest.fixture(scope="session")
def autoround_fixture(tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("auto_round")
    import autoround_fixtures as arf

    cache: dict = {}
    persistent = os.environ.get("W3REPACK_AR_FIXTURE_CACHE")

    def get(family: str, group_size: int, **build_kwargs) -> Path:
        key = _fixture_key(family, group_size, build_kwargs)
        if key in cache:
            return cache[key]
        if persistent:
            root = Path(persistent) / key
            done = root / "DONE"
            model_dir = root / "model"
            if not done.exists():
                if root.exists():
                    shutil.rmtree(root)
                arf.build_fixture(family, group_size, model_dir, **build_kwargs)
                done.write_text("ok\n")
        else:
            model_dir = tmp_path_factory.mktemp(key) / "model"
            arf.build_fixture(family, group_size, model_dir, **build_kwargs)
        cache[key] = model_dir
        return model_dir

    return get


@pytest.fixture(scope="session")
def autoround_converted(tmp_path_factory):
    cache: dict = {}

    def get(src: Path, **options) -> Path:
        key = (str(src), tuple(sorted(options.items())))
        if key not in cache:
            dst = tmp_path_factory.mktemp("converted") / "out"  # not created: the converter makes it
            run_converter(Path(src), dst, **options)
            cache[key] = dst
        return cache[key]

    return get
