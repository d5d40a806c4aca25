"""Cross-attention maps: how much each latent pixel attends to each prompt token, read from the denoiser while it
runs (CLoRA's masks and contrastive loss).

Where the maps are read is the backbone's business (`Backbone.semantic_grid`, `Backbone.attention_capture`:
SDXL's `attn2` layers at the semantic resolution, FLUX's joint attention's image queries over the text keys);
this module holds what they are read into and the swap of the denoiser's processors. Only the captured layers
compute their attention explicitly; their outputs equal the stock processors' (tested).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from composer.backbones.base import Backbone
from composer.errors import StudioError


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


@contextmanager
def capture_cross_attention(
    backbone: Backbone, denoiser, store: MapStore, latent: tuple[int, int]
) -> Iterator[None]:
    """While the block runs, the denoiser's cross-attention maps at `store`'s grid go into `store.maps`.

    Args:
        backbone: the denoiser's family: it picks the layers read and wraps their processors.
        latent: (rows, cols) of the latents (FLUX: before packing).
    """
    originals = dict(denoiser.attn_processors)
    patched = {}
    for name, processor in originals.items():
        wrapped = backbone.attention_capture(name, processor, store, latent)
        patched[name] = processor if wrapped is None else wrapped
    denoiser.set_attn_processor(patched)
    try:
        yield
    finally:
        denoiser.set_attn_processor(dict(originals))


class RegionText:
    """A cross-attention layer whose text keys hold `chunks` prompts side by side (equal lengths, the call's
    own first): every query pixel attends within each prompt separately, and the outputs are blended by the
    pixel's weight per prompt (`weights(queries)` -> (chunks, queries, 1), summing to 1 over the chunks).
    The layer's own processor computes each prompt's attention, so a single chunk equals the plain layer."""

    def __init__(self, original, weights, chunks: int):
        self.original, self.weights, self.chunks = original, weights, chunks

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        if encoder_hidden_states is None:  # self-attention
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kw)
        if hidden_states.ndim != 3 or encoder_hidden_states.shape[1] % self.chunks:
            raise StudioError(
                f"region prompts: a cross-attention call of {tuple(hidden_states.shape)} over "
                f"{encoder_hidden_states.shape[1]} text tokens does not split into {self.chunks} prompts"
            )
        weights = self.weights(hidden_states.shape[1]).to(hidden_states)  # (chunks, Q, 1)
        out = 0
        for k, text in enumerate(encoder_hidden_states.chunk(self.chunks, dim=1)):
            if bool(weights[k].any()):
                out = out + weights[k] * self.original(attn, hidden_states, text, attention_mask, temb, **kw)
        return out


@contextmanager
def cross_attention_by_region(
    backbone: Backbone, denoiser, masks: torch.Tensor, latent: tuple[int, int]
) -> Iterator[None]:
    """While the block runs, the denoiser's cross-attention layers read `len(masks)` prompts laid side by side in
    the text they are given (`encoder_hidden_states` of chunks x tokens), each prompt where its mask is.

    Args:
        masks: (chunks, H, W) non-negative, any resolution; resized by area to each layer's grid and
            normalised per pixel (a pixel no mask covers is an error).
        latent: (rows, cols) of the latents, whose aspect every layer's grid keeps.
    """
    cache: dict[int, torch.Tensor] = {}

    def weights(queries: int) -> torch.Tensor:
        if queries not in cache:
            scale = (latent[0] * latent[1] / queries) ** 0.5
            rows, cols = round(latent[0] / scale), round(latent[1] / scale)
            if rows * cols != queries:
                raise StudioError(f"region prompts: {queries} queries are no grid of the latent's {latent}")
            grid = torch.nn.functional.interpolate(masks[:, None].float(), size=(rows, cols), mode="area")[
                :, 0
            ]
            total = grid.sum(dim=0, keepdim=True)
            if bool((total <= 0).any()):
                raise StudioError("region prompts: some pixels belong to no prompt")
            cache[queries] = (grid / total).reshape(len(masks), queries, 1)
        return cache[queries]

    originals = dict(denoiser.attn_processors)
    patched = {}
    for name, processor in originals.items():
        chunked = backbone.cross_attention(name)
        patched[name] = RegionText(processor, weights, len(masks)) if chunked else processor
    if patched == originals:
        raise StudioError(
            f"region prompts need cross-attention layers; this {backbone.family} denoiser has none"
        )
    denoiser.set_attn_processor(patched)
    try:
        yield
    finally:
        denoiser.set_attn_processor(dict(originals))
