"""Train the bundled concept adapters of the toy world with our own trainer, on the shipped toy model.

python -m toyworld.train_concepts --out toyworld/loras [--steps 1600] [--images 768] [--only star,zigzag] [--n 48]
    [--measure-only]

Runs training different adapters (`--only`) into one folder may go side by side: each writes only its own
entries into manifest.json, under a lock.

One LoRA per held-out concept (6 subjects, 4 styles, 2 backgrounds) from 768 generated scenes each with
trigger-word captions, half of them with the concept beside a base object in either half (so that it composes),
and B-LoRAs from single images (subjects for content, textured squares for style), all written as kohya
safetensors with trigger words, plus manifest.json (name, kind, trigger, tags, description, training settings
and time, and the adapter's own measured success) that the studio imports on first start.

Success is measured right after training: a concept LoRA on `--n` fresh trigger prompts (one render each,
toyworld.concepts.success) beside the base model on the same prompts (the chance level); a B-LoRA's content
half for its shape and style half for its texture and colour, on `--n` seeds of its one prompt.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

import torch
from filelock import FileLock
from PIL import Image

from composer.adapters import blora
from composer.adapters.host import AdapterHost
from composer.backbones import get_backbone, load_pipeline
from composer.formats import read_lora, write_kohya
from composer.train import TrainConfig
from composer.train.data import TrainingImage, to_pixels
from toyworld import concepts, model_dir, scenes
from toyworld.evaluator import Evaluator

log = logging.getLogger("toyworld.train_concepts")

# the best measured recipe (docs/BENCHMARKS.md, "Every adapter type"): every convolution and attention layer,
# both text encoders, Min-SNR weighting
CONCEPT_RECIPE = dict(
    kind="lora", rank=4, learning_rate=2e-3, batch_size=8, targets="full", snr_gamma=5.0, text_encoder=True
)
PAIRS = 0.5  # share of training scenes with a second, base object
# classifier-free guidance of the success renders: on the toy model guidance 2-4 draws the concept adapters'
# shapes and textures cleanly, 5 and above starts to break them (docs/BENCHMARKS.md, "Guidance")
GUIDANCE = 3.0
# how closely a smaller re-measurement (tests/test_bundled.py, slow) must match each recorded success: the
# first `prompts` of the recorded test prompts, within `standard_errors` binomial errors of that smaller sample
# (and never tighter than `floor`)
TOLERANCE = {"prompts": 12, "standard_errors": 3.0, "floor": 0.15}
BLORA_RECIPE = dict(kind="blora", rank=8, learning_rate=1e-3, batch_size=4)
BLORA_PROMPT = "a vlorb"  # B-LoRA's "A [v]": one token for every single-image B-LoRA
# single images for B-LoRA: content (a held-out subject, plain) and style (a base square in a held-out texture)
BLORA_IMAGES = {
    "blora-star": dict(shape="star", colour="red", texture="solid"),
    "blora-heart": dict(shape="heart", colour="green", texture="solid"),
    "blora-zigzag": dict(shape="square", colour="blue", texture="zigzag"),
    "blora-speckled": dict(shape="square", colour="yellow", texture="speckled"),
}
ADAPTER_NAMES = [c.name for c in scenes.HELD_OUT] + list(
    BLORA_IMAGES
)  # every bundled adapter, in training order


def blora_image(name: str, size: int = 64) -> tuple[Image.Image, scenes.SceneSpec]:
    look = BLORA_IMAGES[name]
    spec = scenes.SceneSpec(
        (scenes.ObjectSpec(look["shape"], look["colour"], look["texture"], "large", "centre"),), "white"
    )
    return Image.fromarray(scenes.render(spec, size, 0)), spec


def blora_success(pipe, host, name: str, lora, evaluator, n: int) -> dict:
    """Each half of a bundled B-LoRA alone on its prompt: the content half should draw the image's shape, the
    style half its texture and colour. n seeds of one prompt (renders, not independent prompts)."""
    look = BLORA_IMAGES[name]
    wants = {"content": ("shape",), "style": ("texture", "colour")}
    figures: dict = {"renders": n, "prompt": BLORA_PROMPT, "guidance": GUIDANCE, "independent_prompts": 1}
    for role, attributes in wants.items():
        host.add(role, blora.half(lora, role))
        try:
            with host.activate({role: 1.0}), torch.no_grad():
                images = pipe(
                    prompt=[BLORA_PROMPT] * n,
                    num_inference_steps=30,
                    guidance_scale=GUIDANCE,
                    generator=[torch.Generator().manual_seed(1000 + i) for i in range(n)],
                ).images
        finally:
            host.remove(role)
        for attribute in attributes:
            hits = [
                bool(r.objects) and getattr(r.objects[0], attribute).label == look[attribute]
                for r in evaluator.evaluate(images)
            ]
            figures[f"{role}_{attribute}"] = round(sum(hits) / n, 3)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("toyworld/loras"))
    parser.add_argument("--model", default=str(model_dir()))
    # 768 scenes and 1600 steps: a ring LoRA on the toy model drew small rings in 0.38 / 0.57 / 0.67 / 0.86 / 0.86
    # of prompts from 32 / 96 / 192 / 768 / 3072 scenes at 1600 steps (docs/BENCHMARKS.md, "How many scenes")
    parser.add_argument("--steps", type=int, default=1600)
    parser.add_argument("--blora-steps", type=int, default=400)
    parser.add_argument("--images", type=int, default=768)
    parser.add_argument(
        "--rank", type=int, default=CONCEPT_RECIPE["rank"], help="LoRA rank of concept adapters"
    )
    parser.add_argument("--pairs", type=float, default=PAIRS, help="share of two-object training scenes")
    parser.add_argument(
        "--decoys",
        type=float,
        default=0.0,
        help="share of the two-object scenes of a subject whose other object is written with a decoy word",
    )
    parser.add_argument(
        "--small",
        type=float,
        default=None,
        help="share of a subject's or style's training scenes with its object small (default: as drawn, ~half)",
    )
    parser.add_argument(
        "--measure-only", action="store_true", help="re-measure the adapters in --out without training them"
    )
    parser.add_argument("--n", type=int, default=48, help="test prompts per concept for its recorded success")
    parser.add_argument("--only", default="", help="comma-separated concept/B-LoRA names (default: all)")
    args = parser.parse_args()
    only = selected(args.only) or set(ADAPTER_NAMES)  # a misspelt name is refused before the model loads
    manifest_path = args.out / "manifest.json"
    if args.measure_only:  # so is a name with nothing to measure
        recorded = manifest_entries(manifest_path)
        missing = sorted(
            n for n in only if n not in recorded or not (args.out / f"{n}.safetensors").is_file()
        )
        if missing:
            raise SystemExit(
                f"--measure-only: no file or manifest entry in {args.out} for {', '.join(missing)}"
            )
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    backbone = get_backbone("sdxl")
    pipe = load_pipeline(backbone, args.model)
    evaluator = Evaluator.load()
    host = AdapterHost.for_pipeline(pipe, backbone)
    if args.measure_only:  # keep each file and its training record; measure it again
        for name in (n for n in ADAPTER_NAMES if n in only):
            measured = measure(
                pipe, host, name, read_lora(args.out / f"{name}.safetensors"), evaluator, args.n
            )
            log.info("%s: success %s", name, measured)
            record(manifest_path, {**manifest_entries(manifest_path)[name], "success": measured})
        return
    args.out.mkdir(parents=True, exist_ok=True)
    hardware = (
        "cuda" if torch.cuda.is_available() else f"cpu x{os.cpu_count()} ({torch.get_num_threads()} threads)"
    )

    jobs = []
    for concept in scenes.HELD_OUT:
        if concept.name not in only:
            continue  # its scenes are not even drawn
        data = concepts.training_images(
            concept.name, args.images, pairs=args.pairs, decoys=args.decoys, small=args.small
        )
        captions = [d.caption for d in data]
        config = TrainConfig(
            prompt=captions[0],
            steps=args.steps,
            checkpoint_every=args.steps,
            **{**CONCEPT_RECIPE, "rank": args.rank},
        )
        what = {"subject": "the shape", "style": "the texture", "background": "the background"}[concept.kind]
        jobs.append(
            (
                concept.name,
                config,
                data,
                [concept.trigger],
                ["toyworld", concept.kind],
                f"Toy world {concept.kind} LoRA: {what} '{concept.name}', written with the trigger word "
                f"'{concept.trigger}' (e.g. '{captions[0]}'). For the bundled toy model.",
            )
        )
    for name in BLORA_IMAGES:
        if name not in only:
            continue
        image, spec = blora_image(name)
        config = TrainConfig(
            prompt=BLORA_PROMPT, steps=args.blora_steps, checkpoint_every=args.blora_steps, **BLORA_RECIPE
        )
        jobs.append(
            (
                name,
                config,
                [TrainingImage(None, to_pixels(image, 64), BLORA_PROMPT)],
                ["vlorb"],
                ["toyworld", "blora"],
                f"Toy world B-LoRA from one image ({spec.caption()}). Use {name}.content for its subject and "
                f"{name}.style for its colour and texture, prompt '{BLORA_PROMPT}'.",
            )
        )
    for name, config, data, triggers, tags, description in jobs:
        path = args.out / f"{name}.safetensors"
        result, seconds = concepts.train_in_scratch(pipe, backbone, config, data, host=host)
        measured = measure(pipe, host, name, result.lora, evaluator, args.n)
        write_kohya(result.lora, path, title=name, trigger_words=triggers)
        entry = {
            "name": name,
            "file": path.name,
            "kind": config.kind,
            "trigger_words": triggers,
            "tags": tags,
            "description": description,
            "training": {
                **config.to_json(),
                "images": len(data),
                "two_object_share": args.pairs if config.kind != "blora" else 0.0,
                "decoy_share": args.decoys if config.kind != "blora" else 0.0,
                **({"small_share": args.small} if args.small is not None and config.kind != "blora" else {}),
                "seconds": round(seconds, 1),
                "hardware": hardware,
                "final_loss": round(sum(result.losses[-50:]) / min(50, len(result.losses)), 4),
                "parameters": result.parameters,
            },
            "success": measured,
        }
        log.info("%s: %d params, %.0f s, success %s", name, result.parameters, seconds, measured)
        record(manifest_path, entry)


def selected(only: str) -> set[str]:
    """The names `--only` lists; an unknown name is refused with the known ones."""
    names = set(filter(None, (n.strip() for n in only.split(","))))
    unknown = sorted(names - set(ADAPTER_NAMES))
    if unknown:
        raise SystemExit(
            f"--only: unknown adapter name(s) {', '.join(unknown)}; known: {', '.join(ADAPTER_NAMES)}"
        )
    return names


def measure(pipe, host, name: str, lora, evaluator, n: int) -> dict:
    """The adapter's own success: a B-LoRA's halves (`blora_success`), a concept LoRA on its test prompts
    beside the base model on the same prompts (the chance level)."""
    if name in BLORA_IMAGES:
        return blora_success(pipe, host, name, lora, evaluator, n)
    with torch.no_grad():
        base = concepts.success(pipe, name, evaluator, n, guidance=GUIDANCE)
    host.add(name, lora)
    try:
        with host.activate({name: 1.0}), torch.no_grad():
            measured = concepts.success(pipe, name, evaluator, n, guidance=GUIDANCE)
    finally:
        host.remove(name)
    return {**measured, "base_rate": base["rate"]}


def manifest_entries(path: Path) -> dict[str, dict]:
    """The manifest's entries by name ({} before the first one is written)."""
    if not path.is_file():
        return {}
    return {e["name"]: e for e in json.loads(path.read_text())["adapters"]}


def record(path: Path, entry: dict) -> None:
    """Write one adapter's entry into the manifest, keeping every other entry as the file has it now.

    Read, change and write happen under a lock and the file is replaced whole, so that two runs training
    different adapters into one folder both land (each used to write back the manifest it read at its start).
    """
    with FileLock(str(path) + ".lock"):
        entries = {**manifest_entries(path), entry["name"]: entry}
        adapters = sorted(entries.values(), key=lambda e: e["name"])
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({"adapters": adapters, "success_tolerance": TOLERANCE}, indent=1) + "\n")
        os.replace(tmp, path)


if __name__ == "__main__":
    main()
