"""Bash text for launcher scripts: argument lines and double-quoted strings."""

from __future__ import annotations

import shlex

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
