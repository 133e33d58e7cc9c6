"""Smoke test of a running OpenAI-compatible server (stdlib ``urllib`` only): it judges what the model says.

Checks, each with an answer that can be checked (temperature 0):

- ``GET /v1/models``: the model is served;
- chat: "Repeat exactly: ..." must come back with those words;
- completion: ``1, 2, 3, 4, 5, 6,`` must continue with ``7``;
- a completion whose prompt is longer than one prefill chunk (vLLM's default chunk is 2048 tokens on GPUs under
  70 GiB, 8192 above; the prompt is cut to 80% of the server's ``max_model_len``), whose question has a checkable
  answer ("paper boats");
- the same prompt again, which hits the prefix cache: same judgement, and where the server reports
  ``usage.prompt_tokens_details.cached_tokens`` (vLLM: ``--enable-prompt-tokens-details``), it must be positive.

The long prompt is where a quantized DeepSeek ``kv_b_proj`` crashes vLLM 0.26 (docs/formats.md §3), which a
"hello" test never sees. Every text is also rejected when empty, non-printable, or degenerate (one short unit
repeated, e.g. ``!!!!``: what broken quantized weights produce).

Bounded: each response is read up to ``MAX_RESPONSE`` bytes, every request within the per-request timeout and
the whole run within ``total_timeout``; a malformed or oversized response is a failed check (exit 1), never a
crash. Only a server that gives no HTTP answer to ``GET /v1/models`` raises :class:`Unreachable`.
"""

from __future__ import annotations

import json
import re
import socket
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Callable

DEFAULT_LONG_TOKENS = 9000  # beyond vLLM's default prefill chunk: 2048 below 70 GiB of GPU memory, 8192 above
MAX_RESPONSE = 4 << 20
DEFAULT_TOTAL_TIMEOUT = 1800.0
WORDS = ("the river carries cold water past old stone bridges while market traders count their coins and "
         "children chase paper boats along the bank").split()
REPLACEMENT = "\ufffd"  # what undecodable bytes became
REPEAT = "violet harbor seventeen lanterns"
COUNT_PROMPT = "1, 2, 3, 4, 5, 6,"
_DEGENERATE = re.compile(r"(.{1,8}?)\1{5,}", re.S)


class Unreachable(Exception):
    """No HTTP answer at all from the server."""


class Malformed(Exception):
    """The server answered something that is not the JSON it should be."""


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    seconds: float


@dataclass
class Report:
    url: str
    model: str | None
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(c.ok for c in self.checks)

    def to_json(self) -> dict:
        return {"url": self.url, "model": self.model, "ok": self.ok,
                "checks": [c.__dict__ for c in self.checks]}


def _request(url: str, body: dict | None, timeout: float, api_key: str | None) -> tuple[int, dict | str]:
    """(HTTP status, parsed JSON or the raw text); raises Malformed for a body over MAX_RESPONSE bytes."""
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"} if data else {}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    req = urllib.request.Request(url, data=data, headers=headers, method="POST" if data else "GET")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw, status = r.read(MAX_RESPONSE + 1), r.status
    except urllib.error.HTTPError as e:
        raw, status = e.read(MAX_RESPONSE + 1), e.code
    if len(raw) > MAX_RESPONSE:
        raise Malformed(f"HTTP {status}: response larger than {MAX_RESPONSE >> 20} MiB")
    text = raw.decode("utf-8", "replace")
    try:
        return status, json.loads(text)
    except (ValueError, RecursionError):
        return status, text


def long_prompt(tokens: int) -> str:
    """About ``tokens`` tokens of plain English (roughly one token per word) and a question at the end."""
    words = [WORDS[i % len(WORDS)] for i in range(max(tokens - 16, 1))]
    lines = [" ".join(words[i:i + 20]) + "." for i in range(0, len(words), 20)]
    return "\n".join(lines) + "\nQuestion: what do the children chase? Answer in a few words:"


def _short(x: object, n: int = 120) -> str:
    s = x if isinstance(x, str) else json.dumps(x)
    s = " ".join(s.split())
    return s if len(s) <= n else s[: n - 3] + "..."


def garbage(text: str) -> str | None:
    """Why ``text`` cannot be a working model's answer (None: it can): empty, non-printable, or degenerate."""
    t = text.strip()
    if not t:
        return "empty text"
    bad = [c for c in t if not (c.isprintable() or c in "\n\t\r") or c == REPLACEMENT]
    if bad:
        return f"non-printable characters ({_short(repr(bad[:5]), 40)})"
    m = _DEGENERATE.search(t[:4096])
    if m and len(m.group(0)) >= max(8, len(t) // 2):
        return f"degenerate repeated text ({_short(m.group(0), 30)!r})"
    return None


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def judge_repeat(text: str) -> tuple[bool, str]:
    want = words(REPEAT)
    got = words(text)
    ok = any(got[i:i + len(want)] == want for i in range(len(got)))
    return ok, f"reply: {_short(text, 60)!r}" + ("" if ok else f"; expected the words {REPEAT!r}")


def judge_count(text: str) -> tuple[bool, str]:
    nums = re.findall(r"\d+", text)
    ok = bool(nums) and nums[0] == "7"
    return ok, f"text: {_short(text, 40)!r}" + ("" if ok else "; expected it to continue with 7")


def judge_boats(text: str) -> tuple[bool, str]:
    ok = "boat" in text.lower()
    return ok, f"text: {_short(text, 50)!r}" + ("" if ok else "; expected 'paper boats'")


def _choice(out: dict) -> dict:
    ch = out["choices"][0]
    if not isinstance(ch, dict):
        raise Malformed("choices[0] is not an object")
    return ch


def chat_text(out: dict) -> str:
    msg = _choice(out).get("message") or {}
    if not isinstance(msg, dict):
        raise Malformed("message is not an object")
    text = msg.get("content") or msg.get("reasoning_content") or ""
    if not isinstance(text, str):
        raise Malformed("content is not a string")
    return text


def completion_text(out: dict) -> str:
    text = _choice(out).get("text") or ""
    if not isinstance(text, str):
        raise Malformed("text is not a string")
    return text


def cached_tokens(out: dict) -> int | None:
    """``usage.prompt_tokens_details.cached_tokens`` where the server reports it."""
    usage = out.get("usage")
    details = usage.get("prompt_tokens_details") if isinstance(usage, dict) else None
    n = details.get("cached_tokens") if isinstance(details, dict) else None
    return n if isinstance(n, int) and not isinstance(n, bool) else None


def run(url: str, model: str | None = None, long_tokens: int = DEFAULT_LONG_TOKENS, timeout: float = 600.0,
        api_key: str | None = None, total_timeout: float = DEFAULT_TOTAL_TIMEOUT) -> Report:
    base = url.rstrip("/")
    if base.endswith("/v1"):
        base = base[:-3]
    rep = Report(base, model)
    start = time.monotonic()
    deadline = start + total_timeout

    def budget() -> float:
        return min(timeout, deadline - time.monotonic())

    try:
        status, body = _request(base + "/v1/models", None, max(0.1, min(budget(), 30.0)), api_key)
    except Malformed as e:
        status, body = 0, str(e)
    except (urllib.error.URLError, socket.timeout, ConnectionError, OSError, ValueError) as e:
        raise Unreachable(f"{base}: {getattr(e, 'reason', e)}") from e
    ids: list[str] = []
    max_len = None
    if status == 200 and isinstance(body, dict) and isinstance(body.get("data"), list):
        ids = [str(m.get("id")) for m in body["data"] if isinstance(m, dict) and m.get("id") is not None]
        for m in body["data"]:
            if isinstance(m, dict) and (model is None or m.get("id") == model) and isinstance(m.get("max_model_len"), int):
                max_len = m["max_model_len"]
                break
    ok = bool(ids) and (model is None or model in ids)
    detail = f"models: {', '.join(ids)}" if ids else f"HTTP {status}: {_short(body)}"
    if ids and model is not None and model not in ids:
        detail = f"{model} not served; {detail}"
    rep.checks.append(Check("GET /v1/models", ok, detail + (f" (max_model_len {max_len})" if max_len else ""),
                            time.monotonic() - start))
    if not ids:
        return rep
    rep.model = model = model or ids[0]

    def post(name: str, path: str, body: dict, judge: Callable[[dict], tuple[bool, str]]) -> dict | None:
        t = time.monotonic()

        def fail(detail: str) -> None:
            rep.checks.append(Check(name, False, detail, time.monotonic() - t))

        if budget() <= 0:
            fail(f"not run: the total time limit ({total_timeout:g} s) is spent")
            return None
        try:
            status, out = _request(base + path, body, budget(), api_key)
        except Malformed as e:
            fail(f"malformed response: {e}")
            return None
        except (urllib.error.URLError, socket.timeout, ConnectionError, OSError, ValueError) as e:
            fail(f"no answer: {getattr(e, 'reason', e)}")
            return None
        if status != 200 or not isinstance(out, dict) or not isinstance(out.get("choices"), list) or not out["choices"]:
            fail(f"HTTP {status}: {_short(out)}")
            return None
        try:
            ok, detail = judge(out)
        except (Malformed, KeyError, IndexError, TypeError, AttributeError, ValueError) as e:
            fail(f"malformed response: {type(e).__name__}: {_short(str(e), 60)}; {_short(out, 80)}")
            return None
        rep.checks.append(Check(name, ok, detail, time.monotonic() - t))
        return out

    def judged(get_text: Callable[[dict], str], judge: Callable[[str], tuple[bool, str]]) -> Callable[[dict], tuple[bool, str]]:
        def j(out: dict) -> tuple[bool, str]:
            text = get_text(out)
            why = garbage(text)
            if why is not None:
                return False, f"{why}: {_short(repr(text), 60)}"
            return judge(text)
        return j

    post("chat: repeat exactly", "/v1/chat/completions",
         {"model": model, "messages": [{"role": "user", "content": f"Repeat exactly, and write nothing else: {REPEAT}"}],
          "max_tokens": 48, "temperature": 0}, judged(chat_text, judge_repeat))
    post("completion: count on", "/v1/completions",
         {"model": model, "prompt": COUNT_PROMPT, "max_tokens": 8, "temperature": 0}, judged(completion_text, judge_count))

    target = long_tokens
    note = ""
    if max_len and target > max_len * 0.8:
        target = int(max_len * 0.8)
        note = f" (cut to 80% of max_model_len {max_len})"
    prompt = long_prompt(target)

    def long_judge(cache_check: bool) -> Callable[[dict], tuple[bool, str]]:
        inner = judged(completion_text, judge_boats)

        def j(out: dict) -> tuple[bool, str]:
            usage = out.get("usage")
            used = usage.get("prompt_tokens") if isinstance(usage, dict) else None
            if isinstance(used, int) and used < target // 2:
                return False, f"prompt was only {used} tokens, asked for ~{target}"
            ok, detail = inner(out)
            detail = f"prompt_tokens={used}; {detail}{note}"
            if cache_check:
                cached = cached_tokens(out)
                if cached is None:
                    detail += "; cached tokens not reported by the server"
                elif cached <= 0:
                    ok, detail = False, detail + f"; cached_tokens={cached}: the prefix cache was not hit"
                else:
                    detail += f"; cached_tokens={cached}"
            return ok, detail
        return j

    body = {"model": model, "prompt": prompt, "max_tokens": 16, "temperature": 0}
    post(f"completion, ~{target}-token prompt", "/v1/completions", body, long_judge(False))
    post("same prompt again (prefix-cache hit)", "/v1/completions", body, long_judge(True))
    return rep
