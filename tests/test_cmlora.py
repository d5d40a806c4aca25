"""cmlora (CMLoRA): LoRAs ordered by their measured frequency profiles, a rotating dominant LoRA, and the other
LoRAs' predictions cached between the schedule's refreshes, so that cached steps really skip their passes."""

from __future__ import annotations

import numpy as np
import pytest

from composer.frequency import BINS, profile_of
from composer.methods import CMLoRAParams, CompositeParams
from composer.methods.cmlora import dominant_share, passes_plan, refresh_steps
from composer.render import LoraWeight, RenderRequest, render_batch
from tests.test_methods import SIZE, TRIGGERS, rig, run  # noqa: F401


def test_the_schedule_and_shares_are_the_papers():
    assert refresh_steps(20) == [0, 2, 4, 6, 7, 10, 13, 16, 17, 19]
    assert [round(dominant_share(n), 3) for n in (2, 3, 4, 5)] == [0.6, 0.556, 0.538, 0.529]
    plan = passes_plan(20, 3)
    assert [d for d, _ in plan[:8]] == [0, 0, 1, 1, 2, 2, 0, 1]  # the dominant moves at every refresh
    assert plan[0][1] == [0, 1, 2]  # the first step fills the cache
    assert plan[1][1] == [0]  # a cached step: the dominant LoRA alone
    assert plan[2][1] == [1, 2]  # a refresh: the new dominant and the stale one; 0 ran on the step before
    assert sum(len(todo) for _, todo in plan) == 31  # against composite's 60
    for steps in (1, 2, 7, 50):
        for count in (2, 3, 5):
            last = {}
            for step, (dominant, todo) in enumerate(passes_plan(steps, count)):
                assert dominant in todo
                last.update({i: step for i in todo})
                assert len(last) == count  # every LoRA has a prediction to blend at every step


def test_profiles_rank_fine_detail_above_smooth_change():
    rng = np.random.default_rng(0)
    noise = rng.standard_normal((64, 64))  # fine detail everywhere
    rows, cols = np.indices((64, 64))
    smooth = np.sin(rows / 64 * np.pi) * np.cos(cols / 64 * np.pi)  # a broad colour shift
    fine, broad = profile_of([noise]), profile_of([smooth])
    assert len(fine.radial) == BINS and sum(fine.radial) == pytest.approx(1.0)
    assert fine.score > broad.score + 0.1
    with pytest.raises(ValueError, match="height, width"):
        profile_of([np.zeros(5)])


def render_counting(rig, method, params, loras, profiles, steps=5):  # noqa: F811
    """The image, and the denoiser's rows over a render in the rows of one plain call (passes per image)."""
    backbone, pipe, host = rig
    denoiser = getattr(pipe, backbone.denoiser)
    entry = getattr(denoiser, "conv_in", None) or denoiser.x_embedder  # the latents' first layer
    rows = []
    hook = entry.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
    try:
        request = RenderRequest(
            "a red circle on the left",
            num_inference_steps=steps,
            height=SIZE,
            width=SIZE,
            loras=tuple(LoraWeight(n, w) for n, w in loras),
            method=method,
            method_params=params,
        )
        image = render_batch(pipe, backbone, host, [request], triggers=TRIGGERS, profiles=profiles)[0]
    finally:
        hook.remove()
    return np.asarray(image, dtype=np.float32) / 255.0, rows


def test_cmlora_skips_the_cached_passes_its_schedule_predicts(rig):  # noqa: F811
    backbone, pipe, host = rig
    two = (("a", 1.0), ("b", 0.7))
    profiles = {"a": {"score": 0.2}, "b": {"score": 0.6}}  # b leads
    _, plain = render_counting(rig, "merge", None, two, profiles)
    one_call = plain[0]
    calls_per_step = len(plain) // 5
    image, rows = render_counting(rig, "cmlora", CMLoRAParams(), two, profiles)
    predicted = sum(len(todo) for _, todo in passes_plan(5, 2)) * calls_per_step
    assert sum(rows) / one_call == predicted == 6 * calls_per_step  # step 0 runs both, the rest one each
    composite, rows = render_counting(rig, "composite", CompositeParams(), two, profiles)
    assert sum(rows) / one_call == 5 * 2 * calls_per_step
    assert np.abs(image - composite).max() > 0.01  # dominant shares and caching change the picture
    assert host.context.active == {} and "forward" not in vars(getattr(pipe, backbone.denoiser))
    # the order follows the profiles: swapping the scores swaps which LoRA dominates first
    swapped, _ = render_counting(
        rig, "cmlora", CMLoRAParams(), two, {"a": {"score": 0.6}, "b": {"score": 0.2}}
    )
    assert np.abs(image - swapped).max() > 0.01


def test_cmlora_measures_missing_profiles_into_the_callers_dict(rig):  # noqa: F811
    profiles = {"a": {"score": 0.4}}
    render_counting(rig, "cmlora", CMLoRAParams(), (("a", 1.0), ("b", 1.0)), profiles, steps=2)
    assert set(profiles) == {"a", "b"} and profiles["a"] == {"score": 0.4}
    assert len(profiles["b"]["radial"]) == BINS and 0.0 <= profiles["b"]["score"] <= 1.0


def test_cmlora_of_one_lora_is_a_plain_render(rig):  # noqa: F811
    alone = run(rig, loras=(("a", 0.8),))
    assert np.array_equal(run(rig, "cmlora", CMLoRAParams(), loras=(("a", 0.8),)), alone)


def test_the_studio_keeps_each_loras_profile_with_its_catalog_entry(tmp_path, tiny_sdxl_factory, monkeypatch):
    """Measured on the first cmlora render, stored per base model and file, reused after; a changed file is
    measured again."""
    import composer.methods.cmlora as cmlora
    from app.settings import Settings
    from app.studio import Studio
    from composer.formats import write_kohya
    from db.repository import AdapterRepository
    from db.session import unit_of_work
    from tests.helpers import random_lora

    backbone, make = tiny_sdxl_factory
    pipe = make()
    studio = Studio.open(Settings(data_dir=tmp_path / "data", backbone="sdxl", model="tiny"))
    for i, name in enumerate(["inkwell", "pastel"]):
        path = tmp_path / "in" / f"{name}.safetensors"
        path.parent.mkdir(exist_ok=True)
        write_kohya(
            random_lora(pipe, backbone, seed=i, rank=4, alpha=4.0, std=0.2),
            path,
            trigger_words=[f"{name}style"],
        )
    studio.library.import_paths([tmp_path / "in"])
    measured = []
    real = cmlora.measure_profile
    monkeypatch.setattr(cmlora, "measure_profile", lambda *a, **k: measured.append(a[3]) or real(*a, **k))
    request = RenderRequest(
        "inkwellstyle pastelstyle",
        num_inference_steps=3,
        height=32,
        width=32,
        loras=(LoraWeight("inkwell"), LoraWeight("pastel")),
        method="cmlora",
    )
    studio.render(request)
    assert len(measured) == 2
    info = studio.library.get("inkwell")
    ((model, stored),) = info.frequency_profiles.items()
    assert stored["sha256"] == info.sha256 and len(stored["radial"]) == BINS
    studio.render(request)
    assert len(measured) == 2  # both reused
    with unit_of_work(studio.sessions) as session:  # the entry now points at another file
        AdapterRepository(session).update("inkwell", sha256="f" * 64)
    assert studio.library.frequency_profile(studio.library.get("inkwell"), model) is None
    studio.render(request)
    assert len(measured) == 3
