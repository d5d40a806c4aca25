"""LoRA Switch and LoRA Composite (Zhong et al. 2024), the training-free baselines: switch runs one LoRA per step
in the stack's order, composite averages the LoRAs' predictions; both on tiny SDXL and FLUX."""

from __future__ import annotations

import numpy as np
import pytest

from composer.errors import StudioError
from composer.methods import CompositeParams, SwitchParams, params_from_json
from tests.test_methods import rig, run  # noqa: F401  (the module's two-LoRA pipelines, sdxl and flux)


def test_composite_of_one_lora_is_a_plain_render_and_of_two_is_no_merge(rig):  # noqa: F811
    alone = run(rig, loras=(("a", 0.8),))
    assert np.abs(run(rig, "composite", CompositeParams(), loras=(("a", 0.8),)) - alone).max() < 2 / 255
    two = (("a", 1.0), ("b", 1.0))
    composite = run(rig, "composite", CompositeParams(), loras=two)
    for other in (run(rig, loras=two), alone, run(rig, loras=(("b", 1.0),))):
        assert np.abs(composite - other).max() > 0.01


def test_switch_runs_one_lora_per_step_in_the_stacks_order(rig):  # noqa: F811
    backbone, pipe, host = rig
    denoiser = getattr(pipe, backbone.denoiser)
    seen = []
    inner = denoiser.forward

    def spy(*args, **kwargs):
        seen.append(dict(host.context.active))
        return inner(*args, **kwargs)

    denoiser.forward = spy
    try:
        switched = run(rig, "switch", SwitchParams(every=2), loras=(("a", 1.0), ("b", 0.5)), steps=5)
    finally:
        del denoiser.forward
    per_step = seen[
        :: len(seen) // 5
    ]  # FLUX without true guidance and SDXL's batched guidance: a call a step
    assert per_step == [{"a": 1.0}, {"a": 1.0}, {"b": 0.5}, {"b": 0.5}, {"a": 1.0}]
    assert host.context.active == {}
    merged = run(rig, loras=(("a", 1.0), ("b", 0.5)), steps=5)
    assert np.abs(switched - merged).max() > 0.01
    # a LoRA that stays active longer than the render is that LoRA alone
    first_only = run(rig, "switch", SwitchParams(every=10), loras=(("a", 1.0), ("b", 0.5)))
    assert np.array_equal(first_only, run(rig, loras=(("a", 1.0),)))


def test_switch_and_composite_parameters_are_read_strictly():
    assert params_from_json("switch", {"every": 3}) == SwitchParams(3)
    assert params_from_json("composite", None) == CompositeParams()
    assert [SwitchParams(2).active_at(s, 3) for s in range(8)] == [0, 0, 1, 1, 2, 2, 0, 0]
    for bad, message in [
        ({"every": 0}, "every must be an integer in 1..1000"),
        ({"every": 1.5}, "must be int"),
    ]:
        with pytest.raises(StudioError, match=message):
            params_from_json("switch", bad)
    with pytest.raises(StudioError, match="composite has no parameter every"):
        params_from_json("composite", {"every": 2})


def test_a_batch_whose_images_have_their_own_loras_equals_each_alone(rig):  # noqa: F811
    """One pipeline call, four LoRA stacks (per-sample scales): every image within 1/255 of its request alone."""
    from composer.render import LoraWeight, RenderRequest, render_batch

    backbone, pipe, host = rig
    stacks = [(), (("a", 1.0),), (("b", 0.5),), (("a", 0.7), ("b", 1.0))]
    requests = [
        RenderRequest(
            f"prompt {i}",
            num_inference_steps=3,
            height=32,
            width=32,
            seed=i,
            loras=tuple(LoraWeight(n, w) for n, w in stack),
        )
        for i, stack in enumerate(stacks)
    ]
    batched = render_batch(pipe, backbone, host, requests)
    for request, image in zip(requests, batched, strict=True):
        alone = render_batch(pipe, backbone, host, [request])[0]
        difference = np.abs(np.asarray(image, dtype=int) - np.asarray(alone, dtype=int)).max()
        assert difference <= 1, f"{request.loras}: off by {difference}/255"
    assert host.context.active == {}
    assert np.abs(np.asarray(batched[1], int) - np.asarray(batched[3], int)).max() > 10


def test_text_encoder_loras_mix_per_image_too(tiny_sdxl_factory):
    """A LoRA on the text encoders in a batch of mixed stacks: each prompt is encoded under its own image's
    LoRAs (per-sample scales in the text encoders), so the batch still equals each image alone."""
    from composer.adapters.host import AdapterHost
    from composer.render import LoraWeight, RenderRequest, render_batch
    from tests.helpers import random_lora

    backbone, make = tiny_sdxl_factory
    pipe = make()
    host = AdapterHost.for_pipeline(pipe, backbone)
    host.add("quill", random_lora(pipe, backbone, seed=6, std=0.3, text_encoders=True))
    host.add("ink", random_lora(pipe, backbone, seed=7))
    kw = dict(num_inference_steps=3, height=32, width=32, negative_prompt="blurry")
    requests = [
        RenderRequest("a red circle", seed=1, loras=(LoraWeight("quill"),), **kw),
        RenderRequest("a red circle", seed=1, loras=(LoraWeight("ink"),), **kw),
        RenderRequest("a red circle", seed=1, **kw),
    ]
    batched = render_batch(pipe, backbone, host, requests)
    for request, image in zip(requests, batched, strict=True):
        alone = render_batch(pipe, backbone, host, [request])[0]
        assert np.abs(np.asarray(image, dtype=int) - np.asarray(alone, dtype=int)).max() <= 1
    assert np.abs(np.asarray(batched[0], int) - np.asarray(batched[2], int)).max() > 10
    host.detach()
