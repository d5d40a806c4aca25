"""API keys on every /api/v1 route: `Authorization: Bearer <key>` or `X-API-Key: <key>`, checked against the
hashed keys in the catalog, then a per-key token bucket (the key's `rate_limit_per_minute`)."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool

from app.api.errors import ApiError
from app.api.service import StudioDep
from db.errors import ApiKeyRefusedError

bearer = HTTPBearer(
    auto_error=False, description="`Authorization: Bearer <key>` (keys: `lora-studio apikey`)"
)
key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="the same key in `X-API-Key`")


@dataclass(frozen=True)
class Principal:
    """Who is calling: the API key, by id and name, and its rate limit."""

    key_id: int
    name: str
    rate_limit_per_minute: int


class TokenBucket:
    """Per-key token buckets in this process: `per_minute` tokens at most, refilled continuously, one taken
    per request. Thread-safe (sync routes run on a thread pool)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._buckets: dict[int, tuple[float, float]] = {}  # key id -> (tokens, time of last update)

    def take(self, key: int, per_minute: int) -> float:
        """0.0 when a token was taken (go ahead), else the seconds until the next token."""
        now = self._clock()
        with self._lock:
            tokens, last = self._buckets.get(key, (float(per_minute), now))
            tokens = min(float(per_minute), tokens + (now - last) * per_minute / 60.0)
            if tokens >= 1.0:
                self._buckets[key] = (tokens - 1.0, now)
                return 0.0
            self._buckets[key] = (tokens, now)
            return (1.0 - tokens) * 60.0 / per_minute


def authenticate(
    request: Request,
    studio: StudioDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)],
    api_key: Annotated[str | None, Security(key_header)],
) -> Principal:
    """The caller's key, verified and within its rate limit.

    Raises:
        ApiError: 401 (no, unknown or revoked key), 429 (over the rate limit, with Retry-After).
    """
    if (checked := getattr(request.state, "principal", None)) is not None:
        return checked  # the request guard checked the key (and took a token) before the body was read
    secret = credentials.credentials if credentials is not None else api_key
    if not secret:
        raise ApiError(
            401,
            "unauthorized",
            "an API key is required: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'",
            {"WWW-Authenticate": "Bearer"},
        )
    offer = getattr(request.app.state, "handoff", None)  # `lora-studio render` on this machine (app.handoff)
    key = offer.principal_key(secret) if offer is not None else None
    if key is not None and key.revoked:
        raise ApiError(
            401, "unauthorized", f"API key {key.name!r} is revoked", {"WWW-Authenticate": "Bearer"}
        )
    try:
        key = key or studio.accounts.verify_api_key(secret)
    except ApiKeyRefusedError as exc:
        raise ApiError(401, "unauthorized", str(exc), {"WWW-Authenticate": "Bearer"}) from None
    principal = Principal(key.id, key.name, key.rate_limit_per_minute)
    wait = request.app.state.rate_limiter.take(principal.key_id, principal.rate_limit_per_minute)
    if wait > 0:
        retry = max(1, math.ceil(wait))
        raise ApiError(
            429,
            "rate_limited",
            f"API key {principal.name!r} is limited to {principal.rate_limit_per_minute} requests per "
            f"minute; retry in {retry} s",
            {"Retry-After": str(retry)},
            retry_after=retry,
        )
    request.state.principal = principal
    return principal


async def authenticate_request(request: Request) -> Principal:
    """`authenticate` from the headers alone, before the body is read (`app.api.guard`).

    Raises:
        ApiError: as `authenticate`.
    """
    credentials, api_key = await bearer(request), await key_header(request)
    return await run_in_threadpool(authenticate, request, request.app.state.studio, credentials, api_key)


PrincipalDep = Annotated[Principal, Depends(authenticate)]
