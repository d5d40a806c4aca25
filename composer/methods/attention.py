"""Cross-attention maps: how much each latent pixel attends to each prompt token, read from the denoiser while it
runs (CLoRA's masks and contrastive loss), and where a trigger word sits in the tokenised prompt.

SDXL UNets: the `attn2` layers at the semantic resolution, the largest cross-attention feature map whose longer
side is at most 32 (32x32 for SDXL at 1024 px, as CLoRA reads it; 8x8 for the toy model at 64 px). FLUX has no
cross-attention: its double-stream blocks attend jointly over text and image tokens, so the map is the image
queries' softmax over the text keys alone, pooled to at most 32 per side. Only the captured layers compute their
attention explicitly; their outputs equal the stock processors' (tested).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from composer.errors import StudioError

SEMANTIC_SIDE = 32  # the longest side of the attention maps read


class MapStore:
    """The maps captured during denoiser calls: (B, Q, L) per layer (heads averaged), Q = rows * cols."""

    def __init__(self, rows: int, cols: int):
        self.rows, self.cols = rows, cols
        self.maps: list[torch.Tensor] = []

    def clear(self) -> None:
        self.maps = []

    def mean(self) -> torch.Tensor:
        """(B, rows, cols, L): the captured layers' maps averaged."""
        if not self.maps:
            raise StudioError("no cross-attention maps were captured in this denoiser call")
        maps = torch.stack(self.maps).mean(dim=0)
        return maps.reshape(maps.shape[0], self.rows, self.cols, maps.shape[-1])


class _UNetCrossAttention:
    """diffusers' AttnProcessor arithmetic for a UNet cross-attention layer, keeping its probabilities when its
    query count is the semantic resolution's (other calls go to the layer's own processor)."""

    def __init__(self, original, store: MapStore):
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


class _FluxJointAttention:
    """The stock FLUX processor, plus the image queries' softmax over the text keys (rotary applied), pooled to
    the store's grid."""

    def __init__(self, original, store: MapStore, grid: tuple[int, int]):
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
        from diffusers.models.transformers.transformer_flux import _get_qkv_projections

        query, _, _, _, encoder_key, _ = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
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


def semantic_grid(family: str, denoiser, latent_rows: int, latent_cols: int) -> tuple[int, int]:
    """(rows, cols) of the maps read for a latent of that size (see the module docstring)."""
    if family == "flux":
        rows, cols = latent_rows // 2, latent_cols // 2  # packed 2x2 patches
        factor = max(1, -(-max(rows, cols) // SEMANTIC_SIDE))
        return max(1, rows // factor), max(1, cols // factor)
    levels = [
        (latent_rows >> i, latent_cols >> i)
        for i, kind in enumerate(denoiser.config.down_block_types)
        if "CrossAttn" in kind
    ]
    if not levels:
        raise StudioError("this UNet has no cross-attention layers to read")
    fitting = [size for size in levels if max(size) <= SEMANTIC_SIDE]
    return max(fitting) if fitting else min(levels)


@contextmanager
def capture_cross_attention(
    family: str, denoiser, store: MapStore, latent: tuple[int, int]
) -> Iterator[None]:
    """While the block runs, the denoiser's cross-attention maps at `store`'s grid go into `store.maps`.

    Args:
        latent: (rows, cols) of the latents (FLUX: before packing).
    """
    if family not in ("sdxl", "flux"):
        raise StudioError(f"cannot read cross-attention maps of a {family} denoiser")
    originals = dict(denoiser.attn_processors)
    patched = {}
    for name, processor in originals.items():
        if family == "sdxl" and name.endswith("attn2.processor"):
            patched[name] = _UNetCrossAttention(processor, store)
        elif family == "flux" and name.startswith("transformer_blocks."):
            patched[name] = _FluxJointAttention(processor, store, (latent[0] // 2, latent[1] // 2))
        else:
            patched[name] = processor
    denoiser.set_attn_processor(patched)
    try:
        yield
    finally:
        denoiser.set_attn_processor(dict(originals))


def token_ids(pipe, family: str, text: str, special: bool) -> list[int]:
    """The ids of `text` as the denoiser's text stream sees it: CLIP's for SDXL, T5's for FLUX."""
    tokenizer = pipe.tokenizer if family == "sdxl" else pipe.tokenizer_2
    return list(tokenizer(text, add_special_tokens=special, truncation=False).input_ids)


def trigger_positions(pipe, family: str, prompt: str, triggers: Sequence[str], limit: int) -> list[int]:
    """Token positions of every occurrence of any of `triggers` in `prompt`, below `limit` (the encoder's
    sequence length). Multi-token triggers give all their tokens. Empty: none of them is in the prompt."""
    ids = token_ids(pipe, family, prompt, special=True)[:limit]
    found: set[int] = set()
    for trigger in triggers:
        word = token_ids(pipe, family, trigger, special=False)
        if not word:
            continue
        for start in range(len(ids) - len(word) + 1):
            if ids[start : start + len(word)] == word:
                found.update(range(start, start + len(word)))
    return sorted(found)
