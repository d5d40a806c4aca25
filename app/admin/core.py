"""What every admin route shares: the Studio, templates, the session and signed-in user, CSRF-checked forms
and the HTML error pages."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.templating import Jinja2Templates
from starlette.datastructures import FormData
from starlette.exceptions import HTTPException

from app.accounts import Accounts
from app.admin.session import CSRF_FIELD, AdminError, LoginRequired, Session, SessionCodec, check_csrf
from app.api.errors import status_of
from app.facade import StudioFacade
from composer.errors import StudioError
from db.errors import CatalogError
from db.models import validate_name

log = logging.getLogger(__name__)

TEMPLATES = Jinja2Templates(directory=Path(__file__).parent / "templates")
FORM_LIMIT = 256 * 1024  # plain forms; uploads have their own limit (max_upload_mb)


@dataclass(frozen=True)
class Admin:
    """The signed-in user."""

    id: int
    username: str


def studio_of(request: Request) -> StudioFacade:
    return request.app.state.studio


def accounts_of(request: Request) -> Accounts:
    """API keys and users: the one place the admin routes reach the Studio's accounts from."""
    return studio_of(request).accounts


def session_of(request: Request) -> Session:
    if not hasattr(request.state, "admin_session"):
        request.state.admin_session = request.app.state.codec.read(request)
    return request.state.admin_session


def current_admin(request: Request) -> Admin:
    """The signed-in admin. Raises LoginRequired (a redirect to the login page) otherwise."""
    session = session_of(request)
    if session.user_id is None:
        raise LoginRequired()
    user = accounts_of(request).session_user(session.login)  # None once logged out or expired on the server
    if user is None or user.id != session.user_id or not user.is_admin:  # or deleted or demoted since
        raise LoginRequired()
    return Admin(user.id, user.username)


StudioDep = Annotated[StudioFacade, Depends(studio_of)]
AccountsDep = Annotated[Accounts, Depends(accounts_of)]
AdminDep = Annotated[Admin, Depends(current_admin)]


def page(request: Request, template: str, status: int = 200, /, **context: Any) -> HTMLResponse:
    """Render a template with the session's CSRF token and the user; sets the cookie of a new session."""
    session = session_of(request)
    response = TEMPLATES.TemplateResponse(
        request, template, {"csrf": session.csrf, "csrf_field": CSRF_FIELD, **context}, status_code=status
    )
    if session.fresh:
        codec: SessionCodec = request.app.state.codec
        codec.write(response, session, request)
    return response


def redirect(request: Request, path: str) -> RedirectResponse:
    """303 to a path under /admin (after a POST, so that reloading does not send it again)."""
    return RedirectResponse(f"{request.scope.get('root_path', '')}{path}", status_code=303)


def content_length(request: Request, limit: int, limit_text: str) -> None:
    """Refuse a body over `limit` bytes (or of unknown length) before reading a byte of it."""
    length = request.headers.get("content-length")
    if length is None or not length.isdigit():
        raise AdminError(411, "forms must be sent with a Content-Length header")
    if int(length) > limit:
        raise AdminError(413, f"upload of {int(length) / 2**20:.1f} MiB is over the {limit_text} limit")


async def checked_form(request: Request) -> FormData:
    """A small form, after its CSRF token is checked."""
    content_length(request, FORM_LIMIT, f"{FORM_LIMIT // 1024} KiB form")
    form = await request.form(max_files=0, max_fields=32)
    check_csrf(session_of(request), form.get(CSRF_FIELD))
    return form


FormDep = Annotated[FormData, Depends(checked_form)]


def checked_name(name: str) -> str:
    """A LoRA or key name from the URL; anything that could be a path (`..`, `a/b`) is refused with 400."""
    try:
        return validate_name(name, "name")
    except CatalogError as exc:
        raise AdminError(400, str(exc)) from None


def install_handlers(app) -> None:
    async def on_login_required(request: Request, exc: Exception) -> RedirectResponse:
        target = request.url.path if request.method == "GET" else f"{request.scope.get('root_path', '')}/"
        return RedirectResponse(f"{request.scope.get('root_path', '')}/login?next={target}", status_code=303)

    async def on_admin_error(request: Request, exc: Exception) -> HTMLResponse:
        assert isinstance(exc, AdminError)
        return page(request, "error.html", exc.status, message=exc.message)

    async def on_project_error(request: Request, exc: Exception) -> HTMLResponse:
        status, _ = status_of(exc)
        return page(request, "error.html", status, message=str(exc))

    async def on_http_error(request: Request, exc: Exception) -> HTMLResponse:
        assert isinstance(exc, HTTPException)
        return page(request, "error.html", exc.status_code, message=str(exc.detail))

    async def on_invalid(request: Request, exc: Exception) -> HTMLResponse:
        assert isinstance(exc, RequestValidationError)
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        return page(request, "error.html", 422, message=f"{where}: {first.get('msg', 'invalid')}")

    async def on_unexpected(request: Request, exc: Exception) -> HTMLResponse:
        log.exception("admin %s %s failed", request.method, request.url.path)
        return page(request, "error.html", 500, message="internal error (logged)")

    app.add_exception_handler(LoginRequired, on_login_required)
    app.add_exception_handler(AdminError, on_admin_error)
    app.add_exception_handler(StudioError, on_project_error)
    app.add_exception_handler(CatalogError, on_project_error)
    app.add_exception_handler(HTTPException, on_http_error)
    app.add_exception_handler(RequestValidationError, on_invalid)
    app.add_exception_handler(Exception, on_unexpected)
