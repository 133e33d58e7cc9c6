"""The one table from exceptions to messages and exit codes.

0 success (and NothingToDo), 1 verification found a difference, 2 bad input or usage (one ``error:`` line),
3 internal error (a bug: one line, ``--debug`` shows the traceback), 130 interrupted.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Callable

import typer

from repack import ui
from repack.errors import Mismatch, NothingToDo, UserError

EXIT_OK, EXIT_MISMATCH, EXIT_USAGE, EXIT_INTERNAL, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
INTERRUPTED = "interrupted: nothing half-written was kept; run the same command again to resume"


def is_click(e: BaseException, name: str) -> bool:
    """Click's exception classes by name: typer may bring its own copy of click (``typer._click``)."""
    return any(c.__name__ == name and "click" in c.__module__ for c in type(e).__mro__)


@dataclass(frozen=True)
class Rule:
    """``matches(e)``: this rule applies; ``message(e)``: the line printed (None: nothing); ``stdout``: where."""

    matches: Callable[[BaseException], bool]
    code: Callable[[BaseException], int]
    message: Callable[[BaseException], str | None]
    stdout: bool = False
    debug_raises: bool = False


TABLE: list[Rule] = [
    Rule(lambda e: isinstance(e, Mismatch), lambda e: EXIT_MISMATCH, lambda e: f"verification failed: {ui.printable(str(e))}",
         debug_raises=True),
    Rule(lambda e: isinstance(e, UserError), lambda e: EXIT_USAGE, lambda e: f"error: {ui.printable(str(e))}",
         debug_raises=True),
    Rule(lambda e: isinstance(e, NothingToDo), lambda e: EXIT_OK, lambda e: ui.printable(str(e)), stdout=True),
    Rule(lambda e: isinstance(e, KeyboardInterrupt), lambda e: EXIT_INTERRUPTED, lambda e: INTERRUPTED),
    Rule(lambda e: isinstance(e, typer.Exit) or is_click(e, "Exit"), lambda e: int(getattr(e, "exit_code", 0) or 0),
         lambda e: None),
    Rule(lambda e: isinstance(e, typer.Abort), lambda e: EXIT_INTERRUPTED, lambda e: "aborted"),
    Rule(lambda e: is_click(e, "ClickException"), lambda e: EXIT_USAGE,
         lambda e: f"error: {ui.printable(e.format_message())}"),  # type: ignore[attr-defined]
    Rule(lambda e: True, lambda e: EXIT_INTERNAL,
         lambda e: f"internal error: {type(e).__name__}: {ui.printable(str(e))} (a bug in w3repack; run with --debug for a traceback)",
         debug_raises=True),
]


def exit_for(e: BaseException, debug: bool) -> int:
    """Print ``e``'s line and return its exit code; under ``--debug`` the traceback first, where it helps (the
    exit code stays the table's)."""
    rule = next(r for r in TABLE if r.matches(e))
    if debug and rule.debug_raises:
        import traceback

        sys.stderr.write("".join(traceback.format_exception(type(e), e, e.__traceback__)))
        sys.stderr.flush()
    msg = rule.message(e)
    if msg is not None:
        (ui.out if rule.stdout else ui.err).print(msg, markup=False)
    return rule.code(e)


def hard_exit(code: int) -> None:
    """Exit now: after Ctrl-C a worker blocked in a hub download would hold up the interpreter's exit."""
    if code == EXIT_INTERRUPTED:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
