"""B-LoRA separation on the toy world: content half of one image + style half of another, scored by the evaluator.

python -m bench.blora [--steps 400] [--seeds 12]

Trains a B-LoRA and, as the baseline, a plain LoRA (all attention layers) on each single image of
toyworld.train_concepts.BLORA_IMAGES: content images (a held-out subject, solid) and style images (a square
in a held-out texture). For each content x style pair it renders the shared prompt with
  halves: content half of the content image's B-LoRA + style half of the style image's B-LoRA,
  whole:  both B-LoRAs whole,
  plain:  both plain LoRAs,
and reports how often the evaluator sees the content image's shape with the style image's texture and colour.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.common import emit  # noqa: E402
from composer.adapters import blora  # noqa: E402
from composer.adapters.host import AdapterHost  # noqa: E402
from composer.backbones import get_backbone, load_pipeline  # noqa: E402
from composer.train import TrainConfig  # noqa: E402
from composer.train.data import TrainingImage, to_pixels  # noqa: E402
from toyworld import concepts, model_dir  # noqa: E402
from toyworld.evaluator import Evaluator  # noqa: E402
from toyworld.train_concepts import BLORA_IMAGES, BLORA_PROMPT, BLORA_RECIPE, blora_image  # noqa: E402

CONTENT = [n for n, look in BLORA_IMAGES.items() if look["texture"] == "solid"]
STYLE = [n for n, look in BLORA_IMAGES.items() if look["texture"] != "solid"]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=str(model_dir()))
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--seeds", type=int, default=12)
    parser.add_argument("--sample-steps", type=int, default=30)
    parser.add_argument("--guidance", type=float, default=7.5)
    args = parser.parse_args()
    backbone = get_backbone("sdxl")
    pipe = load_pipeline(backbone, args.model)
    evaluator = Evaluator.load()
    host = AdapterHost.for_pipeline(pipe, backbone)
    for name in CONTENT + STYLE:
        image, _ = blora_image(name)
        data = [TrainingImage(None, to_pixels(image, 64), BLORA_PROMPT)]
        for kind in ("blora", "lora"):
            recipe = dict(BLORA_RECIPE, kind=kind)
            config = TrainConfig(prompt=BLORA_PROMPT, steps=args.steps, checkpoint_every=args.steps, **recipe)
            result, _ = concepts.train_in_scratch(pipe, backbone, config, data, host=host)
            host.add(f"{name}/{kind}", result.lora)
            if kind == "blora":
                for role in blora.ROLES:
                    host.add(f"{name}/{role}", blora.half(result.lora, role))
    stacks = {
        "halves": lambda c, s: {f"{c}/content": 1.0, f"{s}/style": 1.0},
        "whole": lambda c, s: {f"{c}/blora": 1.0, f"{s}/blora": 1.0},
        "plain": lambda c, s: {f"{c}/lora": 1.0, f"{s}/lora": 1.0},
    }
    for method, stack in stacks.items():
        hits = {"all": [], "shape": [], "texture": [], "colour": []}
        for c in CONTENT:
            for s in STYLE:
                gens = [torch.Generator().manual_seed(1000 + i) for i in range(args.seeds)]
                with host.activate(stack(c, s)), torch.no_grad():
                    images = pipe(
                        prompt=[BLORA_PROMPT] * args.seeds,
                        num_inference_steps=args.sample_steps,
                        guidance_scale=args.guidance,
                        generator=gens,
                    ).images
                want = {
                    "shape": BLORA_IMAGES[c]["shape"],
                    "texture": BLORA_IMAGES[s]["texture"],
                    "colour": BLORA_IMAGES[s]["colour"],
                }
                for report in evaluator.evaluate(images):
                    obj = report.objects[0] if report.objects else None
                    got = {k: getattr(obj, k).label == v if obj else False for k, v in want.items()}
                    for k, v in got.items():
                        hits[k].append(v)
                    hits["all"].append(all(got.values()))
        emit(
            "blora",
            {k: round(float(np.mean(v)), 3) for k, v in hits.items()},
            {},
            {
                "method": method,
                "renders": len(hits["all"]),
                "steps": args.steps,
                "recipe": {k: v for k, v in BLORA_RECIPE.items() if k != "kind"},
            },  # fmt: skip
        )


if __name__ == "__main__":
    main()
