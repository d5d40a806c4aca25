"""SDXL: StableDiffusionXLPipeline with a UNet2DConditionModel and two CLIP text encoders."""

from __future__ import annotations

import torch
from torch import nn

from composer.backbones.base import Backbone, on_meta
from composer.backbones.tokenizers import clip_tokenizer

# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json (the fields that shape the network)
REAL_UNET = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    transformer_layers_per_block=(1, 2, 10),
    cross_attention_dim=2048,
    attention_head_dim=(5, 10, 20),
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
    norm_num_groups=32,
)

# Same block layout as SDXL (so up_blocks.0.attentions.0/.1 exist for B-LoRA), toy widths.
TINY_UNET = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    down_block_types=REAL_UNET["down_block_types"],
    up_block_types=REAL_UNET["up_block_types"],
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
    """SDXL-base's UNet on the meta device: the exact architecture, no memory, no weights."""
    return on_meta("UNet2DConditionModel", REAL_UNET)


BACKBONE = Backbone(
    family="sdxl",
    pipeline_class="StableDiffusionXLPipeline",
    denoiser="unet",
    text_encoders=("text_encoder", "text_encoder_2"),
    target_pattern=TARGET_PATTERN,
    build_tiny=tiny,
    build_meta_denoiser=meta_unet,
    blora_blocks={"content": "up_blocks.0.attentions.0", "style": "up_blocks.0.attentions.1"},
    default_steps=30,
    default_guidance=5.0,
)
