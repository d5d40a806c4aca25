"""What each composition method costs over a render without LoRAs, with k LoRAs in the stack.

python -m bench.method_cost [--k 2,3] [--steps 20] [--repeat 5]

The toy model at 64 px, the bundled subject LoRAs (star, heart, cross, ...), one image, guidance 7.5; regional
paints k vertical strips (and, for region prompts, gives each strip its own prompt). Every method and the base
render are timed round-robin, one call each per round; each figure is the ratio of medians over the base
render, with the extremes of the per-round ratios. Issue 20's goals: switch <= 1.05 x merge; composite about
k x a merge; single-pass regional <= 1.3 x base at k = 3; cmlora <= 0.6 x composite at k = 3 (its profiles
measured by the warm-up round, as the catalog keeps them). Denoiser passes per image are counted for merge,
composite, cmlora and gated. gated runs untrained gates (the same work as trained ones: every LoRA's output
apart, then the gates), and its gate parameter count is printed per k.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from bench.common import emit, ratio, round_robin, spread
from composer.adapters.host import AdapterHost
from composer.backbones import get_backbone, load_pipeline
from composer.formats import read_lora
from composer.gates import GateBank
from composer.masks import Mask, RegionMasks
from composer.methods import (
    CLoRAParams,
    CMLoRAParams,
    CompositeParams,
    GatedParams,
    MergeParams,
    RegionalParams,
    SwitchParams,
)
from composer.render import LoraWeight, RenderRequest, render_batch
from toyworld import loras_dir, model_dir, scenes

SUBJECTS = ("star", "heart", "cross", "crescent")
SIZE = 64
FIXED = dict(guidance_scale=7.5, height=SIZE, width=SIZE, seed=0)


def strip(i: int, k: int) -> Mask:
    values = np.zeros((SIZE, SIZE), np.uint8)
    values[:, i * SIZE // k : (i + 1) * SIZE // k] = 255
    return Mask(SIZE, SIZE, values.tobytes())


def methods(names: tuple[str, ...]) -> dict[str, tuple[str, object]]:
    k = len(names)
    regions = RegionMasks.of({n: strip(i, k) for i, n in enumerate(names)})
    prompts = "\n".join(f"{n}: a large red {scenes.TRIGGERS[n]}, white background" for n in names)
    return {
        "merge": ("merge", MergeParams()),
        "switch": ("switch", SwitchParams()),
        "composite": ("composite", CompositeParams()),
        "cmlora": ("cmlora", CMLoRAParams()),
        "regional": ("regional", RegionalParams(regions)),
        "regional + region prompts": ("regional", RegionalParams(regions, prompts=prompts)),
        "regional, single pass": ("regional", RegionalParams(regions, passes="single")),
        "regional + region prompts, single pass": (
            "regional",
            RegionalParams(regions, prompts=prompts, passes="single"),
        ),
        "clora": ("clora", CLoRAParams()),
        "gated": ("gated", GatedParams(gates="untrained")),
    }


def passes_per_image(pipe, render) -> float:
    """Denoiser passes of one render, in passes of a single image (rows through the UNet's first layer over
    the rows of classifier-free guidance's one call)."""
    rows: list[int] = []
    hook = pipe.unet.conv_in.register_forward_pre_hook(lambda module, a: rows.append(a[0].shape[0]))
    try:
        render()
    finally:
        hook.remove()
    return sum(rows) / 2  # guidance batches the unconditional and conditional image: 2 rows a pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--k", default="2,3", help="LoRAs in the stack, comma-separated")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    ks = [int(k) for k in args.k.split(",")]
    if not all(2 <= k <= len(SUBJECTS) for k in ks):
        parser.error(f"--k values must be 2..{len(SUBJECTS)}")
    backbone = get_backbone("sdxl")
    pipe = load_pipeline(backbone, model_dir())
    host = AdapterHost.for_pipeline(pipe, backbone)
    for name in SUBJECTS[: max(ks)]:
        host.add(name, read_lora(loras_dir() / f"{name}.safetensors"))
    triggers = {n: [scenes.TRIGGERS[n]] for n in SUBJECTS}
    figures: dict = {}
    for k in ks:
        names = SUBJECTS[:k]
        prompt = " and ".join(f"a red {scenes.TRIGGERS[n]}" for n in names) + ", white background"
        stack = tuple(LoraWeight(n) for n in names)
        requests = {"base (no LoRA)": RenderRequest(prompt, num_inference_steps=args.steps, **FIXED)}
        for label, (method, params) in methods(names).items():
            requests[label] = RenderRequest(
                prompt,
                loras=stack,
                method=method,
                method_params=params,
                num_inference_steps=args.steps,
                **FIXED,
            )
        profiles: dict = {}  # cmlora's, measured by the warm-up round (the catalog keeps them in the studio)
        fns = {
            label: (
                lambda r=request, p=profiles: render_batch(
                    pipe, backbone, host, [r], triggers=triggers, profiles=p
                )
            )
            for label, request in requests.items()
        }
        times = round_robin(fns, args.repeat)
        counted = ("merge", "composite", "cmlora", "gated")
        passes = {label: passes_per_image(pipe, fns[label]) for label in counted}
        figures[f"k={k}"] = {
            "seconds": {label: spread(t) for label, t in times.items()},
            "over base": {label: ratio(times, label, "base (no LoRA)", "x") for label in list(fns)[1:]},
            "switch / merge": ratio(times, "switch", "merge", "x"),
            "composite / merge": ratio(times, "composite", "merge", "x"),
            "cmlora / composite": ratio(times, "cmlora", "composite", "x"),
            "gated / merge": ratio(times, "gated", "merge", "x"),
            "gate parameters": GateBank.for_stack(host, backbone.denoiser, names).parameter_count(),
            "denoiser passes per image": passes,
            "regional single pass / per region": ratio(times, "regional, single pass", "regional", "x"),
        }
    emit(
        "method_cost",
        figures,
        {
            "switch / merge": "<= 1.05",
            "composite / merge": "about k",
            "regional, single pass over base": "<= 1.3 at k = 3",
            "cmlora / composite": "<= 0.6 at k = 3",
        },
        {"steps": args.steps, "repeat": args.repeat, "size": SIZE, "threads": torch.get_num_threads()},
    )


if __name__ == "__main__":
    main()
