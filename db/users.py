"""Admin-page users: Argon2id password hashes (argon2-cffi), verification in constant time whether or not the
user exists, and the last-login time. The caller owns the transaction (`db.session.unit_of_work`)."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from datetime import datetime

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from sqlalchemy import select
from sqlalchemy.orm import Session

from db.errors import InvalidFieldError, NameTakenError
from db.models import User, utcnow

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
        self.session.flush()
        return user

    def touch_login(self, user: User, now: datetime | None = None) -> None:
        user.last_login_at = now or utcnow()
        self.session.flush()

    def list(self) -> Sequence[User]:
        return self.session.scalars(select(User).order_by(User.username)).all()
