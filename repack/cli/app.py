"""The typer app and its entry point: every command body raises; :func:`main` turns what it raises into a
message and an exit code through ``_errors.TABLE``."""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before numpy loads: no BLAS here, and idle BLAS threads spin

import gc  # noqa: E402
import sys  # noqa: E402

import typer  # noqa: E402

from repack import __version__, ui  # noqa: E402
from repack.cli import _errors, convert, hub, rehearse, serve  # noqa: E402

app = typer.Typer(
    name="w3repack",
    help="Losslessly repack 3-bit AutoRound/GPTQ checkpoints into 4-bit GPTQ that stock vLLM serves with Marlin.",
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
_debug = {"on": False}


def _version(value: bool) -> None:
    if value:
        ui.out.print(f"w3repack {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks on errors (accepted anywhere on the command line)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output (accepted anywhere on the command line)."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="More detail: one line per shard, download detail (accepted anywhere)."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    _debug["on"] = _debug["on"] or debug
    if quiet or verbose:
        ui.set_verbosity(-1 if quiet else 1)


GLOBAL_FLAGS = {"--debug": "debug", "--quiet": "quiet", "-q": "quiet", "--verbose": "verbose", "-v": "verbose"}


def split_global_flags(argv: list[str]) -> tuple[list[str], set[str]]:
    """Take ``--debug``, ``-q``/``--quiet`` and ``-v``/``--verbose`` out of ``argv`` wherever they stand (up to a
    ``--``); returns the rest and the flags found. A bare command line becomes ``--help``."""
    rest: list[str] = []
    found: set[str] = set()
    for i, a in enumerate(argv):
        if a == "--":
            rest += argv[i:]
            break
        if a in GLOBAL_FLAGS:
            found.add(GLOBAL_FLAGS[a])
        else:
            rest.append(a)
    return (rest or ["--help"]), found


for group in (convert, hub, serve, rehearse):
    group.register(app)


def main() -> None:
    """Entry point: run the app; map exceptions to one-line messages and exit codes."""
    gc.freeze()  # the imported modules' objects need no collecting; later collections scan only what runs create
    args, flags = split_global_flags(sys.argv[1:])
    _debug["on"] = "debug" in flags
    if flags & {"quiet", "verbose"}:
        ui.set_verbosity(-1 if "quiet" in flags else 1)
    try:
        rv = app(args=args, prog_name="w3repack", standalone_mode=False)
    except BaseException as e:  # noqa: BLE001 - the table decides, including SystemExit-like click exits
        if isinstance(e, SystemExit):
            raise
        _errors.hard_exit(_errors.exit_for(e, _debug["on"]))
        return
    if isinstance(rv, int) and not isinstance(rv, bool) and rv:  # typer returns Exit codes; Ctrl-C comes back as 130
        if rv == _errors.EXIT_INTERRUPTED:
            ui.err.print(_errors.INTERRUPTED, markup=False)
        _errors.hard_exit(rv)
    _errors.hard_exit(_errors.EXIT_OK)
