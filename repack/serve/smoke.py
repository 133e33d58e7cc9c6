"""Smoke test of a running OpenAI-compatible server (stdlib ``urllib`` only).

Checks: ``GET /v1/models``; a short chat completion; a completion whose prompt is longer than one prefill
chunk (vLLM's default chunk is 2048 tokens on GPUs under 70 GiB, 8192 above; the prompt is cut to 80% of the
server's ``max_model_len``); the same prompt again, which hits the
prefix cache. The last two are where a quantized DeepSeek ``kv_b_proj`` crashes vLLM 0.26 (docs/formats.md §3),
which a "hello" test never sees.
"""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

DEFAULT_LONG_TOKENS = 9000  # beyond vLLM's default prefill chunk: 2048 below 70 GiB of GPU memory, 8192 above
WORDS = ("the river carries cold water past old stone bridges while market traders count their coins and "
         "children chase paper boats along the bank").split()


class Unreachable(Exception):
    """No HTTP answer at all from the server."""


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
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"} if data else {}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    req = urllib.request.Request(url, data=data, headers=headers, method="POST" if data else "GET")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw = r.read().decode("utf-8", "replace")
            status = r.status
    except urllib.error.HTTPError as e:
        raw, status = e.read().decode("utf-8", "replace"), e.code
    try:
        return status, json.loads(raw)
    except json.JSONDecodeError:
        return status, raw


def long_prompt(tokens: int) -> str:
    """About ``tokens`` tokens of plain English (roughly one token per word) and a question at the end."""
    words = [WORDS[i % len(WORDS)] for i in range(max(tokens - 16, 1))]
    lines = [" ".join(words[i:i + 20]) + "." for i in range(0, len(words), 20)]
    return "\n".join(lines) + "\nQuestion: what do the children chase? Answer in a few words:"


def _short(x: object, n: int = 120) -> str:
    s = x if isinstance(x, str) else json.dumps(x)
    s = " ".join(s.split())
    return s if len(s) <= n else s[: n - 3] + "..."


def run(url: str, model: str | None = None, long_tokens: int = DEFAULT_LONG_TOKENS, timeout: float = 600.0,
        api_key: str | None = None) -> Report:
    base = url.rstrip("/")
    if base.endswith("/v1"):
        base = base[:-3]
    rep = Report(base, model)
    t0 = time.monotonic()
    try:
        status, body = _request(base + "/v1/models", None, min(timeout, 30.0), api_key)
    except (urllib.error.URLError, socket.timeout, ConnectionError, OSError, ValueError) as e:
        raise Unreachable(f"{base}: {getattr(e, 'reason', e)}") from e
    ids, max_len = [], None
    if status == 200 and isinstance(body, dict) and isinstance(body.get("data"), list):
        ids = [m.get("id") for m in body["data"] if isinstance(m, dict)]
        for m in body["data"]:
            if isinstance(m, dict) and (model is None or m.get("id") == model) and isinstance(m.get("max_model_len"), int):
                max_len = m["max_model_len"]
                break
    ok = bool(ids) and (model is None or model in ids)
    detail = f"models: {', '.join(map(str, ids))}" if ids else f"HTTP {status}: {_short(body)}"
    if ids and model is not None and model not in ids:
        detail = f"{model} not served; {detail}"
    rep.checks.append(Check("GET /v1/models", ok, detail + (f" (max_model_len {max_len})" if max_len else ""),
                            time.monotonic() - t0))
    if not ids:
        return rep
    rep.model = model = model or ids[0]

    def post(name: str, path: str, body: dict, judge) -> None:
        t = time.monotonic()
        try:
            status, out = _request(base + path, body, timeout, api_key)
        except (urllib.error.URLError, socket.timeout, ConnectionError, OSError) as e:
            rep.checks.append(Check(name, False, f"no answer: {getattr(e, 'reason', e)}", time.monotonic() - t))
            return
        if status != 200 or not isinstance(out, dict) or not out.get("choices"):
            rep.checks.append(Check(name, False, f"HTTP {status}: {_short(out)}", time.monotonic() - t))
            return
        ok, detail = judge(out)
        rep.checks.append(Check(name, ok, detail, time.monotonic() - t))

    def chat_judge(out):
        msg = out["choices"][0].get("message") or {}
        text = msg.get("content") or msg.get("reasoning_content") or ""
        return bool(text.strip()), f"reply: {_short(text, 60)!r}" if text.strip() else "empty reply"

    post("chat completion (short)", "/v1/chat/completions",
         {"model": model, "messages": [{"role": "user", "content": "Reply with one word: hello."}],
          "max_tokens": 16, "temperature": 0}, chat_judge)

    target = long_tokens
    note = ""
    if max_len and target > max_len * 0.8:
        target = int(max_len * 0.8)
        note = f" (cut to 80% of max_model_len {max_len})"
    prompt = long_prompt(target)

    def long_judge(out):
        text = out["choices"][0].get("text") or ""
        used = (out.get("usage") or {}).get("prompt_tokens")
        if isinstance(used, int) and used < target // 2:
            return False, f"prompt was only {used} tokens, asked for ~{target}"
        return bool(text.strip()), f"prompt_tokens={used}; text: {_short(text, 50)!r}{note}"

    body = {"model": model, "prompt": prompt, "max_tokens": 16, "temperature": 0}
    post(f"completion, ~{target}-token prompt", "/v1/completions", body, long_judge)
    post("same prompt again (prefix-cache hit)", "/v1/completions", body, long_judge)
    return rep
