"""A zoo of small toy-world adapters to train and measure LoRA retrieval on (AutoLoRA, issue 21).

python -m toyworld.zoo --out zoo [--count 450] [--steps 60] [--images 32] [--threads 1]

Every zoo adapter teaches one look: one attribute (a shape, a colour, a texture or a background) or a pair of
them ("a red star", "zigzag on brick"), written in its captions with a made-up trigger word in place of the
attribute words, on single-object scenes whose other attributes are random. Types and ranks are mixed (plain
LoRA of rank 2, 4 or 8 on attention, LoRA on every layer, DiffuseKronA, TLoRA), as a real catalog's are.

A concept's plain description ("red star", "zigzag texture, brick background") is what a user would type to
find it. One pair in five, chosen by a fixed hash of its attributes, is held out: the encoder never trains on it
(its attributes are all seen, in other pairs), and retrieval is measured on those only (`retrieval.train`).

Training is short (--steps at batch 8); each adapter records how much it moves the model: the denoising loss on
its own training images, same noise and timesteps, with and without it (`loss_base`, `loss_adapted`).
Written: one kohya safetensors per adapter (with its trigger word and description in the metadata) and
zoo.jsonl, one line per adapter, appended as each finishes (a run that stops resumes where it was).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from PIL import Image

from composer.train import TrainConfig
from composer.train.data import TrainingImage, to_pixels
from toyworld import scenes

log = logging.getLogger("toyworld.zoo")

ATTRIBUTES = ("shape", "colour", "texture", "background")
VALUES = {
    "shape": scenes.SHAPES,
    "colour": scenes.COLOURS,
    "texture": scenes.TEXTURES,
    "background": scenes.BACKGROUNDS,
}
PAIRS = (
    ("shape", "colour"),
    ("shape", "texture"),
    ("colour", "texture"),
    ("shape", "background"),
    ("colour", "background"),
    ("texture", "background"),
)
HELD_OUT_SHARE = 5  # one pair concept in 5 is held out of the encoder's training
# (kind, rank, targets, learning rate, share of the zoo)
TYPES = (
    ("lora", 4, "attention", 3e-3, 0.30),
    ("lora", 2, "attention", 3e-3, 0.10),
    ("lora", 8, "attention", 2e-3, 0.10),
    ("lora", 4, "full", 2e-3, 0.20),
    ("kron", None, "attention", 2e-3, 0.15),
    ("tensor", None, "attention", 3e-3, 0.15),
)
SYLLABLES = ("ka", "lo", "mi", "dru", "zen", "pho", "vik", "tas", "nor", "gel", "bry", "sul", "wex", "quo")


@dataclass(frozen=True)
class ZooEntry:
    """One zoo adapter: what it teaches (`pins`: attribute -> value), its trigger word and how it is built."""

    name: str
    pins: dict
    trigger: str
    kind: str
    rank: int | None
    targets: str
    learning_rate: float
    held_out: bool
    tags: list = field(default_factory=list)

    @property
    def description(self) -> str:
        """The concept in plain words, as a user would search for it ("red star", "zigzag texture")."""
        return describe(self.pins)


def describe(pins: dict) -> str:
    """Plain words for a set of pinned attributes: "red zigzag star, brick background"."""
    words = [pins[a] for a in ("colour", "texture", "shape") if a in pins]
    thing = " ".join(words)
    if "texture" in pins and "shape" not in pins:
        thing += " texture" if "colour" not in pins else " pattern"
    if "colour" in pins and len(words) == 1:
        thing += " colour"
    if "background" in pins:
        bg = f"{pins['background']} background"
        return f"{thing}, {bg}" if thing else bg
    return thing


def _held_out(pins: dict) -> bool:
    if len(pins) < 2:
        return False
    key = "|".join(f"{a}={pins[a]}" for a in sorted(pins))
    return hashlib.sha256(key.encode()).digest()[0] % HELD_OUT_SHARE == 0


def _visible(pins: dict) -> bool:
    if "colour" in pins and "background" in pins:
        return scenes.contrasts(pins["colour"], pins["background"])
    return True


def _trigger(rng: random.Random, used: set[str]) -> str:
    while True:
        word = "".join(rng.choice(SYLLABLES) for _ in range(3))
        if word not in used:
            used.add(word)
            return word


def plan(count: int = 300, seed: int = 0) -> list[ZooEntry]:
    """The zoo's adapters, identical for the same arguments: every single attribute, then pairs at random."""
    rng = random.Random(seed)
    singles = [{a: v} for a in ATTRIBUTES for v in VALUES[a]]
    pairs = [
        {a: va, b: vb} for a, b in PAIRS for va in VALUES[a] for vb in VALUES[b] if _visible({a: va, b: vb})
    ]
    rng.shuffle(pairs)
    concepts = (singles + pairs)[:count]
    if len(concepts) < count:
        raise ValueError(f"the toy world has {len(concepts)} zoo concepts, fewer than {count}")
    weights = [t[-1] for t in TYPES]
    used: set[str] = set()
    out = []
    for pins in concepts:
        kind, rank, targets, lr, _ = rng.choices(TYPES, weights)[0]
        words = [pins[a] for a in ATTRIBUTES[:3] if a in pins]
        if "background" in pins:
            words.append(f"on-{pins['background']}")
        name = "zoo-" + "-".join(words)
        out.append(
            ZooEntry(
                name=name,
                pins=pins,
                trigger=_trigger(rng, used),
                kind=kind,
                rank=rank,
                targets=targets,
                learning_rate=lr,
                held_out=_held_out(pins),
                tags=["toyworld", "zoo", *sorted(pins)],
            )
        )
    return out


def twins(count: int, zoo: int = 300, seed: int = 1) -> list[ZooEntry]:
    """A second adapter for each of the first `count` held-out concepts of `plan(zoo)`: another type, rank and
    trigger word, other training images (`twin_seed`), named "<name>-twin": one concept in two files, to
    measure near-duplicate detection on."""
    rng = random.Random(seed)
    used = {e.trigger for e in plan(zoo)}
    out = []
    for entry in [e for e in plan(zoo) if e.held_out][:count]:
        others = [t for t in TYPES if (t[0], t[1], t[2]) != (entry.kind, entry.rank, entry.targets)]
        kind, rank, targets, lr, _ = rng.choice(others)
        out.append(
            dataclasses.replace(
                entry,
                name=f"{entry.name}-twin",
                trigger=_trigger(rng, used),
                kind=kind,
                rank=rank,
                targets=targets,
                learning_rate=lr,
            )
        )
    return out


def scene_for(entry: ZooEntry, seed: int) -> scenes.SceneSpec:
    """A visible single-object scene with the entry's attributes pinned, the others random (every split)."""
    fixed = {a: v for a, v in entry.pins.items()}
    return scenes.sample_scene(seed, "all", 1, fixed)


def caption_for(entry: ZooEntry, spec: scenes.SceneSpec) -> str:
    """The scene's caption with the pinned attribute words taken out and the trigger word put first."""
    obj = spec.objects[0]
    words = ["small"] if obj.size != scenes.DEFAULT_SIZE else []
    if "colour" not in entry.pins:
        words.append(obj.colour)
    if "texture" not in entry.pins and obj.texture != scenes.DEFAULT_TEXTURE:
        words.append(obj.texture)
    words.append(obj.shape if "shape" not in entry.pins else "thing")
    phrase = f"a {' '.join(words)} {scenes.POSITION_PHRASES[obj.position]}"
    background = "" if "background" in entry.pins else f", {spec.background} background"
    return f"{entry.trigger}, {phrase}{background}"


def training_data(entry: ZooEntry, n: int, seed: int = 0) -> list[TrainingImage]:
    out = []
    for i in range(n):
        spec = scene_for(entry, seed * 100_000 + i)
        image = Image.fromarray(scenes.render(spec, 64, seed * 100_000 + i))
        out.append(TrainingImage(None, to_pixels(image, 64), caption_for(entry, spec)))
    return out


def config_for(entry: ZooEntry, steps: int, prompt: str) -> TrainConfig:
    extra = {"rank": entry.rank} if entry.rank else {}
    if entry.kind == "kron":
        extra["kron_factors"] = (4, 4)
    return TrainConfig(
        kind=entry.kind,
        prompt=prompt,
        steps=steps,
        learning_rate=entry.learning_rate,
        batch_size=8,
        targets=entry.targets,
        checkpoint_every=steps,
        snr_gamma=5.0,
        **extra,
    )


def movement(pipe, backbone, host, resident: str, data: list[TrainingImage], seed: int = 1) -> tuple:
    """(loss without, loss with) the resident adapter on its training images: the same latents, noise and
    timesteps for both (a mean over 4 draws)."""
    from composer.train.objectives import Objective

    objective = Objective(pipe, backbone, 64)
    pixels = torch.stack([d.pixels for d in data])
    mean, std = objective.encode_images(pixels)
    device = objective.denoiser.device
    cond = [objective.encode_caption(d.caption, device) for d in data]
    losses = []
    for scales in ({}, {resident: 1.0}):
        generator = torch.Generator().manual_seed(seed)
        total = 0.0
        with host.activate(scales), torch.no_grad():
            for _ in range(4):
                x0 = objective.latents(mean, std, generator)
                total += float(objective.loss(x0, cond, generator, objective.denoiser.dtype)) / 4
        losses.append(round(total, 5))
    return tuple(losses)


def main() -> None:
    from composer.adapters.host import AdapterHost
    from composer.backbones import get_backbone, load_pipeline
    from composer.formats import write_kohya
    from toyworld import model_dir
    from toyworld.concepts import train_in_scratch

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("zoo"))
    parser.add_argument("--count", type=int, default=450)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--part", default="0/1", help="i/n: train every n-th entry from the i-th (parallel runs)"
    )
    parser.add_argument(
        "--twins", type=int, default=0, help="train only the twins of this many held-out concepts"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    part, parts = (int(x) for x in args.part.split("/"))
    backbone = get_backbone("sdxl")
    pipe = load_pipeline(backbone, str(model_dir()))
    host = AdapterHost.for_pipeline(pipe, backbone)
    args.out.mkdir(parents=True, exist_ok=True)
    record = args.out / (f"zoo-twins-{part}.jsonl" if args.twins else f"zoo-{part}.jsonl")
    done = {json.loads(line)["name"] for p in args.out.glob("zoo-*.jsonl") for line in p.open()}
    todo = twins(args.twins, args.count) if args.twins else plan(args.count)
    for i, entry in enumerate(todo):
        if i % parts != part or entry.name in done:
            continue
        data = training_data(entry, args.images, seed=1 if args.twins else 0)
        config = config_for(entry, args.steps, data[0].caption)
        result, seconds = train_in_scratch(pipe, backbone, config, data, host=host)
        host.add("zoo", result.lora)
        try:
            before, after = movement(pipe, backbone, host, "zoo", data[:16])
        finally:
            host.remove("zoo")
        lora = result.lora
        lora.trigger_words = [entry.trigger]
        write_kohya(lora, args.out / f"{entry.name}.safetensors")
        line = {
            **asdict(entry),
            "description": entry.description,
            "file": f"{entry.name}.safetensors",
            "steps": args.steps,
            "images": args.images,
            "seconds": round(seconds, 1),
            "loss_base": before,
            "loss_adapted": after,
            "caption_example": data[0].caption,
            "twin_of": entry.name[: -len("-twin")] if args.twins else None,
        }
        with record.open("a") as f:
            f.write(json.dumps(line) + "\n")
        log.info("%s (%s) %.1fs loss %.4f -> %.4f", entry.name, entry.kind, seconds, before, after)


if __name__ == "__main__":
    main()
