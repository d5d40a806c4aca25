"""SDXL: StableDiffusionXLPipeline with a UNet2DConditionModel and two CLIP text encoders."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from composer.backbones.base import SEMANTIC_SIDE, Backbone, Conditioning, on_meta, replace_rows
from composer.backbones.tokenizers import clip_tokenizer
from composer.errors import StudioError

# Same block layout as SDXL (so up_blocks.0.attentions.0/.1 exist for B-LoRA), toy widths.
TINY_UNET = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(32, 64, 64),
    layers_per_block=1,
    transformer_layers_per_block=(1, 1, 2),
    cross_attention_dim=64,  # = text_encoder.hidden + text_encoder_2.hidden, as SDXL's 768 + 1280
    attention_head_dim=(2, 4, 4),
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=6 * 8 + 32,  # 6 time ids x 8 + pooled text_encoder_2 projection
    norm_num_groups=8,
)
TINY_TEXT = dict(
    hidden_size=32,
    intermediate_size=64,
    num_attention_heads=4,
    num_hidden_layers=2,
    max_position_embeddings=77,
)
TINY_MERGES = 8000  # the first 8000 merges of CLIP's BPE: a real tokenizer with an 8.5k vocabulary
TINY_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    block_out_channels=(16, 32),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=8,
    sample_size=32,
)

# SDXL attention linears (560 on the real architecture): q/k/v/out of attn1 and attn2 of every transformer block.
TARGET_PATTERN = r"attn[12]\.(to_q|to_k|to_v|to_out\.0)$"
TRAIN_TIMESTEPS = 1000  # the DDPM schedule SDXL (and the toy model) trained on


def text_encoders(hidden: int = 32, seed: int = 0, num_merges: int = TINY_MERGES, **overrides):
    """The two CLIP text encoders of SDXL at toy size, with the real CLIP tokenizer."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = clip_tokenizer(num_merges)
    config = clip_text_config(tokenizer, hidden, **overrides)
    torch.manual_seed(seed)
    return CLIPTextModel(config), CLIPTextModelWithProjection(config), tokenizer


def clip_text_config(tokenizer, hidden: int = 32, **overrides):
    """A CLIPTextConfig at toy size whose vocabulary and special tokens are the tokenizer's."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        **dict(TINY_TEXT, hidden_size=hidden, **overrides),
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        projection_dim=hidden,
        hidden_act="gelu",
    )


def build_pipeline(
    unet_config: dict, vae_config: dict, text_hidden: int, seed: int = 0, num_merges: int = TINY_MERGES
):
    """An SDXL pipeline from configs with seeded random weights (tiny or toy sizes), no downloads."""
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )

    te1, te2, tokenizer = text_encoders(text_hidden, seed, num_merges)
    torch.manual_seed(seed + 1)
    unet = UNet2DConditionModel(**unet_config)
    torch.manual_seed(seed + 2)
    vae = AutoencoderKL(**vae_config)
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        timestep_spacing="leading",
        steps_offset=1,
    )
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=te1,
        text_encoder_2=te2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=False,
        add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny(seed: int = 0):
    return build_pipeline(TINY_UNET, TINY_VAE, TINY_TEXT["hidden_size"], seed)


def meta_unet() -> nn.Module:
    """SDXL-base's UNet on the meta device (its shipped config): the exact architecture, no memory, no weights."""
    return on_meta("sdxl", "unet")


class UNetCrossAttention:
    """diffusers' AttnProcessor arithmetic for a UNet cross-attention layer, keeping its probabilities when its
    query count is the semantic resolution's (other calls go to the layer's own processor)."""

    def __init__(self, original, store):
        self.original, self.store = original, store

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        queries = hidden_states.shape[1] if hidden_states.ndim == 3 else -1
        plain = attn.spatial_norm is None and attn.group_norm is None and not attn.residual_connection
        if encoder_hidden_states is None or queries != self.store.rows * self.store.cols or not plain:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kw)
        batch, length = encoder_hidden_states.shape[:2]
        attention_mask = attn.prepare_attention_mask(attention_mask, length, batch)
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        key = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
        value = attn.head_to_batch_dim(attn.to_v(encoder_hidden_states))
        probs = attn.get_attention_scores(query, key, attention_mask)  # (B * heads, Q, L)
        self.store.maps.append(probs.reshape(batch, -1, *probs.shape[1:]).mean(dim=1).float())
        out = attn.batch_to_head_dim(torch.bmm(probs, value))
        out = attn.to_out[1](attn.to_out[0](out))
        return out / attn.rescale_output_factor


@dataclass(frozen=True)
class SDXLBackbone(Backbone):
    """SDXL's family methods: a UNet on unpacked latents, CLIP prompt tokens, cross-attention in the `attn2`
    layers, DDPM training (epsilon or v prediction, optional min-SNR-gamma weights)."""

    def native_size(self, pipe) -> int:
        return int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)

    def checkpoint_tokenizers(self, configs: Path, checkpoint: Path) -> dict[str, Any]:
        """SDXL's two CLIP tokenizers, built from open-clip-torch's vocabulary (ids equal OpenAI's); the second
        pads with "!" as SDXL's tokenizer_2 does."""
        if (configs / "tokenizer").is_dir() and (configs / "tokenizer_2").is_dir():
            return {}
        return {"tokenizer": clip_tokenizer(), "tokenizer_2": clip_tokenizer(pad_token="!")}

    def prompt_tokenizer(self, pipe):
        return pipe.tokenizer

    def semantic_grid(self, denoiser, latent_rows: int, latent_cols: int) -> tuple[int, int]:
        """The largest cross-attention feature map whose longer side is at most SEMANTIC_SIDE (32x32 for SDXL at
        1024 px, as CLoRA reads it; 8x8 for the toy model at 64 px), else the smallest."""
        levels = [
            (latent_rows >> i, latent_cols >> i)
            for i, kind in enumerate(denoiser.config.down_block_types)
            if "CrossAttn" in kind
        ]
        if not levels:
            raise StudioError("this UNet has no cross-attention layers to read")
        fitting = [size for size in levels if max(size) <= SEMANTIC_SIDE]
        return max(fitting) if fitting else min(levels)

    def attention_capture(self, name: str, processor, store, latent: tuple[int, int]):
        return UNetCrossAttention(processor, store) if self.cross_attention(name) else None

    def cross_attention(self, name: str) -> bool:
        return name.endswith("attn2.processor")

    def replay_inputs(self, pipe, args: tuple, kwargs: dict, latents: torch.Tensor, timestep) -> tuple:
        sample = pipe.scheduler.scale_model_input(latents, timestep)
        if args:
            return (sample, timestep, *args[2:]), kwargs
        return args, {**kwargs, "sample": sample, "timestep": timestep}

    def call_time(self, args: tuple, kwargs: dict) -> torch.Tensor:
        """The UNet's timestep (second argument, or `timestep`) over SDXL's 1000 training timesteps."""
        timestep = args[1] if len(args) > 1 else kwargs.get("timestep")
        if timestep is None:
            raise StudioError("this SDXL denoiser call carries no timestep")
        return torch.as_tensor(timestep).float() / TRAIN_TIMESTEPS

    def with_text(self, kwargs: dict, rows: torch.Tensor, cond: Conditioning) -> dict:
        """The prompt embeddings and the pooled embedding SDXL adds to the time embedding (`text_embeds`)."""
        added = dict(kwargs.get("added_cond_kwargs") or {})
        if "text_embeds" not in added:
            raise StudioError("this SDXL denoiser call carries no pooled text embedding (added_cond_kwargs)")
        added["text_embeds"] = replace_rows(added["text_embeds"], rows, cond.pooled, "pooled embedding")
        text = replace_rows(self.call_text(kwargs), rows, cond.embeds, "prompt embeddings")
        return {**kwargs, "encoder_hidden_states": text, "added_cond_kwargs": added}

    def training_noise(self, pipe, snr_gamma: float | None):
        from diffusers import DDPMScheduler

        noise = DDPMScheduler.from_config(pipe.scheduler.config)
        if noise.config.prediction_type not in ("epsilon", "v_prediction"):
            raise StudioError(
                f"cannot train a model predicting {noise.config.prediction_type!r} (epsilon, v_prediction)"
            )
        return noise

    def encode_caption(self, pipe, caption: str, device) -> Conditioning:
        embeds, _, pooled, _ = pipe.encode_prompt(
            caption, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        return Conditioning(embeds.float(), pooled.float())

    def training_loss(self, objective, x0, cond, generator, dtype) -> torch.Tensor:
        """DDPM noise at a uniform timestep; the UNet predicts epsilon (or v, by the scheduler's config); with
        `snr_gamma`, each sample's loss is weighted by `objective.snr_weights`."""
        noise_schedule = objective.noise
        b, device = x0.shape[0], x0.device
        noise = torch.randn(x0.shape, generator=generator).to(x0)
        steps = noise_schedule.config.num_train_timesteps
        t = torch.randint(0, steps, (b,), generator=generator).to(device)
        noisy = noise_schedule.add_noise(x0, noise, t)
        kind = noise_schedule.config.prediction_type
        target = noise if kind == "epsilon" else noise_schedule.get_velocity(x0, noise, t)
        h = w = objective.size
        time_ids = torch.tensor([[h, w, 0, 0, h, w]], device=device, dtype=dtype).repeat(b, 1)
        embeds = torch.cat([c.embeds for c in cond]).to(device, dtype)
        pooled = torch.cat([c.pooled for c in cond]).to(device, dtype)
        pred = objective.pipe.unet(
            noisy.to(dtype),
            t,
            embeds,
            added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids},
        ).sample
        if objective.snr_gamma is None:
            return F.mse_loss(pred.float(), target.float())
        per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        return (per_sample * objective.snr_weights(t).to(per_sample)).mean()


BACKBONE = SDXLBackbone(
    family="sdxl",
    pipeline_class="StableDiffusionXLPipeline",
    denoiser="unet",
    text_encoders=("text_encoder", "text_encoder_2"),
    target_pattern=TARGET_PATTERN,
    build_tiny=tiny,
    build_meta_denoiser=meta_unet,
    blora_blocks={"content": "up_blocks.0.attentions.0", "style": "up_blocks.0.attentions.1"},
    checkpoint_marker=("model.diffusion_model.label_emb.",),  # SDXL's size/pooled-text embedding
    checkpoint_foreign=("conditioner.embedders.0.model.", "edm_mean"),  # the refiner; Playground v2.5
    checkpoint_components={
        "unet": ("model.diffusion_model.",),
        "vae": ("first_stage_model.",),
        "text_encoder": ("conditioner.embedders.0.transformer.",),
        "text_encoder_2": ("conditioner.embedders.1.model.",),
    },
    default_steps=30,
    default_guidance=5.0,
)
