"""Test helpers: random LoRAs with non-zero weights, so they change the output."""

from __future__ import annotations

import torch
from torch import nn

from composer.formats.model import LoraFile, ModuleDelta


def random_lora(
    pipe,
    backbone,
    seed: int,
    rank: int = 4,
    alpha: float | None = 2.0,
    std: float = 0.3,
    text_encoders: bool = False,
) -> LoraFile:
    """A LoRA on the backbone's default targets (and, if asked, the text encoders' attention)."""
    g = torch.Generator().manual_seed(seed)
    modules: dict[str, ModuleDelta] = {}
    targets = [(backbone.denoiser, n) for n in backbone.target_modules(getattr(pipe, backbone.denoiser))]
    if text_encoders:
        for te in backbone.text_encoders:
            model = getattr(pipe, te)
            targets += [
                (te, n)
                for n, m in model.named_modules()
                if isinstance(m, nn.Linear) and n.endswith(("q_proj", "k_proj", "v_proj", "out_proj"))
            ]
    for component, name in targets:
        module = getattr(pipe, component).get_submodule(name)
        base = getattr(module, "base", module)
        down = torch.randn(rank, base.in_features, generator=g) * std
        up = torch.randn(base.out_features, rank, generator=g) * std
        delta = ModuleDelta(component, name, "lora", {"down": down, "up": up}, alpha)
        modules[delta.key] = delta
    return LoraFile(modules=modules, source_format="diffusers", family=backbone.family)


def render(pipe, prompt: str = "a red circle on the left", steps: int = 3, seed: int = 0, **kwargs):
    """A small deterministic render as a float numpy array (B, H, W, 3) in [0, 1]."""
    if type(pipe).__name__ == "FluxPipeline":
        kwargs.setdefault("max_sequence_length", 32)
    return pipe(
        prompt=prompt,
        num_inference_steps=steps,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
        height=kwargs.pop("height", 32),
        width=kwargs.pop("width", 32),
        **kwargs,
    ).images


def denoiser_inputs(backbone, pipe, size: int, batch: int = 2, latent: int = 4):
    """Random arguments for one direct call of a tiny pipeline's denoiser: latents of `latent` x `latent`
    (FLUX: packed into 2x2 patches), size conditioning of `size` pixels. Returns (args, kwargs, grid), grid
    being FLUX's (rows, cols) of packed patches (None for a UNet)."""
    import torch

    torch.manual_seed(0)
    c = getattr(pipe, backbone.denoiser).config
    if backbone.family == "sdxl":
        args = (torch.randn(batch, c.in_channels, latent, latent), torch.tensor(500))
        kwargs = dict(
            encoder_hidden_states=torch.randn(batch, 77, c.cross_attention_dim),
            added_cond_kwargs={
                "text_embeds": torch.randn(batch, pipe.text_encoder_2.config.projection_dim),
                "time_ids": torch.tensor([[size, size, 0, 0, size, size]] * batch, dtype=torch.float32),
            },
            return_dict=False,
        )
        return args, kwargs, None
    side = latent // 2
    kwargs = dict(
        hidden_states=torch.randn(batch, side * side, c.in_channels),  # packed 2x2 patches
        encoder_hidden_states=torch.randn(batch, 8, c.joint_attention_dim),
        pooled_projections=torch.randn(batch, c.pooled_projection_dim),
        timestep=torch.tensor([0.5] * batch),
        img_ids=pipe._prepare_latent_image_ids(batch, side, side, "cpu", torch.float32),
        txt_ids=torch.zeros(8, 3),
        guidance=torch.tensor([3.5] * batch) if c.guidance_embeds else None,
        return_dict=False,
    )
    return (), kwargs, (side, side)
