"""Every error leaves the API as JSON `{"error": {"type": ..., "message": ..., ...}}` with a fitting status:
project exceptions by a table (most specific first), request validation, HTTP errors, and the unexpected."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.routing import Match, Mount

from composer.errors import (
    FamilyMismatchError,
    LoraFileError,
    OverBudgetError,
    PickleRefusedError,
    StudioError,
    UnknownKeysError,
)
from db.errors import (
    AdapterNotFoundError,
    AmbiguousHashError,
    ApiKeyNotFoundError,
    ApiKeyRefusedError,
    CatalogError,
    DuplicateAdapterError,
    InvalidFieldError,
    NameTakenError,
)

log = logging.getLogger(__name__)

# (exception, HTTP status, error type); the first match wins, so subclasses come before their bases.
ERROR_TABLE: tuple[tuple[type[Exception], int, str], ...] = (
    (AdapterNotFoundError, 404, "not_found"),
    (ApiKeyNotFoundError, 404, "not_found"),
    (AmbiguousHashError, 409, "ambiguous_reference"),
    (NameTakenError, 409, "name_taken"),
    (DuplicateAdapterError, 409, "duplicate"),
    (InvalidFieldError, 422, "invalid_field"),
    (ApiKeyRefusedError, 401, "unauthorized"),
    (CatalogError, 400, "catalog_error"),
    (PickleRefusedError, 415, "pickle_refused"),
    (UnknownKeysError, 422, "unknown_keys"),
    (LoraFileError, 422, "invalid_lora_file"),
    (FamilyMismatchError, 422, "family_mismatch"),
    (OverBudgetError, 422, "over_budget"),
    (StudioError, 400, "bad_request"),
)
HTTP_TYPES = {
    400: "bad_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    411: "length_required",
    413: "payload_too_large",
    415: "unsupported_media_type",
    429: "rate_limited",
}


class ApiError(Exception):
    """An error the API raises itself, with its status, type and any extra fields of the error object."""

    def __init__(
        self, status: int, type: str, message: str, headers: dict[str, str] | None = None, **extra: Any
    ):
        super().__init__(message)
        self.status, self.type, self.message, self.headers, self.extra = status, type, message, headers, extra


def error_response(
    status: int, type: str, message: str, headers: dict[str, str] | None = None, **extra: Any
) -> JSONResponse:
    body = {"error": {"type": type, "message": message, **jsonable_encoder(extra)}}
    return JSONResponse(body, status_code=status, headers=headers)


def _extra(exc: Exception) -> dict[str, Any]:
    """The machine-readable parts of a project error: what a client can act on."""
    if isinstance(exc, AdapterNotFoundError):
        return {"suggestions": exc.suggestions}
    if isinstance(exc, AmbiguousHashError):
        return {"candidates": exc.names}
    if isinstance(exc, DuplicateAdapterError):
        return {"existing_name": exc.existing_name}
    if isinstance(exc, UnknownKeysError):
        return {"keys": exc.keys[:20]}
    return {}


def status_of(exc: Exception) -> tuple[int, str]:
    """The HTTP status and error type of a project exception."""
    return next((status, type) for cls, status, type in ERROR_TABLE if isinstance(exc, cls))


def _validation_message(errors: list[dict[str, Any]]) -> str:
    first = errors[0]
    if first.get("type") == "json_invalid":
        return f"malformed JSON body: {first.get('ctx', {}).get('error', 'cannot be parsed')}"
    where = ".".join(str(p) for p in first.get("loc", ()))
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{where}: {first.get('msg', 'invalid')}{more}"


FALLBACK_ROUTE = "api_fallback"  # the last /api/v1 route: what no other API route matched
HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def route_takes(request: Request, method: str) -> bool:
    """True when a real API route takes the request's path with `method` (mounted apps, which take any
    method, and the API's fallback route, which takes any path, are left out)."""
    scope = {**request.scope, "method": method}
    return any(
        route.matches(scope)[0] is Match.FULL
        for route in request.app.router.routes
        if not isinstance(route, Mount) and getattr(route, "name", None) != FALLBACK_ROUTE
    )


def allowed_methods(request: Request) -> list[str]:
    """Every method the request's path supports. Starlette's 405 names only the first route that matched the
    path, but each method is its own route here (`/loras`: GET and POST), and RFC 9110 wants them all."""
    return [method for method in HTTP_METHODS if route_takes(request, method)]


async def unmatched(request: Request) -> JSONResponse:
    """The answer of the API's fallback route: 405 with Allow when another method fits the path, else 404, both
    in the API's error shape (not the studio's pages, which are mounted at / behind the API)."""
    if allowed := allowed_methods(request):
        return error_response(
            405,
            "method_not_allowed",
            f"{request.method} is not allowed on {request.url.path}; allowed: {', '.join(allowed)}",
            {"Allow": ", ".join(allowed)},
        )
    return error_response(404, "not_found", f"no API route at {request.url.path}")


def install_error_handlers(app: FastAPI) -> None:
    """JSON error answers for every error (the API key was checked before the body: `app.api.guard`)."""

    async def on_api_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ApiError)
        return error_response(exc.status, exc.type, exc.message, exc.headers, **exc.extra)

    async def on_project_error(request: Request, exc: Exception) -> JSONResponse:
        status, type = status_of(exc)
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
        return error_response(status, type, str(exc), headers, **_extra(exc))

    async def on_validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        errors = [dict(e) for e in exc.errors()]
        details = [{k: e[k] for k in ("loc", "msg", "type") if k in e} for e in errors]  # inputs not echoed
        type = "malformed_json" if errors and errors[0].get("type") == "json_invalid" else "validation_error"
        return error_response(422, type, _validation_message(errors), details=details)

    async def on_http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, HTTPException)
        type = HTTP_TYPES.get(exc.status_code, "http_error")  # 405s come from `unmatched`, with Allow
        return error_response(exc.status_code, type, str(exc.detail), exc.headers)

    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("%s %s failed", request.method, request.url.path)
        return error_response(500, "internal_error", "internal server error (logged)")

    app.add_exception_handler(ApiError, on_api_error)
    app.add_exception_handler(StudioError, on_project_error)
    app.add_exception_handler(CatalogError, on_project_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(HTTPException, on_http_error)
    app.add_exception_handler(Exception, on_unexpected)
