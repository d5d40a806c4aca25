"""Catalog repositories, on SQLite and (when LORA_STUDIO_TEST_PG_URL is set) PostgreSQL."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from datetime import UTC
from typing import Any

import pytest
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session, sessionmaker

from db.errors import (
    AdapterNotFoundError,
    AmbiguousHashError,
    DuplicateAdapterError,
    InvalidFieldError,
    NameTakenError,
    RenderNotFoundError,
)
from db.models import Adapter, validate_name
from db.repository import AdapterRepository, RenderRepository
from db.session import make_session_factory, unit_of_work
from tests.conftest_pg import BACKENDS, migrated_engine


@pytest.fixture(params=BACKENDS)
def engine(request: pytest.FixtureRequest, tmp_path) -> Iterator[Engine]:
    with migrated_engine(request.param, tmp_path) as engine:
        yield engine


@pytest.fixture
def sessions(engine: Engine) -> sessionmaker[Session]:
    return make_session_factory(engine)


def _hex(seed: str) -> str:
    return hashlib.sha256(seed.encode()).hexdigest()


def fields(name: str, **over: Any) -> dict[str, Any]:
    """A valid adapter whose hashes derive from its name."""
    base: dict[str, Any] = {
        "name": name,
        "family": "sdxl",
        "adapter_type": "lora",
        "source_format": "kohya",
        "rank": 8,
        "alpha": 4.0,
        "file_path": f"/data/loras/{name}.safetensors",
        "file_size": 1234,
        "sha256": _hex("file:" + name),
        "tensor_sha256": _hex("tensors:" + name),
        "trigger_words": [f"{name}_style"],
        "tags": ["style"],
        "description": f"the {name} adapter",
        "metadata_json": {"ss_network_dim": "8"},
    }
    return base | over


def add(sessions: sessionmaker[Session], name: str, **over: Any) -> None:
    with unit_of_work(sessions) as session:
        AdapterRepository(session).add(**fields(name, **over))


def names(adapters) -> list[str]:
    return [a.name for a in adapters]


def test_add_and_get_round_trip(sessions):
    add(sessions, "Pixel Art", training_config={"steps": 500}, embedding=b"\x00\x01")
    with sessions() as session:
        a = AdapterRepository(session).get_by_name("Pixel Art")
        assert a.sha256 == _hex("file:Pixel Art") and a.autov2 == a.sha256[:10]
        assert a.trigger_words == ["Pixel Art_style"] and a.tags == ["style"]
        assert a.metadata_json == {"ss_network_dim": "8"} and a.training_config == {"steps": 500}
        assert (a.rank, a.alpha, a.embedding, a.preview_path) == (8, 4.0, b"\x00\x01", None)
        assert a.created_at.tzinfo is not None and a.created_at.utcoffset() == UTC.utcoffset(None)
        assert a.updated_at >= a.created_at


def test_duplicate_tensor_hash_is_refused_naming_the_existing_adapter(sessions):
    add(sessions, "original")
    with pytest.raises(DuplicateAdapterError, match="'original'") as info:
        add(sessions, "renamed copy", tensor_sha256=_hex("tensors:original"))
    assert info.value.existing_name == "original"
    with pytest.raises(DuplicateAdapterError, match="same file"):
        add(sessions, "same file", sha256=_hex("file:original"))


def test_name_taken(sessions):
    add(sessions, "style")
    with pytest.raises(NameTakenError, match="'style' is taken"):
        add(sessions, "style", sha256=_hex("x"), tensor_sha256=_hex("y"))


def test_unknown_name_suggests_close_names(sessions):
    add(sessions, "watercolor")
    add(sessions, "charcoal")
    with (
        sessions() as session,
        pytest.raises(AdapterNotFoundError, match="'watercolour'.*'watercolor'") as info,
    ):
        AdapterRepository(session).get_by_name("watercolour")
    assert info.value.suggestions == ["watercolor"]


def test_find_by_hash_and_resolve(sessions):
    add(sessions, "a")
    add(sessions, "b")
    sha, tensors = _hex("file:a"), _hex("tensors:a")
    with sessions() as session:
        repo = AdapterRepository(session)
        for ref in (sha, sha.upper(), f"sha256:{sha}", sha[:10], sha[:12], tensors, tensors[:9]):
            assert repo.find_by_hash(ref).name == "a", ref
        assert repo.find_by_hash("0" * 64) is None
        with pytest.raises(InvalidFieldError, match="'xyz'"):
            repo.find_by_hash("xyz")
        assert repo.resolve("a").name == "a" and repo.resolve(sha[:10]).name == "a"
        with pytest.raises(AdapterNotFoundError, match="'nope'"):
            repo.resolve("nope")


def test_short_hash_matching_two_adapters_is_ambiguous(sessions):
    add(sessions, "one", sha256="abcdef0123" + "1" * 54)
    add(sessions, "two", sha256="abcdef0123" + "2" * 54)
    with sessions() as session, pytest.raises(AmbiguousHashError, match="one, two"):
        AdapterRepository(session).find_by_hash("abcdef0123")


def test_list_filters_and_case_insensitive_search(sessions):
    add(sessions, "Ink Wash", tags=["Style", "monochrome"], description="Sumi-e brush strokes")
    add(sessions, "corgi", family="flux", adapter_type="lokr", trigger_words=["sks dog"], tags=["subject"])
    add(sessions, "neon", tags=["style"], trigger_words=["cyber_city"], description="glow at 100%")
    with sessions() as session:
        repo = AdapterRepository(session)
        assert names(repo.list()) == ["Ink Wash", "corgi", "neon"]
        assert names(repo.list(query="INK")) == ["Ink Wash"]  # name
        assert names(repo.list(query="SKS")) == ["corgi"]  # trigger word
        assert names(repo.list(query="monochr")) == ["Ink Wash"]  # tag
        assert names(repo.list(query="brush")) == ["Ink Wash"]  # description
        assert names(repo.list(query="wash sumi")) == ["Ink Wash"]  # every word, any field
        assert names(repo.list(query="wash glow")) == []
        assert names(repo.list(query="100%")) == ["neon"]  # % and _ are literal, not wildcards
        assert names(repo.list(query="r_c")) == ["neon"]
        assert names(repo.list(query="k_w")) == []
        assert names(repo.list(family="flux")) == ["corgi"]
        assert names(repo.list(adapter_type="lora")) == ["Ink Wash", "neon"]
        assert names(repo.list(tag="STYLE")) == ["Ink Wash", "neon"]  # exact tag, any case
        assert names(repo.list(tag="styl")) == []
        assert names(repo.list(query="style", tag="style", family="sdxl")) == ["Ink Wash", "neon"]
        assert names(repo.list(limit=1, offset=1)) == ["corgi"]
        assert repo.count(tag="style") == 2 and repo.count() == 3
        assert list(repo.names()) == ["Ink Wash", "corgi", "neon"]


def test_update_changes_fields_and_updated_at(sessions):
    add(sessions, "draft")
    with sessions() as session:
        before = AdapterRepository(session).get_by_name("draft").updated_at
    with unit_of_work(sessions) as session:
        a = AdapterRepository(session).update("draft", name="final", tags=["done"], description="ready")
        assert a.name == "final"
    with sessions() as session:
        a = AdapterRepository(session).get_by_name("final")
        assert (a.tags, a.description) == (["done"], "ready")
        assert a.updated_at > before and a.created_at < a.updated_at


def test_update_new_sha256_moves_autov2_and_checks_duplicates(sessions):
    add(sessions, "a")
    add(sessions, "b")
    with unit_of_work(sessions) as session:
        assert AdapterRepository(session).update("a", sha256=_hex("edited")).autov2 == _hex("edited")[:10]
    with unit_of_work(sessions) as session:
        repo = AdapterRepository(session)
        with pytest.raises(NameTakenError):
            repo.update("a", name="b")
        with pytest.raises(DuplicateAdapterError, match="'b'"):
            repo.update("a", tensor_sha256=_hex("tensors:b"))
        with pytest.raises(InvalidFieldError, match="family 'sd3'"):
            repo.update("a", description="changed", family="sd3")
        with pytest.raises(InvalidFieldError, match="created_at"):
            repo.update("a", created_at=None)
        a = repo.get_by_name("a")  # refused updates left it untouched
        assert (a.name, a.tensor_sha256, a.description) == ("a", _hex("tensors:a"), "the a adapter")


def test_in_place_json_edits_are_saved(sessions):
    add(sessions, "a")
    with unit_of_work(sessions) as session:
        a = AdapterRepository(session).get_by_name("a")
        a.tags.append("extra")
        a.metadata_json["note"] = "x"
    with sessions() as session:
        a = AdapterRepository(session).get_by_name("a")
        assert a.tags == ["style", "extra"] and a.metadata_json["note"] == "x"


def test_delete(sessions):
    add(sessions, "gone")
    with unit_of_work(sessions) as session:
        assert AdapterRepository(session).delete("gone").file_path == "/data/loras/gone.safetensors"
    with sessions() as session, pytest.raises(AdapterNotFoundError):
        AdapterRepository(session).delete("gone")


def test_unit_of_work_rolls_back_on_any_exception(sessions):
    with pytest.raises(RuntimeError), unit_of_work(sessions) as session:
        AdapterRepository(session).add(**fields("half-imported"))
        raise RuntimeError("copy failed")
    with pytest.raises(DuplicateAdapterError), unit_of_work(sessions) as session:
        repo = AdapterRepository(session)
        repo.add(**fields("first"))
        repo.add(**fields("second", tensor_sha256=_hex("tensors:first")))
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(Adapter)) == 0


def test_add_refuses_missing_unknown_and_malformed_fields(sessions):
    with unit_of_work(sessions) as session:
        repo = AdapterRepository(session)
        with pytest.raises(InvalidFieldError, match="missing fields sha256"):
            repo.add(**{k: v for k, v in fields("a").items() if k != "sha256"})
        with pytest.raises(InvalidFieldError, match="unknown or read-only fields colour"):
            repo.add(**fields("a", colour="red"))
        for bad in (
            {"family": "sd3"},
            {"adapter_type": "oft"},
            {"source_format": "ckpt"},
            {"sha256": "123"},
            {"file_path": "relative/x.safetensors"},
            {"tags": "style"},
            {"trigger_words": ["ok", ""]},
            {"rank": 0},
        ):
            with pytest.raises(InvalidFieldError, match=next(iter(bad))):
                repo.add(**fields("a", **bad))


@pytest.mark.parametrize("name", ["", " padded", "a/b", "a\\b", "..", "x" * 129, "tab\tname", "semi;colon"])
def test_invalid_names_are_refused(name):
    with pytest.raises(InvalidFieldError, match="adapter name"):
        validate_name(name)


@pytest.mark.parametrize("name", ["Pixel Art v1.5", "ink_wash-2", "x" * 128, "Café au lait", "日本画"])
def test_valid_names(name):
    assert validate_name(name) == name


def render_fields(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "prompt": "a red cube",
        "backbone": "sdxl",
        "model": "toy",
        "method": "merge",
        "params": {"steps": 4, "guidance": 5.0, "size": [64, 64]},
        "seed": 2**40,
        "loras": [{"name": "ink", "sha256": _hex("ink"), "weight": 0.8}],
    }
    return base | over


def test_render_records_provenance(sessions):
    with unit_of_work(sessions) as session:
        repo = RenderRepository(session)
        first = repo.add(**render_fields()).id
        second = repo.add(**render_fields(prompt="a blue ball", negative_prompt="blurry")).id
    with unit_of_work(sessions) as session:
        repo = RenderRepository(session)
        r = repo.set_status(first, "done", output_path="/out/1.png")
        assert (r.status, r.output_path, r.error) == ("done", "/out/1.png", None)
        repo.set_status(second, "failed", error="out of memory")
    with sessions() as session:
        repo = RenderRepository(session)
        r = repo.get(first)
        assert r.loras == render_fields()["loras"] and r.params["size"] == [64, 64] and r.seed == 2**40
        assert r.created_at.tzinfo is not None and r.negative_prompt == ""
        assert [x.id for x in repo.list()] == [second, first]
        assert [x.id for x in repo.list(status="failed")] == [second]
        assert repo.get(second).error == "out of memory"
        with pytest.raises(RenderNotFoundError, match="999"):
            repo.get(999)


def test_render_refuses_malformed_loras_and_status(sessions):
    with unit_of_work(sessions) as session:
        repo = RenderRepository(session)
        with pytest.raises(InvalidFieldError, match="loras entry"):
            repo.add(**render_fields(loras=[{"name": "ink", "weight": 1.0}]))
        with pytest.raises(InvalidFieldError, match="status 'finished'"):
            repo.add(**render_fields(status="finished"))
        with pytest.raises(InvalidFieldError, match="missing fields seed"):
            repo.add(**{k: v for k, v in render_fields().items() if k != "seed"})
