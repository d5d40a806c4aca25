"""Accounts: REST API keys and admin-page users, each call one unit of work over the catalog. Callers get frozen
snapshots (`ApiKeyInfo`, `UserInfo`), never ORM rows, so no route or command holds a database session."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import NamedTuple

from sqlalchemy.orm import Session, sessionmaker

from db.errors import InvalidFieldError
from db.models import ApiKey, User
from db.repository import DEFAULT_RATE_LIMIT, ApiKeyRepository
from db.session import unit_of_work
from db.users import UserRepository


@dataclass(frozen=True)
class ApiKeyInfo:
    """An API key as lists show it (the secret is never kept; `prefix` is its first characters)."""

    id: int
    name: str
    prefix: str
    rate_limit_per_minute: int
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None

    @classmethod
    def of(cls, key: ApiKey) -> ApiKeyInfo:
        return cls(
            key.id,
            key.name,
            key.prefix,
            key.rate_limit_per_minute,
            key.created_at,
            key.last_used_at,
            key.revoked_at,
        )


class NewApiKey(NamedTuple):
    """A key just created and its plain secret, shown this once."""

    key: ApiKeyInfo
    secret: str


@dataclass(frozen=True)
class UserInfo:
    """An admin-page user (the password hash stays in the catalog)."""

    id: int
    username: str
    is_admin: bool
    created_at: datetime
    last_login_at: datetime | None

    @classmethod
    def of(cls, user: User) -> UserInfo:
        return cls(user.id, user.username, user.is_admin, user.created_at, user.last_login_at)


class Accounts:
    """API keys and users over a session factory; each method is one transaction."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self.sessions = sessions

    # --- API keys ------------------------------------------------------------------------------------
    def create_api_key(self, name: str, rate_limit_per_minute: int = DEFAULT_RATE_LIMIT) -> NewApiKey:
        """A new key and its secret (not stored, cannot be shown again).

        Raises:
            NameTakenError: another key (revoked ones too) has this name.
            InvalidFieldError: a malformed name or rate limit.
        """
        with unit_of_work(self.sessions) as session:
            key, secret = ApiKeyRepository(session).create(name, rate_limit_per_minute=rate_limit_per_minute)
            return NewApiKey(ApiKeyInfo.of(key), secret)

    def verify_api_key(self, secret: str, now: datetime | None = None) -> ApiKeyInfo:
        """The live key whose secret this is; its `last_used_at` moves (at most once a minute).

        Raises:
            ApiKeyRefusedError: unknown or revoked key.
        """
        with unit_of_work(self.sessions) as session:
            return ApiKeyInfo.of(ApiKeyRepository(session).verify(secret, now))

    def get_api_key(self, name: str) -> ApiKeyInfo:
        """The key named `name`, revoked or not.

        Raises:
            ApiKeyNotFoundError: naming `name`.
        """
        with self.sessions() as session:
            return ApiKeyInfo.of(ApiKeyRepository(session).get_by_name(name))

    def list_api_keys(self, include_revoked: bool = True) -> list[ApiKeyInfo]:
        """Keys in creation order."""
        with self.sessions() as session:
            return [ApiKeyInfo.of(k) for k in ApiKeyRepository(session).list(include_revoked)]

    def revoke_api_key(self, name: str, now: datetime | None = None) -> ApiKeyInfo:
        """Refuse the key from now on (a revoked key keeps its first revocation time).

        Raises:
            ApiKeyNotFoundError: naming `name`.
        """
        with unit_of_work(self.sessions) as session:
            return ApiKeyInfo.of(ApiKeyRepository(session).revoke(name, now))

    # --- users ---------------------------------------------------------------------------------------
    def create_user(self, username: str, password: str, *, is_admin: bool = True) -> UserInfo:
        """A new user with an Argon2 hash of `password`.

        Raises:
            NameTakenError: the username is taken.
            InvalidFieldError: a malformed username or a password out of length bounds.
        """
        with unit_of_work(self.sessions) as session:
            return UserInfo.of(UserRepository(session).create(username, password, is_admin=is_admin))

    def verify_login(
        self, username: object, password: object, now: datetime | None = None, *, admin_only: bool = True
    ) -> UserInfo | None:
        """The admin (or, `admin_only=False`, any user) whose password this is, with the login time recorded;
        None for a wrong password, an unknown user (the same Argon2 work, so timing does not tell) or a user
        who is not an admin where one must be."""
        if not isinstance(username, str):
            return None
        with unit_of_work(self.sessions) as session:
            users = UserRepository(session)
            user = users.verify(username, password)  # type: ignore[arg-type]  # non-strings are refused there
            if user is None or (admin_only and not user.is_admin):
                return None
            users.touch_login(user, now)
            return UserInfo.of(user)

    def get_user(self, user_id: int) -> UserInfo | None:
        """The user with this id, or None (deleted since)."""
        with self.sessions() as session:
            user = UserRepository(session).get(user_id)
            return None if user is None else UserInfo.of(user)

    def list_users(self) -> list[UserInfo]:
        """Users by username."""
        with self.sessions() as session:
            return [UserInfo.of(u) for u in UserRepository(session).list()]

    def set_password(self, username: str, password: str) -> UserInfo:
        """Replace a user's password.

        Raises:
            InvalidFieldError: no such user, or a password out of length bounds.
        """
        with unit_of_work(self.sessions) as session:
            return UserInfo.of(UserRepository(session).set_password(username, password))

    def start_session(self, user_id: int, hours: float, now: datetime | None = None) -> str:
        """A server-side login session for the user, `hours` long; its token (for the cookie)."""
        with unit_of_work(self.sessions) as session:
            users = UserRepository(session)
            user = users.get(user_id)
            if user is None:
                raise InvalidFieldError(f"no user with id {user_id}")
            return users.start_session(user, timedelta(hours=hours), now)

    def session_user(self, token: object, now: datetime | None = None) -> UserInfo | None:
        """The user of a live login session, or None (logged out, expired, unknown)."""
        with self.sessions() as session:
            user = UserRepository(session).session_user(token, now)
            return None if user is None else UserInfo.of(user)

    def end_session(self, token: object) -> None:
        """Log out: the session's token is worthless from now on, on every server sharing the catalog."""
        with unit_of_work(self.sessions) as session:
            UserRepository(session).end_session(token)
