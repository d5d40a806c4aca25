"""Catalog schema and sessions: migrations agree with the models, upgrade is idempotent and reversible,
SQLite connections are configured, URLs are normalized, and `db` stays a pure SQLAlchemy layer."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, inspect

from db import search
from db.errors import CatalogError, MigrationError
from db.models import Base
from db.session import (
    alembic_config,
    current_revision,
    default_sqlite_url,
    head_revision,
    make_engine,
    normalize_url,
    upgrade,
)
from tests.conftest_pg import BACKENDS, catalog_url, migrated_engine

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(params=BACKENDS)
def engine(request: pytest.FixtureRequest, tmp_path) -> Iterator[Engine]:
    with migrated_engine(request.param, tmp_path) as engine:
        yield engine


def test_models_and_migrations_agree(engine):
    with engine.connect() as connection:
        context = MigrationContext.configure(
            connection,
            opts={"compare_type": True, "compare_server_default": True, "include_name": search.include_name},
        )
        assert compare_metadata(context, Base.metadata) == []


def test_upgrade_is_idempotent_and_downgrade_empties(engine):
    assert current_revision(engine) == head_revision() == "0007"
    upgrade(engine)  # a second start changes nothing
    assert current_revision(engine) == head_revision()
    with engine.begin() as connection:
        command.downgrade(alembic_config(connection), "base")
    assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
    upgrade(engine)
    assert {"adapters", "renders", "api_keys", "render_jobs", "users"} <= set(
        inspect(engine).get_table_names()
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_0002_adds_api_keys_to_a_0001_catalog_and_keeps_its_rows(backend, tmp_path):
    with catalog_url(backend, tmp_path) as url:
        engine = make_engine(url)
        try:
            upgrade(engine, "0001")
            assert "api_keys" not in inspect(engine).get_table_names()
            with engine.begin() as connection:
                connection.exec_driver_sql(
                    "INSERT INTO renders (prompt, negative_prompt, backbone, model, method, params, seed, "
                    "loras, status) VALUES ('a cat', '', 'sdxl', 'tiny', 'merge', '{}', 7, '[]', 'done')"
                )
            upgrade(engine, "0002")
            assert current_revision(engine) == "0002"
            columns = {c["name"] for c in inspect(engine).get_columns("api_keys")}
            assert columns == {
                "id", "name", "key_hash", "prefix", "created_at", "last_used_at", "revoked_at",
                "rate_limit_per_minute",
            }  # fmt: skip
            with engine.begin() as connection:
                assert connection.exec_driver_sql("SELECT prompt, seed FROM renders").all() == [("a cat", 7)]
                command.downgrade(alembic_config(connection), "0001")
            assert "api_keys" not in inspect(engine).get_table_names()
            assert current_revision(engine) == "0001"
        finally:
            engine.dispose()


@pytest.mark.parametrize("backend", BACKENDS)
def test_unknown_revision_is_reported_and_nothing_is_created(backend, tmp_path):
    with catalog_url(backend, tmp_path) as url:
        engine = make_engine(url)
        try:
            with pytest.raises(MigrationError, match="no-such-revision"):
                upgrade(engine, "no-such-revision")
            assert current_revision(engine) is None
        finally:
            engine.dispose()


def test_sqlite_file_under_data_dir_with_wal_foreign_keys_and_busy_timeout(tmp_path):
    data_dir = tmp_path / "not" / "yet"
    url = default_sqlite_url(data_dir)
    assert url == f"sqlite:///{data_dir.resolve()}/catalog.sqlite"
    engine = make_engine(url)
    try:
        assert data_dir.is_dir()
        with engine.connect() as connection:
            pragma = connection.exec_driver_sql
            assert pragma("PRAGMA journal_mode").scalar() == "wal"
            assert pragma("PRAGMA foreign_keys").scalar() == 1
            assert pragma("PRAGMA busy_timeout").scalar() >= 1000
        upgrade(engine)
        assert (data_dir / "catalog.sqlite").is_file()
    finally:
        engine.dispose()


@pytest.mark.parametrize(
    ("url", "driver"),
    [
        ("postgresql://u:p@db:5432/lora", "postgresql+psycopg"),
        ("postgres://u:p@db/lora", "postgresql+psycopg"),
        ("postgresql+psycopg://u:p@db/lora", "postgresql+psycopg"),
        ("sqlite:////tmp/x.sqlite", "sqlite"),
    ],
)
def test_urls_are_normalized_to_psycopg(url, driver):
    assert normalize_url(url).drivername == driver


def test_unsupported_database_is_refused():
    with pytest.raises(CatalogError, match="mysql"):
        make_engine("mysql://u:p@db/lora")


def test_alembic_cli_uses_the_same_migrations(tmp_path):
    url = default_sqlite_url(tmp_path)
    alembic = Path(sys.executable).parent / "alembic"
    cmd = [str(alembic), "-c", "db/migrations/alembic.ini", "-x", f"url={url}", "upgrade", "head"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    engine = make_engine(url)
    try:
        assert current_revision(engine) == head_revision()
    finally:
        engine.dispose()


def test_db_imports_no_upper_layer_and_no_torch():
    code = (
        "import sys, db.models, db.session, db.repository, db.errors\n"
        "bad = sorted({m.split('.')[0] for m in sys.modules} & {'composer', 'app', 'retrieval', 'torch'})\n"
        "assert not bad, bad\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
