"""Serving engines behind one interface (:class:`~repack.serve.engines.base.Engine`), by ``--engine`` name.

``engine_for(name)`` gives the engine; a new engine is a module here with an :class:`Engine` subclass, added to
:data:`ENGINES`.
"""

from __future__ import annotations

from repack.errors import UserError
from repack.serve.engines.base import Engine, Launch, LaunchMemory, VersionFlags
from repack.serve.engines.sglang import SglangEngine
from repack.serve.engines.vllm import VllmEngine

ENGINES: dict[str, type[Engine]] = {cls.name: cls for cls in (VllmEngine, SglangEngine)}

__all__ = ["ENGINES", "Engine", "Launch", "LaunchMemory", "VersionFlags", "engine_for", "names"]


def names() -> list[str]:
    return list(ENGINES)


def engine_for(name: str) -> Engine:
    """The engine called ``name``; UserError naming the known ones otherwise."""
    cls = ENGINES.get(name)
    if cls is None:
        raise UserError(f"--engine {name!r}: expected one of {', '.join(ENGINES)}")
    return cls()
