"""Bash text for launcher scripts, through one escaping layer.

Every piece of text a launcher did not write itself (paths, engine arguments, environment keys and values, recipe
names, versions, warnings in comments) reaches the script through :func:`word` (one ``shlex.quote``d word; a
:class:`Var` is the only way to place a variable) or :func:`comment` (control characters escaped, so it stays one
line); :func:`assign`, :func:`default` and :func:`export` are a checked name and one :func:`word`. The argv is a
Python list until :func:`command_lines` turns it into words; grouping ``--flag value`` on one line is layout only.
:func:`display` is the same argv for a terminal, :func:`write_script` the file.
"""

from __future__ import annotations

import errno
import os
import re
import shlex
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, Union

from repack.errors import UserError
from repack.ui import printable

NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")

PREFLIGHT_GPUS = [
    'die() { echo "preflight: $*" >&2; exit 1; }',
    'version_ge() { [ "$(printf \'%s\\n%s\\n\' "$1" "$2" | sort -V | head -n 1)" = "$2" ]; }',
    "",
    'command -v nvidia-smi >/dev/null 2>&1 || die "nvidia-smi not found: no NVIDIA driver here"',
    'mapfile -t MEM_MIB < <(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits)',
    '[ "${#MEM_MIB[@]}" -ge "$NEED_GPUS" ] || die "${#MEM_MIB[@]} GPUs found, the plan needs $NEED_GPUS"',
    'for i in "${!MEM_MIB[@]}"; do',
    '  mib="${MEM_MIB[$i]%%.*}"',
    '  mib="${mib// /}"',
    '  [ "$mib" -ge "$NEED_MIB" ] || die "GPU $i has $mib MiB, the plan assumes at least $NEED_MIB MiB"',
    'done',
]
"""Bash lines every launcher starts with: ``die``, ``version_ge``, and the GPU count and memory check against
``NEED_GPUS`` and ``NEED_MIB``."""

SCRIPT_VARS = frozenset({
    # the launchers' own
    "MODEL", "PYTHON", "VLLM", "NEED_GPUS", "NEED_MIB", "MIN_VLLM", "FLAGS_VLLM", "MIN_SGLANG", "FLAGS_SGLANG", "NODES",
    "RAY_PORT", "ROLE", "HEAD_IP", "MEM_MIB", "VLLM_VERSION", "SGLANG_VERSION", "TOTAL", "HAVE", "i", "mib",
    # bash's: set by bash itself, read-only, or changing how the rest of the script runs
    "_", "PATH", "IFS", "ENV", "CDPATH", "GLOBIGNORE", "POSIXLY_CORRECT", "PS4", "SHELLOPTS", "UID", "EUID", "PPID",
    "SHLVL", "PWD", "OLDPWD", "RANDOM", "SRANDOM", "SECONDS", "LINENO", "HISTCMD", "FUNCNAME", "GROUPS",
    "EPOCHREALTIME", "EPOCHSECONDS", "OPTIND", "OPTARG", "PIPESTATUS", "DIRSTACK"})
"""Names an ``[env]`` entry may not set (nor any ``BASH*``): the launchers assign or rely on them, or bash does, so
the value would not reach the engine as given or would change what the script runs."""


@dataclass(frozen=True)
class Var:
    """One word that is the value of a variable of the script itself (``"$NAME"``); never built from outside text."""

    name: str

    def __post_init__(self) -> None:
        if not NAME_RE.match(self.name):
            raise ValueError(f"not a bash variable name: {self.name!r}")


Word = Union[str, Var]


def _text(s: str, what: str) -> str:
    if "\x00" in s:
        raise UserError(f"{what} {printable(s[:80])!r}: contains a NUL character, which a bash word cannot hold")
    return s


def word(w: Word, what: str = "argument") -> str:
    """``w`` as exactly one bash word: ``shlex.quote`` of the text, or ``"$NAME"`` for a :class:`Var`."""
    if isinstance(w, Var):
        return f'"${w.name}"'
    return shlex.quote(_text(w, what))


def words(argv: Sequence[Word]) -> str:
    return " ".join(word(w) for w in argv)


def _ansi_c(s: str) -> str:
    out = []
    for c in s:
        if c in "\\'":
            out.append("\\" + c)
        elif c.isprintable():
            out.append(c)
        elif 0xDC80 <= ord(c) <= 0xDCFF:  # a byte that was not UTF-8 (surrogateescape)
            out.append(f"\\x{ord(c) - 0xDC00:02x}")
        else:  # its UTF-8 bytes: the same whatever the locale
            out.append("".join(f"\\x{b:02x}" for b in c.encode("utf-8", "surrogatepass")))
    return "$'" + "".join(out) + "'"


def display(argv: Sequence[str]) -> str:
    """``argv`` as one bash command line for a terminal: :func:`word` where every character is printable, else
    bash's ``$'...'`` quoting (same argv when pasted into bash, no raw control character printed)."""
    return " ".join(word(a) if a.isprintable() else _ansi_c(_text(a, "argument")) for a in argv)


def command_lines(argv: Sequence[Word], prefix: str = "exec ") -> list[str]:
    """``prefix`` and ``argv`` as bash lines joined by ``\\`` continuations: the words before the first ``--``
    option on the first line, then one line per option (an option and the word after it, unless that starts with
    ``--``). Only the line breaks depend on the text; every element is one :func:`word`."""
    first = next((i for i, a in enumerate(argv) if isinstance(a, str) and a.startswith("--")), len(argv))
    groups: list[list[Word]] = [list(argv[:first])]
    i = first
    while i < len(argv):
        a = argv[i]
        nxt = argv[i + 1] if i + 1 < len(argv) else None
        if nxt is not None and not (isinstance(nxt, str) and nxt.startswith("--")):
            groups.append([a, nxt])
            i += 2
        else:
            groups.append([a])
            i += 1
    lines = [prefix + words(groups[0])] + ["  " + words(g) for g in groups[1:]]
    return [ln + " \\" for ln in lines[:-1]] + [lines[-1]]


def comment(text: str) -> str:
    """A one-line bash comment: newlines and every other non-printable character appear escaped (``\\n``)."""
    return "# " + printable(text)


def check_name(name: str, what: str = "environment variable") -> str:
    if not NAME_RE.match(name):
        raise UserError(f"{what} name {printable(name[:80])!r}: not a shell variable name ([A-Za-z_][A-Za-z0-9_]*)")
    return name


def reserved(name: str) -> bool:
    return name in SCRIPT_VARS or name.startswith("BASH")


def check_env(env: dict[str, str]) -> dict[str, str]:
    """``env`` if every key is a variable name that the launchers do not use themselves and no value holds NUL."""
    for k, v in env.items():
        check_name(k)
        if reserved(k):
            raise UserError(f"environment variable {k}: the launcher or bash sets or relies on it itself; not allowed in [env]")
        _text(v, f"environment variable {k}:")
    return env


def assign(name: str, value: Word) -> str:
    """``NAME=WORD``."""
    return f"{check_name(name, 'variable')}={word(value)}"


def default(name: str, value: str) -> str:
    """``NAME`` from the environment where set and not empty, else ``value``."""
    return f'[ -n "${{{check_name(name, "variable")}:-}}" ] || {name}={word(value)}'


def export(name: str, value: str) -> str:
    return f"export {check_name(name)}={word(value, f'environment variable {name}:')}"


def encode(script: str) -> bytes:
    """The script's bytes: a path argument that was not UTF-8 keeps its original bytes (``surrogateescape``)."""
    try:
        return script.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError as e:
        raise UserError(f"the launcher holds text that cannot be written as bytes ({e.reason})") from None


_KINDS = {stat.S_IFLNK: "a symbolic link", stat.S_IFDIR: "a folder", stat.S_IFIFO: "a FIFO", stat.S_IFSOCK: "a socket",
          stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device"}


def write_script(path: Path, data: bytes, overwrite: bool = False, mode: int = 0o755, option: str = "-o") -> None:
    """Write an executable launcher (or, with ``mode``, any file w3repack writes) at ``path`` without following a
    link there.

    New file: created with ``O_CREAT | O_EXCL | O_NOFOLLOW`` (nothing that exists at ``path``, a dangling link
    included, is opened), ``mode`` set on that descriptor. ``overwrite``: only a regular file is replaced, by a new
    file renamed over it (the old file's inode, mode and links are left alone). UserError for anything else, naming
    ``option``."""
    path = Path(path)
    where = f"{option} {printable(str(path))}"
    parent, name = path.parent, path.name
    if name in ("", ".", ".."):
        raise UserError(f"{where}: names a folder, not a file")
    try:
        dfd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise UserError(f"{where}: the folder {printable(str(parent))} does not exist") from None
    except NotADirectoryError:
        raise UserError(f"{where}: {printable(str(parent))} is not a folder") from None
    except OSError as e:
        raise UserError(f"{where}: cannot open the folder {printable(str(parent))}: {e.strerror}") from None
    try:
        try:
            st = os.lstat(name, dir_fd=dfd)
        except FileNotFoundError:
            st = None
        except OSError as e:
            raise UserError(f"{where}: {e.strerror}") from None
        if st is not None:
            kind = _KINDS.get(stat.S_IFMT(st.st_mode))
            if kind:
                raise UserError(f"{where}: {kind} is there; refused (launch writes a new regular file)")
            if not overwrite:
                raise UserError(f"{where}: the file exists; --overwrite replaces it")
        tmp = name if st is None else f".{name}.w3repack-{os.getpid()}.tmp"
        _create(dfd, tmp, data, where if tmp == name else f"{where} (its temporary file {printable(tmp)})", mode)
        if tmp != name:
            try:
                os.rename(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
            except OSError as e:
                _unlink(dfd, tmp)
                raise UserError(f"{where}: cannot replace it: {e.strerror}") from None
    finally:
        os.close(dfd)


def _create(dfd: int, name: str, data: bytes, where: str, mode: int = 0o755) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(name, flags, 0o700, dir_fd=dfd)
    except FileExistsError:
        raise UserError(f"{where}: something appeared there meanwhile; refused, nothing written") from None
    except OSError as e:
        hint = " (a read-only file system?)" if e.errno == errno.EROFS else ""
        raise UserError(f"{where}: cannot create it: {e.strerror}{hint}") from None
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fchmod(fd, mode)
    except OSError as e:
        os.close(fd)
        _unlink(dfd, name)
        raise UserError(f"{where}: cannot write it: {e.strerror}") from None
    os.close(fd)


def _unlink(dfd: int, name: str) -> None:
    try:
        os.unlink(name, dir_fd=dfd)
    except OSError:
        pass
