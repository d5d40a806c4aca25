"""Ranked full-text search over adapters (migration 0006): SQLite FTS5 with bm25, PostgreSQL tsvector with
ts_rank, over the same four fields, a name match weighing most: name, trigger words, tags and description.

A query's words are matched as word prefixes ("ink" finds "inkwell" and "inkwellstyle"), every word required;
anything but letters, digits and underscores separates words, so no query can reach the engine's syntax. With
`any_word` (auto mode reads a whole prompt) an entry matching any word counts, ranked by how many and how rare;
words under 3 letters and common English ones are left out there, as a prefix they would match everything.
"""

from __future__ import annotations

import re

from sqlalchemy import Float, Integer, Select, func, literal_column, select, text
from sqlalchemy.orm import Session

from db.models import Adapter

FTS_TABLE = "adapters_fts"  # SQLite: the FTS5 index and its shadow tables (adapters_fts_data, ...)
PG_INDEX = "ix_adapters_search"
# the text PostgreSQL indexes (weighted: name A ... description D); the same expression in queries, so the
# planner uses the index
PG_DOCUMENT = (
    "setweight(to_tsvector('simple', coalesce(adapters.name, '')), 'A') || "
    "setweight(to_tsvector('simple', coalesce(adapters.trigger_words::text, '')), 'B') || "
    "setweight(to_tsvector('simple', coalesce(adapters.tags::text, '')), 'C') || "
    "setweight(to_tsvector('simple', coalesce(adapters.description, '')), 'D')"
)
BM25_WEIGHTS = (8.0, 4.0, 2.0, 1.0)  # name, trigger words, tags, description
MAX_WORDS = 32
STOP_WORDS = frozenset((
    "the", "and", "with", "for", "from", "into", "onto", "over", "under", "its", "this", "that", "are", "was",
    "were", "has", "have", "not", "but", "one", "two",
))  # fmt: skip


def include_name(name: str | None, type_: str, parent_names: dict) -> bool:
    """For Alembic's comparison of models and database: the search index is not a model's table."""
    if type_ == "table" and name is not None and name.startswith(FTS_TABLE):
        return False
    return not (type_ == "index" and name == PG_INDEX)


def query_words(query: str) -> list[str]:
    """The words of a query, lower-cased (at most MAX_WORDS)."""
    return re.findall(r"\w+", query.lower())[:MAX_WORDS]


def ranked(session: Session, query: str, any_word: bool = False) -> Select | None:
    """SELECT (Adapter, score) of the adapters matching every word of `query` (`any_word`: at least one;
    higher score: better), or None when the query has no words. The caller adds filters, order and limit."""
    words = query_words(query)
    if any_word:
        words = [w for w in words if len(w) >= 3 and w not in STOP_WORDS]
    if not words:
        return None
    if session.get_bind().dialect.name == "postgresql":
        joiner = " | " if any_word else " & "
        tsquery = func.to_tsquery("simple", joiner.join(f"{w}:*" for w in words))
        document = literal_column(PG_DOCUMENT)
        score = func.ts_rank(document, tsquery).label("score")
        return select(Adapter, score).where(document.op("@@")(tsquery))
    match = (" OR " if any_word else " ").join(f'"{w}"*' for w in words)
    weights = ", ".join(str(w) for w in BM25_WEIGHTS)
    hits = (
        text(
            f"SELECT rowid AS id, -bm25({FTS_TABLE}, {weights}) AS score FROM {FTS_TABLE} WHERE {FTS_TABLE} MATCH :q"
        )
        .bindparams(q=match)
        .columns(id=Integer, score=Float)
        .subquery("hits")
    )
    return select(Adapter, hits.c.score.label("score")).join(hits, hits.c.id == Adapter.id)
