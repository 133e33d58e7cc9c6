"""Serving recipes: TOML files shipped in ``repack/recipes/`` (hardware facts plus vLLM settings), or one file the
user names explicitly (:class:`RecipeFile`, ``--recipe-file``), checked by the same schema.

Schema (every key and type checked, unknown keys refused, numbers finite and in range): top level ``name``,
``description``, ``source_repo`` (strings), ``notes`` (list of strings), tables ``[hardware]``, ``[serve]`` and
``[env]`` (variable names to strings). A loaded recipe is a plain dict with all three tables present.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Callable, Union

from repack.errors import UserError
from repack.serve.shell import NAME_RE, reserved
from repack.ui import printable

MAX_RECIPE_BYTES = 1 << 20

# ranges shared with the command-line options (repack/cli/serve.py)
GPU_MEMORY_GIB = (0.0, 4096.0)        # exclusive low, inclusive high
UTILIZATION = (0.0, 1.0)              # exclusive low, inclusive high
CPU_OFFLOAD_GIB = (0.0, 65536.0)      # inclusive both
MAX_GPUS = 4096
MAX_TOKENS = 1 << 31
KV_DTYPES = ("auto", "fp8", "fp8_e4m3", "fp8_e5m2", "bfloat16")
CC_RE = re.compile(r"[0-9]{1,2}\.[0-9]{1,2}\Z")


@dataclass(frozen=True)
class RecipeFile:
    """A recipe named by its path (``--recipe-file``), as opposed to a shipped recipe's name."""

    path: Path


RecipeRef = Union[str, RecipeFile]


def _toml():
    try:
        import tomllib
    except ImportError:  # Python 3.10
        try:
            import tomli as tomllib
        except ImportError as e:
            raise UserError("reading recipes on Python 3.10 needs the tomli package (pip install tomli)") from e
    return tomllib


def _dir():
    return resources.files("repack") / "recipes"


def names() -> list[str]:
    return sorted(p.name[:-5] for p in _dir().iterdir() if p.name.endswith(".toml"))


# --- value checks: each returns the value or raises ValueError with what is wrong --------------------------


def _string(v: object) -> str:
    if not isinstance(v, str):
        raise ValueError("must be a string")
    if "\x00" in v:
        raise ValueError("must not contain a NUL character")
    return v


def _strings(v: object) -> list[str]:
    if not isinstance(v, list):
        raise ValueError("must be a list of strings")
    return [_string(x) for x in v]


def _bool(v: object) -> bool:
    if not isinstance(v, bool):
        raise ValueError("must be true or false")
    return v


def _int(lo: int, hi: int) -> Callable[[object], int]:
    def check(v: object) -> int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError("must be an integer")
        if not lo <= v <= hi:
            raise ValueError(f"must be in {lo}..{hi}")
        return v
    return check


def number(v: object, lo: float, hi: float, low_open: bool) -> float:
    """``v`` as a finite float in ``(lo, hi]`` (``low_open``) or ``[lo, hi]``; ValueError otherwise."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError("must be a number")
    f = float(v)
    if not math.isfinite(f):
        raise ValueError("must be a finite number")
    if (f <= lo if low_open else f < lo) or f > hi:
        raise ValueError(f"must be in {'(' if low_open else '['}{lo:g}, {hi:g}]")
    return f


def _num(lo: float, hi: float, low_open: bool) -> Callable[[object], float]:
    return lambda v: number(v, lo, hi, low_open)


def _cc(v: object) -> str:
    s = _string(v)
    if not CC_RE.match(s):
        raise ValueError("must be MAJOR.MINOR, e.g. \"8.6\"")
    return s


def _kv(v: object) -> str:
    s = _string(v)
    if s not in KV_DTYPES:
        raise ValueError(f"must be one of {', '.join(KV_DTYPES)}")
    return s


TOP: dict[str, Callable[[object], object]] = {"name": _string, "description": _string, "source_repo": _string,
                                              "notes": _strings}
HARDWARE: dict[str, Callable[[object], object]] = {
    "gpus": _int(1, MAX_GPUS), "gpu_name": _string, "gpu_memory_gib": _num(*GPU_MEMORY_GIB, True),
    "compute_capability": _cc, "consumer_pcie": _bool}
SERVE: dict[str, Callable[[object], object]] = {
    "gpu_memory_utilization": _num(*UTILIZATION, True), "max_model_len": _int(1, MAX_TOKENS), "kv_cache_dtype": _kv,
    "cpu_offload_gb": _num(*CPU_OFFLOAD_GIB, False), "max_num_batched_tokens": _int(1, MAX_TOKENS),
    "enforce_eager": _bool, "extra_args": _strings}
REQUIRED_HARDWARE = ("gpus", "gpu_memory_gib", "compute_capability")


def validate(data: dict, where: str) -> dict:
    """``data`` (parsed TOML) checked against the schema; UserError naming ``where`` and the key otherwise."""

    def bad(key: str, why: str) -> UserError:
        return UserError(f"{where}: {key} {why}")

    def table(key: str, schema: dict[str, Callable[[object], object]] | None) -> dict:
        t = data.get(key, {})
        if not isinstance(t, dict):
            raise bad(f"[{key}]", "must be a table")
        out = {}
        for k, v in t.items():
            name = f"[{key}] {printable(k[:80])}"
            if schema is None:  # [env]
                if not NAME_RE.match(k):
                    raise bad(name, "is not an environment variable name ([A-Za-z_][A-Za-z0-9_]*)")
                if reserved(k):
                    raise bad(name, "is set or relied on by the launcher or bash itself; not allowed in [env]")
                check: Callable[[object], object] = _string
            elif k not in schema:
                raise bad(name, f"is not a recipe key (known: {', '.join(schema)})")
            else:
                check = schema[k]
            try:
                out[k] = check(v)
            except ValueError as e:
                raise bad(name, str(e)) from None
        return out

    out: dict = {}
    for k, v in data.items():
        if k in ("hardware", "serve", "env"):
            continue
        if k not in TOP:
            raise bad(printable(k[:80]), f"is not a recipe key (known: {', '.join([*TOP, '[hardware]', '[serve]', '[env]'])})")
        try:
            out[k] = TOP[k](v)
        except ValueError as e:
            raise bad(k, str(e)) from None
    out["hardware"], out["serve"], out["env"] = table("hardware", HARDWARE), table("serve", SERVE), table("env", None)
    for k in REQUIRED_HARDWARE:
        if k not in out["hardware"]:
            raise bad("[hardware]", f"needs {k}")
    return out


def _parse(text: str, where: str) -> dict:
    try:
        return _toml().loads(text)
    except RecursionError:
        raise UserError(f"{where}: not valid TOML (nested too deeply)") from None
    except ValueError as e:
        raise UserError(f"{where}: not valid TOML ({printable(str(e))})") from None


def load(ref: RecipeRef) -> dict:
    """A shipped recipe by name (nothing else: no path, no file outside ``repack/recipes/``), or the file of a
    :class:`RecipeFile`; validated by :func:`validate` either way."""
    if isinstance(ref, RecipeFile):
        return load_file(ref.path)
    known = names()
    if ref not in known:
        shown = printable(ref[:120])
        why = " (a recipe of your own: --recipe-file PATH)" if ("/" in ref or "\\" in ref or ref.startswith(".")) else ""
        raise UserError(f"--recipe {shown!r}: not a shipped recipe{why}; known recipes: {', '.join(known)}")
    f = _dir() / f"{ref}.toml"
    data = validate(_parse(f.read_text(encoding="utf-8"), f"recipe {ref}"), f"recipe {ref}")
    data.setdefault("name", ref)
    return data


def load_file(path: Path) -> dict:
    """A recipe file of the user's: a regular file of at most MAX_RECIPE_BYTES, UTF-8 TOML, checked as strictly as
    a shipped recipe; its ``name`` defaults to the file's stem."""
    from repack.checkpoint import read_bounded
    from repack.errors import FormatError

    where = f"--recipe-file {printable(str(path))}"
    try:
        raw = read_bounded(Path(path), MAX_RECIPE_BYTES)
    except FormatError as e:
        raise UserError(f"--recipe-file {e}") from None
    except FileNotFoundError:
        raise UserError(f"{where}: no such file") from None
    except OSError as e:
        raise UserError(f"{where}: cannot read it: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{where}: not UTF-8 text") from None
    data = validate(_parse(text, where), where)
    data.setdefault("name", Path(path).stem)
    return data
