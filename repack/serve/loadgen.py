"""Decode and prefill speed of an OpenAI-compatible server on this machine (loopback), as a deployment sees it.

Requests are ``/v1/completions`` with token-id prompts (no tokenizer needed), greedy, ``ignore_eos`` (vLLM's
extension) so that each makes exactly ``max_tokens``; B requests in flight at once make batch B. Decode tokens/s
at batch B is ``B x (N - 1) / (t(N) - t(1))`` with ``t(n)`` the wall time of B fresh prompts generating n tokens
(prefill and one step cancel out); prefill tokens/s is the new prompt tokens of a batch over its wall time with
``max_tokens=1``. A warm-up precedes each batch size; each figure is the median of ``repeat`` runs, with min/max.
"""

from __future__ import annotations

import http.client
import json
import random
import statistics
import threading
import time
from dataclasses import dataclass


class LoadError(Exception):
    """The server answered wrongly (status, body, token count)."""


@dataclass(frozen=True)
class Speed:
    median: float
    low: float
    high: float
    runs: list[float]

    def to_json(self) -> dict:
        return {"median": round(self.median, 1), "min": round(self.low, 1), "max": round(self.high, 1),
                "runs": [round(r, 1) for r in self.runs]}


def speed(runs: list[float]) -> Speed:
    return Speed(statistics.median(runs), min(runs), max(runs), runs)


class Client:
    """Completions against ``http://host:port`` for ``model``, each request bounded by ``timeout`` seconds."""

    def __init__(self, host: str, port: int, model: str, vocab: int, timeout: float = 300.0, seed: int = 0):
        self.host, self.port, self.model, self.vocab, self.timeout = host, port, model, vocab, timeout
        self.rng = random.Random(seed)

    def get(self, path: str) -> str:
        c = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        try:
            c.request("GET", path)
            r = c.getresponse()
            body = r.read(64 << 20).decode("utf-8", "replace")
            if r.status != 200:
                raise LoadError(f"GET {path}: HTTP {r.status}: {body[:200]}")
            return body
        finally:
            c.close()

    def prompt(self, n: int) -> list[int]:
        return [self.rng.randrange(2, self.vocab) for _ in range(n)]

    def complete(self, prompt: list[int], max_tokens: int) -> int:
        """Completion tokens the server made for ``prompt``; LoadError unless exactly ``max_tokens``."""
        body = json.dumps({"model": self.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                           "ignore_eos": True})
        c = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        try:
            c.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
            r = c.getresponse()
            data = r.read(16 << 20)
        finally:
            c.close()
        if r.status != 200:
            raise LoadError(f"POST /v1/completions: HTTP {r.status}: {data[:300].decode('utf-8', 'replace')}")
        try:
            made = int(json.loads(data)["usage"]["completion_tokens"])
        except (ValueError, KeyError, TypeError) as e:
            raise LoadError(f"POST /v1/completions: no usage.completion_tokens in the answer ({e})") from e
        if made != max_tokens:
            raise LoadError(f"POST /v1/completions: {made} completion tokens, {max_tokens} asked (ignore_eos)")
        return made

    def batch(self, prompts: list[list[int]], max_tokens: int) -> float:
        """Wall seconds for all ``prompts`` in flight at once."""
        errors: list[BaseException] = []

        def one(p: list[int]) -> None:
            try:
                self.complete(p, max_tokens)
            except BaseException as e:  # noqa: BLE001 - reported below, in the caller's thread
                errors.append(e)

        threads = [threading.Thread(target=one, args=(p,), daemon=True) for p in prompts]
        t = time.perf_counter()
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        took = time.perf_counter() - t
        if errors:
            raise LoadError(str(errors[0])) from errors[0]
        return took

    def decode(self, b: int, prompt_len: int, gen: int, repeat: int) -> Speed:
        self.batch([self.prompt(prompt_len) for _ in range(b)], gen)  # warm-up at this batch size
        t1 = statistics.median(self.batch([self.prompt(prompt_len) for _ in range(b)], 1) for _ in range(repeat))
        runs = []
        for _ in range(repeat):
            tn = self.batch([self.prompt(prompt_len) for _ in range(b)], gen)
            runs.append(b * (gen - 1) / max(tn - t1, 1e-9))
        return speed(runs)

    def prefill(self, b: int, prompt_len: int, repeat: int) -> Speed:
        self.batch([self.prompt(prompt_len) for _ in range(b)], 1)
        return speed([b * prompt_len / self.batch([self.prompt(prompt_len) for _ in range(b)], 1) for _ in range(repeat)])


def wait_ready(client: Client, alive, deadline: float, poll: float = 2.0) -> bool:
    """Poll ``/health`` until it answers 200 (True), ``alive()`` turns False or ``deadline`` (monotonic) passes."""
    while time.monotonic() < deadline and alive():
        try:
            client.get("/health")
            return True
        except (OSError, LoadError, http.client.HTTPException):
            time.sleep(poll)
    return False
