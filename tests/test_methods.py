"""Composition methods: every registered method runs and leaves the pipeline as it found it; regional masks put
each LoRA's prediction exactly where it is painted; masks and parameters are read strictly."""

from __future__ import annotations

import base64
import dataclasses
import io

import numpy as np
import pytest
import torch
from PIL import Image

from composer.adapters.host import AdapterHost
from composer.errors import StudioError
from composer.masks import PALETTE, Mask, MaskError, RegionMasks
from composer.methods import (
    METHODS,
    CLoRAParams,
    MergeParams,
    RegionalParams,
    params_from_json,
    params_to_json,
)
from composer.render import LoraWeight, RenderRequest, render_batch
from composer.seams.streams import blend_weights, denoise_in_streams
from tests.helpers import denoiser_inputs

SIZE = 32  # pixels; the tiny models' latents are 4x4 (SDXL) / 2x2 patches (FLUX) at this size


def half_mask(side: str, size: int = SIZE) -> Mask:
    """White on the `side` ("left" or "right") half."""
    values = np.zeros((size, size), np.uint8)
    if side == "left":
        values[:, : size // 2] = 255
    else:
        values[:, size // 2 :] = 255
    return Mask(size, size, values.tobytes())


def full_mask(size: int = SIZE) -> Mask:
    return Mask(size, size, bytes([255]) * size * size)


@pytest.fixture(scope="module", params=["sdxl", "flux"])
def rig(request, tiny_sdxl_factory, tiny_flux_factory):
    """A tiny pipeline with two resident random LoRAs, "a" and "b"."""
    from tests.helpers import random_lora

    backbone, make = tiny_sdxl_factory if request.param == "sdxl" else tiny_flux_factory
    pipe = make()
    host = AdapterHost.for_pipeline(pipe, backbone)
    host.add("a", random_lora(pipe, backbone, seed=1))
    host.add("b", random_lora(pipe, backbone, seed=2))
    yield backbone, pipe, host
    host.detach()


TRIGGERS = {"a": ["red"], "b": ["circle"]}  # words of the prompt below, standing for the LoRAs' concepts


def run(rig, method="merge", params=None, loras=(("a", 1.0),), pictures=None, steps=3, seed=0):
    backbone, pipe, host = rig
    request = RenderRequest(
        "a red circle on the left",
        num_inference_steps=steps,
        height=SIZE,
        width=SIZE,
        seed=seed,
        loras=tuple(LoraWeight(n, w) for n, w in loras),
        method=method,
        method_params=params,
    )
    image = render_batch(pipe, backbone, host, [request], pictures=pictures, triggers=TRIGGERS)[0]
    return np.asarray(image, dtype=np.float32) / 255.0


def test_every_registered_method_runs_and_restores_the_pipeline(rig):
    backbone, pipe, host = rig
    denoiser = getattr(pipe, backbone.denoiser)
    base = run(rig, loras=())
    variants = [(name, params()) for name, params in METHODS.items() if name not in ("regional", "clora")]
    variants += [
        ("regional", RegionalParams(RegionMasks.of({"a": half_mask("left")}))),
        ("regional", RegionalParams(RegionMasks.of({"a": half_mask("left")}), passes="single")),
        ("clora", CLoRAParams(update_until=1.0)),
        ("clora", CLoRAParams(prompts="per-lora", concepts="a: crimson\nb: disc", refine=2)),
    ]
    for name, sample in variants:
        changed = run(rig, name, sample, loras=(("a", 1.0), ("b", 0.5)))
        assert np.abs(changed - base).max() > 0.01, f"{name} changed nothing"
        assert "forward" not in vars(denoiser), f"{name} left its denoiser wrapper on"
        assert host.context.active == {} and host.context.fused == {}
        assert np.array_equal(run(rig, loras=()), base), f"{name} left the pipeline changed"


def test_regional_without_masks_is_a_merge_and_one_full_mask_is_that_lora_alone(rig):
    merged = run(rig, loras=(("a", 1.0), ("b", 0.7)))
    assert np.array_equal(run(rig, "regional", RegionalParams(), loras=(("a", 1.0), ("b", 0.7))), merged)
    # a covers every pixel, b has no mask: one stream of a + b, which is the merge again
    everywhere = RegionalParams(RegionMasks.of({"a": full_mask()}))
    assert np.abs(run(rig, "regional", everywhere, loras=(("a", 1.0), ("b", 0.7))) - merged).max() < 2 / 255
    alone = run(rig, loras=(("a", 1.0),))
    assert np.abs(run(rig, "regional", everywhere, loras=(("a", 1.0),)) - alone).max() < 2 / 255


def run_prompt(rig, prompt, method="merge", params=None, loras=(("a", 1.0),)):
    backbone, pipe, host = rig
    request = RenderRequest(
        prompt,
        num_inference_steps=3,
        height=SIZE,
        width=SIZE,
        loras=tuple(LoraWeight(n, w) for n, w in loras),
        method=method,
        method_params=params,
    )
    image = render_batch(pipe, backbone, host, [request], triggers=TRIGGERS)[0]
    return np.asarray(image, dtype=np.float32) / 255.0


def test_a_region_prompt_denoises_its_region_with_that_prompt(rig):
    """Streams mode: a region covering everything with its own prompt is a plain render of that prompt (the
    unconditional half keeps the request's negative). Either mode: a region prompt equal to the request's
    changes nothing, another one changes the render."""
    backbone = rig[0]
    loras = (("a", 1.0), ("b", 0.7))
    whole = RegionMasks.of({"a": full_mask()})
    request_prompt = "a red circle on the left"
    other = run_prompt(rig, "a blue square at the top", loras=loras)
    swapped = RegionalParams(whole, prompts="a: a blue square at the top", prompt_mode="streams")
    got = run_prompt(rig, request_prompt, "regional", swapped, loras)
    assert np.abs(got - other).max() < 2 / 255
    assert np.abs(got - run_prompt(rig, request_prompt, loras=loras)).max() > 0.01
    left = RegionMasks.of({"a": half_mask("left")})
    plain = run_prompt(rig, request_prompt, "regional", RegionalParams(left), loras)
    for mode in ("streams", "attention"):
        same = RegionalParams(left, prompts=f"a: {request_prompt}", prompt_mode=mode)
        changed = RegionalParams(left, prompts="a: a blue square at the top", prompt_mode=mode)
        if mode == "attention" and backbone.family == "flux":
            with pytest.raises(StudioError, match="need cross-attention layers; this flux denoiser has none"):
                run_prompt(rig, request_prompt, "regional", changed, loras)
            continue
        assert np.abs(run_prompt(rig, request_prompt, "regional", same, loras) - plain).max() < 2 / 255, mode
        assert np.abs(run_prompt(rig, request_prompt, "regional", changed, loras) - plain).max() > 0.01, mode


def test_a_region_reads_its_own_prompt_in_cross_attention(tiny_sdxl_factory):
    """One cross-attention layer given two prompts side by side: each pixel's output is the plain layer's
    output on the prompt its region picks, bit for bit."""
    from composer.seams.attention import RegionText

    backbone, make = tiny_sdxl_factory
    unet = make().unet
    name = next(n for n in unet.attn_processors if backbone.cross_attention(n))
    attn = unet.get_submodule(name.removesuffix(".processor"))
    processor = unet.attn_processors[name]
    rows = cols = 4
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(2, rows * cols, attn.to_q.in_features, generator=g)
    first, second = (torch.randn(2, 7, attn.to_k.in_features, generator=g) for _ in range(2))
    left = torch.zeros(rows, cols)
    left[:, : cols // 2] = 1
    weights = torch.stack([1 - left, left]).reshape(2, rows * cols, 1)
    with torch.no_grad():
        out = RegionText(processor, lambda q: weights, 2)(attn, pixels, torch.cat([first, second], dim=1))
        on_first, on_second = processor(attn, pixels, first), processor(attn, pixels, second)
    by_pixel = left.flatten().bool()
    assert torch.allclose(out[:, by_pixel], on_second[:, by_pixel], atol=1e-6)
    assert torch.allclose(out[:, ~by_pixel], on_first[:, ~by_pixel], atol=1e-6)
    assert not torch.allclose(on_first, on_second, atol=1e-3)


def test_region_prompts_are_read_strictly():
    painted = RegionMasks.of({"a": half_mask("left"), "b": half_mask("right")})
    params = RegionalParams(
        painted, prompts="a: a red star on the left\nb: a blue heart; ", prompt_mode="streams"
    )
    assert params_from_json("regional", params_to_json(params)) == params
    params.check(["a", "b"])
    cases = [
        ("a red star", "region prompt 'a red star': write `name: its prompt`"),
        ("a:", "region prompt 'a:': write `name: its prompt`"),
        ("a: one\na: two", "'a' is given twice"),
        ("a: " + "x" * 2001, "has 2001 characters; at most 2000"),
    ]
    for text, message in cases:
        with pytest.raises(StudioError, match=message):
            RegionalParams(painted, prompts=text)
    with pytest.raises(StudioError, match="regional.prompts must be str"):
        params_from_json("regional", {"prompts": 3})
    with pytest.raises(StudioError, match="a region prompt for b, which has no painted region"):
        RegionalParams(RegionMasks.of({"a": half_mask("left")}), prompts="b: x").check(["a", "b"])


def test_each_stream_owns_its_pixels_in_one_batched_pass(rig):
    """Left half from LoRA a's prediction, right half from b's, bit for bit, in a single denoiser call."""
    backbone, pipe, host = rig
    denoiser = getattr(pipe, backbone.denoiser)
    args, kwargs, grid = denoiser_inputs(backbone, pipe, SIZE)
    with torch.no_grad():
        with host.activate({"a": 1.0}):
            only_a = denoiser(*args, **kwargs)[0]
        with host.activate({"b": 0.5}):
            only_b = denoiser(*args, **kwargs)[0]
        left = torch.zeros(SIZE, SIZE)
        left[:, : SIZE // 2] = 1
        calls = []
        with denoise_in_streams(
            denoiser,
            host,
            [{"a": 1.0}, {"b": 0.5}],
            torch.stack([left, 1 - left]),
            grid,
            lambda *_: calls.append(1),
        ):
            blended = denoiser(*args, **kwargs)[0]
    assert calls == [1]
    if grid is None:  # (B, C, h, w): columns 0-1 are left
        assert torch.allclose(blended[..., :2], only_a[..., :2], atol=1e-5)
        assert torch.allclose(blended[..., 2:], only_b[..., 2:], atol=1e-5)
        assert not torch.allclose(only_a, only_b, atol=1e-3)
    else:  # (B, 4 patches, C) in row-major order: patches 0 and 2 are the left column
        assert torch.allclose(blended[:, [0, 2]], only_a[:, [0, 2]], atol=1e-5)
        assert torch.allclose(blended[:, [1, 3]], only_b[:, [1, 3]], atol=1e-5)
    assert "forward" not in vars(denoiser)


def test_regional_render_shows_its_masks_and_keeps_loras_apart(rig):
    backbone, pipe, host = rig
    pictures = []
    params = RegionalParams(RegionMasks.of({"a": half_mask("left"), "b": half_mask("right")}))
    image = run(rig, "regional", params, loras=(("a", 1.0), ("b", 1.0)), pictures=pictures)
    assert [caption for caption, _ in pictures] == ["region: a (50%)", "region: b (50%)"]
    assert all(p.size == (SIZE, SIZE) for _, p in pictures)
    assert np.asarray(pictures[0][1])[:, : SIZE // 2].min() == 255
    merged = run(rig, loras=(("a", 1.0), ("b", 1.0)))
    assert np.abs(image - merged).max() > 0.01  # not a merge
    # one LoRA painted on the left only: the pixels nobody painted get the base model's stream
    pictures = []
    run(
        rig,
        "regional",
        RegionalParams(RegionMasks.of({"a": half_mask("left")}), feather=2),
        pictures=pictures,
    )
    assert [c for c, _ in pictures] == ["region: a (50%)", "region: no mask (50%)"]


def test_masks_from_a_painted_canvas_and_from_json():
    canvas = Image.new("RGBA", (8, 4), (255, 255, 255, 255))
    for x in range(4):
        canvas.putpixel((x, 0), PALETTE[0] + (255,))
        canvas.putpixel(
            (x + 4, 1), (PALETTE[1][0] + 20, PALETTE[1][1] - 10, PALETTE[1][2], 255)
        )  # antialiased
    masks = RegionMasks.from_colour_map(canvas, ["star", "heart", "ring"])
    assert masks.names() == ["star", "heart"]  # ring's colour was not painted: it acts everywhere
    assert masks.get("star").coverage() == pytest.approx(4 / 32)
    assert np.asarray(masks.get("heart").to_image())[1, 4:].tolist() == [255] * 4
    back = RegionMasks.from_json(masks.to_json())
    assert back == masks
    buffer = io.BytesIO()
    Image.new("L", (8, 4), 255).save(buffer, format="PNG")
    plain = RegionMasks.from_json({"star": base64.b64encode(buffer.getvalue()).decode()})
    assert plain.get("star").coverage() == 1.0
    transparent = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    transparent.putpixel((0, 0), (0, 0, 0, 255))
    assert Mask.from_image(transparent).coverage() == pytest.approx(1 / 16)  # alpha carries the region
    with pytest.raises(MaskError, match="the mask of 'star' is not base64"):
        RegionMasks.from_json({"star": "%%%"})
    with pytest.raises(MaskError, match="not a picture"):
        RegionMasks.from_json({"star": base64.b64encode(b"hello").decode()})
    with pytest.raises(MaskError, match="one size"):
        RegionMasks.of({"a": half_mask("left", 8), "b": half_mask("left", 16)})
    with pytest.raises(MaskError, match="8 colours"):
        RegionMasks.from_colour_map(canvas, [str(i) for i in range(9)])


def test_method_parameters_are_read_strictly():
    regional = params_from_json("regional", {"regions": {"a": half_mask("left").encode()}, "feather": 3})
    assert regional == RegionalParams(RegionMasks.of({"a": half_mask("left")}), 3)
    assert params_from_json("regional", params_to_json(regional)) == regional
    assert params_from_json("merge", None) == MergeParams()
    request = RenderRequest("x", loras=(LoraWeight("a"),), method="regional", method_params=regional)
    assert RenderRequest.from_json(request.to_json()) == request
    cases = [
        (
            "blend",
            {},
            "unknown composition method 'blend'; choose merge, switch, composite, cmlora, regional, clora",
        ),
        ("merge", {"feather": 1}, "merge has no parameter feather"),
        ("regional", {"feather": "2"}, "regional.feather must be int"),
        ("regional", {"feather": 999}, "feather must be an integer in 0..256"),
        ("regional", {"regions": ["a"]}, "regional.regions: regions must be an object"),
    ]
    for method, data, message in cases:
        with pytest.raises(StudioError, match=message):
            params_from_json(method, data)
    with pytest.raises(StudioError, match="masks for LoRAs not in the stack: b"):
        RenderRequest(
            "x",
            loras=(LoraWeight("a"),),
            method="regional",
            method_params=RegionalParams(RegionMasks.of({"b": full_mask()})),
        ).validate()
    with pytest.raises(StudioError, match="parameters of 'merge' given for method 'regional'"):
        RenderRequest("x", method="regional", method_params=MergeParams()).validate()


def test_blend_weights_refuse_uncovered_pixels_and_bad_shapes():
    with pytest.raises(StudioError, match="belong to no stream"):
        blend_weights(torch.zeros(2, 4, 4), torch.Size([1, 4, 4, 4]), None)
    with pytest.raises(StudioError, match="does not match the latent grid"):
        blend_weights(torch.ones(1, 4, 4), torch.Size([1, 5, 8]), (2, 2))


def test_every_method_file_is_registered():
    from pathlib import Path

    import composer.methods as package

    contract = {"__init__", "base"}  # the registry and the method contract; seams live in composer.seams
    files = {p.stem for p in Path(package.__file__).parent.glob("*.py")} - contract
    registered = {cls.__module__.rsplit(".", 1)[1] for cls in METHODS.values()}
    assert files == registered, f"method files not in composer.methods.METHODS: {files - registered}"


def test_a_method_declares_gradients_on_its_class_and_the_render_honours_it(monkeypatch, tiny_sdxl_factory):
    from contextlib import contextmanager
    from typing import ClassVar

    from composer.methods import CompositionParams, MethodRun

    assert CLoRAParams.needs_grad and not MergeParams.needs_grad and not RegionalParams.needs_grad
    assert all("needs_grad" not in {f.name for f in dataclasses.fields(cls)} for cls in METHODS.values())
    assert not hasattr(MethodRun, "needs_grad")  # apply no longer flips it on the run
    modes = []

    @dataclasses.dataclass(frozen=True)
    class GradProbe(CompositionParams):
        needs_grad: ClassVar[bool] = True

        def check(self, stack):
            return None

        @contextmanager
        def apply(self, run):
            def record(pipe, step, timestep, tensors):
                modes.append(torch.is_inference_mode_enabled())
                return tensors

            run.step_end.append(record)
            yield

    @dataclasses.dataclass(frozen=True)
    class PlainProbe(GradProbe):
        needs_grad: ClassVar[bool] = False

    backbone, make = tiny_sdxl_factory
    pipe = make()
    host = AdapterHost.for_pipeline(pipe, backbone)
    for cls, inference in ((GradProbe, False), (PlainProbe, True)):
        monkeypatch.setitem(METHODS, "probe", cls)
        modes.clear()
        request = RenderRequest("a cat", num_inference_steps=1, height=SIZE, width=SIZE, method="probe")
        render_batch(pipe, backbone, host, [request])
        assert modes == [inference]
    host.detach()


def test_the_stack_is_named_entries_and_scales_read_them():
    from composer.methods import MethodRun, StackEntry

    stack = [StackEntry("star", "star#1", 0.8), StackEntry("heart", "heart", 1.0)]
    run = MethodRun(pipe=None, backbone=None, host=None, stack=stack, height=SIZE, width=SIZE)
    assert run.scales == {"star#1": 0.8, "heart": 1.0}
    with pytest.raises(dataclasses.FrozenInstanceError):
        stack[0].weight = 2.0


def test_sampling_defaults_fill_in_the_backbones_where_the_request_has_none(tiny_sdxl_factory):
    from composer.render import sampling_defaults

    backbone, _ = tiny_sdxl_factory
    assert sampling_defaults(RenderRequest("x"), backbone) == (
        backbone.default_steps,
        backbone.default_guidance,
    )
    assert sampling_defaults(RenderRequest("x", num_inference_steps=7, guidance_scale=0.0), backbone) == (
        7,
        0.0,
    )
