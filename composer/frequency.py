"""What a LoRA changes at each spatial frequency, measured from its own renders (CMLoRA's ordering).

A LoRA's profile is the radial average of the log-magnitude spectrum of the change it makes to a picture: the
grey difference between a render with the LoRA alone and the same render (prompt, seed) without it. Its score
is the share of that spectrum above half the Nyquist frequency: subjects, textures and styles (edges, fine
detail) score high; backgrounds and global colour low. Nothing is assumed from a LoRA's name or category.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

BINS = 16  # radial bins from the centre of the spectrum to the Nyquist circle
SEEDS = (0, 1)  # renders per LoRA (the profile is their mean)
STEPS = 20  # denoising steps of a profiling render


@dataclass(frozen=True)
class FrequencyProfile:
    """`radial`: BINS values summing to 1, low to high frequency; `score`: the share above half Nyquist."""

    radial: tuple[float, ...]
    score: float

    def to_json(self) -> dict:
        return {"radial": [round(v, 6) for v in self.radial], "score": round(self.score, 6)}


def profile_of(changes: Sequence[np.ndarray]) -> FrequencyProfile:
    """The profile of one or more (H, W) grey changes (a LoRA's render minus the base render)."""
    radial = np.zeros(BINS)
    for change in changes:
        change = np.asarray(change, dtype=np.float64)
        if change.ndim != 2 or min(change.shape) < 4:
            raise ValueError(f"a change image is (height, width) of at least 4 x 4, got {change.shape}")
        spectrum = np.log1p(np.abs(np.fft.fftshift(np.fft.fft2(change - change.mean()))))
        rows, cols = np.indices(change.shape)
        radius = np.hypot(
            (rows - change.shape[0] // 2) / (change.shape[0] / 2),
            (cols - change.shape[1] // 2) / (change.shape[1] / 2),
        )
        which = np.minimum((radius * BINS).astype(int), BINS)  # BINS: the corners beyond Nyquist, left out
        sums = np.bincount(which.ravel(), weights=spectrum.ravel(), minlength=BINS + 1)[:BINS]
        counts = np.bincount(which.ravel(), minlength=BINS + 1)[:BINS]
        radial += sums / np.maximum(counts, 1)
    total = radial.sum()
    radial = radial / total if total > 0 else np.full(BINS, 1.0 / BINS)
    return FrequencyProfile(tuple(float(v) for v in radial), float(radial[BINS // 2 :].sum()))


def _grey(image) -> np.ndarray:
    return np.asarray(image.convert("L"), dtype=np.float64) / 255.0


def measure_profile(
    pipe, backbone, host, resident: str, prompt: str, height: int, width: int, weight: float = 1.0
) -> FrequencyProfile:
    """Render `prompt` with the resident LoRA alone and without it (SEEDS, STEPS, the backbone's guidance) and
    profile the difference. The host's active set is put back after."""
    kwargs = dict(
        prompt=prompt,
        num_inference_steps=STEPS,
        guidance_scale=backbone.default_guidance,
        height=height,
        width=width,
    )
    changes = []
    with torch.inference_mode():
        for seed in SEEDS:
            pictures = []
            for scales in ({resident: weight}, {}):
                with host.activate(scales):
                    generator = torch.Generator("cpu").manual_seed(seed)
                    pictures.append(_grey(pipe(generator=generator, **kwargs).images[0]))
            changes.append(pictures[0] - pictures[1])
    return profile_of(changes)
