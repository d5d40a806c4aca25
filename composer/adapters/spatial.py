"""Per-region scales: an adapter whose delta is weighted per token (or per pixel) inside the adapter layer.

Single-pass regional LoRAs: instead of one denoiser pass per region, every painted LoRA runs in the same pass
and its delta is multiplied, in every adapted layer, by its mask resized to that layer's resolution. Because a
LoRA's delta is added to the layer's output, masking it there is exact: y = W x + sum_i m_i * s_i * delta_i(x).

What a layer's output looks like decides how the mask applies:
- a convolution's (B, C, h, w): the mask resized to (h, w);
- a token sequence (B, N, C): N image tokens of one of the latent grid's levels (a UNet halves it per
  level, rounding up; FLUX's packed 2x2 patches are the grid itself), or FLUX's single blocks' text tokens
  followed by the image tokens;
- anything that carries no image tokens (text tokens, time embeddings, modulations): the LoRA at its full
  weight there, as a merge would apply it (those layers act on every pixel at once).

`TokenGeometry` is what the layers need to know about the current denoiser call (the latent grid and the text
length); whoever runs the pass sets it before each call.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from composer.errors import AdapterError

_LEVELS = 6  # latent grid halvings searched for a token count (SDXL's UNet uses 3)


@dataclass
class TokenGeometry:
    """The denoiser call's latent grid (rows, cols of its first token level), text token count and depth."""

    grid: tuple[int, int] = (0, 0)
    text_tokens: int = 0
    depth: int = _LEVELS  # token levels the denoiser has: a UNet halves the grid per level, FLUX keeps one

    def ambiguous(self) -> bool:
        """True when some image level has as many tokens as the text (FLUX at 512 x 256 px: 512 and 512): a
        layer's tokens could then be either, and masks cannot be placed."""
        return any(rows * cols == self.text_tokens for rows, cols in self.levels())

    def levels(self) -> list[tuple[int, int]]:
        rows, cols = self.grid
        out = []
        for _ in range(self.depth):
            out.append((rows, cols))
            if rows <= 1 and cols <= 1:
                break
            rows, cols = math.ceil(rows / 2), math.ceil(cols / 2)
        return out


@dataclass(eq=False)
class SpatialScale:
    """An adapter's weight, times its mask: (H, W) values in 0..1 at any resolution."""

    weight: float
    mask: torch.Tensor
    geometry: TokenGeometry
    _resized: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.mask.ndim != 2:
            raise AdapterError(f"a region mask is (height, width), got shape {tuple(self.mask.shape)}")

    def _at(self, size: tuple[int, int], like: torch.Tensor) -> torch.Tensor:
        key = (size, like.device, like.dtype)
        if key not in self._resized:
            resized = F.interpolate(self.mask[None, None].float(), size=size, mode="area")[0, 0]
            self._resized[key] = (resized * self.weight).to(device=like.device, dtype=like.dtype)
        return self._resized[key]

    def weights_for(self, y: torch.Tensor) -> torch.Tensor | float:
        """This scale shaped to broadcast over the layer output y: per pixel or per token where y has image
        tokens, else the full weight."""
        if y.ndim == 4:
            return self._at(tuple(y.shape[-2:]), y)[None, None]  # (1, 1, h, w)
        if y.ndim != 3:
            return self.weight
        tokens = y.shape[1]
        text = self.geometry.text_tokens
        if tokens == text:
            return self.weight
        for rows, cols in self.geometry.levels():
            image = rows * cols
            if tokens == image:
                return self._at((rows, cols), y).reshape(1, image, 1)
            if text and tokens == text + image:  # FLUX single blocks: [text | image]
                head = torch.full((text,), float(self.weight), device=y.device, dtype=y.dtype)
                return torch.cat([head, self._at((rows, cols), y).flatten()]).reshape(1, tokens, 1)
        return self.weight
