"""Train the ground-truth evaluator on freshly generated toy world scenes and write its weights.

    python -m toyworld.train_evaluator --out toyworld/weights/evaluator.safetensors --steps 1500

Every batch is new scenes of all concepts (base + held-out, one or two objects) plus a quarter of negatives
(`toyworld.negatives`: noise, flat fields, empty backgrounds, random polygons, blobs, broken shapes, read as
"none" / "unknown" / "other"), a quarter of batches drawn at another size and resized like `evaluate` does,
half of the images mildly blurred and noised so that softer images from a diffusion model still read. Seeded:
the same arguments give the same weights on the same machine. The report gives accuracy on fresh scenes and
the false-positive rate on fresh negatives of each kind.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from toyworld import negatives, scenes
from toyworld.evaluator import (
    ATTRIBUTES,
    LABELS,
    READ_LAYOUTS,
    DetectorNet,
    Evaluator,
    EvaluatorConfig,
    accuracy,
    to_tensor,
)

log = logging.getLogger(__name__)
OTHER_SIZES = (32, 40, 48, 80, 96, 128)
TEST_SEED = 2_000_000_011  # fresh scenes for the final measurement; training seeds are (seed, step) pairs


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1500
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 1e-4
    seed: int = 0
    resize_fraction: float = 0.25  # batches drawn at another size, then resized to the training size
    augment_fraction: float = 0.5  # samples blurred and noised
    max_blur_sigma: float = 1.0
    max_noise: float = 0.04  # std in [0, 1] pixel units
    test_scenes: int = 1000
    negative_fraction: float = 0.25  # of each batch


def targets(specs: list[scenes.SceneSpec] | list[negatives.Truth]) -> dict[str, torch.Tensor]:
    """Class indices per head: layout (B,), background (B,), and per slot (B, 5) with -100 where empty (and
    for what is not asked: the size of an unknown shape)."""
    layouts = [tuple(sorted(lay)) for lay in READ_LAYOUTS]
    out = {
        "layout": torch.tensor([layouts.index(tuple(sorted(o.position for o in s.objects))) for s in specs]),
        "background": torch.tensor([LABELS["background"].index(s.background) for s in specs]),
    }
    for a in ATTRIBUTES:
        t = torch.full((len(specs), len(scenes.POSITIONS)), -100, dtype=torch.long)
        for b, s in enumerate(specs):
            for o in s.objects:
                if (value := getattr(o, a)) is not None:
                    t[b, scenes.POSITIONS.index(o.position)] = LABELS[a].index(value)
        out[a] = t
    return out


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (B, 3, H, W)."""
    radius = max(1, math.ceil(2 * sigma))
    k = torch.exp(-(torch.arange(-radius, radius + 1, dtype=x.dtype) ** 2) / (2 * sigma**2))
    k = (k / k.sum()).view(1, 1, 1, -1).repeat(3, 1, 1, 1)  # (3, 1, 1, K)
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="replicate"), k, groups=3)
    return F.conv2d(F.pad(x, (0, 0, radius, radius), mode="replicate"), k.transpose(2, 3), groups=3)


def make_batch(cfg: TrainConfig, step: int, image_size: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One training batch: normalised images (B, 3, S, S) and their targets."""
    rng = np.random.default_rng((cfg.seed, step, 1))
    size = image_size
    if rng.random() < cfg.resize_fraction:
        size = int(rng.choice(OTHER_SIZES))
    n_neg = round(cfg.batch_size * cfg.negative_fraction)
    images, specs = scenes.dataset(
        cfg.batch_size - n_neg, seed=cfg.seed * 1_000_003 + step, split="all", size=size
    )
    if n_neg:
        neg_images, truths = negatives.dataset(n_neg, seed=cfg.seed * 1_000_003 + step, size=size)
        images, specs = np.concatenate([images, neg_images]), [*specs, *truths]
    x = to_tensor(images, image_size) * 0.25 + 0.5  # back to [0, 1] for augmentation
    aug = torch.from_numpy(rng.random(cfg.batch_size) < cfg.augment_fraction)
    if aug.any():
        sigma = float(rng.uniform(0.3, cfg.max_blur_sigma))
        noise = torch.from_numpy(rng.uniform(0, cfg.max_noise, size=(int(aug.sum()), 1, 1, 1))).float()
        gen = torch.Generator().manual_seed(int(rng.integers(2**31)))
        soft = _blur(x[aug], sigma)
        x[aug] = (soft + noise * torch.randn(soft.shape, generator=gen)).clamp(0, 1)
    return (x - 0.5) / 0.25, targets(specs)


def loss_fn(out: dict[str, torch.Tensor], tgt: dict[str, torch.Tensor]) -> torch.Tensor:
    loss = F.cross_entropy(out["layout"], tgt["layout"]) + F.cross_entropy(
        out["background"], tgt["background"]
    )
    for a in ATTRIBUTES:
        weight = 2.0 if a == "texture" else 1.0  # the slowest attribute to learn
        loss = loss + weight * F.cross_entropy(out[a].flatten(0, 1), tgt[a].flatten(), ignore_index=-100)
    return loss


def train(cfg: TrainConfig, model_cfg: EvaluatorConfig | None = None) -> Evaluator:
    """Train a fresh detector for cfg.steps steps (AdamW, one-cycle schedule)."""
    model_cfg = model_cfg or EvaluatorConfig()
    torch.manual_seed(cfg.seed)
    net = DetectorNet(model_cfg)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.steps, pct_start=0.15)
    net.train()
    start, running = time.perf_counter(), 0.0
    for step in range(cfg.steps):
        x, tgt = make_batch(cfg, step, model_cfg.image_size)
        loss = loss_fn(net(x), tgt)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        running = 0.98 * running + 0.02 * loss.item() if step else loss.item()
        if step % 100 == 0 or step == cfg.steps - 1:
            log.info("step %d/%d loss %.4f (%.0f s)", step, cfg.steps, running, time.perf_counter() - start)
    return Evaluator(net.eval(), model_cfg)


def measure(evaluator: Evaluator, n: int, seed: int = TEST_SEED, size: int = 64) -> dict[str, float]:
    """Per-attribute accuracy on n fresh scenes (all concepts, one and two objects)."""
    images, specs = scenes.dataset(n, seed=seed, split="all", size=size)
    return accuracy(evaluator.evaluate(images), specs)


def measure_negatives(
    evaluator: Evaluator, n: int, seed: int = TEST_SEED, size: int = 64
) -> dict[str, float]:
    """False positives on n fresh negatives per kind: for noise, flat fields and empty backgrounds the share
    read as holding an object; for polygons, blobs and broken shapes the share of unknown objects read as a
    known shape (or missed: nothing read at their position)."""
    out = {}
    for kind in negatives.KINDS:
        images, truths = negatives.dataset(n, seed=seed, size=size, kinds=(kind,))
        reports = evaluator.evaluate(images)
        if kind in negatives.OBJECT_KINDS:
            wrong = [
                (got := r.object_at(o.position)) is None or got.shape.label != negatives.UNKNOWN_SHAPE
                for r, t in zip(reports, truths, strict=True)
                for o in t.objects
                if o.shape == negatives.UNKNOWN_SHAPE
            ]
        else:
            wrong = [r.count > 0 for r in reports]
        out[kind] = sum(wrong) / len(wrong)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="toyworld/weights/evaluator.safetensors")
    parser.add_argument("--steps", type=int, default=TrainConfig.steps)
    parser.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    parser.add_argument("--lr", type=float, default=TrainConfig.lr)
    parser.add_argument("--seed", type=int, default=TrainConfig.seed)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (the machine is shared)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    start = time.perf_counter()
    evaluator = train(cfg)
    train_s = time.perf_counter() - start
    acc = {f"{size}px": measure(evaluator, cfg.test_scenes, size=size) for size in (64, 32, 128)}
    fp = {f"{size}px": measure_negatives(evaluator, cfg.test_scenes // 4, size=size) for size in (64, 128)}
    evaluator.save(
        args.out,
        train_config=json.dumps(cfg.__dict__),
        accuracy=json.dumps(acc),
        false_positives=json.dumps(fp),
    )
    log.info("accuracy on %d fresh scenes: %s", cfg.test_scenes, json.dumps(acc))
    log.info("false positives on %d fresh negatives per kind: %s", cfg.test_scenes // 4, json.dumps(fp))
    log.info(
        "training wall time %.1f s (%d steps, batch %d, %d threads)",
        train_s,
        cfg.steps,
        cfg.batch_size,
        args.threads,
    )
    log.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
