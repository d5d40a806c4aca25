"""FLUX.1: FluxPipeline with a FluxTransformer2DModel, a CLIP text encoder and a T5 encoder."""

from __future__ import annotations

import torch
from torch import nn

from composer.backbones.base import Backbone, on_meta
from composer.backbones.sdxl import TINY_MERGES, clip_text_config
from composer.backbones.tokenizers import clip_tokenizer, t5_tokenizer

# black-forest-labs/FLUX.1-dev transformer/config.json
REAL_TRANSFORMER = dict(
    patch_size=1,
    in_channels=64,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)

TINY_TRANSFORMER = dict(
    patch_size=1,
    in_channels=16,  # 4 latent channels packed 2x2
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=32,
    pooled_projection_dim=32,
    guidance_embeds=True,
    axes_dims_rope=(4, 6, 6),
)
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
    use_quant_conv=False,
    use_post_quant_conv=False,
    shift_factor=0.0609,
    scaling_factor=1.5035,
)
TINY_T5 = dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, relative_attention_num_buckets=8)

# The linears of FLUX's double- and single-stream blocks (METHODS.md).
TARGET_PATTERN = (
    r"(transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
    r"|ff\.net\.(0\.proj|2)|ff_context\.net\.(0\.proj|2)|norm1(_context)?\.linear)"
    r"|single_transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v)|proj_mlp|proj_out|norm\.linear))$"
)


def tiny(seed: int = 0):
    """A FLUX pipeline with tiny random weights, a real CLIP BPE tokenizer and an offline T5 tokenizer."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5Config, T5EncoderModel

    tokenizer = clip_tokenizer(TINY_MERGES)
    tokenizer_2 = t5_tokenizer()
    torch.manual_seed(seed)
    clip = CLIPTextModel(clip_text_config(tokenizer))
    t5 = T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer_2), pad_token_id=tokenizer_2.pad_token_id, eos_token_id=1, **TINY_T5
        )
    )
    torch.manual_seed(seed + 1)
    transformer = FluxTransformer2DModel(**TINY_TRANSFORMER)
    torch.manual_seed(seed + 2)
    vae = AutoencoderKL(**TINY_VAE)
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=clip,
        tokenizer=tokenizer,
        text_encoder_2=t5,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def meta_transformer() -> nn.Module:
    """FLUX.1-dev's transformer on the meta device."""
    return on_meta("FluxTransformer2DModel", REAL_TRANSFORMER)


BACKBONE = Backbone(
    family="flux",
    pipeline_class="FluxPipeline",
    denoiser="transformer",
    text_encoders=("text_encoder", "text_encoder_2"),
    target_pattern=TARGET_PATTERN,
    build_tiny=tiny,
    build_meta_denoiser=meta_transformer,
    default_steps=28,
    default_guidance=3.5,
)
