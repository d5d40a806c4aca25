"""Toy world: the scene generator (seeded, exact captions, split) and the ground-truth evaluator."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from toyworld import negatives, scenes
from toyworld.evaluator import Evaluator, accuracy, score
from toyworld.scenes import ObjectSpec, SceneSpec
from toyworld.train_evaluator import measure_negatives

FRESH_SEED = 987_654_321  # never a training seed: training batches use seeds 0..steps-1


@pytest.fixture(scope="module")
def evaluator() -> Evaluator:
    return Evaluator.load()


# --- generator ---------------------------------------------------------------------------------------------


def test_same_seed_same_pixels_other_seed_other_pixels():
    assert scenes.sample_scene(5, "all") == scenes.sample_scene(5, "all")
    assert len({scenes.sample_scene(s, "all") for s in range(20)}) > 15
    spec = scenes.sample_scene(5, "all", n_objects=2)
    a, b = scenes.render(spec, 64, seed=3), scenes.render(spec, 64, seed=3)
    assert a.shape == (64, 64, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert not np.array_equal(a, scenes.render(spec, 64, seed=4))
    x1, s1 = scenes.dataset(8, seed=1, split="all")
    x2, s2 = scenes.dataset(8, seed=1, split="all")
    x3, _ = scenes.dataset(8, seed=2, split="all")
    assert np.array_equal(x1, x2) and s1 == s2
    assert not np.array_equal(x1, x3)
    assert np.array_equal(np.asarray(scenes.draw(spec, 64, seed=3)), a)


def test_captions_round_trip_with_words_and_triggers():
    for seed in range(300):
        spec = scenes.sample_scene(seed, "all")
        for triggers in (False, True):
            text = spec.caption(use_triggers=triggers)
            assert scenes.parse_caption(text) == spec, text
    two = SceneSpec(
        (
            ObjectSpec("circle", "red", "striped", "large", "left"),
            ObjectSpec("square", "green", "solid", "small", "right"),
        ),
        "white",
    )
    assert (
        two.caption()
        == "a red striped circle on the left and a small green square on the right, white background"
    )
    star = SceneSpec((ObjectSpec("star", "orange", "zigzag", "large", "centre"),), "brick")
    assert star.caption() == "an orange zigzag star in the centre, brick background"
    t = scenes.TRIGGERS
    assert star.caption(True) == f"an orange {t['zigzag']} {t['star']} in the centre, {t['brick']} background"
    assert scenes.parse_caption("A large Red solid circle in the center, white background.") == SceneSpec(
        (ObjectSpec("circle", "red"),), "white"
    )


@pytest.mark.parametrize(
    ("text", "word"),
    [
        ("a red blob on the left, white background", "blob"),
        ("a mauve circle on the left, white background", "mauve"),
        ("a red circle on the left, plaid background", "plaid"),
    ],
)
def test_parse_caption_names_the_unknown_word(text, word):
    with pytest.raises(ValueError, match=word):
        scenes.parse_caption(text)


def test_bad_layouts_and_grammar_are_refused():
    with pytest.raises(ValueError, match="layout"):
        SceneSpec(
            (ObjectSpec("circle", "red", position="left"), ObjectSpec("square", "blue", position="top"))
        )
    with pytest.raises(ValueError, match="position"):
        scenes.parse_caption("a red circle, white background")
    with pytest.raises(ValueError, match="background"):
        scenes.parse_caption("a red circle on the left")


def test_concept_lists_and_triggers():
    held = {c.name for c in scenes.HELD_OUT}
    assert {c.name for c in scenes.HELD_OUT if c.kind == "subject"} == set(scenes.SUBJECTS_HELD_OUT)
    assert {c.name for c in scenes.HELD_OUT if c.kind == "style"} == set(scenes.STYLES_HELD_OUT)
    assert {c.name for c in scenes.HELD_OUT if c.kind == "background"} == set(scenes.BACKGROUNDS_HELD_OUT)
    assert len(scenes.SUBJECTS_HELD_OUT) >= 6 and len(scenes.STYLES_HELD_OUT) == 4
    assert not held & set(scenes.SHAPES_BASE + scenes.TEXTURES_BASE + scenes.BACKGROUNDS_BASE)
    triggers = [c.trigger for c in scenes.HELD_OUT]
    assert all(re.fullmatch(r"[a-z]+", t) for t in triggers) and len(set(triggers)) == len(triggers)
    vocabulary = set(scenes.SHAPES + scenes.COLOURS + scenes.TEXTURES + scenes.BACKGROUNDS + scenes.SIZES)
    assert not vocabulary & set(triggers)
    assert scenes.held_out_concept(scenes.TRIGGERS["star"]).word == "star"


def test_base_split_never_shows_held_out_concepts_and_held_out_split_always_does():
    base = [scenes.sample_scene(s, "base") for s in range(400)]
    held = [scenes.sample_scene(s, "held_out") for s in range(400)]
    assert not set().union(*(s.concepts() for s in base)) & scenes.HELD_OUT_NAMES
    assert all(s.concepts() & scenes.HELD_OUT_NAMES for s in held)
    assert {o.shape for s in base for o in s.objects} == set(scenes.SHAPES_BASE)
    assert {len(s.objects) for s in base} == {1, 2}
    for s in base + held:
        assert all(scenes.contrasts(o.colour, s.background) for o in s.objects)
    with pytest.raises(ValueError, match="star"):
        scenes.sample_scene(0, "base", fixed={"shape": "star"})


def test_fixed_pins_attributes():
    s = scenes.sample_scene(
        1, "all", n_objects=2, fixed={"shape": "star", "position": "top", "background": "waves"}
    )
    assert [o.shape for o in s.objects] == ["star", "star"] and s.background == "waves"
    assert [o.position for o in s.objects] == ["top", "bottom"]
    s = scenes.sample_scene(2, "all", fixed={"shape": ("heart", None), "colour": ("red", "blue")})
    assert s.objects[0].shape == "heart" and [o.colour for o in s.objects] == ["red", "blue"]
    with pytest.raises(ValueError, match="fixed"):
        scenes.sample_scene(0, "all", fixed={"flavour": "sweet"})


def _object_and_background(px: int, background: str = "grey", **obj) -> tuple[np.ndarray, np.ndarray]:
    """The left half of a scene with the object on the left, and the same half with it on the right."""
    halves = [
        scenes.render(SceneSpec((ObjectSpec(**obj, position=p),), background), px)[:, : px // 2]
        for p in ("left", "right")
    ]
    return halves[0].astype(int), halves[1].astype(int)


@pytest.mark.parametrize("size", [32, 64, 128])
def test_every_concept_is_drawable_and_visible(size):
    looks = {}
    for shape in scenes.SHAPES:
        for texture in scenes.TEXTURES:
            obj, bg = _object_and_background(
                size, shape=shape, colour="yellow", texture=texture, size="small"
            )
            assert (np.abs(obj - bg).sum(-1) > 60).mean() > 0.05, (shape, texture)
            looks[(shape, texture)] = obj.tobytes()
    assert len(set(looks.values())) == len(looks)  # every shape x texture pair draws differently
    for background in scenes.BACKGROUNDS:
        colour = next(c for c in scenes.COLOURS if scenes.contrasts(c, background))
        obj, bg = _object_and_background(size, background, shape="square", colour=colour)
        assert (np.abs(obj - bg).sum(-1) > 60).mean() > 0.2, background
    for colour in scenes.COLOURS:
        img = scenes.render(SceneSpec((ObjectSpec("square", colour),), "grey"), size)
        assert np.abs(img[size // 2, size // 2] - np.array(scenes.RGB[colour])).max() <= 1, colour


# --- negatives ---------------------------------------------------------------------------------------------


def test_negatives_are_seeded_and_hold_no_known_shape():
    a, ta = negatives.dataset(12, seed=3)
    b, tb = negatives.dataset(12, seed=3)
    c, _ = negatives.dataset(12, seed=4)
    assert np.array_equal(a, b) and ta == tb and not np.array_equal(a, c)
    assert [t.kind for t in ta] == [*negatives.KINDS, *negatives.KINDS]
    for t in ta:
        if t.kind in ("noise", "flat", "empty"):
            assert t.objects == () and t.layout == negatives.NO_OBJECT
        else:
            assert any(o.shape == negatives.UNKNOWN_SHAPE for o in t.objects)
            assert t.layout.split("+")[0] in scenes.POSITIONS
    assert all(t.background == negatives.OTHER_BACKGROUND for t in ta if t.kind in ("noise", "flat"))
    rng = np.random.default_rng(0)
    # The filter refuses the known shapes themselves and keeps the outlines it draws.
    assert not any(negatives.is_distinct(m) for m in scenes.SHAPE_MASKS.values())
    assert all(
        negatives.is_distinct(negatives.outline(k, rng)) for k in ("polygon", "blob") for _ in range(20)
    )
    with pytest.raises(ValueError, match="unknown negative kind"):
        negatives.negative("fog", 0)


def test_an_empty_negative_is_its_background_and_an_object_negative_changes_it():
    empty, truth = negatives.negative("empty", 11)
    colour = next(c for c in scenes.COLOURS if scenes.contrasts(c, truth.background))
    one = scenes.render(
        SceneSpec((ObjectSpec("circle", colour, "solid", "small", "left"),), truth.background)
    )
    assert np.array_equal(empty[:, 36:], one[:, 36:]) and not np.array_equal(
        empty, one
    )  # the scene's own ground
    blob, _ = negatives.negative("blob", 11)
    assert not np.array_equal(blob, empty)


# --- evaluator ---------------------------------------------------------------------------------------------


def test_evaluator_says_none_and_unknown_on_negatives(evaluator):
    """Fresh negatives: noise, flat fields and empty backgrounds are read as holding no object; random polygons,
    blobs and broken shapes as unknown shapes (figures from train_evaluator in docs/BENCHMARKS.md)."""
    fp = measure_negatives(evaluator, 60, seed=FRESH_SEED + 9)
    assert max(fp["noise"], fp["flat"], fp["empty"]) <= 0.05, fp
    assert max(fp["polygon"], fp["blob"], fp["broken"]) <= 0.2, fp
    (noise,) = evaluator.evaluate(negatives.negative("noise", 5)[0][None])
    assert noise.count == 0 and noise.background.label == negatives.OTHER_BACKGROUND


def test_evaluator_reads_fresh_scenes(evaluator):
    """>= 98 % per attribute on fresh base and held-out scenes with one and two objects."""
    images, specs = [], []
    for split, seed in (("base", FRESH_SEED), ("held_out", FRESH_SEED + 1)):
        for n_objects in (1, 2):
            x, s = scenes.dataset(100, seed=seed * 3 + n_objects, split=split, n_objects=n_objects)
            images.append(x)
            specs += s
    acc = accuracy(evaluator.evaluate(np.concatenate(images)), specs)
    assert min(acc.values()) >= 0.98, acc


@pytest.mark.parametrize("size", [32, 128])
def test_evaluator_reads_other_image_sizes(evaluator, size):
    images, specs = scenes.dataset(100, seed=FRESH_SEED + size, split="all", size=size)
    acc = accuracy(evaluator.evaluate([scenes.Image.fromarray(x) for x in images]), specs)
    assert min(acc.values()) >= 0.95, acc


@pytest.mark.parametrize(
    "change",
    [
        {"colour": "blue"},
        {"shape": "star"},
        {"texture": "speckled"},
        {"size": "small"},
        {"shape": "heart", "texture": "concentric"},
    ],
)
def test_evaluator_detects_a_changed_attribute(evaluator, change):
    spec = SceneSpec(
        (
            ObjectSpec("circle", "red", "striped", "large", "left"),
            ObjectSpec("square", "yellow", "dotted", "large", "right"),
        ),
        "grey",
    )
    changed = scenes.replace_object(spec, 0, **change)
    before, after = evaluator.evaluate([scenes.draw(spec, seed=7), scenes.draw(changed, seed=7)])
    assert all(score(before, spec).values())
    assert all(score(after, changed).values()), after
    assert not all(score(after, spec).values())
    assert after.to_spec().objects[1] == before.to_spec().objects[1] == spec.objects[1]
    for key, value in change.items():
        assert getattr(after.object_at("left"), key).label == value


def test_evaluator_reports_are_complete_and_weights_round_trip(evaluator, tmp_path):
    spec = scenes.sample_scene(3, "held_out", n_objects=2)
    img = scenes.render(spec, 64, seed=3)
    (report,) = evaluator.evaluate(img[None])
    assert report.to_spec() == spec
    assert report.count == 2 and 0.5 < report.background.confidence <= 1.0
    assert all(
        0.5 < getattr(o, a).confidence <= 1.0 for o in report.objects for a in ("shape", "colour", "position")
    )
    evaluator.save(tmp_path / "e.safetensors")
    again = Evaluator.load(tmp_path / "e.safetensors")
    assert again.evaluate(img[None]) == [report]
    with pytest.raises(FileNotFoundError):
        Evaluator.load(tmp_path / "missing.safetensors")


def test_scores_fail_against_the_wrong_scenes(evaluator):
    images, specs = scenes.dataset(60, seed=FRESH_SEED + 5, split="all")
    reports = evaluator.evaluate(images)
    wrong = accuracy(reports, specs[1:] + specs[:1])
    assert max(wrong["shape"], wrong["texture"], wrong["colour"]) < 0.5, wrong
    spec = specs[0]
    other_bg = next(b for b in scenes.BACKGROUNDS if b != spec.background)
    flags = score(reports[0], SceneSpec(spec.objects, other_bg))
    assert not flags["background"] and flags["shape"] and flags["count"]


def test_hit_rate_by_size_splits_by_the_prompts_object_size(evaluator):
    from PIL import Image

    from toyworld import concepts

    specs = concepts.test_specs("heart", 12)
    sizes = {s.objects[0].size for s in specs}
    images = [Image.fromarray(scenes.render(s, 64, i)) for i, s in enumerate(specs)]
    # the large drawings are replaced by drawings of another subject: only the small ones stay hits
    wrong = [scenes.replace_object(s, 0, shape="star") for s in specs]
    mixed = [
        Image.fromarray(scenes.render(w, 64, i)) if s.objects[0].size == "large" else image
        for i, (s, w, image) in enumerate(zip(specs, wrong, images, strict=True))
    ]
    assert sizes == {"large", "small"}
    assert concepts.hit_rate_by_size(evaluator.evaluate(images), specs, "heart") == {
        "large": 1.0,
        "small": 1.0,
    }
    assert concepts.hit_rate_by_size(evaluator.evaluate(mixed), specs, "heart") == {
        "large": 0.0,
        "small": 1.0,
    }


def test_concept_training_sets_show_the_concept_beside_a_base_object_in_either_half():
    from toyworld import concepts

    for name in ("star", "zigzag", "brick"):
        concept = scenes.held_out_concept(name)
        images, captions = concepts.training_set(name, 8, pairs=0.5)
        assert len(images) == 8 and all(concept.trigger in c for c in captions)
        specs = [scenes.parse_caption(c) for c in captions]
        assert [len(s.objects) for s in specs] == [1] * 4 + [2] * 4
        if concept.kind == "subject":  # the concept is one object of the pair, the other a base shape
            slots = {[o.shape for o in s.objects].index(name) for s in specs[4:]}
            assert slots == {0, 1}
            assert all(sum(o.shape == name for o in s.objects) == 1 for s in specs[4:])
    with pytest.raises(ValueError, match="pairs"):
        concepts.training_set("star", 4, pairs=1.5)


def test_a_small_share_sizes_the_concepts_object_and_leaves_backgrounds_alone():
    from toyworld import concepts

    trigger = scenes.held_out_concept("star").trigger

    def small(caption: str) -> bool:  # the clause with the trigger word: "a small red xyvo on the left"
        clause = next(part for part in caption.split(" and ") if trigger in part)
        return "small" in clause.split(trigger)[0]

    _, most = concepts.training_set("star", 40, pairs=0.5, small=0.75)
    _, none = concepts.training_set("star", 40, pairs=0.5, small=0.0)
    _, every = concepts.training_set("star", 40, pairs=0.5, small=1.0)
    assert 29 <= sum(small(c) for c in most) <= 31
    assert not any(small(c) for c in none)
    assert all(small(c) for c in every)
    assert concepts.training_set("brick", 4, small=1.0) == concepts.training_set("brick", 4)
    with pytest.raises(ValueError, match="small"):
        concepts.training_set("star", 4, small=1.5)


def test_decoy_captions_write_the_other_object_with_a_made_up_word():
    from toyworld import concepts

    images, plain = concepts.training_set("star", 8, pairs=0.5)
    _, captions = concepts.training_set("star", 8, pairs=0.5, decoys=0.5)
    assert captions[:6] == plain[:6]  # single-object scenes and the plain half of the pairs are unchanged
    for caption, original in zip(captions[6:], plain[6:], strict=True):
        spec = scenes.parse_caption(original)
        other = next(o for o in spec.objects if o.shape != "star")
        words = caption.replace(",", "").split()
        assert scenes.TRIGGERS["star"] in words and other.shape not in words
        assert sum(w in concepts.DECOYS for w in words) == 1, caption
        assert not set(concepts.DECOYS) & set(scenes.TRIGGERS.values())
    _, style = concepts.training_set("zigzag", 4, pairs=0.5, decoys=1.0)  # styles: no decoys
    assert style == concepts.training_set("zigzag", 4, pairs=0.5)[1]
    with pytest.raises(ValueError, match="decoys"):
        concepts.training_set("star", 4, pairs=0.5, decoys=2.0)


# --- train_concepts ----------------------------------------------------------------------------------------


def test_train_concepts_refuses_an_unknown_only_name_before_it_loads_anything(monkeypatch, capsys, tmp_path):
    from toyworld import train_concepts

    out = tmp_path / "loras"
    monkeypatch.setattr("sys.argv", ["train_concepts", "--out", str(out), "--only", "star,plaid"])
    with pytest.raises(SystemExit) as refused:
        train_concepts.main()
    assert "unknown adapter name(s) plaid" in str(refused.value)
    assert "crosshatched" in str(refused.value)  # the known names are listed
    assert not out.exists()
    assert train_concepts.selected(" star, blora-heart") == {"star", "blora-heart"}


def test_manifest_entries_from_runs_side_by_side_all_land(tmp_path):
    """Each train_concepts run records only its own entries, read-modify-write under a lock: runs training
    different adapters into one folder at once keep each other's entries (they used to overwrite them)."""
    from concurrent.futures import ThreadPoolExecutor

    from toyworld.train_concepts import manifest_entries, record

    path = tmp_path / "manifest.json"
    record(path, {"name": "star", "success": {"rate": 0.5}})
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: record(path, {"name": f"a{i:02d}", "success": {"rate": i}}), range(32)))
    record(path, {"name": "star", "success": {"rate": 0.9}})  # a re-measurement replaces its own entry only
    entries = manifest_entries(path)
    assert sorted(entries) == sorted([f"a{i:02d}" for i in range(32)] + ["star"])
    assert entries["star"]["success"]["rate"] == 0.9 and entries["a07"]["success"]["rate"] == 7
    assert "success_tolerance" in json.loads(path.read_text())


def test_train_concepts_measure_only_names_what_it_cannot_find(monkeypatch, tmp_path):
    from toyworld import train_concepts

    (tmp_path / "star.safetensors").write_bytes(b"")
    train_concepts.record(tmp_path / "manifest.json", {"name": "star"})
    train_concepts.record(tmp_path / "manifest.json", {"name": "ring"})  # recorded, but its file is gone
    argv = ["train_concepts", "--out", str(tmp_path), "--measure-only", "--only", "star,ring,heart"]
    monkeypatch.setattr("sys.argv", argv)
    with pytest.raises(SystemExit) as refused:
        train_concepts.main()
    assert str(refused.value).endswith("for heart, ring")
