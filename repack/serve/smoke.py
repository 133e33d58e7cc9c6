"""Smoke test of a running OpenAI-compatible server (stdlib ``http.client`` only): it judges what the model says.

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

Bounded: each response is read up to ``MAX_RESPONSE`` bytes; every request ends by its wall-clock deadline (the
per-request timeout, cut to what is left of ``total_timeout``) however slowly the bytes arrive; a malformed or
oversized response is a failed check (exit 1), never a crash. Only a server that gives no HTTP answer to
``GET /v1/models`` raises :class:`Unreachable`.

Trust: http and https only; requests go to the URL's origin alone (a redirect is reported, not followed, so the
API key never leaves that origin); a URL with credentials is refused before any name lookup; whatever the server
sends is shown with control characters escaped.
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import time
from dataclasses import dataclass, field
from typing import Callable

from repack.errors import UserError
from repack.ui import printable

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


class Timeout(Exception):
    """The request's wall-clock deadline passed."""


@dataclass(frozen=True)
class Origin:
    """Where every request goes: ``scheme://host:port`` and a path prefix; never credentials, query or fragment."""
    scheme: str
    host: str
    port: int
    prefix: str

    @property
    def base(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}{self.prefix}"


def parse_url(url: str) -> Origin:
    """The server's origin from ``url``; ValueError (naming no credentials) for what smoke does not take: a scheme
    other than http/https, user or password in the URL, a query or fragment, control characters or spaces."""
    from urllib.parse import urlsplit

    if any(not c.isprintable() or c.isspace() for c in url):
        raise ValueError("the URL holds spaces or control characters")
    try:
        u = urlsplit(url)
        port = u.port
    except ValueError as e:
        raise ValueError(f"not a URL with a valid host and port ({e})") from None
    scheme = u.scheme.lower()
    if scheme not in ("http", "https"):
        raise ValueError(f"scheme {u.scheme + ':' if u.scheme else '(none)'} refused: smoke speaks http and https only")
    if "@" in u.netloc:
        raise ValueError("credentials in the URL are refused (nothing was sent); put an API key in OPENAI_API_KEY")
    if u.query or u.fragment or url.endswith(("?", "#")):
        raise ValueError("a query or fragment in the server URL is refused")
    if not u.hostname:
        raise ValueError("no host in the URL")
    prefix = u.path.rstrip("/")
    if prefix.endswith("/v1"):
        prefix = prefix[:-3]
    if port == 0:
        raise ValueError("port 0 is not a server's port")
    return Origin(scheme, u.hostname, port if port is not None else (443 if scheme == "https" else 80), prefix)


def _request(origin: Origin, path: str, body: dict | None, timeout: float, api_key: str | None) -> tuple[int, dict | str]:
    """(HTTP status, parsed JSON or the raw text) of one request to ``origin``, within ``timeout`` wall-clock
    seconds from now whatever the server does (the socket is shut down at the deadline: a server trickling
    bytes is cut off too); Timeout then. A redirect is an answer like any other (its status), not followed.
    Malformed for a body over MAX_RESPONSE bytes or an unparsable HTTP answer; OSError where nothing came."""
    import http.client
    import threading

    deadline = time.monotonic() + timeout
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"} if data else {}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    cls = http.client.HTTPSConnection if origin.scheme == "https" else http.client.HTTPConnection
    conn = cls(origin.host, origin.port, timeout=timeout)
    result: list = []
    gone = threading.Event()

    def work() -> None:
        try:
            conn.request("POST" if data else "GET", origin.prefix + path, body=data, headers=headers)
            if gone.is_set():
                return
            r = conn.getresponse()
            raw = bytearray()
            while len(raw) <= MAX_RESPONSE and not gone.is_set():
                chunk = r.read1(min(1 << 16, MAX_RESPONSE + 1 - len(raw)))
                if not chunk:
                    break
                raw += chunk
            result.append((r.status, bytes(raw)))
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
            result.append(e)

    t = threading.Thread(target=work, daemon=True, name="w3repack-smoke-request")
    t.start()
    t.join(max(0.0, deadline - time.monotonic()))
    if t.is_alive():
        gone.set()
        sock = conn.sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        raise Timeout(f"no complete answer within {timeout:g} s")
    conn.close()
    out = result[0]
    if isinstance(out, http.client.HTTPException):
        raise Malformed(f"not an HTTP answer ({type(out).__name__})")
    if isinstance(out, BaseException):
        raise out
    status, raw = out
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
    """Server text for a report line: whitespace collapsed, control characters escaped, at most ``n`` characters."""
    s = x if isinstance(x, str) else json.dumps(x)
    s = printable(" ".join(s[: 4 * n].split()))
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
    """The checks against the server at ``url`` (see the module docstring). UserError for a URL it refuses
    (before any connection or name lookup), Unreachable when ``GET /v1/models`` gets no HTTP answer."""
    try:
        origin = parse_url(url)
    except ValueError as e:
        raise UserError(f"smoke URL: {e}") from None
    if api_key is not None and any(not c.isprintable() for c in api_key):
        raise UserError("OPENAI_API_KEY holds control characters; not sent")
    base = origin.base
    rep = Report(base, model)
    start = time.monotonic()
    deadline = start + total_timeout

    def budget() -> float:
        return min(timeout, deadline - time.monotonic())

    try:
        status, body = _request(origin, "/v1/models", None, max(0.1, min(budget(), 30.0)), api_key)
    except Malformed as e:
        status, body = 0, str(e)
    except (Timeout, OSError, ValueError) as e:
        raise Unreachable(f"{base}: {_short(str(e))}") from None
    ids: list[str] = []
    max_len = None
    if status == 200 and isinstance(body, dict) and isinstance(body.get("data"), list):
        ids = [str(m.get("id")) for m in body["data"] if isinstance(m, dict) and m.get("id") is not None]
        for m in body["data"]:
            n = m.get("max_model_len") if isinstance(m, dict) else None
            if (model is None or m.get("id") == model) and isinstance(n, int) and not isinstance(n, bool) and n > 0:
                max_len = m["max_model_len"]
                break
    ok = bool(ids) and (model is None or model in ids)
    detail = f"models: {_short(', '.join(ids[:64]), 300)}" if ids else f"HTTP {status}: {_short(body)}"
    if ids and model is not None and model not in ids:
        detail = f"{_short(model)} not served; {detail}"
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
            status, out = _request(origin, path, body, budget(), api_key)
        except Malformed as e:
            fail(f"malformed response: {_short(str(e))}")
            return None
        except Timeout as e:
            fail(f"timed out: {e}")
            return None
        except (OSError, ValueError) as e:
            fail(f"no answer: {_short(str(e))}")
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
