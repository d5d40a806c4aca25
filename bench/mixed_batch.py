"""Throughput of a batch whose images each have their own LoRA (one pipeline call, per-sample scales) against
a batch of the same size with one LoRA for every image, and against one call per image.

python -m bench.mixed_batch [--images 8] [--steps 20] [--repeat 5]

The toy model at 64 px with the bundled concept LoRAs (each has text-encoder parts, so the text encoders mix
per image too), merge, guidance 7.5. Timed round-robin: `same` (n images, one LoRA, one call), `mixed` (n
images, n different LoRAs, one call) and `one by one` (the mixed images, a call each). Goal (issue 20): mixed
>= 0.85 of same's throughput.
"""

from __future__ import annotations

import argparse

import torch

from bench.common import emit, ratio, round_robin, spread
from composer.adapters.host import AdapterHost
from composer.backbones import get_backbone, load_pipeline
from composer.formats import read_lora
from composer.render import LoraWeight, RenderRequest, render_batch
from toyworld import loras_dir, model_dir, scenes

CONCEPTS = (
    "star",
    "heart",
    "cross",
    "crescent",
    "arrow",
    "ring",
    "zigzag",
    "concentric",
    "speckled",
    "brick",
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    if not 2 <= args.images <= len(CONCEPTS):
        parser.error(f"--images must be 2..{len(CONCEPTS)} (one bundled LoRA each)")
    backbone = get_backbone("sdxl")
    pipe = load_pipeline(backbone, model_dir())
    host = AdapterHost.for_pipeline(pipe, backbone)
    names = CONCEPTS[: args.images]
    for name in names:
        host.add(name, read_lora(loras_dir() / f"{name}.safetensors"))

    def request(i: int, name: str) -> RenderRequest:
        prompt = f"a large red {scenes.TRIGGERS[name]} in the centre, white background"
        kw = dict(num_inference_steps=args.steps, guidance_scale=7.5, height=64, width=64, seed=i)
        return RenderRequest(prompt, loras=(LoraWeight(name),), **kw)

    same = [request(i, names[0]) for i in range(args.images)]
    mixed = [request(i, name) for i, name in enumerate(names)]
    times = round_robin(
        {
            "same": lambda: render_batch(pipe, backbone, host, same),
            "mixed": lambda: render_batch(pipe, backbone, host, mixed),
            "one by one": lambda: [render_batch(pipe, backbone, host, [r]) for r in mixed],
        },
        args.repeat,
    )
    figures = {
        **{f"seconds per batch, {k}": spread(v) for k, v in times.items()},
        "throughput mixed / same": ratio(times, "same", "mixed", "same / mixed seconds"),
        "throughput mixed / one by one": ratio(times, "one by one", "mixed", "one by one / mixed seconds"),
    }
    emit(
        "mixed_batch",
        figures,
        {"throughput mixed / same": ">= 0.85"},
        {
            "images": args.images,
            "steps": args.steps,
            "repeat": args.repeat,
            "threads": torch.get_num_threads(),
        },
    )


if __name__ == "__main__":
    main()
