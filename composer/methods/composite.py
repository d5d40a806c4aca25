"""composite (LoRA Composite, Zhong et al. 2024): every step the denoiser runs once per LoRA alone, and the
LoRAs' noise predictions are averaged (the conditional and the unconditional halves alike) before guidance.

All k passes run as one batched denoiser call (the multi-stream seam with equal weights everywhere). The text
encoders see the whole stack, as with merge. Cost: k denoiser passes per step.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from composer.methods.base import CompositionParams, MethodRun
from composer.seams.streams import denoise_in_streams


@dataclass(frozen=True)
class CompositeParams(CompositionParams):
    """Composite has no knobs beyond the per-LoRA weights of the stack (each LoRA's stream runs at its weight)."""

    def check(self, stack: list[str]) -> None:
        return None

    @contextmanager
    def apply(self, run: MethodRun) -> Iterator[None]:
        with run.host.activate(run.scales):  # text encoders: the whole stack
            if not run.stack:
                yield
                return
            streams = [{entry.resident: entry.weight} for entry in run.stack]
            equal = torch.ones(len(streams), 1, 1)
            grid = run.backbone.patch_grid(run.pipe, run.height, run.width)
            denoiser = getattr(run.pipe, run.backbone.denoiser)
            with denoise_in_streams(denoiser, run.host, streams, equal, grid):
                yield
