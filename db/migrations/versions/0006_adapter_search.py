"""Full-text search over adapters' names, trigger words, tags and descriptions, ranked.

SQLite: a contentless FTS5 index (`adapters_fts`) kept in step by triggers on insert, update and delete,
which give it the JSON arrays as their words (stored JSON escapes non-ASCII). PostgreSQL: a GIN index on the
same four fields as a `simple` tsvector weighted A (name) to D (description) (`db.search.PG_DOCUMENT`). Rows
present before this revision are indexed by it.

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
# the JSON arrays as their words: stored JSON escapes non-ASCII ("caf\u00e9"), json_each gives "café"
_WORDS = "(SELECT group_concat(value, ' ') FROM json_each({row}.{column}))"
_PG_DOCUMENT = (
    "setweight(to_tsvector('simple', coalesce(name, '')), 'A') || "
    "setweight(to_tsvector('simple', coalesce(trigger_words::text, '')), 'B') || "
    "setweight(to_tsvector('simple', coalesce(tags::text, '')), 'C') || "
    "setweight(to_tsvector('simple', coalesce(description, '')), 'D')"
)


def _values(row: str) -> str:
    """id, name, trigger words, tags and description of `row`, as the index holds them."""
    words = ", ".join(_WORDS.format(row=row, column=c) for c in ("trigger_words", "tags"))
    return f"{row}.id, {row}.name, {words}, {row}.description"


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(f"CREATE INDEX ix_adapters_search ON adapters USING gin (({_PG_DOCUMENT}))")
        return
    # contentless: the index keeps only what it needs to rank rows; the triggers give it each row's text
    op.execute(
        f"CREATE VIRTUAL TABLE adapters_fts USING fts5({_COLUMNS}, content='', "
        "tokenize='unicode61 remove_diacritics 2')"
    )
    delete = f"INSERT INTO adapters_fts(adapters_fts, rowid, {_COLUMNS}) VALUES ('delete', {_values('old')});"
    insert = f"INSERT INTO adapters_fts(rowid, {_COLUMNS}) VALUES ({_values('new')});"
    op.execute(f"CREATE TRIGGER adapters_fts_insert AFTER INSERT ON adapters BEGIN {insert} END")
    op.execute(f"CREATE TRIGGER adapters_fts_delete AFTER DELETE ON adapters BEGIN {delete} END")
    op.execute(f"CREATE TRIGGER adapters_fts_update AFTER UPDATE ON adapters BEGIN {delete} {insert} END")
    op.execute(f"INSERT INTO adapters_fts(rowid, {_COLUMNS}) SELECT {_values('adapters')} FROM adapters")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP INDEX IF EXISTS ix_adapters_search")
        return
    for trigger in ("insert", "delete", "update"):
        op.execute(f"DROP TRIGGER IF EXISTS adapters_fts_{trigger}")
    op.execute("DROP TABLE IF EXISTS adapters_fts")
