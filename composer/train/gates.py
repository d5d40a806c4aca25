"""Training the gates of gated fusion (`composer.gates`) for one LoRA set: the denoising loss on pictures that
show the set's concepts together, with the base model and the LoRAs frozen; only the gates learn.

AutoLoRA does not publish its gate objective; this is the family's own training loss (`Objective`: SDXL's
DDPM epsilon/v loss, FLUX's rectified flow), with the set's LoRAs active at their weights on the text encoders
(the captions are encoded as a render encodes its prompt) and gated in the denoiser.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from composer.adapters.host import AdapterHost
from composer.backbones.base import Backbone, Conditioning
from composer.errors import StudioError
from composer.gates import GateBank, StoredGates, gated_denoiser
from composer.train.data import TrainingImage
from composer.train.objectives import Objective

Progress = Callable[[int, int, float], None]  # (step done, total steps, loss of that step)
EVAL_DRAWS = 2  # noise draws per training image for the loss before and after


@dataclass(frozen=True)
class GateTraining:
    """Trained gates and how they were trained: `record` holds steps, seconds, the first and last step's loss,
    the loss on the training images with untrained and with trained gates (same noise and timesteps), the
    learning rate, seed, batch size, image count, LoRA weights and the gate parameter count."""

    gates: StoredGates
    losses: list[float]

    @property
    def record(self) -> dict[str, Any]:
        return self.gates.record


def _batches(n: int, size: int):
    for start in range(0, n, size):
        yield torch.arange(start, min(n, start + size))


@torch.no_grad()
def eval_loss(
    objective: Objective,
    mean: torch.Tensor,
    std: torch.Tensor,
    cond: list[Conditioning],
    seed: int,
    dtype: torch.dtype,
    draws: int = EVAL_DRAWS,
    batch: int = 8,
) -> float:
    """The mean denoising loss over every image, `draws` times, with noise and timesteps drawn from `seed`
    (the same draws whatever the gates, so two evaluations compare pairwise)."""
    generator = torch.Generator().manual_seed(seed)
    total, count = 0.0, 0
    for _ in range(draws):
        for idx in _batches(mean.shape[0], batch):
            x0 = objective.latents(mean[idx], std[idx], generator)
            loss = objective.loss(x0, [cond[i] for i in idx.tolist()], generator, dtype)
            total += float(loss) * len(idx)
            count += len(idx)
    return total / count


def train_gates(
    pipe,
    backbone: Backbone,
    host: AdapterHost,
    residents: Mapping[str, float],
    images: Sequence[TrainingImage],
    steps: int = 300,
    lr: float = 5e-3,
    seed: int = 0,
    batch_size: int = 2,
    progress: Progress | None = None,
) -> GateTraining:
    """Train gates for the resident LoRAs `residents` (resident name -> weight) on captioned images of their
    concepts together. The pipeline comes back as it was: the host's active set, every parameter's
    requires_grad, the denoiser's forward.

    Raises:
        StudioError: no LoRAs, no images, images of different sizes, a size the family cannot train at,
            fewer than 1 step, a learning rate that is not positive, or a loss that stops being finite.
    """
    if not residents:
        raise StudioError("gate training needs the LoRAs of the set")
    if not images:
        raise StudioError("gate training needs images showing the set's concepts")
    if steps < 1 or batch_size < 1:
        raise StudioError(f"gate training needs steps >= 1 and batch_size >= 1, got {steps} and {batch_size}")
    if not lr > 0:
        raise StudioError(f"the learning rate must be positive, got {lr}")
    sizes = {tuple(img.pixels.shape[-2:]) for img in images}
    if len(sizes) != 1 or len(next(iter(sizes))) != 2 or next(iter(sizes))[0] != next(iter(sizes))[1]:
        raise StudioError(f"gate training takes square images of one size, got {sorted(sizes)}")
    size = next(iter(sizes))[0]
    problem = backbone.train_size_problem(size)
    if problem:
        raise StudioError(problem)
    objective = Objective(pipe, backbone, size)
    denoiser = objective.denoiser
    device, dtype = denoiser.device, denoiser.dtype
    generator = torch.Generator().manual_seed(seed)
    trainable = [p for p in denoiser.parameters() if p.requires_grad]  # the LoRAs' weights among them
    with host.activate(dict(residents)):
        mean, std = objective.encode_images(torch.stack([img.pixels.clamp(-1, 1) for img in images]))
        captions: dict[str, Conditioning] = {}
        for img in images:
            if img.caption not in captions:
                captions[img.caption] = objective.encode_caption(img.caption, device)
        cond = [captions[img.caption] for img in images]
        bank = GateBank.for_stack(host, backbone.denoiser, residents).to(device)
        try:
            for p in trainable:
                p.requires_grad_(False)
            with gated_denoiser(denoiser, backbone, host, bank):
                before = eval_loss(objective, mean, std, cond, seed + 1, dtype)
                optimizer = torch.optim.AdamW(bank.parameters(), lr=lr, weight_decay=0.0)
                losses: list[float] = []
                began = time.monotonic()
                for step in range(steps):
                    idx = torch.randint(0, mean.shape[0], (batch_size,), generator=generator)
                    x0 = objective.latents(mean[idx], std[idx], generator)
                    loss = objective.loss(x0, [cond[i] for i in idx.tolist()], generator, dtype)
                    if not torch.isfinite(loss):
                        raise StudioError(
                            f"the gate loss became {loss.item()} at step {step + 1}; lower lr ({lr})"
                        )
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    losses.append(float(loss.item()))
                    if progress is not None:
                        progress(step + 1, steps, losses[-1])
                seconds = time.monotonic() - began
                after = eval_loss(objective, mean, std, cond, seed + 1, dtype)
        finally:
            for p in trainable:
                p.requires_grad_(True)
    record = {
        "steps": steps,
        "seconds": round(seconds, 2),
        "loss_first": round(losses[0], 6),
        "loss_last": round(losses[-1], 6),
        "loss_untrained": round(before, 6),  # on the training images, same draws as below
        "loss_trained": round(after, 6),
        "lr": lr,
        "seed": seed,
        "batch_size": batch_size,
        "images": len(images),
        "size": size,
        "weights": {name: float(w) for name, w in residents.items()},
        "parameters": bank.parameter_count(),
    }
    return GateTraining(StoredGates(bank.tensors(), record), losses)
