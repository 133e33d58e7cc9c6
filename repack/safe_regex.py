"""Regex search in bounded time, for patterns that come from a checkpoint (``extra_config`` keys).

A pattern without repetition is matched by :mod:`re` (its work is at most pattern length times subject
length). Any other is compiled from :mod:`re`'s own parse tree into an NFA and simulated state set by state
set: time linear in the subject, whatever the pattern (no backtracking). Constructs an NFA cannot express
(backreferences, lookaround, inline flags) and patterns longer than MAX_PATTERN or compiling to more than
MAX_STATES states are refused with :class:`UnsafePattern`.
"""

from __future__ import annotations

import functools
import importlib
import re
import sys
import unicodedata
from typing import Any, Callable

C: Any = importlib.import_module("re._constants" if sys.version_info >= (3, 11) else "sre_constants")
P: Any = importlib.import_module("re._parser" if sys.version_info >= (3, 11) else "sre_parse")

MAX_PATTERN = 1000
MAX_STATES = 4000


class UnsafePattern(ValueError):
    """A pattern that cannot be matched in bounded time."""


class InvalidPattern(UnsafePattern):
    """Not a regex at all."""


Pred = Callable[[str], bool]


def _category(cat) -> Pred:
    table: dict = {
        C.CATEGORY_DIGIT: lambda c: unicodedata.category(c) == "Nd",
        C.CATEGORY_NOT_DIGIT: lambda c: unicodedata.category(c) != "Nd",
        C.CATEGORY_SPACE: str.isspace,
        C.CATEGORY_NOT_SPACE: lambda c: not c.isspace(),
        C.CATEGORY_WORD: lambda c: c.isalnum() or c == "_",
        C.CATEGORY_NOT_WORD: lambda c: not (c.isalnum() or c == "_"),
    }
    if cat not in table:
        raise UnsafePattern(f"unsupported category {cat}")
    return table[cat]


def _is(ch: str) -> Pred:
    return lambda c: c == ch


def _within(lo: int, hi: int) -> Pred:
    return lambda c: lo <= ord(c) <= hi


def _char_class(items) -> Pred:
    negate = False
    preds: list[Pred] = []
    for op, av in items:
        if op is C.NEGATE:
            negate = True
        elif op is C.LITERAL:
            preds.append(_is(chr(av)))
        elif op is C.RANGE:
            preds.append(_within(av[0], av[1]))
        elif op is C.CATEGORY:
            preds.append(_category(av))
        else:
            raise UnsafePattern(f"unsupported character class item {op}")
    return lambda c: any(p(c) for p in preds) != negate


class _NFA:
    """States: ("char", pred, next) | ("split", [next...]) | ("bol"|"eol", None, next) | ("match",)."""

    def __init__(self) -> None:
        self.states: list[list] = []

    def add(self, *state) -> int:
        if len(self.states) >= MAX_STATES:
            raise UnsafePattern(f"compiles to more than {MAX_STATES} states")
        self.states.append(list(state))
        return len(self.states) - 1

    def seq(self, nodes, nxt: int) -> int:
        """States matching ``nodes`` then continuing at ``nxt``; returns the entry state (built back to front)."""
        for op, av in reversed(list(nodes)):
            nxt = self.node(op, av, nxt)
        return nxt

    def node(self, op, av, nxt: int) -> int:
        if op is C.LITERAL:
            return self.add("char", _is(chr(av)), nxt)
        if op is C.NOT_LITERAL:
            is_ch = _is(chr(av))
            return self.add("char", lambda c: not is_ch(c), nxt)
        if op is C.ANY:
            return self.add("char", lambda c: c != "\n", nxt)
        if op is C.IN:
            return self.add("char", _char_class(av), nxt)
        if op is C.BRANCH:
            return self.add("split", [self.seq(alt, nxt) for alt in av[1]])
        if op is C.SUBPATTERN:
            _, add_flags, del_flags, sub = av
            if add_flags or del_flags:
                raise UnsafePattern("inline flags are not supported")
            return self.seq(sub, nxt)
        if op in (C.MAX_REPEAT, C.MIN_REPEAT, getattr(C, "POSSESSIVE_REPEAT", C.MAX_REPEAT)):
            lo, hi, sub = av
            if hi is C.MAXREPEAT:
                loop = self.add("split", [])
                self.states[loop][1] = [self.seq(sub, loop), nxt]
                entry = loop
            else:
                entry = nxt
                for _ in range(hi - lo):
                    entry = self.add("split", [self.seq(sub, entry), nxt])
                    nxt = entry
            for _ in range(lo):
                entry = self.seq(sub, entry)
            return entry
        if op is C.AT:
            if av in (C.AT_BEGINNING, C.AT_BEGINNING_STRING):
                return self.add("bol", None, nxt)
            if av in (C.AT_END, C.AT_END_STRING):
                return self.add("eol", None, nxt)
        raise UnsafePattern(f"unsupported construct {op}")


@functools.lru_cache(maxsize=4096)
def _compile(pattern: str) -> tuple[_NFA, int] | re.Pattern:
    if len(pattern) > MAX_PATTERN:
        raise UnsafePattern(f"longer than {MAX_PATTERN} characters")
    try:
        tree = P.parse(pattern)
    except (re.error, RecursionError, OverflowError) as e:
        raise InvalidPattern(f"not a valid regex ({e})") from None
    if tree.state.flags & ~(re.UNICODE | getattr(C, "SRE_FLAG_UNICODE", 0)):
        raise UnsafePattern("inline flags are not supported")
    if not _repeats(tree):
        return re.compile(pattern)
    nfa = _NFA()
    return nfa, nfa.seq(tree, nfa.add("match"))


def _repeats(nodes) -> bool:
    for op, av in nodes:
        if op in (C.MAX_REPEAT, C.MIN_REPEAT, getattr(C, "POSSESSIVE_REPEAT", C.MAX_REPEAT)):
            return True
        if op is C.BRANCH and any(_repeats(alt) for alt in av[1]):
            return True
        if op is C.SUBPATTERN and _repeats(av[3]):
            return True
        if op in (C.GROUPREF, C.GROUPREF_EXISTS, C.ASSERT, C.ASSERT_NOT, getattr(C, "ATOMIC_GROUP", C.ASSERT)):
            raise UnsafePattern(f"unsupported construct {op}")
    return False


def check(pattern: str) -> None:
    """Raise UnsafePattern unless ``pattern`` can be searched in bounded time."""
    _compile(pattern)


@functools.lru_cache(maxsize=4096)
def _required(pattern: str) -> tuple[str, ...]:
    """Strings any match of ``pattern`` contains: its top-level runs of literal characters (no flags are allowed,
    so they match only themselves)."""
    runs, cur = [], ""
    for op, av in P.parse(pattern):
        if op is C.LITERAL:
            cur += chr(av)
            continue
        if cur:
            runs.append(cur)
        cur = ""
    if cur:
        runs.append(cur)
    return tuple(runs)


def search(pattern: str, subject: str) -> bool:
    """Whether ``pattern`` matches somewhere in ``subject`` (as ``re.search``), in time linear in ``subject``."""
    compiled = _compile(pattern)
    if isinstance(compiled, re.Pattern):
        return compiled.search(subject) is not None
    if any(lit not in subject for lit in _required(pattern)):
        return False  # a literal every match holds is missing: no need to run the automaton
    nfa, start = compiled
    states = nfa.states
    n = len(subject)

    def close(todo: list[int], pos: int, into: set[int]) -> bool:
        while todo:
            s = todo.pop()
            if s in into:
                continue
            into.add(s)
            kind = states[s][0]
            if kind == "match":
                return True
            if kind == "split":
                todo.extend(states[s][1])
            elif (kind == "bol" and pos == 0) or (kind == "eol" and pos == n):
                todo.append(states[s][2])
        return False

    cur: set[int] = set()
    for pos in range(n + 1):
        if close([start], pos, cur):
            return True
        if pos == n:
            return False
        c = subject[pos]
        nxt: set[int] = set()
        todo = [states[s][2] for s in cur if states[s][0] == "char" and states[s][1](c)]
        if close(todo, pos + 1, nxt):
            return True
        cur = nxt
    return False
