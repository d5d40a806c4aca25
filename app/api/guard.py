"""What every /api/v1 request passes before a byte of its body is read: its API key (401, or 429 over the key's
rate, from the headers alone) and its size (413 when the declared Content-Length is over the limit, and 413 as
soon as the bytes read pass it when the length was not declared or was a lie). JSON bodies are bounded by
`max_json_kb`, multipart uploads by `max_upload_mb`. The docs and the OpenAPI schema are public; a path or method
no route takes goes straight to the API's fallback route (404 or 405, no body read)."""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.auth import authenticate_request
from app.api.errors import ApiError, error_response, route_takes

KIB = 1024
MIB = 2**20
MULTIPART_SLACK = 64 * KIB  # boundaries and the small form fields around an uploaded file


class BodyTooLarge(HTTPException):
    """The body grew past its limit while it was read (an HTTPException, so that FastAPI passes it on as is)."""

    def __init__(self, limit_text: str):
        super().__init__(413, f"the request body is over the {limit_text}")


def body_limit(scope: Scope, max_json_kb: int, max_upload_mb: int) -> tuple[int, str]:
    """The byte limit of a request's body and how to name it: uploads (multipart) by max_upload_mb, every
    other body by max_json_kb."""
    content_type = dict(scope["headers"]).get(b"content-type", b"").decode("latin-1").lower()
    if content_type.startswith("multipart/"):
        return max_upload_mb * MIB + MULTIPART_SLACK, f"{max_upload_mb} MiB limit (max_upload_mb)"
    return max_json_kb * KIB, f"{max_json_kb} KiB limit (max_json_kb)"


class RequestGuard:
    """ASGI middleware over the API app: key first, then a bounded body (see the module docstring)."""

    def __init__(self, app: ASGIApp, prefix: str, public: tuple[str, ...]) -> None:
        self.app, self.prefix, self.public = app, prefix, public

    def guarded(self, path: str) -> bool:
        if not (path == self.prefix or path.startswith(f"{self.prefix}/")):
            return False
        return not any(path == p or path.startswith(f"{p}/") for p in self.public)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.guarded(scope["path"]):
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        if not route_takes(request, scope["method"]):
            await self.app(scope, receive, send)  # the fallback route answers 404 or 405; it reads no body
            return
        try:
            await authenticate_request(request)  # sets request.state.principal (in the scope) for the routes
        except ApiError as exc:
            response = error_response(exc.status, exc.type, exc.message, exc.headers, **exc.extra)
            await response(scope, receive, send)
            return
        settings = request.app.state.studio.settings
        limit, limit_text = body_limit(scope, settings.max_json_kb, settings.max_upload_mb)
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            response = error_response(
                413,
                "payload_too_large",
                f"a body of {int(declared):,} bytes is over the {limit_text}",
            )
            await response(scope, receive, send)
            return
        seen = 0

        async def bounded() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge(limit_text)
            return message

        await self.app(scope, bounded, send)


__all__ = ["BodyTooLarge", "MULTIPART_SLACK", "RequestGuard", "body_limit"]
