"""app.accounts.Accounts: API keys and admin users as frozen snapshots, each call its own transaction, on a
SQLite catalog (and PostgreSQL when LORA_STUDIO_TEST_PG_URL is set)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from datetime import timedelta

import pytest

from app.accounts import Accounts, ApiKeyInfo, UserInfo
from db.errors import ApiKeyNotFoundError, ApiKeyRefusedError, InvalidFieldError, NameTakenError
from db.models import utcnow
from db.session import make_session_factory
from tests.conftest_pg import BACKENDS, migrated_engine


@pytest.fixture(params=BACKENDS)
def accounts(request: pytest.FixtureRequest, tmp_path) -> Iterator[Accounts]:
    with migrated_engine(request.param, tmp_path) as engine:
        yield Accounts(make_session_factory(engine))


def test_api_key_lifecycle_returns_frozen_snapshots(accounts):
    key, secret = accounts.create_api_key("ci", rate_limit_per_minute=30)
    assert isinstance(key, ApiKeyInfo) and key.name == "ci" and key.rate_limit_per_minute == 30
    assert secret.startswith("ls_") and key.prefix == secret[:8] and not key.revoked
    with pytest.raises(dataclasses.FrozenInstanceError):
        key.name = "other"  # type: ignore[misc]
    verified = accounts.verify_api_key(secret)
    assert (verified.id, verified.name, verified.rate_limit_per_minute) == (key.id, "ci", 30)
    assert verified.last_used_at is not None  # recorded, and committed: a fresh read sees it
    assert accounts.get_api_key("ci").last_used_at == verified.last_used_at
    later = verified.last_used_at + timedelta(minutes=5)
    assert accounts.verify_api_key(secret, now=later).last_used_at == later
    with pytest.raises(NameTakenError, match="'ci'"):
        accounts.create_api_key("ci")
    accounts.create_api_key("web")
    assert [k.name for k in accounts.list_api_keys()] == ["ci", "web"]
    revoked = accounts.revoke_api_key("ci")
    assert revoked.revoked and accounts.get_api_key("ci").revoked_at == revoked.revoked_at
    assert [k.name for k in accounts.list_api_keys(include_revoked=False)] == ["web"]
    with pytest.raises(ApiKeyRefusedError, match="'ci' was revoked"):
        accounts.verify_api_key(secret)
    with pytest.raises(ApiKeyRefusedError, match="invalid API key"):
        accounts.verify_api_key(secret[:8] + "x" * 40)
    with pytest.raises(ApiKeyNotFoundError, match="'nope'"):
        accounts.revoke_api_key("nope")


def test_a_refused_key_writes_nothing(accounts):
    with pytest.raises(InvalidFieldError):
        accounts.create_api_key("ci", rate_limit_per_minute=0)
    assert accounts.list_api_keys() == []


def test_users_login_touches_last_login_and_refuses_non_admins(accounts):
    ann = accounts.create_user("ann", "first-password")
    assert isinstance(ann, UserInfo) and ann.is_admin and ann.last_login_at is None
    accounts.create_user("bob", "bobs-password", is_admin=False)
    with pytest.raises(NameTakenError, match="'ann'"):
        accounts.create_user("ann", "whatever-long")
    with pytest.raises(InvalidFieldError, match="8 to 1024"):
        accounts.create_user("cy", "short")
    now = utcnow()
    user = accounts.verify_login("ann", "first-password", now=now)
    assert user is not None and user.id == ann.id and user.last_login_at == now
    assert accounts.get_user(ann.id).last_login_at == now
    for name, password in [("ann", "First-password"), ("zed", "first-password"), (None, "x"), ("ann", None)]:
        assert accounts.verify_login(name, password) is None
    assert accounts.verify_login("bob", "bobs-password") is None  # not an admin: no login
    assert accounts.get_user(accounts.list_users()[1].id).last_login_at is None
    assert [u.username for u in accounts.list_users()] == ["ann", "bob"]
    accounts.set_password("ann", "second-password")
    assert accounts.verify_login("ann", "first-password") is None
    assert accounts.verify_login("ann", "second-password").username == "ann"
    with pytest.raises(InvalidFieldError, match="'nobody'"):
        accounts.set_password("nobody", "long-enough-1")
    assert accounts.get_user(10_000) is None


def test_the_studio_carries_accounts(tmp_path):
    from app.settings import Settings
    from app.studio import Studio

    studio = Studio.open(Settings(data_dir=tmp_path / "data"))
    assert isinstance(studio.accounts, Accounts) and studio.accounts.sessions is studio.sessions
