"""Gates for the composition benchmark's `gated` method: trained per LoRA set on toy scenes that show the set's
concepts together (the set's own kind of scene, other seeds than the benchmark's prompts), with trigger-word
captions, and cached in a folder so that a rerun reuses them.

The cache file is named by the set (its names and file hashes, `composer.gates.gate_set_key`), the base model
(`model_identity`) and the training settings; its metadata holds the training record.
"""

from __future__ import annotations

import hashlib
import json
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from composer.formats.safetensors_io import file_hashes, load_tensors, save
from composer.gates import StoredGates, gate_set_key
from composer.train.data import TrainingImage, to_pixels
from composer.train.gates import train_gates
from toyworld import scenes

TRAIN_SEED = 424_242  # the scenes' seed: not the benchmark's prompt seeds
DEFAULT_DIR = Path.home() / ".cache" / "lora-studio" / "bench-gates"
# the parts of a diffusers folder that gate training runs through (the VAE encodes the training scenes)
MODEL_PARTS = ("unet", "vae", "text_encoder", "text_encoder_2", "transformer", "text_encoder_3")


@dataclass(frozen=True)
class GateSettings:
    steps: int = 300
    lr: float = 5e-3
    images: int = 32
    batch_size: int = 2
    seed: int = 0


def model_identity(folder: str | Path) -> str:
    """SHA-256 over the files of the model parts gate training runs through, so that gates cached for one base
    model are not reused for another or for a retrained one (parts it does not read, such as the toy model's
    LoRA encoder, do not count)."""
    folder = Path(folder)
    digest = hashlib.sha256()
    for part in MODEL_PARTS:
        for f in sorted(p for p in (folder / part).rglob("*") if p.is_file()):
            digest.update(f"{f.relative_to(folder).as_posix()}\n".encode())
            digest.update(hashlib.sha256(f.read_bytes()).digest())
    return digest.hexdigest()


def scene_images(specs: Sequence[scenes.SceneSpec], size: int) -> list[TrainingImage]:
    """Each scene drawn (its own seed) with its trigger-word caption, as the trainer takes it."""
    out = []
    for i, spec in enumerate(specs):
        picture = Image.fromarray(scenes.render(spec, size, TRAIN_SEED + i))
        out.append(TrainingImage(None, to_pixels(picture, size), spec.caption(use_triggers=True)))
    return out


def set_gates(
    pipe,
    backbone,
    host,
    names: Sequence[str],
    files: dict[str, Path],
    specs: Callable[[int, int], list[scenes.SceneSpec]],
    size: int,
    settings: GateSettings,
    folder: Path,
    base: str,
) -> tuple[StoredGates, bool]:
    """The set's gates, trained now (`specs(n, seed)`: n training scenes of the set) or read from `folder`;
    and whether they came from the cache. `base`: the base model's `model_identity`."""
    lora_set = gate_set_key((n, file_hashes(files[n]).sha256) for n in names)
    key = hashlib.sha256(f"{base}\n{lora_set}".encode()).hexdigest()
    s = settings
    path = folder / f"{key[:20]}-{s.steps}s-{s.images}i-{s.lr:g}lr-{s.batch_size}b-{s.seed}.safetensors"
    if path.is_file():
        tensors, metadata = load_tensors(path)
        return StoredGates(tensors, json.loads(metadata["record"])), True
    images = scene_images(specs(s.images, TRAIN_SEED), size)
    trained = train_gates(
        pipe, backbone, host, dict.fromkeys(names, 1.0), images, s.steps, s.lr, s.seed, s.batch_size
    )
    record = {**trained.record, "captions": sorted({i.caption for i in images})}
    folder.mkdir(parents=True, exist_ok=True)
    save(path, trained.gates.tensors, {"record": json.dumps(record)})
    return StoredGates(trained.gates.tensors, record), False


def summary(trained: dict[frozenset, tuple[StoredGates, bool]], test_captions: dict[frozenset, set]) -> dict:
    """What the gates cost and did, over the sets: steps, seconds, the training-image loss before and after
    (means), how many were cached, and the share of test prompts whose caption was also a training caption."""
    records = [gates.record for gates, _ in trained.values()]
    seen = [
        caption in set(trained[key][0].record.get("captions", []))
        for key, captions in test_captions.items()
        for caption in captions
    ]
    return {
        "sets": len(records),
        "cached": sum(cached for _, cached in trained.values()),
        "steps": sorted({r["steps"] for r in records}),
        "images_per_set": sorted({r["images"] for r in records}),
        "lr": sorted({r["lr"] for r in records}),
        "gate_parameters": sorted({r["parameters"] for r in records}),
        "seconds_per_set_median": round(statistics.median(r["seconds"] for r in records), 1),
        "seconds_total": round(sum(r["seconds"] for r in records), 1),
        "loss_untrained_mean": round(statistics.mean(r["loss_untrained"] for r in records), 5),
        "loss_trained_mean": round(statistics.mean(r["loss_trained"] for r in records), 5),
        "sets_whose_loss_fell": sum(r["loss_trained"] < r["loss_untrained"] for r in records),
        "test_captions_seen_in_training": round(sum(seen) / len(seen), 3) if seen else None,
    }
