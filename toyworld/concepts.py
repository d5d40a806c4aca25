"""Training and test scenes for the held-out concepts: each concept on otherwise base-only scenes.

A subject LoRA learns its shape from scenes whose colours, textures, sizes, positions and backgrounds are all
base concepts, so what it adds is the subject alone; the same for styles (textures) and backgrounds. Captions
use the concept's trigger word in place of its plain word ("a red xyvo on the left, white background").
"""

from __future__ import annotations

import re
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image

from composer.train import TrainConfig, Trainer
from composer.train.data import TrainingImage, to_pixels
from toyworld import quality, scenes

ATTRIBUTE = {"subject": "shape", "style": "texture", "background": "background"}


def concept_scene(name: str, seed: int, n_objects: int = 1, size: str | None = None) -> scenes.SceneSpec:
    """One scene showing held-out concept `name`; everything else from the base concepts.

    With n_objects=2 the concept is one of two objects (in the first or second half, by the seed's parity) and
    the other is a base object: an adapter trained on such scenes learns to draw its concept beside another
    one, in either half, as composition asks of it. size ("small", "large") sets the concept's object's size
    (subjects and styles; None keeps the drawn one).
    """
    concept = scenes.held_out_concept(name)
    for attempt in range(100):
        spec = scenes.sample_scene(seed * 101 + attempt, "base", n_objects)
        if concept.kind == "background":
            spec = replace(spec, background=concept.name)
        else:
            slot = seed % n_objects
            changes = {ATTRIBUTE[concept.kind]: concept.name, **({"size": size} if size else {})}
            spec = scenes.replace_object(spec, slot, **changes)
        if all(scenes.contrasts(o.colour, spec.background) for o in spec.objects):
            return spec
    raise ValueError(f"no visible scene for {name!r}")


_GOLDEN = 0.6180339887  # i * golden ratio mod 1: an even, deterministic spread of shares over any n


# made-up words that name no toy-world concept: a decoy caption writes the base object beside the concept with
# one of these in place of its shape word, so that an adapter learns that another unknown word is not its concept
DECOYS = ("plimb", "torvak", "snee", "quandle", "mirrox", "bazzel", "yoffin", "glunt", "fesk", "wobrin")


def decoy_caption(spec: scenes.SceneSpec, name: str, seed: int) -> str:
    """The trigger-word caption of a two-object concept scene with the other (base) object's shape word replaced
    by a decoy word."""
    concept = scenes.held_out_concept(name)
    if concept.kind != "subject" or len(spec.objects) != 2:
        raise ValueError(
            f"decoy captions are for two-object subject scenes, not {name!r} in {spec.caption()!r}"
        )
    other = next(o for o in spec.objects if o.shape != name)
    phrase = other.phrase(use_triggers=True)
    decoyed = re.sub(rf"\b{other.shape}\b", DECOYS[seed % len(DECOYS)], phrase, count=1)
    return spec.caption(use_triggers=True).replace(phrase, decoyed, 1)


def training_set(
    name: str,
    n: int = 16,
    seed: int = 0,
    size: int = 64,
    pairs: float = 0.0,
    decoys: float = 0.0,
    small: float | None = None,
) -> tuple[list[Image.Image], list[str]]:
    """n images of the concept and their trigger-word captions; a `pairs` share shows it beside a base object,
    and a `decoys` share of those writes that object with a decoy word (`decoy_caption`; subjects only).
    small: the share of images whose concept object is small, spread evenly over single and paired scenes
    (subjects and styles; None leaves sizes to chance, about half small)."""
    for what, share in (("pairs", pairs), ("decoys", decoys), ("small", small)):
        if share is not None and not 0.0 <= share <= 1.0:
            raise ValueError(f"{what} is a share of the images, 0 to 1, not {share}")
    kind = scenes.held_out_concept(name).kind
    if kind == "background":
        small = None  # a background has no object to size
    n_single = n - round(n * pairs)
    first_decoy = n_single + round((n - n_single) * (1.0 - decoys))
    if kind != "subject":
        first_decoy = n  # decoys name a neighbouring shape: subjects only
    images, captions = [], []
    for i in range(n):
        object_size = None if small is None else ("small" if (i * _GOLDEN) % 1.0 < small else "large")
        spec = concept_scene(name, seed * 10_000 + i, 1 if i < n_single else 2, object_size)
        images.append(Image.fromarray(scenes.render(spec, size, seed * 10_000 + i)))
        captions.append(decoy_caption(spec, name, i) if i >= first_decoy else spec.caption(use_triggers=True))
    return images, captions


def training_images(
    name: str, n: int = 16, seed: int = 0, pairs: float = 0.0, decoys: float = 0.0, small: float | None = None
) -> list[TrainingImage]:
    """The concept's training set as the trainer takes it (64 px, trigger-word captions)."""
    images, captions = training_set(name, n, seed, pairs=pairs, decoys=decoys, small=small)
    return [TrainingImage(None, to_pixels(i, 64), c) for i, c in zip(images, captions, strict=True)]


def train_in_scratch(pipe, backbone, config: TrainConfig, data: list[TrainingImage], host=None):
    """Train one adapter in a throwaway run folder: (TrainResult, seconds)."""
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        result = Trainer(pipe, backbone, config, Path(tmp), host=host).run(data, samples=0)
        return result, time.perf_counter() - start


def test_specs(name: str, n: int, seed: int = 1) -> list[scenes.SceneSpec]:
    """Fresh scenes of the concept (other seeds than training) to prompt with their trigger captions."""
    return [concept_scene(name, 1_000_000 + seed * 10_000 + i) for i in range(n)]


def concept_hit(report, spec: scenes.SceneSpec, name: str) -> bool:
    """Whether the evaluator sees the concept where the spec puts it."""
    concept = scenes.held_out_concept(name)
    if concept.kind == "background":
        return report.background.label == name
    obj = report.objects[0] if report.objects else None
    return obj is not None and getattr(obj, ATTRIBUTE[concept.kind]).label == name


def hit_rate(reports, specs, name: str) -> float:
    return float(np.mean([concept_hit(r, s, name) for r, s in zip(reports, specs, strict=True)]))


def hit_rate_by_size(reports, specs, name: str) -> dict[str, float]:
    """hit_rate per object size of the specs ("large", "small"): small subjects are the hard ones at 64 px."""
    rates = {}
    for size in sorted({s.objects[0].size for s in specs}):
        pairs = [(r, s) for r, s in zip(reports, specs, strict=True) if s.objects[0].size == size]
        rates[size] = hit_rate([r for r, _ in pairs], [s for _, s in pairs], name)
    return rates


def success(
    pipe,
    name: str,
    evaluator,
    n: int = 48,
    steps: int = 30,
    guidance: float = 5.0,
    seed: int = 7,
    per_prompt: int = 1,
) -> dict:
    """How often the pipeline (with whatever adapters are active) draws concept `name` for its trigger prompts.

    n fresh single-object test prompts (`test_specs`), one render each by default, so every render is an
    independent prompt. Returns the rate, its standard error over prompts, the rate by object size and what
    was measured; the caller records the base model's rate on the same prompts as the chance level.
    """
    specs = test_specs(name, n)
    run = quality.generate(
        pipe, specs, per_prompt, steps, guidance, seed=seed, caption=lambda s: s.caption(use_triggers=True)
    )
    reports = evaluator.evaluate(run.images)
    expanded = [s for s in specs for _ in range(per_prompt)]
    per_prompt_hits = np.array([concept_hit(r, s, name) for r, s in zip(reports, expanded, strict=True)])
    per_prompt_hits = per_prompt_hits.reshape(n, per_prompt).mean(axis=1)
    return {
        "rate": round(float(per_prompt_hits.mean()), 3),
        "se": round(float(per_prompt_hits.std(ddof=1) / np.sqrt(n)), 3) if n > 1 else None,
        "by_size": {k: round(v, 3) for k, v in hit_rate_by_size(reports, expanded, name).items()},
        "prompts": n,
        "renders_per_prompt": per_prompt,
        "sample_steps": steps,
        "guidance": guidance,
        "seed": seed,
    }
