"""A hub endpoint on 127.0.0.1 serving a local folder as repo ``repo`` at ``commit`` (HF_ENDPOINT points here):
what huggingface_hub asks for (HEAD/GET ``/{repo}/resolve/{rev}/{file}`` with Range, the tree listing). Shards in
``slow`` are sent in ``chunk``-byte pieces ``delay`` seconds apart. Every request is logged."""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class FakeHub:
    src: Path
    repo: str
    commit: str
    slow: set[str] = field(default_factory=set)
    delay: float = 0.05
    chunk: int = 64 << 10
    log: list[tuple[str, str, str | None]] = field(default_factory=list)
    server: http.server.ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def full_gets(self, suffix: str = ".safetensors") -> list[str]:
        """Paths fetched whole (no Range): shard downloads, not header probes."""
        return [p for m, p, r in list(self.log) if m == "GET" and p.endswith(suffix) and r is None]

    def __enter__(self) -> FakeHub:
        hub = self
        files = {p.relative_to(self.src).as_posix(): p for p in self.src.rglob("*") if p.is_file()}

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def do_HEAD(self):
                self.serve(head=True)

            def do_GET(self):
                self.serve(head=False)

            def reply(self, code: int, body: bytes = b"", headers: dict | None = None, head: bool = False) -> None:
                self.send_response(code)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if not head:
                    self.wfile.write(body)

            def serve(self, head: bool) -> None:
                hub.log.append((self.command, self.path, self.headers.get("Range")))
                if self.path.startswith(f"/api/models/{hub.repo}/tree/"):
                    listing = [{"type": "file", "path": f, "size": p.stat().st_size, "oid": hashlib.sha1(f.encode()).hexdigest()}
                               for f, p in sorted(files.items())]
                    return self.reply(200, json.dumps(listing).encode(), {"Content-Type": "application/json"}, head)
                prefix = f"/{hub.repo}/resolve/"
                name = self.path[len(prefix):].partition("/")[2] if self.path.startswith(prefix) else ""
                if name not in files:
                    return self.reply(404, b"", {"X-Error-Code": "EntryNotFound"}, head)
                data = files[name].read_bytes()
                meta = {"X-Repo-Commit": hub.commit, "ETag": '"' + hashlib.sha256(data).hexdigest() + '"'}
                rng = self.headers.get("Range")
                if rng and not head:
                    a, b = rng.split("=")[1].split("-")
                    return self.reply(206, data[int(a): int(b) + 1 if b else None], meta)
                if head or name not in hub.slow:
                    return self.reply(200, data, meta, head)
                self.send_response(200)
                for k, v in meta.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                with contextlib.suppress(OSError):
                    for i in range(0, len(data), hub.chunk):
                        self.wfile.write(data[i: i + hub.chunk])
                        self.wfile.flush()
                        time.sleep(hub.delay)

            def handle_one_request(self):
                with contextlib.suppress(ConnectionError):
                    super().handle_one_request()

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        assert self.server is not None
        self.server.shutdown()
        self.server.server_close()
