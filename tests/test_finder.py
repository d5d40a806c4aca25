"""Finding LoRAs in the studio (issue 21): weight search with the toy model's shipped LoRA encoder, hybrid
ranking, embeddings kept with the catalog as it changes, similar LoRAs and near-duplicates, auto mode through
the Studio, the CLI and REST.

The catalog here holds the shipped zoo sample (`toyworld/zoo_sample`: held-out looks the encoder never trained
on) under names that say nothing ("lora-1", ...), with no tags or descriptions: only their weights tell them
apart."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from fastapi.testclient import TestClient
from typer.testing import CliRunner

import toyworld
from app.api import create_app
from app.cli import app as cli
from app.finder import MAGIC, pack
from app.jobs import make_executor
from app.settings import Settings
from app.studio import Studio
from composer.formats import read_lora, write_kohya
from db.repository import ApiKeyRepository
from db.session import unit_of_work

SAMPLE = toyworld.PACKAGE_DIR / "zoo_sample"


def sample_entries() -> list[dict]:
    return [json.loads(line) for line in (SAMPLE / "zoo.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    """A toy studio with the zoo sample imported under uninformative names: (studio, {name: entry})."""
    root = tmp_path_factory.mktemp("finder")
    studio = Studio.open(Settings(data_dir=root / "data", bundled=False))
    names = {}
    for i, entry in enumerate(sample_entries()):
        info = studio.library.import_file(SAMPLE / entry["file"], name=f"lora-{i}")
        names[info.name] = entry
    return studio, names


def test_weight_search_finds_held_out_looks_by_their_weights_alone(catalog):
    studio, names = catalog
    assert studio.finder().available()
    firsts, ranks = 0, []
    for name, entry in names.items():
        hits = studio.search_loras(entry["description"], mode="weights", limit=len(names))
        order = [h.info.name for h in hits]
        assert all(h.text_score is None and h.weight_score is not None for h in hits)
        ranks.append(order.index(name) + 1)
        firsts += order[0] == name
    # chance: R@1 = 1 / len(names); the recorded held-out figures are in docs/BENCHMARKS.md
    assert firsts / len(names) >= 0.5, ranks
    assert sum(r <= 3 for r in ranks) / len(names) >= 0.75, ranks


def test_embeddings_are_stored_and_follow_imports_and_deletes(catalog, tmp_path):
    studio, names = catalog
    finder = studio.finder()
    index = finder.index()
    some = next(iter(names))
    blob = studio.library.embedding_of(some)
    assert blob is not None and blob.startswith(MAGIC)
    size = len(index)
    # a new import is embedded at once (the index is already built) and found
    entry = names[some]
    copy = refactored(read_lora(SAMPLE / entry["file"]))
    write_kohya(copy, tmp_path / "twin.safetensors")
    twin = studio.library.import_file(tmp_path / "twin.safetensors", name="twin")
    assert studio.library.embedding_of("twin") is not None
    assert len(finder.index()) == size + 1
    assert "twin" in [h.info.name for h in studio.search_loras(entry["description"], "weights", limit=3)]
    # similar and near-duplicate: the same delta in other factors, a different file
    similar = studio.similar_loras("twin", limit=2)
    assert similar[0][0].name == some and similar[0][1] >= 0.999
    groups = studio.near_duplicates()["groups"]
    assert {"names": sorted([some, "twin"]), "cosine": groups[0]["cosine"]} in groups
    assert not any(len(g["names"]) > 2 for g in groups)  # different looks are not duplicates
    # deleted: gone from the index and from every result
    studio.library.delete(twin.name)
    assert len(finder.index()) == size
    assert "twin" not in [h.info.name for h in studio.search_loras(entry["description"], "weights", limit=10)]
    # an embedding made by another encoder is made again
    studio.library.set_embedding(some, pack(torch.ones(128).numpy(), b"x" * 16))
    finder._state = None  # as if another process changed the catalog
    finder.index()
    assert studio.library.embedding_of(some) == blob


def refactored(lora):
    """The same deltas in other factors (A -> M A, B -> B M^-1): another file, the same LoRA."""
    out = {}
    for key, m in lora.modules.items():
        if set(m.tensors) != {"down", "up"}:
            out[key] = m
            continue
        rank = m.tensors["down"].shape[0]
        mix = torch.eye(rank) + 0.3 * torch.ones(rank, rank)
        down = torch.einsum("ij,j...->i...", mix, m.tensors["down"])
        up = torch.einsum("oj...,ji->oi...", m.tensors["up"], torch.linalg.inv(mix))
        out[key] = dataclasses.replace(m, tensors={**m.tensors, "down": down, "up": up})
    return dataclasses.replace(lora, modules=out)


def test_hybrid_ranks_text_matches_and_weight_matches_together(catalog):
    studio, names = catalog
    name, entry = next(iter(names.items()))
    studio.library.update(name, description="moonlit harbour study")
    try:
        hits = studio.search_loras("moonlit", mode="hybrid", limit=5)
        assert hits[0].info.name == name and hits[0].text_score is not None
        text_only = studio.search_loras("moonlit", mode="text")
        assert [h.info.name for h in text_only] == [name] and text_only[0].weight_score is None
        both = studio.search_loras(entry["description"], mode="hybrid", limit=len(names))
        assert {h.info.name for h in both} <= set(names) | {"twin"}
        with pytest.raises(Exception, match="search mode 'fuzzy'"):
            studio.search_loras("moonlit", mode="fuzzy")
    finally:
        studio.library.update(name, description="")


def test_auto_mode_picks_loras_for_the_prompt_and_reports_them(catalog, tmp_path):
    studio, names = catalog
    name, entry = next((n, e) for n, e in names.items() if "shape" in e["pins"])
    result = studio.render_image(
        prompt=entry["description"], auto_loras=2, steps=2, out=tmp_path / "auto.png"
    )
    picks = result.provenance["auto_loras"]
    assert len(picks) == 2 and all(p["weight_score"] is not None for p in picks)
    assert {x["name"] for x in result.provenance["loras"]} == {p["name"] for p in picks}
    picked = [names[p["name"]]["trigger"] for p in picks]
    assert all(t in result.provenance["prompt"] for t in picked)  # their trigger words joined the prompt
    with pytest.raises(Exception, match="auto mode picks 1 to 8"):
        studio.render_image(prompt="x", auto_loras=9, steps=1, out=tmp_path / "no.png")


def test_cli_search_similar_and_auto_render(catalog, tmp_path):
    studio, names = catalog
    runner = CliRunner()
    data = ["--data-dir", str(studio.settings.root)]
    name, entry = next(iter(names.items()))
    out = runner.invoke(cli, ["search", entry["description"], "--mode", "weights", "--limit", "3", *data])
    assert out.exit_code == 0, out.output
    assert len(out.output.strip().splitlines()) == 3
    out = runner.invoke(cli, ["search", "x", "--mode", "fuzzy", *data])
    assert out.exit_code == 1 and "search mode 'fuzzy'" in out.output
    out = runner.invoke(cli, ["similar", name, "--limit", "2", *data])
    assert out.exit_code == 0 and len(out.output.strip().splitlines()) == 2, out.output
    png = tmp_path / "cli-auto.png"
    out = runner.invoke(
        cli,
        ["render", "--prompt", entry["description"], "--auto-loras", "1", "--steps", "2", "--in-process",
         "--out", str(png), *data],
    )  # fmt: skip
    assert out.exit_code == 0, out.output
    assert png.is_file() and "auto: lora-" in out.output


def test_rest_search_modes_and_auto_renders(catalog):
    studio, names = catalog
    with unit_of_work(studio.sessions) as session:
        key = ApiKeyRepository(session).create("finder")[1]
    with TestClient(create_app(studio, make_executor(studio))) as client:
        client.headers["Authorization"] = f"Bearer {key}"
        name, entry = next(iter(names.items()))
        body = client.get("/api/v1/search", params={"q": entry["description"], "mode": "weights"}).json()
        assert body["mode"] == "weights" and body["results"][0]["weight_score"] is not None
        assert client.get("/api/v1/search", params={"q": "x", "mode": "fuzzy"}).status_code == 422
        job = client.post(
            "/api/v1/renders",
            json={"requests": [{"prompt": entry["description"], "auto_loras": 1, "num_inference_steps": 2}]},
        )
        assert job.status_code == 202, job.text
        picks = job.json()["auto_loras"][0]
        assert len(picks) == 1 and picks[0]["name"] in names
