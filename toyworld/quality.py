"""Quality harness: render prompt sets with fixed seeds and score them with the ground-truth evaluator.

Later work measures LoRAs, composition and retrieval the same way: a list of expected scenes, a way to turn
each into a prompt, images from the pipeline, and per-attribute accuracy from the evaluator.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from toyworld import combos, scenes
from toyworld.evaluator import Evaluator, score

PROMPT_SETS = ("withheld", "held_out_subjects")


def prompt_set(name: str, n: int | None = None, seed: int = 0) -> list[scenes.SceneSpec]:
    """Expected scenes of a named set, a fixed sample of n of them (all when n is None).

    withheld: single-object base scenes whose (shape, colour, position, background) never appear in training.
    held_out_subjects: single-object scenes of held-out subjects written with their plain word; the base model
        has never seen them, so it should fail to draw them.
    """
    if name == "withheld":
        specs = combos.withheld_single_object_scenes()
    elif name == "held_out_subjects":
        specs = [
            scenes.sample_scene(
                seed * 1000 + i, "all", 1, {"shape": subject, "texture": "solid", "size": "large"}
            )
            for i, subject in enumerate(scenes.SUBJECTS_HELD_OUT * 4)
        ]
    else:
        raise ValueError(f"unknown prompt set {name!r}; choose one of {', '.join(PROMPT_SETS)}")
    if n is not None and n < len(specs):
        rng = np.random.default_rng(seed)
        specs = [specs[i] for i in sorted(rng.choice(len(specs), n, replace=False))]
    return specs


@dataclass(frozen=True)
class QualityRun:
    specs: list[scenes.SceneSpec]
    images: list  # PIL images, per_prompt consecutive images per spec
    per_prompt: int


def generate(
    pipe,
    specs: Sequence[scenes.SceneSpec],
    per_prompt: int = 2,
    steps: int = 30,
    guidance: float = 5.0,
    seed: int = 0,
    caption: Callable[[scenes.SceneSpec], str] = lambda s: s.caption(),
    batch: int = 16,
) -> QualityRun:
    """Render every spec's caption `per_prompt` times; image j of prompt i uses seed (seed, i, j).

    Renders go to the pipeline `batch` at a time across prompts (each image keeps its own generator), so a
    set of many distinct prompts costs as few denoiser calls as one prompt repeated.
    """
    jobs = [
        (caption(spec), seed * 1_000_003 + i * 101 + j)
        for i, spec in enumerate(specs)
        for j in range(per_prompt)
    ]
    images = []
    for start in range(0, len(jobs), batch):
        chunk = jobs[start : start + batch]
        out = pipe(
            prompt=[text for text, _ in chunk],
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=[torch.Generator().manual_seed(s) for _, s in chunk],
        )
        images.extend(out.images)
    return QualityRun(list(specs), images, per_prompt)


def measure(evaluator: Evaluator, run: QualityRun) -> dict[str, float]:
    """Per-attribute accuracy over all images (strict: matched at the expected position), and `*_drawn`:
    the share of images where some detected object has the expected shape / colour, wherever it is."""
    reports = evaluator.evaluate(run.images)
    expected = [s for s in run.specs for _ in range(run.per_prompt)]
    totals: dict[str, float] = {}
    for report, spec in zip(reports, expected, strict=True):
        for key, ok in score(report, spec).items():
            totals[key] = totals.get(key, 0.0) + ok
        want = spec.objects[0]
        totals["shape_drawn"] = totals.get("shape_drawn", 0.0) + any(
            o.shape.label == want.shape for o in report.objects
        )
        totals["colour_drawn"] = totals.get("colour_drawn", 0.0) + any(
            o.colour.label == want.colour for o in report.objects
        )
    return {k: round(v / len(expected), 4) for k, v in totals.items()}
