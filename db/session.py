"""Engines, sessions, transactions and schema upgrades. Nothing here runs at import.

SQLite is the default (one file under the data dir, WAL journal, foreign keys on, a busy timeout so that
concurrent writers wait instead of failing); PostgreSQL is chosen by URL and always uses psycopg 3.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.orm import Session, sessionmaker

from db.errors import CatalogError, MigrationError

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
SQLITE_FILENAME = "catalog.sqlite"
SQLITE_BUSY_TIMEOUT_MS = 10_000
# Any fixed 64-bit key: serializes concurrent `upgrade()` calls against one PostgreSQL database.
_PG_MIGRATION_LOCK_KEY = 0x4C6F_5241_5374_7564  # "LoRAStud"


def normalize_url(url: str | URL) -> URL:
    """Parse a database URL; plain `postgresql://` (or `postgres://`) is rewritten to the psycopg 3 driver.

    Raises:
        CatalogError: the URL is malformed or names a backend other than SQLite or PostgreSQL.
    """
    try:
        parsed = make_url(url)
    except Exception as exc:  # sqlalchemy raises ArgumentError; keep the URL (minus password) in the message
        raise CatalogError(f"malformed database URL {str(url)!r}: {exc}") from exc
    backend = parsed.get_backend_name()
    if backend == "postgres" or parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg")
    elif backend not in ("sqlite", "postgresql"):
        raise CatalogError(
            f"unsupported database {parsed.render_as_string()!r}: use sqlite:///PATH or postgresql://..."
        )
    return parsed


def default_sqlite_url(data_dir: Path) -> str:
    """The default catalog: one SQLite file, `catalog.sqlite`, under the data dir (absolute path)."""
    path = Path(data_dir).expanduser().resolve() / SQLITE_FILENAME
    return URL.create("sqlite", database=str(path)).render_as_string(hide_password=False)


def _sqlite_on_connect(dbapi_connection: Any, connection_record: Any) -> None:
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys = ON")
        # WAL: readers never block the writer. In-memory databases answer "memory" and stay as they are.
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute("PRAGMA synchronous = NORMAL")  # safe with WAL; a crash may lose the last commit only
    finally:
        cursor.close()


def make_engine(url: str, *, echo: bool = False) -> Engine:
    """Build the catalog engine for a SQLite or PostgreSQL URL.

    SQLite: creates the file's parent directory and sets WAL, foreign keys and busy_timeout on every
    connection. PostgreSQL: psycopg 3 (`postgresql+psycopg://`), connections checked before use.

    Raises:
        CatalogError: unsupported or malformed URL, or the SQLite directory cannot be created.
    """
    parsed = normalize_url(url)
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database or ""
        if database and database != ":memory:" and not database.startswith("file:"):
            parent = Path(database).expanduser().resolve().parent
            try:
                parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise CatalogError(f"cannot create catalog directory {parent}: {exc}") from exc
        engine = create_engine(parsed, echo=echo)
        event.listen(engine, "connect", _sqlite_on_connect)
        return engine
    return create_engine(parsed, echo=echo, pool_pre_ping=True)


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions bound to `engine`. Objects stay readable after commit (no expiry), for CLI and API output."""
    return sessionmaker(bind=engine, expire_on_commit=False)


@contextmanager
def unit_of_work(session_factory: sessionmaker[Session]) -> Iterator[Session]:
    """One transaction: commits when the block ends normally, rolls back on any exception (nothing written)."""
    with session_factory() as session, session.begin():
        yield session


def alembic_config(connection: Connection | None = None) -> Config:
    """An Alembic config built in code (no alembic.ini lookup); `connection` is what env.py migrates."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    """The newest migration revision this code ships."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    if head is None:
        raise MigrationError(f"no migrations found in {MIGRATIONS_DIR}")
    return head


def current_revision(engine: Engine) -> str | None:
    """The revision the database is at, or None for an empty database."""
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Run Alembic migrations up to `revision` in one transaction, on SQLite or PostgreSQL.

    Concurrent callers (several workers starting at once) are serialized: SQLite by taking the write lock
    first (`BEGIN IMMEDIATE`), PostgreSQL by a transaction-scoped advisory lock.

    Raises:
        MigrationError: a migration failed; the database is left as it was.
    """
    try:
        with engine.connect() as connection, connection.begin():
            if connection.dialect.name == "sqlite":
                # pysqlite opens no transaction before DDL; opening it ourselves makes the DDL atomic.
                connection.exec_driver_sql("BEGIN IMMEDIATE")
            else:
                connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_PG_MIGRATION_LOCK_KEY})")
            command.upgrade(alembic_config(connection), revision)
    except CatalogError:
        raise
    except Exception as exc:
        url = engine.url.render_as_string(hide_password=True)
        raise MigrationError(f"migrating {url} to {revision} failed: {exc}") from exc
    log.info("catalog %s at revision %s", engine.url.render_as_string(hide_password=True), revision)
