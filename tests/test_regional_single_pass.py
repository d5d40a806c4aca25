"""Single-pass regional: each painted LoRA's change is masked inside every adapted layer, so one denoiser pass
serves every region. Exact at the layer, the whole stack's merge under a full mask, one pass per step."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from composer.adapters.base import MixingContext
from composer.adapters.host import AdapterHost
from composer.adapters.layer import AdaptedModule
from composer.adapters.lora import LoraAdapter
from composer.adapters.spatial import SpatialScale, TokenGeometry
from composer.errors import StudioError
from composer.masks import RegionMasks
from composer.methods import RegionalParams
from tests.test_methods import SIZE, full_mask, half_mask, rig, run  # noqa: F401

LEFT = torch.zeros(8, 8)
LEFT[:, :4] = 1.0


def lora_on(base: nn.Module, seed: int) -> LoraAdapter:
    g = torch.Generator().manual_seed(seed)
    if isinstance(base, nn.Conv2d):
        down = torch.randn(2, base.in_channels, *base.kernel_size, generator=g)
        up = torch.randn(base.out_channels, 2, 1, 1, generator=g)
    else:
        down = torch.randn(2, base.in_features, generator=g)
        up = torch.randn(base.out_features, 2, generator=g)
    adapter = LoraAdapter(base, down, up, alpha=None)
    return adapter


def layer_with(base: nn.Module, **scales) -> tuple[AdaptedModule, MixingContext]:
    context = MixingContext()
    layer = AdaptedModule(base, context, "test")
    for i, name in enumerate(["a", "b"]):
        layer.add(name, lora_on(base, i))
    context.active = scales
    return layer, context


@torch.no_grad()
def test_a_conv_layer_applies_the_delta_only_inside_the_mask():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, 3, padding=1)
    x = torch.randn(2, 3, 8, 8)
    geometry = TokenGeometry((8, 8), 77)
    masked, _ = layer_with(conv, a=SpatialScale(0.7, LEFT, geometry))
    full, _ = layer_with(conv, a=0.7)
    y, ref = masked(x), full(x)
    assert torch.allclose(y[..., :4], ref[..., :4], atol=1e-5)  # inside: the LoRA at its weight
    assert torch.allclose(y[..., 4:], conv(x)[..., 4:], atol=1e-6)  # outside: the base layer
    assert not torch.allclose(ref[..., 4:], conv(x)[..., 4:], atol=1e-3)


@torch.no_grad()
def test_token_layers_mask_image_tokens_at_every_level_and_leave_text_tokens_whole():
    torch.manual_seed(0)
    linear = nn.Linear(6, 4)
    geometry = TokenGeometry((8, 8), 77)
    # two LoRAs on opposite halves, stacked into one pair of matmuls
    both, _ = layer_with(linear, a=SpatialScale(1.0, LEFT, geometry), b=SpatialScale(0.5, 1 - LEFT, geometry))
    only_a, _ = layer_with(linear, a=1.0)
    only_b, _ = layer_with(linear, b=0.5)
    for rows, cols in [(8, 8), (4, 4), (2, 2)]:  # a UNet's levels: the mask is resized to each
        x = torch.randn(2, rows * cols, 6)
        left = torch.zeros(rows, cols, dtype=torch.bool)
        left[:, : cols // 2] = True
        left = left.flatten()
        y = both(x)
        assert torch.allclose(y[:, left], only_a(x)[:, left], atol=1e-5)
        assert torch.allclose(y[:, ~left], only_b(x)[:, ~left], atol=1e-5)
    text = torch.randn(2, 77, 6)  # cross-attention keys and values read the text: both LoRAs at full weight
    merged, _ = layer_with(linear, a=1.0, b=0.5)
    assert torch.allclose(both(text), merged(text), atol=1e-5)
    time = torch.randn(2, 6)  # a time embedding: no tokens either
    assert torch.allclose(both(time), merged(time), atol=1e-5)


@torch.no_grad()
def test_flux_joint_sequences_mask_the_image_part_only():
    torch.manual_seed(0)
    linear = nn.Linear(6, 4)
    geometry = TokenGeometry((8, 8), 5)  # packed patches and 5 text tokens
    masked, _ = layer_with(linear, a=SpatialScale(1.0, LEFT, geometry))
    full, _ = layer_with(linear, a=1.0)
    x = torch.randn(1, 5 + 64, 6)  # FLUX single blocks: [text | image]
    left = torch.cat([torch.ones(5, dtype=torch.bool), LEFT.flatten().bool()])
    assert torch.allclose(masked(x)[:, left], full(x)[:, left], atol=1e-5)
    assert torch.allclose(masked(x)[:, ~left], linear(x)[:, ~left], atol=1e-6)


def test_one_full_mask_in_a_single_pass_is_the_merge(rig):  # noqa: F811
    merged = run(rig, loras=(("a", 1.0), ("b", 0.7)))
    everywhere = RegionalParams(RegionMasks.of({"a": full_mask()}), passes="single")
    assert np.abs(run(rig, "regional", everywhere, loras=(("a", 1.0), ("b", 0.7))) - merged).max() <= 1 / 255
    alone = run(rig, loras=(("a", 1.0),))
    assert np.abs(run(rig, "regional", everywhere, loras=(("a", 1.0),)) - alone).max() <= 1 / 255


def test_single_pass_runs_one_pass_per_step_and_differs_from_merge(rig):  # noqa: F811
    backbone, pipe, host = rig
    denoiser = getattr(pipe, backbone.denoiser)
    batches = []
    entry = getattr(denoiser, "conv_in", None) or denoiser.x_embedder  # the latents' first layer
    hook = entry.register_forward_pre_hook(lambda module, args: batches.append(args[0].shape[0]))
    halves = RegionMasks.of({"a": half_mask("left"), "b": half_mask("right")})
    try:
        single = run(rig, "regional", RegionalParams(halves, passes="single"), loras=(("a", 1.0), ("b", 1.0)))
        one_pass = list(batches)
        batches.clear()
        run(rig, "regional", RegionalParams(halves), loras=(("a", 1.0), ("b", 1.0)))
        per_region = list(batches)
    finally:
        hook.remove()
    assert len(one_pass) == len(per_region) == 3  # one call per step either way
    assert [b * 2 for b in one_pass] == per_region  # but per-region batches a stream per painted LoRA
    merged = run(rig, loras=(("a", 1.0), ("b", 1.0)))
    assert np.abs(single - merged).max() > 0.01
    assert "forward" not in vars(denoiser) and host.context.active == {}


def test_streams_mode_prompts_need_a_stream_per_region():
    with pytest.raises(StudioError, match="passes=per-region"):
        RegionalParams(prompts="a: a dog", prompt_mode="streams", passes="single")
    RegionalParams(prompts="a: a dog", prompt_mode="attention", passes="single")  # fine


def test_a_size_whose_image_tokens_count_as_many_as_the_texts_is_refused():
    from composer.seams.streams import denoise_in_one_pass

    class Denoiser(nn.Module):
        def forward(self, hidden_states, encoder_hidden_states):
            return hidden_states

    geometry = TokenGeometry()
    denoiser = Denoiser()
    host = AdapterHost({})
    with denoise_in_one_pass(denoiser, host, {}, geometry, grid=(16, 32)):
        with pytest.raises(StudioError, match="cannot tell image tokens from the 512 text tokens"):
            denoiser(hidden_states=torch.zeros(1, 512, 4), encoder_hidden_states=torch.zeros(1, 512, 8))
        denoiser(hidden_states=torch.zeros(1, 512, 4), encoder_hidden_states=torch.zeros(1, 77, 8))  # fine
        # packed patches have one level: a text as long as a quarter of the grid is no image level
        denoiser(hidden_states=torch.zeros(1, 512, 4), encoder_hidden_states=torch.zeros(1, 128, 8))
