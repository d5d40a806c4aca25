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
