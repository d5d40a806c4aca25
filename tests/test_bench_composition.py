"""bench.composition's instrument: its prompts, checks, chance level and per-prompt rates (no rendering)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from bench import composition
from toyworld import scenes
from toyworld.evaluator import Evaluator


@pytest.fixture(scope="module")
def evaluator() -> Evaluator:
    return Evaluator.load()


@pytest.mark.parametrize("which", composition.SETS)
def test_each_set_writes_its_concepts_and_its_checks_pass_on_the_clean_scene(which, evaluator):
    plan = composition.prompts(which, 6, seed=3)
    assert len(plan) == 6 and [p.spec for p in plan] == [
        p.spec for p in composition.prompts(which, 6, seed=3)
    ]
    for p in plan:
        caption = p.spec.caption(use_triggers=True)
        assert all(scenes.TRIGGERS[name] in caption for name in p.loras), caption
        assert scenes.parse_caption(p.spec.caption()) == p.spec
        if which != "subjects-mixed":
            assert all(o.size == "large" for o in p.spec.objects)
    clean = np.stack([scenes.render(p.spec, composition.SIZE, seed=i) for i, p in enumerate(plan)])
    got = composition.rates(evaluator.evaluate(clean), plan, seeds=1)
    assert got["both"]["rate"] >= 5 / 6, got  # the drawn scene is what the prompt asks for
    shuffled = composition.rates(evaluator.evaluate(clean[::-1]), plan, seeds=1)
    assert shuffled["both"]["rate"] < got["both"]["rate"]  # the checks tell scenes apart


def test_chance_blobs_rarely_pass_and_rates_count_prompts(evaluator):
    plan = composition.prompts("subjects-large", 8, seed=1)
    blobs = [im for i, p in enumerate(plan) for im in composition.chance_images(p, 2, i)]
    chance = composition.rates(evaluator.evaluate(np.stack(blobs)), plan, seeds=2)
    assert chance["both"]["rate"] <= 0.1, chance
    with pytest.raises(ValueError, match="unknown set"):
        composition.prompts("three-subjects", 2, 0)
    only = composition.prompts("subjects-mixed", 6, seed=1, only=("star", "heart"))
    assert {frozenset(p.loras) for p in only} == {frozenset(("star", "heart"))}
    with pytest.raises(ValueError, match="no pair"):
        composition.prompts("subject-background", 2, 0, only=("star", "heart"))


def test_rates_are_means_over_prompts_of_each_prompts_seeds():
    plan = composition.prompts("subjects-large", 2, seed=0)

    class R:
        def __init__(self, hit: bool) -> None:
            self.hit = hit

    for p in plan:
        p.checks.update({k: (lambda r: r.hit) for k in p.checks})
    got = composition.rates([R(True), R(False), R(True), R(True)], plan, seeds=2)
    assert got["both"]["rate"] == 0.75  # prompt 1: 1/2, prompt 2: 2/2
    assert got["both"]["se"] == round(float(np.std([0.5, 1.0], ddof=1) / np.sqrt(2)), 3)


def test_alone_counts_a_lora_drawing_its_subject_on_the_wrong_side(evaluator):
    plan = composition.prompts("subjects-large", 4, seed=2)
    clean = [scenes.render(p.spec, composition.SIZE, seed=i) for i, p in enumerate(plan)]
    swapped = [
        scenes.render(
            scenes.SceneSpec(
                tuple(replace(o, position=composition.OTHER_SIDE[o.position]) for o in p.spec.objects),
                p.spec.background,
            ),
            composition.SIZE,
            seed=i,
        )
        for i, p in enumerate(plan)
    ]
    # per prompt: LoRA 1 seed 1, LoRA 1 seed 2, LoRA 2 seed 1, LoRA 2 seed 2
    right = composition.alone_rates(
        evaluator.evaluate(np.stack([im for im in clean for _ in range(4)])), plan, 2
    )
    assert right["own side"]["rate"] >= 0.75 and right["other side"]["rate"] == 0.0, right
    wrong = composition.alone_rates(
        evaluator.evaluate(np.stack([im for im in swapped for _ in range(4)])), plan, 2
    )
    assert wrong["other side"]["rate"] >= 0.75 and wrong["own side"]["rate"] == 0.0, wrong
    with pytest.raises(ValueError, match="subjects sets only"):
        composition.alone_rates([], composition.prompts("subject-background", 2, 0), 1)


def test_method_cost_runs_every_method_on_strips_that_cover_the_picture():
    import numpy as np

    from bench.method_cost import SIZE, methods, strip
    from composer.methods import method_name

    names = ("star", "heart", "cross")
    chosen = methods(names)
    assert {method for method, _ in chosen.values()} == {
        "merge",
        "switch",
        "composite",
        "cmlora",
        "regional",
        "clora",
        "gated",
    }
    for method, params in chosen.values():
        params.check(list(names))  # masks and region prompts name only LoRAs of the stack
        assert method_name(params) == method
    cover = sum(np.frombuffer(strip(i, 3).data, np.uint8).astype(int) for i in range(3))
    assert cover.shape == (SIZE * SIZE,) and (cover == 255).all()  # k strips, no gap, no overlap


def test_method_steps_times_every_method_on_a_tiny_denoiser(monkeypatch, capsys):
    """bench.method_steps (bench/gpu.sh's method figures) runs end to end on tiny SDXL and FLUX."""
    import json

    from bench import method_steps

    for family in ("sdxl", "flux"):
        argv = ["method_steps", "--family", family, "--config", "tiny", "--repeat", "1", "--latent", "8"]
        monkeypatch.setattr("sys.argv", argv)
        method_steps.main()
        figures = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["figures"]
        assert set(figures["over base"]) == {
            "merge",
            "switch",
            "composite",
            "regional, per region",
            "regional, single pass",
            "gated",
        }
        assert figures["gated / merge"]["x"] > 0 and figures["gated layers"] > 0
        assert figures["cmlora passes per step"] == 1.55  # 31 passes over 20 steps at k = 3
        assert figures["mixed / same throughput"]["x"] > 0


def test_cached_gates_are_keyed_by_the_base_model(tmp_path):
    """bench.gates caches trained gates per LoRA set *and* base model: a retrained UNet or VAE is another key,
    a part that gate training does not read (the toy model's LoRA encoder) is not."""
    from bench.gates import model_identity

    for part in ("unet", "vae", "lora_encoder"):
        (tmp_path / part).mkdir()
        (tmp_path / part / "weights.safetensors").write_bytes(b"one")
    before = model_identity(tmp_path)
    (tmp_path / "lora_encoder" / "weights.safetensors").write_bytes(b"two")
    assert model_identity(tmp_path) == before
    (tmp_path / "vae" / "weights.safetensors").write_bytes(b"two")
    assert model_identity(tmp_path) != before
