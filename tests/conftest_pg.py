"""Catalog test databases: SQLite in tmp_path, or a fresh schema per test on the PostgreSQL server named by
LORA_STUDIO_TEST_PG_URL (start one with `.ci/postgres.sh`; PostgreSQL cases skip when it is unset)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine

from db.session import default_sqlite_url, make_engine, normalize_url, upgrade

PG_ENV = "LORA_STUDIO_TEST_PG_URL"
BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


@contextmanager
def isolated_pg_url() -> Iterator[str]:
    """A URL whose connections see only a new, empty schema (via search_path); the schema is dropped after."""
    base = os.environ.get(PG_ENV)
    if not base:
        pytest.skip(f"{PG_ENV} is not set (start a server with .ci/postgres.sh)")
    url = normalize_url(base)
    schema = f"test_{uuid.uuid4().hex[:16]}"
    admin = create_engine(url)
    try:
        with admin.begin() as connection:
            connection.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
        yield url.update_query_dict({"options": f"-csearch_path={schema}"}).render_as_string(
            hide_password=False
        )
    finally:
        with admin.begin() as connection:
            connection.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        admin.dispose()


@contextmanager
def catalog_url(backend: str, tmp_path: Path) -> Iterator[str]:
    """A database URL for `backend` ("sqlite" or "postgres") that no other test shares."""
    if backend == "sqlite":
        yield default_sqlite_url(tmp_path / "data")
        return
    with isolated_pg_url() as url:
        yield url


@contextmanager
def migrated_engine(backend: str, tmp_path: Path) -> Iterator[Engine]:
    """An engine on an isolated database migrated to head."""
    with catalog_url(backend, tmp_path) as url:
        engine = make_engine(url)
        try:
            upgrade(engine)
            yield engine
        finally:
            engine.dispose()
