"""The one interface ``launch`` and ``serve`` drive every engine through.

An :class:`Engine` knows its version rules (:meth:`Engine.version`, :meth:`Engine.version_flags`), what it refuses
before any memory is planned (:meth:`Engine.check`), how it plans a launch (:meth:`Engine.plan`: a
:class:`Launch` with the argv, environment, one memory verdict, warnings and the minimum version) and the bash
launcher around that argv (:meth:`Engine.script`). Invariant of a :class:`Launch`: ``argv`` is exactly what the
engine receives, from :meth:`Engine.plan` (``serve``) or from the script (``launch``); the script adds nothing to it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar

from repack.serve import planner


@dataclass
class VersionFlags:
    """The flags a version of an engine needs (``args``), the oldest version they work on, and notes about them."""

    version: str
    args: list[str] = field(default_factory=list)
    min_version: str = "0.0"
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class LaunchMemory:
    """One GPU under the engine's own memory rule, and the launch's one verdict (``fits``: memory and a layout
    that splits the model into whole ranks; ``reason`` says why not). ``context``: the context length passed."""

    weights_gib_per_gpu: float
    kv_bytes_per_token: int
    kv_cache_gib: float
    capacity_tokens: int
    context: int
    fits: bool
    reason: str


@dataclass(kw_only=True)
class Launch:
    """A planned launch. ``gpus``: all GPUs (``nodes`` x the GPUs of one node); ``path``: the serving path the
    model is served by (``paths.NATIVE`` or ``paths.REPACKED``); ``warnings``: what the user is told before it
    starts. Engines subclass it to keep their own plan for :meth:`Engine.script`."""

    engine: str
    label: str
    model_path: str
    argv: list[str]
    env: dict[str, str]
    version: str
    min_version: str
    gpus: int
    nodes: int
    path: str
    memory: LaunchMemory
    warnings: list[str] = field(default_factory=list)


class Engine(ABC):
    """One serving engine. ``name``: the ``--engine`` value; ``label``: how messages name it; ``version_option``:
    the command-line option that picks the version the flags are for."""

    name: ClassVar[str]
    label: ClassVar[str]
    version_option: ClassVar[str]
    default_version: ClassVar[str]

    @abstractmethod
    def installed(self) -> str | None:
        """The installed engine's version, or None."""

    @abstractmethod
    def parse_version(self, version: str) -> str:
        """``version`` normalized; UserError (naming :attr:`version_option`) when it is not one or too old."""

    def version(self, given: str | None = None) -> str:
        """The version flags are chosen for: ``given``, else the installed one, else :attr:`default_version`."""
        return self.parse_version(given or self.installed() or self.default_version)

    @abstractmethod
    def version_flags(self, version: str, model: planner.Model, gpu: planner.Gpu, path: str, speculative: int = 0) -> VersionFlags:
        """The flags ``version`` needs for ``model`` on ``path``; UserError for what that version cannot serve."""

    @abstractmethod
    def check(self, model: planner.Model, req: planner.Request, path: str = "auto", rehearsal=None) -> None:
        """UserError (one line) for what the engine refuses before memory is planned: the model, or options the
        launch cannot honour with this engine."""

    @abstractmethod
    def plan(self, model: planner.Model, req: planner.Request, *, model_path: str | None = None, path: str = "auto",
             version: str | None = None, force: bool = False, rehearsal=None, trust_remote_code: bool = False,
             nodes: int = 1, recipe: dict | None = None) -> Launch:
        """The launch of ``model`` as ``req`` asks (``model_path``: the path the engine gets, default the model's
        absolute path); UserError when it does not fit, unless ``force``. ``recipe``: the recipe ``req`` was filled
        from (its engine-specific settings)."""

    @abstractmethod
    def script(self, launch: Launch, recipe: dict | None = None) -> str:
        """The bash launcher of ``launch``: preflight checks, then ``exec`` of ``launch.argv``."""
