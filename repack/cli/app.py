"""The typer app and its entry point: every command body raises; :func:`main` turns what it raises into a
message and an exit code through ``_errors.TABLE``."""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before numpy loads: no BLAS here, and idle BLAS threads spin

import gc  # noqa: E402

import typer  # noqa: E402

from repack import __version__, ui  # noqa: E402
from repack.cli import _errors, convert, hub, serve  # noqa: E402

app = typer.Typer(
    name="w3repack",
    help="Losslessly repack 3-bit AutoRound/GPTQ checkpoints into 4-bit GPTQ that stock vLLM serves with Marlin.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
_debug = {"on": False}


def _version(value: bool) -> None:
    if value:
        ui.out.print(f"w3repack {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks on errors."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    _debug["on"] = debug


for group in (convert, hub, serve):
    group.register(app)


def main() -> None:
    """Entry point: run the app; map exceptions to one-line messages and exit codes."""
    gc.freeze()  # the imported modules' objects need no collecting; later collections scan only what runs create
    try:
        rv = app(standalone_mode=False)
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
