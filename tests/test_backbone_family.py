"""Backbones own their family: methods, seams and the trainer never branch on it; each family's latent grid,
prompt tokens, attention capture and denoiser replay agree with what its pipeline really does."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import torch

from composer.backbones import BACKBONES, get_backbone
from composer.backbones.base import Backbone
from composer.backbones.sdxl import SDXLBackbone
from composer.errors import BackboneError, StudioError
from composer.seams.attention import MapStore, capture_cross_attention
from tests.helpers import denoiser_inputs

ROOT = Path(__file__).resolve().parent.parent
FAMILY_BRANCH = re.compile(r"family\s*==|family\s*!=|\.family\s+in\b|[\"']flux[\"']|[\"']sdxl[\"']")
SIZE = 32


def test_methods_seams_and_trainer_never_branch_on_the_family():
    found = []
    for package in ("composer/methods", "composer/seams", "composer/train"):
        for path in sorted((ROOT / package).rglob("*.py")):
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if FAMILY_BRANCH.search(line):
                    found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not found, "family branches outside composer/backbones:\n" + "\n".join(found)


def test_the_registry_is_keyed_by_each_backbones_family_and_replace_keeps_the_family_class():
    assert all(name == backbone.family for name, backbone in BACKBONES.items())
    assert all(type(backbone) is not Backbone for backbone in BACKBONES.values())
    tuned = dataclasses.replace(get_backbone("sdxl"), default_guidance=7.5)  # as app/studio.py does
    assert isinstance(tuned, SDXLBackbone) and tuned.default_guidance == 7.5


def test_a_family_without_its_methods_is_refused_by_name():
    sdxl = get_backbone("sdxl")
    bare = Backbone(**{f.name: getattr(sdxl, f.name) for f in dataclasses.fields(sdxl)} | {"family": "sd3"})
    with pytest.raises(BackboneError, match="sd3 backbone does not support replaying"):
        bare.replay_inputs(None, (), {}, torch.zeros(1), 1)
    with pytest.raises(BackboneError, match="sd3 backbone does not support training"):
        bare.training_noise(None, None)
    with pytest.raises(StudioError, match="cross-attention maps of a sd3 denoiser"):
        bare.attention_capture("x", None, None, (4, 4))


def _family(request, family):
    return request.getfixturevalue("tiny_sdxl_factory" if family == "sdxl" else "tiny_flux_factory")


def _record_denoiser(denoiser, calls):
    original = denoiser.forward

    def forward(*args, **kwargs):
        out = original(*args, **kwargs)
        calls.append((args, kwargs, out[0] if isinstance(out, tuple) else out.sample))
        return out

    denoiser.forward = forward


@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_latent_grid_is_what_the_pipeline_denoises(family, request):
    backbone, make = _family(request, family)
    pipe = make()
    seen = []

    def step_end(pipe_, step, timestep, tensors):
        seen.append(tuple(tensors["latents"].shape))
        return tensors

    pipe("a cat", num_inference_steps=1, height=SIZE, width=SIZE, callback_on_step_end=step_end)
    rows, cols = backbone.latent_size(pipe, SIZE, SIZE)
    grid = backbone.patch_grid(pipe, SIZE, SIZE)
    if grid is None:  # the denoiser takes the latents as an image
        assert seen[0][-2:] == (rows, cols)
    else:  # packed patches: a sequence of grid rows x cols
        assert seen[0][1] == grid[0] * grid[1] and grid == (rows // 2, cols // 2)
    assert backbone.native_size(pipe) > 0 and backbone.native_size(pipe) % 8 == 0


@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_replaying_a_recorded_call_at_the_next_latents_gives_the_pipelines_next_call(family, request):
    backbone, make = _family(request, family)
    pipe = make()
    denoiser = getattr(pipe, backbone.denoiser)
    calls, replayed = [], []

    def step_end(pipe_, step, timestep, tensors):  # where CLoRA replays: the scheduler is at the next step
        if step == 0:
            args, kwargs, _ = calls[0]
            following = pipe_.scheduler.timesteps[1]
            replayed.append(
                backbone.replay_inputs(pipe_, args, kwargs, tensors["latents"].clone(), following)
            )
        return tensors

    _record_denoiser(denoiser, calls)
    try:
        with torch.no_grad():
            pipe(
                "a cat",
                num_inference_steps=3,
                height=SIZE,
                width=SIZE,
                guidance_scale=1.0 if family == "sdxl" else 3.5,  # no CFG doubling: one sample per call
                callback_on_step_end=step_end,
            )
            del denoiser.forward
            out = denoiser(*replayed[0][0], **replayed[0][1])
    finally:
        vars(denoiser).pop("forward", None)
    out = out[0] if isinstance(out, tuple) else out.sample
    assert torch.allclose(out, calls[1][2], atol=1e-5)


@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_prompt_tokens_come_from_the_stream_the_denoiser_attends_to(family, request):
    backbone, make = _family(request, family)
    pipe = make()
    tokenizer = pipe.tokenizer if family == "sdxl" else pipe.tokenizer_2
    assert backbone.prompt_tokenizer(pipe) is tokenizer
    assert (
        backbone.token_ids(pipe, "a xyvo", special=False)
        == tokenizer("a xyvo", add_special_tokens=False).input_ids
    )
    expected = 77 if family == "sdxl" else min(512, tokenizer.model_max_length)
    assert backbone.prompt_length(pipe) == expected


def test_flux_capture_honours_fused_projections(tiny_flux_factory):
    backbone, make = tiny_flux_factory
    pipe = make()
    denoiser = pipe.transformer
    args, kwargs, _ = denoiser_inputs(backbone, pipe, SIZE)
    maps = []
    with torch.no_grad():
        for fused in (False, True):
            if fused:
                for module in denoiser.modules():
                    if hasattr(module, "fuse_projections") and hasattr(module, "to_q"):
                        module.fuse_projections()
                assert any(getattr(m, "fused_projections", False) for m in denoiser.modules())
            store = MapStore(*backbone.semantic_grid(denoiser, 4, 4))
            plain = denoiser(*args, **kwargs)[0]
            with capture_cross_attention(backbone, denoiser, store, (4, 4)):
                read = denoiser(*args, **kwargs)[0]
            assert torch.allclose(read, plain, atol=1e-5)
            maps.append(store.mean())
    assert torch.allclose(maps[0], maps[1], atol=1e-5)
