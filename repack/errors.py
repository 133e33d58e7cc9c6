"""Errors the CLI maps to exit codes: UserError -> 2 (bad input or usage), Mismatch -> 1 (verification)."""


class UserError(Exception):
    """Bad input, bad usage or an unusable environment; shown as one ``error:`` line, exit code 2."""


class FormatError(UserError):
    """A file in the checkpoint is malformed; the message names the file (and tensor)."""


class Mismatch(Exception):
    """Verification found a difference; exit code 1."""


class NothingToDo(Exception):
    """The requested work is already done; shown as one line, exit code 0."""
