"""Admin sessions: a signed cookie (itsdangerous, key kept in the data dir with mode 0600) carrying the user id,
the token of a server-side login session (`login_sessions`: logging out ends it there, so a copied cookie is
worthless afterwards) and a CSRF token that every POST form must echo. Anonymous visitors get a session too (for
the login form's token); logging in issues a fresh one, so a token seen before login is worthless after it."""

from __future__ import annotations

import hmac
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from fastapi import Request
from itsdangerous import BadSignature, URLSafeTimedSerializer

COOKIE = "lora_studio_admin"
CSRF_FIELD = "csrf"
SALT = "lora-studio-admin-session"


class AdminError(Exception):
    """An admin request refused: rendered as an HTML page with this status and message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class LoginRequired(Exception):
    """No signed-in user: the handler redirects to the login page."""


def load_secret(path: Path) -> bytes:
    """The cookie-signing key, created (32 random bytes, hex, mode 0600) if the file does not exist yet.

    Raises:
        AdminError: the file exists but is unreadable or too short (it is never silently replaced).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        secret = path.read_text().strip()
        if len(secret) < 32:
            raise AdminError(500, f"{path}: the session key is shorter than 32 characters") from None
        return secret.encode()
    with os.fdopen(fd, "w") as out:
        out.write(secrets.token_hex(32) + "\n")
    return path.read_text().strip().encode()


@dataclass(frozen=True)
class Session:
    user_id: int | None
    csrf: str
    fresh: bool = False  # not yet in the browser's cookie: the response sets it
    login: str | None = None  # the server-side login session's token (`Accounts.start_session`)

    @classmethod
    def new(cls, user_id: int | None = None, login: str | None = None) -> Session:
        return cls(user_id, secrets.token_urlsafe(32), fresh=True, login=login)


class SessionCodec:
    """Reads and writes the session cookie."""

    def __init__(self, secret: bytes, max_age_s: int):
        self._serializer = URLSafeTimedSerializer(secret, salt=SALT)
        self.max_age_s = max_age_s

    def read(self, request: Request) -> Session:
        """The request's session, or a fresh anonymous one (missing, tampered or expired cookie)."""
        raw = request.cookies.get(COOKIE)
        if raw:
            try:
                data = self._serializer.loads(raw, max_age=self.max_age_s)
                return Session(data.get("u"), str(data["c"]), login=data.get("l"))
            except (BadSignature, KeyError, TypeError, AttributeError):
                pass
        return Session.new()

    def write(self, response, session: Session, request: Request) -> None:
        response.set_cookie(
            COOKIE,
            self._serializer.dumps({"u": session.user_id, "c": session.csrf, "l": session.login}),
            max_age=self.max_age_s,
            path="/admin",
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
        )

    @staticmethod
    def clear(response) -> None:
        response.delete_cookie(COOKIE, path="/admin")


def check_csrf(session: Session, sent: object) -> None:
    """Raises AdminError(403) unless the form's token equals the session's (compared in constant time)."""
    if session.fresh or not isinstance(sent, str) or not hmac.compare_digest(sent, session.csrf):
        raise AdminError(
            403,
            "this form's security token is missing or out of date (CSRF check); reload the page and send it again",
        )
