"""API keys in the catalog, on SQLite and (when LORA_STUDIO_TEST_PG_URL is set) PostgreSQL: the secret is
shown once and stored only as its SHA-256; verification by prefix and constant-time hash comparison."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from db.errors import ApiKeyNotFoundError, ApiKeyRefusedError, InvalidFieldError, NameTakenError
from db.models import ApiKey, utcnow
from db.repository import ApiKeyRepository, hash_secret
from db.session import make_session_factory, unit_of_work
from tests.conftest_pg import BACKENDS, migrated_engine


@pytest.fixture(params=BACKENDS)
def sessions(request: pytest.FixtureRequest, tmp_path) -> Iterator[sessionmaker[Session]]:
    with migrated_engine(request.param, tmp_path) as engine:
        yield make_session_factory(engine)


def create(sessions, name: str, **kw) -> str:
    with unit_of_work(sessions) as session:
        return ApiKeyRepository(session).create(name, **kw)[1]


def test_create_stores_only_the_hash_and_a_prefix(sessions):
    with unit_of_work(sessions) as session:
        key, secret = ApiKeyRepository(session).create("ci", rate_limit_per_minute=30)
    assert secret.startswith("ls_") and len(secret) > 40
    with sessions() as session:
        row = session.scalars(select(ApiKey)).one()
        assert row.key_hash == hash_secret(secret) and len(row.key_hash) == 64
        assert row.prefix == secret[:8] and row.rate_limit_per_minute == 30
        assert row.created_at.tzinfo is not None and row.last_used_at is None and row.revoked_at is None
        stored = [str(v) for v in session.execute(select(ApiKey.__table__)).one()]
    assert not any(secret in v for v in stored), "the secret itself must never be stored"
    assert create(sessions, "other") != secret


def test_verify_finds_the_key_and_marks_it_used(sessions):
    secret = create(sessions, "ci")
    create(sessions, "web")
    with unit_of_work(sessions) as session:
        key = ApiKeyRepository(session).verify(secret)
        assert key.name == "ci" and key.last_used_at is not None
        first = key.last_used_at
    with unit_of_work(sessions) as session:  # within a minute: not written again
        assert (
            ApiKeyRepository(session).verify(secret, now=first + timedelta(seconds=30)).last_used_at == first
        )
    later = first + timedelta(minutes=2)
    with unit_of_work(sessions) as session:
        assert ApiKeyRepository(session).verify(secret, now=later).last_used_at == later


@pytest.mark.parametrize("bad", ["", "ls_", "ls_short", "not-a-key-at-all-but-long-enough", None])
def test_unknown_or_malformed_secrets_are_refused(sessions, bad):
    secret = create(sessions, "ci")
    with unit_of_work(sessions) as session, pytest.raises(ApiKeyRefusedError, match="invalid API key"):
        ApiKeyRepository(session).verify(bad)
    # same prefix, wrong rest: found by prefix, refused by the hash comparison
    with unit_of_work(sessions) as session, pytest.raises(ApiKeyRefusedError, match="invalid API key"):
        ApiKeyRepository(session).verify(secret[:8] + "x" * 40)


def test_revoked_keys_are_refused_and_keep_their_name(sessions):
    secret = create(sessions, "ci")
    with unit_of_work(sessions) as session:
        revoked_at = ApiKeyRepository(session).revoke("ci").revoked_at
    with unit_of_work(sessions) as session:  # revoking twice keeps the first time
        assert (
            ApiKeyRepository(session).revoke("ci", now=utcnow() + timedelta(days=1)).revoked_at == revoked_at
        )
    with unit_of_work(sessions) as session, pytest.raises(ApiKeyRefusedError, match="'ci' was revoked"):
        ApiKeyRepository(session).verify(secret)
    with unit_of_work(sessions) as session, pytest.raises(NameTakenError, match="'ci' is taken"):
        ApiKeyRepository(session).create("ci")


def test_list_get_and_errors(sessions):
    for name in ("a", "b", "c"):
        create(sessions, name)
    with unit_of_work(sessions) as session:
        repo = ApiKeyRepository(session)
        repo.revoke("b")
        assert [k.name for k in repo.list()] == ["a", "b", "c"]
        assert [k.name for k in repo.list(include_revoked=False)] == ["a", "c"]
        assert repo.get_by_name("b").revoked
        with pytest.raises(ApiKeyNotFoundError, match="no API key named 'zz'"):
            repo.get_by_name("zz")
        with pytest.raises(ApiKeyNotFoundError):
            repo.revoke("zz")


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"name": "../etc"}, "API key name '../etc'"),
        ({"name": ""}, "1-128 characters"),
        ({"name": "ok", "rate_limit_per_minute": 0}, "rate_limit_per_minute 0"),
        ({"name": "ok", "rate_limit_per_minute": True}, "rate_limit_per_minute True"),
    ],
)
def test_malformed_fields_are_refused_and_nothing_is_written(sessions, kw, match):
    with pytest.raises(InvalidFieldError, match=match), unit_of_work(sessions) as session:
        ApiKeyRepository(session).create(**kw)
    with sessions() as session:
        assert ApiKeyRepository(session).list() == []
