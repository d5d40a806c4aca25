"""Admin-page users: Argon2id password hashes (argon2-cffi), verification in constant time whether or not the
user exists, and the last-login time. The caller owns the transaction (`db.session.unit_of_work`)."""

from __future__ import annotations

import functools
import hashlib
import secrets
from collections.abc import Sequence
from datetime import datetime, timedelta

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from db.errors import InvalidFieldError, NameTakenError
from db.models import LoginSession, User, utcnow

MIN_PASSWORD = 8
MAX_PASSWORD = 1024  # Argon2 takes any length; this bounds the work one login attempt can ask for


@functools.cache
def _hasher() -> PasswordHasher:
    return PasswordHasher()  # argon2-cffi's defaults follow RFC 9106's second recommendation (Argon2id)


@functools.cache
def _dummy_hash() -> str:
    """A hash to verify against when the username is unknown, so that the time taken does not tell."""
    return _hasher().hash("not a password of anyone")


def check_password(password: object) -> str:
    """Raises InvalidFieldError unless the password is a string of MIN_PASSWORD..MAX_PASSWORD characters."""
    if not isinstance(password, str) or not MIN_PASSWORD <= len(password) <= MAX_PASSWORD:
        raise InvalidFieldError(f"a password needs {MIN_PASSWORD} to {MAX_PASSWORD} characters")
    return password


class UserRepository:
    """Create, verify and list admin users."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def create(self, username: str, password: str, *, is_admin: bool = True) -> User:
        """A new user with an Argon2 hash of `password`.

        Raises:
            NameTakenError: the username is taken.
            InvalidFieldError: a malformed username or a password out of length bounds.
        """
        user = User(
            username=username, password_hash=_hasher().hash(check_password(password)), is_admin=is_admin
        )
        if self.get_by_name(username) is not None:
            raise NameTakenError(f"username {username!r} is taken", username)
        self.session.add(user)
        self.session.flush()
        return user

    def get(self, user_id: int) -> User | None:
        return self.session.get(User, user_id)

    def get_by_name(self, username: str) -> User | None:
        return self.session.scalars(select(User).where(User.username == username)).one_or_none()

    def verify(self, username: str, password: str) -> User | None:
        """The user if `password` is theirs, else None; an unknown username costs the same Argon2 work. A hash
        made with older parameters is upgraded on success."""
        user = self.get_by_name(username) if isinstance(username, str) else None
        if not isinstance(password, str) or len(password) > MAX_PASSWORD:
            return None
        try:
            _hasher().verify(user.password_hash if user else _dummy_hash(), password)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return None
        if user is None:
            return None
        if _hasher().check_needs_rehash(user.password_hash):
            user.password_hash = _hasher().hash(password)
        return user

    def set_password(self, username: str, password: str) -> User:
        """Replace a user's password.

        Raises:
            InvalidFieldError: no such user, or a password out of length bounds.
        """
        user = self.get_by_name(username)
        if user is None:
            raise InvalidFieldError(f"no user named {username!r}")
        user.password_hash = _hasher().hash(check_password(password))
        self.end_sessions(user.id)  # a new password signs the user out everywhere
        self.session.flush()
        return user

    def touch_login(self, user: User, now: datetime | None = None) -> None:
        user.last_login_at = now or utcnow()
        self.session.flush()

    def list(self) -> Sequence[User]:
        return self.session.scalars(select(User).order_by(User.username)).all()

    # --- server-side login sessions --------------------------------------------------------------------------
    @staticmethod
    def _digest(token: str) -> str:
        return hashlib.sha256(token.encode()).hexdigest()

    def start_session(self, user: User, lifetime: timedelta, now: datetime | None = None) -> str:
        """A new login session of `user` for `lifetime`; returns its token (only its hash is stored)."""
        token = secrets.token_urlsafe(32)
        now = now or utcnow()
        self.session.add(
            LoginSession(
                token_hash=self._digest(token), user_id=user.id, created_at=now, expires_at=now + lifetime
            )
        )
        self.session.flush()
        return token

    def session_user(self, token: object, now: datetime | None = None) -> User | None:
        """The user of a live session (not ended, not expired), else None."""
        if not isinstance(token, str) or not token:
            return None
        row = self.session.scalars(
            select(LoginSession).where(LoginSession.token_hash == self._digest(token))
        ).one_or_none()
        if row is None or row.ended_at is not None or row.expires_at <= (now or utcnow()):
            return None
        return self.get(row.user_id)

    def end_session(self, token: object, now: datetime | None = None) -> None:
        """End one session (logout); an unknown or ended token is a no-op."""
        if isinstance(token, str) and token:
            self.session.execute(
                update(LoginSession)
                .where(LoginSession.token_hash == self._digest(token), LoginSession.ended_at.is_(None))
                .values(ended_at=now or utcnow())
            )

    def end_sessions(self, user_id: int, now: datetime | None = None) -> None:
        """End every session of a user."""
        self.session.execute(
            update(LoginSession)
            .where(LoginSession.user_id == user_id, LoginSession.ended_at.is_(None))
            .values(ended_at=now or utcnow())
        )
