"""Bundled toy-world adapters: imported once on first start, with their trigger words, tags and descriptions."""

from __future__ import annotations

import json

import pytest

import toyworld
from app.bundled import import_bundled, manifest
from app.settings import Settings
from app.studio import Studio
from composer.formats import write_kohya
from db.repository import AdapterRepository
from db.session import unit_of_work
from tests.helpers import random_lora


def test_bundled_adapters_are_imported_once(tmp_path, tiny_sdxl_factory):
    backbone, make = tiny_sdxl_factory
    pipe = make()
    folder = tmp_path / "bundle"
    folder.mkdir()
    entries = []
    for i, name in enumerate(["star", "zigzag"]):
        write_kohya(
            random_lora(pipe, backbone, seed=i), folder / f"{name}.safetensors", trigger_words=[f"t{i}"]
        )
        entries.append(
            {"name": name, "file": f"{name}.safetensors", "kind": "lora", "tags": ["toyworld", "subject"],
             "description": f"the {name}", "trigger_words": [f"t{i}"], "training": {"steps": 3}}
        )  # fmt: skip
    (folder / "manifest.json").write_text(json.dumps({"adapters": entries}))
    studio = Studio.open(Settings(data_dir=tmp_path / "data", bundled=False))
    record = tmp_path / "data" / "bundled.json"
    assert import_bundled(studio.library, folder, record) == ["star", "zigzag"]
    info = studio.library.get("star")
    assert info.trigger_words == ["t0"] and info.tags == ["toyworld", "subject"]
    assert info.description == "the star" and info.training_config == {"steps": 3}
    assert import_bundled(studio.library, folder, record) == []
    with unit_of_work(studio.sessions) as session:  # a user deletes one: it does not come back
        AdapterRepository(session).delete("star")
    assert import_bundled(studio.library, folder, record) == []
    assert [a.name for a in studio.library.list()] == ["zigzag"]


def test_a_new_version_of_a_bundled_adapter_takes_its_name_and_keeps_the_old_one(tmp_path, tiny_sdxl_factory):
    backbone, make = tiny_sdxl_factory
    pipe = make()
    folder = tmp_path / "bundle"
    folder.mkdir()

    def bundle(seed: int) -> None:
        for name in ("star", "ring"):
            write_kohya(
                random_lora(pipe, backbone, seed=seed + (name == "ring")), folder / f"{name}.safetensors"
            )
        entries = [
            {"name": n, "file": f"{n}.safetensors", "kind": "lora", "tags": ["toyworld"], "description": n}
            for n in ("star", "ring")
        ]
        (folder / "manifest.json").write_text(json.dumps({"adapters": entries}))

    studio = Studio.open(Settings(data_dir=tmp_path / "data", bundled=False))
    record = tmp_path / "data" / "bundled.json"
    bundle(0)
    assert import_bundled(studio.library, folder, record) == ["star", "ring"]
    old_star = studio.library.get("star").sha256
    # the user renames the bundled ring, and catalogs an unrelated adapter of their own as "ring"
    studio.library.update("ring", name="my-ring")
    write_kohya(random_lora(pipe, backbone, seed=99), tmp_path / "mine.safetensors")
    studio.library.import_file(tmp_path / "mine.safetensors", name="ring")
    bundle(10)  # the next studio version ships retrained files under the same names
    assert import_bundled(studio.library, folder, record) == ["star", "ring-2"]
    star = studio.library.get("star")
    assert star.sha256 != old_star and star.sha256 in json.loads(record.read_text())["sha256"]
    previous = studio.library.get("star-previous")
    assert previous.sha256 == old_star and "superseded" in previous.tags
    assert {"my-ring", "ring", "ring-2"} <= set(studio.library.names())  # the user's own "ring" is untouched
    assert import_bundled(studio.library, folder, record) == []


def test_the_shipped_bundle_imports_on_first_start(tmp_path):
    entries = manifest(toyworld.loras_dir())
    kinds = {e["tags"][1] for e in entries}
    if not entries:
        pytest.fail("toyworld/loras/manifest.json is missing: run python -m toyworld.train_concepts")
    assert {"subject", "style", "background", "blora"} <= kinds
    studio = Studio.open(Settings(data_dir=tmp_path / "data", bundled=True))
    names = {a.name: a for a in studio.library.list(limit=1000)}
    assert set(names) == {e["name"] for e in entries}
    for e in entries:
        assert names[e["name"]].trigger_words == e["trigger_words"]
        assert names[e["name"]].adapter_type == e["kind"]
    measured = [e for e in entries if "success" in e]
    assert measured, "no bundled adapter records its measured success"
    for e in measured:  # the catalog entry carries the adapter's own success, as the manifest does
        assert studio.library.get(e["name"]).training_config["success"] == e["success"]
    from typer.testing import CliRunner

    from app.cli import app

    subject = next(e for e in measured if e["kind"] == "lora")
    shown = CliRunner().invoke(app, ["show", subject["name"], "--data-dir", str(tmp_path / "data")])
    assert shown.exit_code == 0, shown.output
    assert f"success        {subject['success']['rate']:.3f}" in shown.output


def test_a_bundled_subject_adapter_draws_its_subject(bundled_pipe):
    """The shipped heart LoRA, through the trigger word, makes the toy model draw hearts it never draws alone."""
    import torch

    from composer.formats import read_lora
    from toyworld import concepts

    pipe, host, evaluator = bundled_pipe

    def rate() -> float:
        return concepts.success(pipe, "heart", evaluator, n=8, steps=20, guidance=7.5, seed=7)["rate"]

    base = rate()
    host.add("heart", read_lora(toyworld.loras_dir() / "heart.safetensors"))
    try:
        with host.activate({"heart": 1.0}), torch.no_grad():
            with_lora = rate()
    finally:
        host.remove("heart")
    assert with_lora >= base + 0.25, (base, with_lora)  # measured here (evaluator v2): 0.0 -> 0.625


def _remeasure_cases():
    entries = [e for e in manifest(toyworld.loras_dir()) if e["kind"] == "lora" and "success" in e]
    return [pytest.param(e, id=e["name"]) for e in entries]


@pytest.mark.slow
@pytest.mark.parametrize("entry", _remeasure_cases())
def test_recorded_success_matches_a_fresh_measurement(entry, bundled_pipe):
    """Each bundled concept LoRA draws its concept as often as its manifest entry says: the first prompts of
    the recorded measurement, re-rendered here, within the manifest's stated tolerance."""
    import math

    import torch

    from composer.formats import read_lora
    from toyworld import concepts

    pipe, host, evaluator = bundled_pipe
    rule = json.loads((toyworld.loras_dir() / "manifest.json").read_text())["success_tolerance"]
    recorded = entry["success"]
    n = rule["prompts"]
    host.add(entry["name"], read_lora(toyworld.loras_dir() / entry["file"]))
    try:
        with host.activate({entry["name"]: 1.0}), torch.no_grad():
            fresh = concepts.success(
                pipe, entry["name"], evaluator, n, recorded["sample_steps"], recorded["guidance"],
                recorded["seed"],
            )  # fmt: skip
    finally:
        host.remove(entry["name"])
    p = recorded["rate"]
    tolerance = max(rule["floor"], rule["standard_errors"] * math.sqrt(p * (1 - p) / n))
    assert abs(fresh["rate"] - p) <= tolerance, (entry["name"], recorded, fresh, tolerance)
    if p - recorded["base_rate"] > tolerance:  # clearly above chance, even at this many prompts: still is
        assert fresh["rate"] > recorded["base_rate"], (entry["name"], recorded, fresh)


@pytest.fixture(scope="module")
def bundled_pipe():
    from composer.adapters.host import AdapterHost
    from composer.backbones import get_backbone, load_pipeline
    from toyworld.evaluator import Evaluator

    backbone = get_backbone("sdxl")
    pipe = load_pipeline(backbone, toyworld.model_dir())
    host = AdapterHost.for_pipeline(pipe, backbone)
    yield pipe, host, Evaluator.load()
    host.detach()
