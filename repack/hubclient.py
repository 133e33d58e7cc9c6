"""The huggingface_hub client as w3repack uses it: repo ids, downloads into its cache, header range requests,
and one place that turns hub and network failures into one-line UserErrors.

huggingface_hub's settings apply as for every hub client (``HF_HOME``, ``HF_HUB_CACHE``, ``HF_TOKEN``,
``HF_ENDPOINT``, ``HF_HUB_OFFLINE``).
"""

from __future__ import annotations

import contextlib
import re
import time
from pathlib import Path
from typing import Iterator

from repack.checkpoint import CONFIG_NAME
from repack.errors import UserError
from repack.safetensors_io import header_length

REPO_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")
HEADER_PROBE = 65536
HEADER_FETCH_S = 120.0


def parse_repo_id(src: str) -> tuple[str, str | None] | None:
    """``(repo, revision)`` if ``src`` reads as ``org/name[@revision]`` and is not an existing local path."""
    if Path(src).expanduser().exists() or src.startswith((".", "/", "~")) or not REPO_RE.match(src):
        return None
    repo, _, rev = src.partition("@")
    return repo, rev or None


def offline() -> bool:
    from huggingface_hub import constants

    return bool(getattr(constants, "HF_HUB_OFFLINE", False))


def unreachable(timeout: float = 5.0) -> str | None:
    """Why the hub endpoint (``HF_ENDPOINT``) cannot be reached at all, or None: one TCP connection, at most
    ``timeout`` seconds, instead of huggingface_hub's retries (tens of seconds). Not judged behind a proxy."""
    import os
    import socket
    from urllib.parse import urlsplit

    from huggingface_hub import constants

    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")):
        return None
    u = urlsplit(constants.ENDPOINT)
    if not u.hostname:
        return None
    try:
        socket.create_connection((u.hostname, u.port or (443 if u.scheme == "https" else 80)), timeout=timeout).close()
    except OSError as e:
        return f"{constants.ENDPOINT} cannot be reached ({e.strerror or e})"
    return None


def go_offline() -> None:
    """Use the local hub cache only, as with ``HF_HUB_OFFLINE=1``."""
    from huggingface_hub import constants

    constants.HF_HUB_OFFLINE = True


def quiet() -> None:
    """No progress bars or retry chatter from huggingface_hub: the CLI prints one line per outcome."""
    from huggingface_hub.utils import disable_progress_bars, logging

    disable_progress_bars()
    logging.set_verbosity_error()


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _hub_message(e: Exception) -> str | None:
    """The one-line reason for a hub or network failure (None: not one); subclasses come before their bases."""
    from huggingface_hub import errors as he

    local = "HF_HUB_OFFLINE is set" if offline() else "the hub could not be reached"
    table: list[tuple[type | tuple[type, ...], str]] = [
        (he.GatedRepoError, f"gated repository: accept its terms on the hub and set HF_TOKEN ({_first_line(e)})"),
        (he.RepositoryNotFoundError, "no such local folder, and no such hub repository (or it is private: set HF_TOKEN)"),
        (he.RevisionNotFoundError, "revision not found"),
        (he.LocalEntryNotFoundError, f"no such local folder, not in the local hub cache, and {local}"),
        (he.EntryNotFoundError, "no such file in the repository"),
        (he.OfflineModeIsEnabled, "needs the network but HF_HUB_OFFLINE is set"),
        (he.HfHubHTTPError, _first_line(e)),
        ((ConnectionError, TimeoutError), f"network error: {e}"),
    ]
    for cls, msg in table:
        if isinstance(e, cls):
            return msg
    if type(e).__module__.split(".")[0] in ("httpx", "httpx2", "requests", "urllib3"):
        return f"network error: {_first_line(e)}"
    return None


@contextlib.contextmanager
def hub_errors(what: str) -> Iterator[None]:
    """Turn huggingface_hub and network failures into one-line UserErrors."""
    try:
        yield
    except UserError:
        raise
    except Exception as e:
        msg = _hub_message(e)
        if msg is None:
            raise
        raise UserError(f"{what}: {msg}") from e


def download(repo: str, filename: str, revision: str | None, local_only: bool = False) -> Path:
    from huggingface_hub import hf_hub_download

    with hub_errors(f"{repo}@{revision or 'main'}: {filename}"):
        return Path(hf_hub_download(repo, filename, revision=revision, local_files_only=local_only))


def snapshot_from_cache(src: str) -> Path:
    """The cached snapshot folder of ``org/name[@revision]`` (no download)."""
    parsed = parse_repo_id(src)
    if parsed is None:
        return Path(src)
    repo, rev = parsed
    try:
        return download(repo, CONFIG_NAME, rev, local_only=True).parent
    except UserError as e:
        raise UserError(f"{src}: not a local folder and not in the hub cache; `w3repack convert {src} DST` fetches it") from e


def fetch_header_prefix(repo: str, commit: str, name: str) -> bytes:
    """A shard's first ``8 + N`` bytes by HTTP range requests (``safetensors_io.parse_header`` reads them).

    huggingface_hub's ``parse_safetensors_file_metadata`` returns the decoded JSON only; the plan needs the
    exact bytes (the header length fixes every data offset, and a fetched shard must match them).
    """
    from huggingface_hub import constants, hf_hub_url
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    url = hf_hub_url(repo, name, revision=commit, endpoint=constants.ENDPOINT)
    headers = build_hf_headers()
    where = f"{repo}/{name}"
    deadline = time.monotonic() + HEADER_FETCH_S
    with hub_errors(f"{repo}@{commit}: {name} header"):
        data = _get_range(get_session(), hf_raise_for_status, url, headers, 0, HEADER_PROBE, deadline, where)
        n = header_length(where, data)
        if len(data) < 8 + n:
            data = data[:8] + _get_range(get_session(), hf_raise_for_status, url, headers, 8, n, deadline, where)
        if len(data) < 8 + n:
            raise UserError(f"{where}: the server sent {len(data)} bytes of a {8 + n}-byte header")
        return data[: 8 + n]


def _get_range(session, raise_for_status, url: str, headers: dict, start: int, size: int, deadline: float,
               where: str) -> bytes:
    """At most ``size`` bytes from byte ``start`` of ``url``, before ``deadline``: a server that ignores the range
    or sends without end is cut off, never read whole."""
    buf = bytearray()
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise UserError(f"{where}: header fetch took more than {HEADER_FETCH_S:.0f} s")
    rng = {"range": f"bytes={start}-{start + size - 1}"}
    with session.stream("GET", url, headers={**headers, **rng}, timeout=min(30.0, remaining)) as r:
        if r.status_code >= 400:
            r.read()
        raise_for_status(r)
        skip = start if r.status_code == 200 else 0  # range ignored: the body starts at byte 0
        for chunk in r.iter_bytes():
            if skip:
                cut = min(skip, len(chunk))
                chunk, skip = chunk[cut:], skip - cut
            buf += chunk
            if len(buf) >= size:
                break
            if time.monotonic() > deadline:
                raise UserError(f"{where}: header fetch took more than {HEADER_FETCH_S:.0f} s")
    return bytes(buf[:size])
