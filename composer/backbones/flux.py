"""FLUX.1: FluxPipeline with a FluxTransformer2DModel, a CLIP text encoder and a T5 encoder."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from composer.backbones.base import SEMANTIC_SIDE, Backbone, Conditioning, on_meta, replace_rows
from composer.backbones.sdxl import TINY_MERGES, clip_text_config
from composer.backbones.tokenizers import clip_tokenizer, t5_tokenizer
from composer.errors import BackboneError, StudioError

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
    """FLUX.1-dev's transformer on the meta device (its shipped config)."""
    return on_meta("flux", "transformer")


T5_LENGTH = 512  # T5 tokens FluxPipeline encodes (at most; a tokenizer with a shorter limit caps it)


def image_query_text_key(attn, hidden_states, encoder_hidden_states):
    """The image queries and text keys of a FLUX joint-attention layer, (B, seq, heads * head_dim) each, as its
    projections compute them (separate to_q / add_k_proj, or the fused to_qkv / to_added_qkv)."""
    if getattr(attn, "fused_projections", False):
        if not hasattr(attn, "to_added_qkv"):
            raise StudioError(
                "a fused FLUX attention layer without to_added_qkv: cannot project the text keys"
            )
        query = attn.to_qkv(hidden_states).chunk(3, dim=-1)[0]
        key = attn.to_added_qkv(encoder_hidden_states).chunk(3, dim=-1)[1]
        return query, key
    return attn.to_q(hidden_states), attn.add_k_proj(encoder_hidden_states)


class FluxJointAttention:
    """The stock FLUX processor, plus the image queries' softmax over the text keys (rotary applied), pooled to
    the store's grid."""

    def __init__(self, original, store, grid: tuple[int, int]):
        self.original, self.store, self.grid = original, store, grid

    def __call__(
        self,
        attn,
        hidden_states,
        encoder_hidden_states=None,
        attention_mask=None,
        image_rotary_emb=None,
        **kw,
    ):
        out = self.original(
            attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb, **kw
        )
        if encoder_hidden_states is None:
            return out
        from diffusers.models.embeddings import apply_rotary_emb

        query, encoder_key = image_query_text_key(attn, hidden_states, encoder_hidden_states)
        query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))
        encoder_key = attn.norm_added_k(encoder_key.unflatten(-1, (-1, attn.head_dim)))
        text = encoder_hidden_states.shape[1]
        if image_rotary_emb is not None:  # positions: text first, then image (the joint sequence's order)
            cos, sin = image_rotary_emb
            query = apply_rotary_emb(query, (cos[text:], sin[text:]), sequence_dim=1)
            encoder_key = apply_rotary_emb(encoder_key, (cos[:text], sin[:text]), sequence_dim=1)
        scores = torch.einsum("bqhd,bkhd->bhqk", query.float(), encoder_key.float()) * attn.head_dim**-0.5
        probs = scores.softmax(dim=-1).mean(dim=1)  # (B, Q, L)
        rows, cols = self.grid
        if (rows, cols) != (self.store.rows, self.store.cols):
            grid = probs.transpose(1, 2).reshape(probs.shape[0], text, rows, cols)
            grid = F.adaptive_avg_pool2d(grid, (self.store.rows, self.store.cols))
            probs = grid.flatten(2).transpose(1, 2)
        self.store.maps.append(probs)
        return out


@dataclass(frozen=True)
class FluxBackbone(Backbone):
    """FLUX's family methods: a transformer on packed 2x2 latent patches, T5 prompt tokens, joint attention
    read as the image queries over the text keys, rectified-flow training.

    Training: x_t = (1 - t) x0 + t noise and the transformer predicts noise - x0 on packed patches (diffusers'
    FLUX trainer's target); t = sigmoid(N(0, 1)) (logit-normal, kohya sd-scripts' "sigmoid" sampling; diffusers
    defaults to uniform). Guided models get the objective's guidance (3.5 for FLUX.1-dev) and T5 sees 512
    tokens, as FluxPipeline renders.
    """

    def checkpoint_tokenizers(self, configs: Path, checkpoint: Path) -> dict[str, Any]:
        """CLIP-L's tokenizer built offline; T5's from the configs, or from a `tokenizer_2` folder beside the
        checkpoint: its SentencePiece vocabulary is in no checkpoint and not among our dependencies."""
        out: dict[str, Any] = {}
        if not (configs / "tokenizer").is_dir():
            out["tokenizer"] = clip_tokenizer()
        if not (configs / "tokenizer_2").is_dir():
            beside = checkpoint.parent / "tokenizer_2"
            if not beside.is_dir():
                raise BackboneError(
                    f"{checkpoint.name}: FLUX needs T5's tokenizer, which single-file checkpoints do not carry "
                    f"and this package does not ship; put the tokenizer_2 folder of a FLUX.1 diffusers model "
                    f"(spiece.model or tokenizer.json) at {beside}"
                )
            from transformers import T5TokenizerFast

            out["tokenizer_2"] = T5TokenizerFast.from_pretrained(beside, local_files_only=True)
        return out

    def patch_grid(self, pipe, height: int, width: int) -> tuple[int, int]:
        rows, cols = self.latent_size(pipe, height, width)
        return rows // 2, cols // 2

    def train_size_problem(self, size: int) -> str | None:
        if size % 16:
            return f"FLUX trains on 2x2 latent patches: resolution must be a multiple of 16, got {size}"
        return None

    def prompt_tokenizer(self, pipe):
        return pipe.tokenizer_2

    def prompt_length(self, pipe) -> int:
        return min(T5_LENGTH, int(pipe.tokenizer_2.model_max_length))

    def semantic_grid(self, denoiser, latent_rows: int, latent_cols: int) -> tuple[int, int]:
        """The packed patch grid, pooled by a whole factor to at most SEMANTIC_SIDE per side."""
        rows, cols = latent_rows // 2, latent_cols // 2
        factor = max(1, -(-max(rows, cols) // SEMANTIC_SIDE))
        return max(1, rows // factor), max(1, cols // factor)

    def attention_capture(self, name: str, processor, store, latent: tuple[int, int]):
        if not name.startswith("transformer_blocks."):  # the double-stream (joint) blocks
            return None
        return FluxJointAttention(processor, store, (latent[0] // 2, latent[1] // 2))

    def replay_inputs(self, pipe, args: tuple, kwargs: dict, latents: torch.Tensor, timestep) -> tuple:
        """The transformer takes the packed latents as they are and the timestep divided by 1000."""
        timestep = (timestep / 1000).expand(latents.shape[0]).to(latents.dtype)
        return args, {**kwargs, "hidden_states": latents, "timestep": timestep}

    def call_time(self, args: tuple, kwargs: dict) -> torch.Tensor:
        """The transformer's `timestep`: already the flow's share of noise, 0 to 1 (the pipeline divides by
        1000)."""
        timestep = kwargs.get("timestep")
        if timestep is None:
            raise StudioError("this FLUX denoiser call carries no timestep")
        return torch.as_tensor(timestep).float()

    def with_text(self, kwargs: dict, rows: torch.Tensor, cond: Conditioning) -> dict:
        """The T5 prompt embeddings and CLIP's pooled projection (`txt_ids` depend on the length only)."""
        if not isinstance(kwargs.get("pooled_projections"), torch.Tensor):
            raise StudioError("this FLUX denoiser call carries no pooled_projections")
        return {
            **kwargs,
            "encoder_hidden_states": replace_rows(
                self.call_text(kwargs), rows, cond.embeds, "prompt embeddings"
            ),
            "pooled_projections": replace_rows(
                kwargs["pooled_projections"], rows, cond.pooled, "pooled embedding"
            ),
        }

    def training_noise(self, pipe, snr_gamma: float | None):
        if snr_gamma is not None:
            raise StudioError(
                f"snr_gamma weights DDPM timesteps (SDXL); {self.family} trains by rectified flow, leave it unset"
            )
        return None

    def encode_caption(self, pipe, caption: str, device) -> Conditioning:
        embeds, pooled, text_ids = pipe.encode_prompt(
            caption, prompt_2=None, device=device, max_sequence_length=self.prompt_length(pipe)
        )
        return Conditioning(embeds.float(), pooled.float(), text_ids)

    def training_loss(self, objective, x0, cond, generator, dtype) -> torch.Tensor:
        pipe = objective.pipe
        b, c, h, w = x0.shape
        device = x0.device
        noise = torch.randn(x0.shape, generator=generator).to(x0)
        t = torch.sigmoid(torch.randn((b,), generator=generator)).to(x0)
        tb = t.view(-1, 1, 1, 1)
        noisy = (1 - tb) * x0 + tb * noise
        pack = pipe._pack_latents
        img_ids = pipe._prepare_latent_image_ids(b, h // 2, w // 2, device, dtype)
        transformer = pipe.transformer
        guidance = (
            torch.full((b,), objective.guidance, device=device, dtype=torch.float32)
            if getattr(transformer.config, "guidance_embeds", False)
            else None
        )
        pred = transformer(
            hidden_states=pack(noisy, b, c, h, w).to(dtype),
            timestep=t.to(dtype),
            guidance=guidance,
            pooled_projections=torch.cat([k.pooled for k in cond]).to(device, dtype),
            encoder_hidden_states=torch.cat([k.embeds for k in cond]).to(device, dtype),
            txt_ids=cond[0].text_ids,
            img_ids=img_ids,
            return_dict=False,
        )[0]
        target = pack(noise - x0, b, c, h, w)
        return F.mse_loss(pred.float(), target.float())


BACKBONE = FluxBackbone(
    family="flux",
    pipeline_class="FluxPipeline",
    denoiser="transformer",
    text_encoders=("text_encoder", "text_encoder_2"),
    target_pattern=TARGET_PATTERN,
    build_tiny=tiny,
    build_meta_denoiser=meta_transformer,
    checkpoint_marker=("double_blocks.", "model.diffusion_model.double_blocks."),
    checkpoint_foreign=tuple(  # FLUX.2 and Chroma share the block names; their configs are not shipped
        prefix + name
        for prefix in ("", "model.diffusion_model.")
        for name in ("single_stream_modulation.", "distilled_guidance_layer.")
    ),
    checkpoint_components={
        "transformer": ("double_blocks.", "model.diffusion_model.double_blocks."),
        "vae": ("vae.", "first_stage_model."),
        "text_encoder": ("text_encoders.clip_l.",),
        "text_encoder_2": ("text_encoders.t5xxl.",),
    },
    default_steps=28,
    default_guidance=3.5,
)
