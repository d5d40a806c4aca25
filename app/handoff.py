"""Handing `lora-studio render` to a running `lora-studio serve` on the same data dir.

A render in a fresh process pays for importing torch and diffusers and loading the pipeline (seconds) before
its first denoising step; a running server has all of that warm. So `serve` leaves a record in its data dir
(`serve.json`, readable by its owner only): its process id, a loopback URL and a secret made for this run.
`render` reads it and, when that process is alive and answers, submits the request as a one-request job to
the REST API with that secret, follows its progress and writes the PNGs where it was asked to; when no server
is up, it renders in-process as before.

The secret is no API key of its own: it stands for the catalog key named `HANDOFF_KEY` (made the first time a
server offers hand-off), so jobs from the command line are listed, rate-limited and revocable like any key's;
revoke that key (`lora-studio apikey revoke`) and servers stop offering hand-off.

This module is the client as well as the record, and imports nothing heavy (no torch, no web stack): the
client runs before the command decides whether it needs torch at all.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from composer.errors import StudioError

log = logging.getLogger(__name__)

RECORD = "serve.json"
HANDOFF_KEY = "lora-studio render hand-off"
HANDOFF_RATE_LIMIT = 600  # requests per minute: a render's submit plus its polls
API = "/api/v1"
POLL_S = 0.05  # first poll interval; it grows to MAX_POLL_S
MAX_POLL_S = 0.5


class HandoffError(StudioError):
    """The server took the request and refused or failed it: the message is the server's own, one line."""


def numbered(out: Path, index: int, count: int) -> Path:
    """Where image `index` of `count` goes when the user asked for `out` (one image: `out` itself)."""
    return out if count == 1 else out.with_name(f"{out.stem}_{index}{out.suffix or '.png'}")


def loopback_url(host: str, port: int) -> str:
    """The URL a process on this machine reaches a server bound to `host` at."""
    reach = "127.0.0.1" if host in ("0.0.0.0", "", "::", "localhost") else host
    return f"http://{'[' + reach + ']' if ':' in reach else reach}:{port}"


# --- the server's side -----------------------------------------------------------------------------------
@dataclass
class HandoffOffer:
    """A running server's offer (a service of the web app: started after the executor, stopped before it).

    `start` makes sure the hand-off key exists and is live, then writes the record; `stop` removes the record
    if it is still this process's. `principal_key` answers the API's authentication for the secret.
    """

    studio: Any  # app.facade.StudioFacade: accounts and settings
    url: str
    secret: str = ""
    offered: bool = False

    @property
    def record(self) -> Path:
        return Path(self.studio.settings.root) / RECORD

    def start(self) -> None:
        """Offer hand-off; if that cannot be done the server runs on without it (a warning says why)."""
        from db.errors import ApiKeyNotFoundError, CatalogError

        accounts = self.studio.accounts
        try:
            try:
                key = accounts.get_api_key(HANDOFF_KEY)
            except ApiKeyNotFoundError:
                key = accounts.create_api_key(HANDOFF_KEY, HANDOFF_RATE_LIMIT).key
            if key.revoked:
                log.warning("render hand-off not offered: the API key %r is revoked", HANDOFF_KEY)
                return
            self.secret = secrets.token_urlsafe(32)
            body = {"pid": os.getpid(), "url": self.url, "secret": self.secret, "started": time.time()}
            tmp = self.record.with_name(f".{RECORD}.{os.getpid()}")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump(body, f)
            os.replace(tmp, self.record)
        except (CatalogError, OSError) as exc:
            log.warning("render hand-off not offered: %s", exc)
            return
        self.offered = True

    def stop(self) -> None:
        if self.offered and (read_record(self.record.parent) or {}).get("pid") == os.getpid():
            self.record.unlink(missing_ok=True)
        self.offered = False

    def principal_key(self, secret: str):
        """The hand-off key's `ApiKeyInfo` when `secret` is this run's, else None."""
        if not (self.offered and secret and secrets.compare_digest(secret, self.secret)):
            return None
        return self.studio.accounts.get_api_key(HANDOFF_KEY)


# --- the command line's side -----------------------------------------------------------------------------
def read_record(root: Path) -> dict | None:
    try:
        record = json.loads((Path(root) / RECORD).read_text())
    except (OSError, ValueError):
        return None
    ok = (
        isinstance(record, dict) and isinstance(record.get("pid"), int) and isinstance(record.get("url"), str)
    )
    return record if ok and isinstance(record.get("secret"), str) else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive, but not a server we may use
        return True
    return True


class _Client:
    def __init__(self, url: str, secret: str, timeout: float) -> None:
        self.url, self.secret, self.timeout = url.rstrip("/"), secret, timeout

    def call(self, method: str, path: str, body: dict | None = None) -> tuple[int, bytes]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(f"{self.url}{path}", data=data, method=method)
        request.add_header("Authorization", f"Bearer {self.secret}")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def json(self, method: str, path: str, body: dict | None = None) -> dict:
        status, raw = self.call(method, path, body)
        return _answer(status, raw, f"{method} {path}")


def _answer(status: int, raw: bytes, what: str) -> dict:
    """The JSON answer of a call; an HTTP error raises with the API's own message (its error shape)."""
    try:
        answer = json.loads(raw or b"{}")
    except ValueError:
        answer = {}
    if status >= 400:
        error = answer.get("error") if isinstance(answer, dict) else None
        message = error.get("message") if isinstance(error, dict) else None
        raise HandoffError(message or f"the server answered HTTP {status} to {what}")
    return answer


def _follow(client: _Client, job: dict, progress: Callable[[float], None] | None) -> dict:
    """Poll the job until it ends: every 50 ms at first, backing off to 0.5 s (a long render's polls stay
    well within the key's rate limit); a 429 waits its Retry-After."""
    wait = POLL_S
    while job["status"] in ("queued", "running"):
        if progress is not None:
            progress(float(job["progress"]))
        time.sleep(wait)
        wait = min(MAX_POLL_S, wait * 1.5)
        status, raw = client.call("GET", f"{API}/renders/{job['id']}")
        if status == 429:
            time.sleep(float(json.loads(raw or b"{}").get("error", {}).get("retry_after", 1)))
            continue
        job = _answer(status, raw, f"job {job['id']}")
    return job


def render_via_server(
    root: Path,
    request: dict,
    out: Path,
    *,
    backbone: str | None = None,
    model: str | None = None,
    progress: Callable[[float], None] | None = None,
    connect_timeout: float = 2.0,
    report: dict | None = None,
) -> tuple[list[Path], str] | None:
    """Render `request` (the REST API's render request, as JSON) on the server running on data dir `root`:
    the PNG paths written (at `out`, numbered when several) and the server's URL, or None when no server is
    up there (nothing was sent, or it could not be reached: render in-process instead).

    `report`, when given, receives what the server's answer adds beside the images (`auto_loras`: the LoRAs
    auto mode picked).

    Raises:
        HandoffError: the server refused the request (bad input: its own message) or the render failed.
    """
    record = read_record(root)
    if record is None or not _alive(record["pid"]):
        return None
    client = _Client(record["url"], record["secret"], connect_timeout)
    batch = {"requests": [request], **({"backbone": backbone} if backbone else {})}
    batch |= {"model": model} if model else {}
    try:
        status, raw = client.call("POST", f"{API}/renders", batch)
    except (urllib.error.URLError, OSError, TimeoutError) as exc:  # not listening (yet, or any more)
        log.info("no server to hand the render to at %s: %s", record["url"], exc)
        return None
    if status in (401, 503):  # another run's record, or a server without an executor: render here
        log.info("the server at %s cannot take the render (HTTP %s)", record["url"], status)
        return None
    job = _answer(status, raw, "the render")
    if report is not None and job.get("auto_loras"):
        report["auto_loras"] = job["auto_loras"][0]
    client.timeout = 60.0
    try:
        job = _follow(client, job, progress)
    except KeyboardInterrupt:  # Ctrl-C stops the render on the server too, as it would in-process
        client.call("DELETE", f"{API}/renders/{job['id']}")
        raise
    if job["status"] != "done":
        raise HandoffError(job.get("error") or f"the server's job {job['id']} ended {job['status']}")
    urls = [url for result in job["results"] for url in result["images"]]
    paths = []
    out = Path(out).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    for i, url in enumerate(urls):
        status, png = client.call("GET", url)
        if status != 200:
            raise HandoffError(f"the server answered HTTP {status} for image {i} of job {job['id']}")
        path = numbered(out, i, len(urls))
        path.write_bytes(png)
        paths.append(path)
    return paths, record["url"]
