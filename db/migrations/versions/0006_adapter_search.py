"""Full-text search over adapters' names, trigger words, tags and descriptions, ranked.

SQLite: an FTS5 index (`adapters_fts`, external content: the adapters table) kept in step by triggers on
insert, update and delete. PostgreSQL: a GIN index on the same text as a `simple` tsvector
(`db.search.pg_document`). Rows present before this revision are indexed by it.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-07

Written by hand; tests/test_db_migrations.py checks it against db/models.py (the FTS tables are the search's,
not the models').
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_COLUMNS = "name, trigger_words, tags, description"
_PG_DOCUMENT = (
    "to_tsvector('simple', coalesce(name, '') || ' ' || coalesce(trigger_words::text, '') || ' ' || "
    "coalesce(tags::text, '') || ' ' || coalesce(description, ''))"
)


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(f"CREATE INDEX ix_adapters_search ON adapters USING gin ({_PG_DOCUMENT})")
        return
    op.execute(
        f"CREATE VIRTUAL TABLE adapters_fts USING fts5({_COLUMNS}, content='adapters', content_rowid='id', "
        "tokenize='unicode61 remove_diacritics 2')"
    )
    new = ", ".join(f"new.{c}" for c in _COLUMNS.split(", "))
    old = ", ".join(f"old.{c}" for c in _COLUMNS.split(", "))
    delete = f"INSERT INTO adapters_fts(adapters_fts, rowid, {_COLUMNS}) VALUES ('delete', old.id, {old});"
    insert = f"INSERT INTO adapters_fts(rowid, {_COLUMNS}) VALUES (new.id, {new});"
    op.execute(f"CREATE TRIGGER adapters_fts_insert AFTER INSERT ON adapters BEGIN {insert} END")
    op.execute(f"CREATE TRIGGER adapters_fts_delete AFTER DELETE ON adapters BEGIN {delete} END")
    op.execute(f"CREATE TRIGGER adapters_fts_update AFTER UPDATE ON adapters BEGIN {delete} {insert} END")
    op.execute("INSERT INTO adapters_fts(adapters_fts) VALUES ('rebuild')")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP INDEX IF EXISTS ix_adapters_search")
        return
    for trigger in ("insert", "delete", "update"):
        op.execute(f"DROP TRIGGER IF EXISTS adapters_fts_{trigger}")
    op.execute("DROP TABLE IF EXISTS adapters_fts")
