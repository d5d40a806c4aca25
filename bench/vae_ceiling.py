"""How much of each held-out concept survives the toy model's VAE: the ceiling on what a concept LoRA can show.

python -m bench.vae_ceiling [--model toyworld/model] [--n 100] [--concepts star,zigzag]

A concept LoRA teaches the UNet to make latents of its subject, style or background; the VAE decoder turns them
into pixels. If the evaluator cannot see the concept in the VAE's own reconstruction of a clean drawing, no
adapter can make it appear in a render. For each held-out concept (subjects, styles and backgrounds): `--n`
fresh scenes (the test scenes bench.adapters prompts with), drawn, encoded to the posterior mean, decoded, and
scored; hit rates by object size, beside the evaluator's rate on the drawings themselves.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from bench.common import emit  # noqa: E402
from composer.backbones import get_backbone, load_pipeline  # noqa: E402
from composer.train.data import to_pixels  # noqa: E402
from toyworld import concepts, model_dir, scenes  # noqa: E402
from toyworld.evaluator import Evaluator  # noqa: E402


@torch.no_grad()
def reconstruct(pipe, images: list[Image.Image]) -> list[Image.Image]:
    """Encode to the posterior mean and decode; pixels come back as the pipeline turns its renders into images."""
    x = torch.stack([to_pixels(image, image.width) for image in images])
    y = pipe.vae.decode(pipe.vae.encode(x).latent_dist.mean).sample
    return pipe.image_processor.postprocess(y, output_type="pil")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=str(model_dir()))
    parser.add_argument("--n", type=int, default=100, help="scenes per concept")
    parser.add_argument(
        "--concepts",
        default=",".join(c.name for c in scenes.HELD_OUT),
        help="held-out concepts to measure (default: all of them)",
    )
    args = parser.parse_args()
    pipe = load_pipeline(get_backbone("sdxl"), args.model)
    evaluator = Evaluator.load()
    figures, drawn = {}, {}
    for name in args.concepts.split(","):
        specs = concepts.test_specs(name, args.n)
        images = [Image.fromarray(scenes.render(s, 64, i)) for i, s in enumerate(specs)]
        for label, batch in (("drawn", images), ("vae", reconstruct(pipe, images))):
            reports = evaluator.evaluate(batch)
            for size, rate in concepts.hit_rate_by_size(reports, specs, name).items():
                (figures if label == "vae" else drawn)[f"{name}_{size}"] = round(rate, 3)
    emit("vae_ceiling", figures, {}, {"evaluator_on_drawings": drawn, "scenes_per_concept": args.n})


if __name__ == "__main__":
    main()
