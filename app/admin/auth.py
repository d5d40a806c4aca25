"""Login and logout. A successful login replaces the session (new CSRF token, a new server-side login session)
and records the time; logout ends the server-side session."""

from __future__ import annotations

from fastapi import APIRouter, Request

from app.admin.core import AccountsDep, FormDep, page, redirect, session_of, studio_of
from app.admin.session import Session

router = APIRouter()


def safe_next(target: object, root: str) -> str:
    """Where to go after login: a path under the admin page only (never another site: no '//', '\\', scheme)."""
    if not isinstance(target, str) or not target.startswith(f"{root}/"):
        return "/"
    path = target.removeprefix(root)
    return "/" if path.startswith("//") or "\\" in path or ":" in path else path


@router.get("/login")
def login_form(request: Request, next: str = ""):
    """The login form."""
    return page(request, "login.html", next=next, error=None)


@router.post("/login")
def login(request: Request, form: FormDep, accounts: AccountsDep):
    """Check the password (Argon2) and start a signed-in session; repeated failures make the client wait."""
    username, password = form.get("username"), form.get("password")
    throttle = request.app.state.throttle
    address = request.client.host if request.client else "unknown"
    name = username if isinstance(username, str) else ""
    wait = throttle.retry_after(address, name)
    if wait:
        response = page(
            request,
            "login.html",
            429,
            next=form.get("next", ""),
            error=f"too many failed logins; try again in {wait} s",
        )
        response.headers["Retry-After"] = str(wait)
        return response
    user = accounts.verify_login(username, password)
    if user is None:
        throttle.failed(address, name)
        return page(request, "login.html", 401, next=form.get("next", ""), error="wrong username or password")
    throttle.succeeded(address, name)
    hours = studio_of(request).settings.admin_session_hours
    request.state.admin_session = Session.new(user.id, accounts.start_session(user.id, hours))
    response = redirect(request, safe_next(form.get("next"), request.scope.get("root_path", "")))
    request.app.state.codec.write(response, session_of(request), request)
    return response


@router.post("/logout")
def logout(request: Request, form: FormDep, accounts: AccountsDep):
    """End the session, on the server too: the old cookie no longer signs anyone in."""
    accounts.end_session(session_of(request).login)
    response = redirect(request, "/login")
    request.app.state.codec.clear(response)
    return response
