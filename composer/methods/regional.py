"""regional: each LoRA acts inside its own painted region, with no bleeding into the others.

Every LoRA given a mask gets a denoising stream of its own (itself plus the unmasked LoRAs); the pixels no mask
covers get a stream of the unmasked LoRAs alone (the base model when every LoRA has a mask). All streams run in
one batched denoiser call per step and their noise predictions are blended by the masks (`streams`), the
multi-stream masked fusion of MultiDiffusion (Bar-Tal et al., 2023) and CLoRA, here with masks the user draws.
Cost: one denoiser pass per stream that covers some pixel. The text encoders see the whole stack (merge).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image, ImageFilter

from composer.errors import StudioError
from composer.masks import RegionMasks
from composer.methods.base import CompositionParams, MethodRun
from composer.seams.streams import denoise_in_streams

MAX_FEATHER = 256


@dataclass(frozen=True)
class RegionalParams(CompositionParams):
    """Masks by LoRA name (a LoRA of the stack without one acts everywhere) and their edge softness."""

    regions: RegionMasks = field(
        default_factory=RegionMasks,
        metadata={"help": "paint each LoRA's region in its colour; an unpainted LoRA acts everywhere"},
    )
    feather: int = field(
        default=0, metadata={"help": "blur the mask edges by this many pixels (0: hard edges)"}
    )

    def __post_init__(self):
        if not isinstance(self.feather, int) or not 0 <= self.feather <= MAX_FEATHER:
            raise StudioError(f"feather must be an integer in 0..{MAX_FEATHER}, got {self.feather!r}")

    def check(self, stack: list[str]) -> None:
        unknown = [n for n in self.regions.names() if n not in stack]
        if unknown:
            raise StudioError(
                f"regional: masks for LoRAs not in the stack: {', '.join(unknown)} "
                f"(stack: {', '.join(stack) or 'empty'})"
            )

    def stream_masks(self, stack: list[str], height: int, width: int) -> list[tuple[str | None, np.ndarray]]:
        """(LoRA name or None for the rest, (height, width) float mask in 0..1) per stream that covers a pixel.

        Masks are stretched to the render's size, then feathered; the rest is what no mask covers.
        """
        self.check(stack)
        out: list[tuple[str | None, np.ndarray]] = []
        for name in stack:
            mask = self.regions.get(name)
            if mask is None:
                continue
            image = mask.to_image().resize((width, height), Image.Resampling.BILINEAR)
            if self.feather:
                image = image.filter(ImageFilter.GaussianBlur(self.feather))
            values = np.asarray(image, dtype=np.float32) / 255.0
            if values.any():
                out.append((name, values))
        covered = np.clip(sum((m for _, m in out), np.zeros((height, width), np.float32)), 0.0, 1.0)
        rest = 1.0 - covered
        if rest.max() > 1e-3:
            out.append((None, rest))
        return out

    @contextmanager
    def apply(self, run: MethodRun) -> Iterator[None]:
        catalog = [entry.name for entry in run.stack]
        resident = {entry.name: (entry.resident, entry.weight) for entry in run.stack}
        masked = set(self.regions.names())
        everywhere = {res: w for name, (res, w) in resident.items() if name not in masked}
        streams = self.stream_masks(catalog, run.height, run.width) if masked else []
        for name, values in streams:
            label = "no mask" if name is None else name
            run.pictures.append(
                (f"region: {label} ({values.mean():.0%})", Image.fromarray((values * 255).astype(np.uint8)))
            )
        with ExitStack() as stack:
            stack.enter_context(run.host.activate(run.scales))  # text encoders: the whole stack
            if masked:
                scales = [
                    {**everywhere, **({} if name is None else {resident[name][0]: resident[name][1]})}
                    for name, _ in streams
                ]
                masks = torch.from_numpy(np.stack([values for _, values in streams]))  # (S, H, W)
                grid = run.backbone.patch_grid(run.pipe, run.height, run.width)
                denoiser = getattr(run.pipe, run.backbone.denoiser)
                stack.enter_context(denoise_in_streams(denoiser, run.host, scales, masks, grid))
            yield
