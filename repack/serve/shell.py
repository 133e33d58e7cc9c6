"""Bash text for launcher scripts: argument lines and double-quoted strings."""

from __future__ import annotations

import shlex


def dq(s: str) -> str:
    """``s`` safe inside a double-quoted bash string."""
    return s.replace("\\", "\\\\").replace('"', '\\"').replace("$", "\\$").replace("`", "\\`")


def arg_lines(args: list[str]) -> list[str]:
    """One line per flag (``--flag value`` together), quoted for bash; ``$MODEL`` stays a variable."""
    lines, i = [], 0
    while i < len(args):
        a = args[i]
        if a.startswith("--") and i + 1 < len(args) and not args[i + 1].startswith("--"):
            v = args[i + 1]
            lines.append(f"{a} {v if v == '$MODEL' else shlex.quote(v)}")
            i += 2
        else:
            lines.append(a if a == "$MODEL" else shlex.quote(a))
            i += 1
    return lines
