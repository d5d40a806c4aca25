"""Ranked full-text search over the catalog (migration 0006), on SQLite FTS5 and PostgreSQL tsvector alike:
word prefixes, every word required, a name match first, filters, and an index that follows every insert, edit
and delete."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy.orm import Session, sessionmaker

from db.repository import AdapterRepository
from db.search import query_words
from db.session import make_session_factory, unit_of_work
from tests.conftest_pg import BACKENDS, migrated_engine
from tests.test_db import fields


@pytest.fixture(params=BACKENDS)
def sessions(request: pytest.FixtureRequest, tmp_path) -> Iterator[sessionmaker[Session]]:
    with migrated_engine(request.param, tmp_path) as engine:
        yield make_session_factory(engine)


def names(sessions, query: str, **filters) -> list[str]:
    with sessions() as session:
        return [a.name for a, _ in AdapterRepository(session).search(query, **filters)]


def test_search_ranks_name_matches_first_and_needs_every_word(sessions):
    with unit_of_work(sessions) as session:
        repo = AdapterRepository(session)
        repo.add(**fields("inkwell", trigger_words=["inkwellstyle"], tags=["style", "ink"]))
        repo.add(**fields("pastel", description="soft colours, like ink wash", tags=["style"]))
        repo.add(**fields("dog-portrait", trigger_words=["sks"], tags=["subject"], family="flux"))
    assert names(sessions, "ink") == ["inkwell", "pastel"]  # name first, a description word after
    assert names(sessions, "INKW") == ["inkwell"]  # a prefix, any case
    assert names(sessions, "ink soft") == ["pastel"]  # every word
    assert names(sessions, "sks") == ["dog-portrait"]  # trigger words
    assert names(sessions, "portrait") == ["dog-portrait"]  # a part of a hyphenated name
    assert sorted(names(sessions, "style", family="sdxl")) == ["inkwell", "pastel"]
    assert names(sessions, "style", tag="ink") == ["inkwell"]
    assert names(sessions, "nothing") == []
    with unit_of_work(sessions) as session:  # words beyond ASCII, in the JSON arrays too
        AdapterRepository(session).add(**fields("nihonga", trigger_words=["日本画"], tags=["café"]))
    assert names(sessions, "日本画") == ["nihonga"] and names(sessions, "café") == ["nihonga"]
    with sessions() as session:
        scores = [score for _, score in AdapterRepository(session).search("ink")]
    assert scores[0] > scores[1] > 0


def test_any_word_reads_a_whole_prompt(sessions):
    """Auto mode's text side: an entry matching any of a prompt's words, more or rarer matches first; short and
    common words take no part (as prefixes they would match everything)."""
    with unit_of_work(sessions) as session:
        repo = AdapterRepository(session)
        repo.add(**fields("inkwell", trigger_words=["inkwellstyle"], tags=["style", "ink"]))
        repo.add(**fields("pastel", description="soft colours", tags=["style"]))
        repo.add(**fields("dog-portrait", trigger_words=["sks"], tags=["subject"]))
    prompt = "a pastel portrait of the dog, with soft light"
    assert names(sessions, prompt) == []  # every word: no entry has them all
    found = names(sessions, prompt, any_word=True)
    assert set(found) == {"pastel", "dog-portrait"} and "inkwell" not in found
    assert names(sessions, "a photo of the thing on it", any_word=True) == []
    assert names(sessions, "an ink picture", any_word=True) == ["inkwell"]


def test_the_index_follows_edits_and_deletes(sessions):
    with unit_of_work(sessions) as session:
        AdapterRepository(session).add(**fields("inkwell", trigger_words=[], description=""))
    with unit_of_work(sessions) as session:
        AdapterRepository(session).update("inkwell", name="charcoal", tags=["sketch"])
    assert names(sessions, "inkwell") == [] and names(sessions, "sketch") == ["charcoal"]
    with unit_of_work(sessions) as session:
        AdapterRepository(session).delete("charcoal")
    assert names(sessions, "sketch") == [] and names(sessions, "charcoal") == []


@pytest.mark.parametrize(
    "query", ['"', "*", "ink OR", "NEAR(", "-x", ":*", "a & b", "'; DROP TABLE adapters"]
)
def test_query_syntax_never_reaches_the_engine(sessions, query):
    with unit_of_work(sessions) as session:
        AdapterRepository(session).add(**fields("inkwell"))
    names(sessions, query)  # no error, whatever the engine's syntax
    assert names(sessions, "ink") == ["inkwell"]  # and the table is still there
    assert query_words("Ink-Well, 'x'") == ["ink", "well", "x"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_entries_from_before_the_index_are_found(backend, tmp_path):
    from db.session import make_engine, upgrade
    from tests.conftest_pg import catalog_url

    with catalog_url(backend, tmp_path) as url:
        engine = make_engine(url)
        try:
            upgrade(engine, "0005")
            sessions = make_session_factory(engine)
            with unit_of_work(sessions) as session:
                AdapterRepository(session).add(**fields("inkwell", tags=["café"]))
            upgrade(engine)
            assert names(sessions, "inkw") == ["inkwell"] and names(sessions, "café") == ["inkwell"]
        finally:
            engine.dispose()
