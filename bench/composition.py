"""Two subjects in one image, each from its own LoRA, on the toy model: merge vs regional with the true halves
(an oracle: the user painted exactly where each subject goes) vs clora with masks only vs clora with its latent
updates.

python -m bench.composition [--pairs 12] [--per-pair 2] [--steps 20] [--guidance 7.5] [--methods merge,clora]

Scenes: two held-out subjects on the left and right, every other attribute a base concept; the prompt writes each
subject with its trigger word ("a red xyvo on the left and a blue quelb on the right, white background") and the
stack holds both bundled subject LoRAs. The toy-world evaluator reads every image: "both" = each subject seen
where the prompt puts it; "left" / "right" = that one alone. Time per image is relative to merge, measured side
by side in this run.
"""

from __future__ import annotations

import argparse
import itertools
import time

import numpy as np
import torch

from bench.common import emit
from composer.adapters.host import AdapterHost
from composer.backbones import get_backbone, load_pipeline
from composer.formats import read_lora
from composer.masks import Mask, RegionMasks
from composer.methods import CLoRAParams, RegionalParams
from composer.render import LoraWeight, RenderRequest, render_batch
from toyworld import loras_dir, model_dir, scenes
from toyworld.evaluator import Evaluator

SIZE = 64


def two_subject_scenes(pairs: int, seed: int) -> list[scenes.SceneSpec]:
    """`pairs` scenes, each two different held-out subjects left and right (ordered pairs, chosen by seed)."""
    ordered = list(itertools.permutations(scenes.SUBJECTS_HELD_OUT, 2))
    rng = np.random.default_rng(seed)
    chosen = [ordered[i] for i in rng.choice(len(ordered), min(pairs, len(ordered)), replace=False)]
    out = []
    for i, (left, right) in enumerate(chosen):
        spec = scenes.sample_scene(seed * 1000 + i, "base", 2, fixed={"position": ("left", "right")})
        spec = scenes.replace_object(scenes.replace_object(spec, 0, shape=left), 1, shape=right)
        out.append(spec)
    return out


def half(side: str) -> Mask:
    values = np.zeros((SIZE, SIZE), np.uint8)
    values[:, : SIZE // 2] = 255
    return Mask(SIZE, SIZE, (values if side == "left" else 255 - values).tobytes())


def method_params(method: str, spec: scenes.SceneSpec):
    left, right = (o.shape for o in spec.objects)
    return {
        "merge": ("merge", None),
        "regional": ("regional", RegionalParams(RegionMasks.of({left: half("left"), right: half("right")}))),
        "clora-masks": ("clora", CLoRAParams(step_size=0.0)),
        "clora": ("clora", CLoRAParams()),
    }[method]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pairs", type=int, default=12)
    parser.add_argument("--per-pair", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", default="merge,regional,clora-masks,clora")
    args = parser.parse_args()
    methods = args.methods.split(",")

    backbone = get_backbone("sdxl")
    pipe = load_pipeline(backbone, model_dir())
    host = AdapterHost.for_pipeline(pipe, backbone)
    for name in scenes.SUBJECTS_HELD_OUT:
        host.add(name, read_lora(loras_dir() / f"{name}.safetensors"))
    triggers = {name: [scenes.TRIGGERS[name]] for name in scenes.SUBJECTS_HELD_OUT}
    evaluator = Evaluator.load()
    specs = two_subject_scenes(args.pairs, args.seed)

    images: dict[str, list] = {m: [] for m in methods}
    seconds = dict.fromkeys(methods, 0.0)
    for i, spec in enumerate(specs):
        loras = tuple(LoraWeight(o.shape) for o in spec.objects)
        for j in range(args.per_pair):
            for m in methods:  # interleaved, so the machine's drift hits every method alike
                name, params = method_params(m, spec)
                request = RenderRequest(
                    spec.caption(use_triggers=True),
                    num_inference_steps=args.steps,
                    guidance_scale=args.guidance,
                    height=SIZE,
                    width=SIZE,
                    seed=args.seed * 1_000_003 + i * 101 + j,
                    loras=loras,
                    method=name,
                    method_params=params,
                )
                start = time.perf_counter()
                images[m] += render_batch(pipe, backbone, host, [request], triggers=triggers)
                seconds[m] += time.perf_counter() - start

    figures = {}
    expected = [spec for spec in specs for _ in range(args.per_pair)]
    for m in methods:
        reports = evaluator.evaluate(images[m])
        hits = {"left": [], "right": []}
        for report, spec in zip(reports, expected, strict=True):
            for obj in spec.objects:
                seen = report.object_at(obj.position)
                hits[obj.position].append(seen is not None and seen.shape.label == obj.shape)
        both = [a and b for a, b in zip(hits["left"], hits["right"], strict=True)]
        figures[m] = {
            "both": round(float(np.mean(both)), 3),
            "left": round(float(np.mean(hits["left"])), 3),
            "right": round(float(np.mean(hits["right"])), 3),
            "time_vs_merge": round(seconds[m] / seconds[methods[0]], 2),
        }
    emit(
        "composition",
        figures,
        {},
        {"images_per_method": len(expected), "threads": torch.get_num_threads()},
    )


if __name__ == "__main__":
    main()
