"""The shipped toy base model: loads through the SDXL loading code, keeps SDXL's layout, draws base concepts
that the evaluator recognises, and does not draw held-out subjects."""

from __future__ import annotations

import pytest

import toyworld
from composer.backbones import count_params, get_backbone, load_pipeline
from toyworld import quality
from toyworld.evaluator import Evaluator


@pytest.fixture(scope="module")
def toy():
    return load_pipeline(get_backbone("sdxl"), toyworld.model_dir())


@pytest.fixture(scope="module")
def evaluator():
    return Evaluator.load()


def test_ships_in_diffusers_layout_under_50_mb(toy):
    files = [p for p in toyworld.model_dir().rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 50 * 2**20
    assert type(toy).__name__ == "StableDiffusionXLPipeline"
    for block in get_backbone("sdxl").blora_blocks.values():  # B-LoRA's content and style blocks exist
        toy.unet.get_submodule(block)
    assert count_params(toy.unet) < 10_000_000
    assert len(toy.tokenizer) == len(toy.tokenizer_2) and toy.tokenizer("a red circle").input_ids[1:-1] == [
        320,
        736,
        7117,
    ]


def test_quality_harness_runs_and_the_base_model_draws_base_concepts(toy, evaluator):
    specs = quality.prompt_set("withheld", n=12, seed=1)
    run = quality.generate(toy, specs, per_prompt=2, steps=20, guidance=7.5, seed=1)
    assert len(run.images) == 24 and run.images[0].size == (64, 64)
    figures = quality.measure(evaluator, run)
    assert set(figures) >= {"shape", "colour", "position", "background", "shape_drawn"}
    # small-N versions of what the full run (bench/quality.py, docs/BENCHMARKS.md) measures (0.98 / 0.97 / 1.0)
    assert figures["position"] >= 0.85 and figures["shape"] >= 0.85 and figures["colour"] >= 0.85, figures


def test_held_out_subjects_are_not_drawn_by_the_base_model(toy, evaluator):
    specs = quality.prompt_set("held_out_subjects", n=12, seed=1)
    run = quality.generate(toy, specs, per_prompt=1, steps=20, guidance=7.5, seed=1)
    assert quality.measure(evaluator, run)["shape_drawn"] <= 0.25


def test_base_scenes_hold_no_held_out_concept_and_decoder_scenes_may():
    import numpy as np

    from toyworld import scenes
    from toyworld.train_base import batch_of_scenes

    _, base = batch_of_scenes(np.random.default_rng(0), 64, "base")
    _, every = batch_of_scenes(np.random.default_rng(0), 64, "all")

    def held_out(caption: str) -> bool:
        return bool(set(caption.replace(",", "").split()) & scenes.HELD_OUT_NAMES)

    assert not any(held_out(c) for c in base)
    assert sum(held_out(c) for c in every) >= 8


def test_decoder_focus_draws_that_share_of_scenes_in_the_focus_textures():
    """train_base --vae-focus: the sharpened decoder sees the textures the VAE loses most in a set share of
    its scenes (every object of such a scene), and all other scenes as before."""
    import numpy as np

    from toyworld.train_base import batch_of_scenes

    def focused(caption: str) -> bool:  # every object crosshatched (a two-object caption joins them by "and")
        return caption.count("crosshatched") == 1 + (" and " in caption)

    _, always = batch_of_scenes(np.random.default_rng(0), 32, "all", ("crosshatched",), 1.0)
    _, half = batch_of_scenes(np.random.default_rng(0), 200, "all", ("crosshatched",), 0.5)
    _, never = batch_of_scenes(np.random.default_rng(0), 200, "all", ("crosshatched",), 0.0)
    assert all(focused(c) for c in always)
    assert 0.4 <= np.mean([focused(c) for c in half]) <= 0.65  # the share, plus the few drawn so by chance
    assert np.mean([focused(c) for c in never]) <= 0.1


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--vae-focus", "plaid"], "not toy-world textures"),
        (["--vae-focus", "crosshatched", "--vae-focus-share", "2"], "is a share"),
        (["--vae-focus", "crosshatched"], "needs --vae-scenes all"),
    ],
)
def test_train_base_names_a_bad_focus_before_it_trains(argv, message, monkeypatch, capsys, tmp_path):
    from toyworld import train_base

    monkeypatch.setattr("sys.argv", ["train_base", "--out", str(tmp_path / "m"), *argv])
    with pytest.raises(SystemExit):
        train_base.main()
    assert message in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def test_edge_loss_sees_fine_texture_that_blur_removes():
    """The decoder's edge loss (train_base --vae-edge-weight) is zero for the image itself and grows when
    a fine texture is blurred away, while pixel L1 barely moves: what it adds to the reconstruction loss."""
    import torch
    import torch.nn.functional as F

    from toyworld.train_base import edge_loss

    x = torch.zeros(1, 3, 16, 16)
    x[..., ::2, :] = 1.0  # stripes of period 2 px
    blurred = torch.full_like(x, 0.5)  # what a blurring codec returns
    assert edge_loss(x, x).item() == 0.0
    assert edge_loss(blurred, x).item() >= 1.5 * F.l1_loss(blurred, x).item()  # 1.0 against 0.5


def test_a_unet_takes_a_vae_of_another_latent_width_with_new_in_and_out_convolutions(tiny_sdxl_factory):
    import torch
    from diffusers import AutoencoderKL

    from toyworld.train_base import match_unet_to_vae

    _, make = tiny_sdxl_factory
    pipe = make()
    assert not match_unet_to_vae(pipe)  # the same width: nothing changes
    before = {
        k: v.clone() for k, v in pipe.unet.state_dict().items() if not k.startswith(("conv_in", "conv_out"))
    }
    pipe.vae = AutoencoderKL(**{**pipe.vae.config, "latent_channels": 8})
    assert match_unet_to_vae(pipe)
    assert pipe.unet.config.in_channels == pipe.unet.config.out_channels == 8
    after = pipe.unet.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())  # the rest of the UNet is kept
    latents = pipe.vae.encode(torch.rand(1, 3, 32, 32) * 2 - 1).latent_dist.mean
    assert latents.shape[1] == 8
    n = pipe.unet.config.cross_attention_dim
    out = pipe.unet(
        latents,
        torch.tensor([10]),
        torch.zeros(1, 4, n),
        added_cond_kwargs={
            "text_embeds": torch.zeros(
                1,
                pipe.unet.config.projection_class_embeddings_input_dim
                - 6 * pipe.unet.config.addition_time_embed_dim,
            ),
            "time_ids": torch.zeros(1, 6),
        },
    ).sample
    assert out.shape == latents.shape and torch.count_nonzero(out) == 0  # a zero head until it trains
