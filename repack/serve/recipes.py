"""Serving recipes: TOML files shipped in ``repack/recipes/`` (hardware facts plus vLLM settings)."""

from __future__ import annotations

from importlib import resources

from repack.errors import UserError

SECTIONS = {"hardware": dict, "serve": dict, "env": dict}


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


def load(name: str) -> dict:
    """The recipe called ``name`` (file stem), validated."""
    f = _dir() / f"{name}.toml"
    if not f.is_file():
        raise UserError(f"recipe {name!r} not found; known recipes: {', '.join(names())}")
    try:
        data = _toml().loads(f.read_text(encoding="utf-8"))
    except ValueError as e:
        raise UserError(f"recipe {name}: not valid TOML ({e})") from e
    for key, typ in SECTIONS.items():
        data.setdefault(key, {})
        if not isinstance(data[key], typ):
            raise UserError(f"recipe {name}: [{key}] must be a table")
    hw, sv = data["hardware"], data["serve"]
    for key in ("gpus", "gpu_memory_gib", "compute_capability"):
        if key not in hw:
            raise UserError(f"recipe {name}: [hardware] needs {key}")
    if not all(isinstance(a, str) for a in sv.get("extra_args", [])):
        raise UserError(f"recipe {name}: [serve] extra_args must be a list of strings")
    data["env"] = {str(k): str(v) for k, v in data["env"].items()}
    data.setdefault("name", name)
    return data
