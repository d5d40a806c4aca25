"""What each composition method costs per denoising step, on a real denoiser architecture with random weights.

python -m bench.method_steps [--family sdxl|flux] [--config mid] [--k 3] [--rank 16] [--repeat 7]
    [--device cpu|cuda] [--dtype float16] [--latent 128]

The denoiser alone (no text encoders, no VAE), k random LoRAs on every target the backbone adapts, one call per
step as the pipeline makes it (SDXL: batch 2, classifier-free guidance; FLUX-dev: batch 1). Timed round-robin:
- base: no LoRA; merge: all k active; switch: one LoRA active (its step is a single LoRA's);
- composite: the k LoRAs as k streams of one batched call (the multi-stream seam, equal weights);
- regional (per region): k streams blended by k vertical strips; regional single pass: one call, each LoRA's
  change masked inside the layers (`composer.adapters.spatial`);
- streams n (n = 1..k): n LoRAs as n streams. cmlora's step is one of these: its plan (`passes_plan`, 20
  steps) runs n streams at each step, so its mean step is the plan's mean of the measured streams-n medians
  (the blend of cached predictions, a few element-wise products, is left out);
- heterogeneous batch: 8 images with 8 different LoRAs (per-sample scales) against 8 images with one LoRA;
- gated: the k LoRAs fused by gates in every adapted layer (`composer.gates`; untrained gates do the same work
  as trained ones), with the gates' parameter count.
Issue 20's goals: single pass <= 1.3 x base at k = 3; cmlora <= 0.6 x composite at k = 3; mixed / same
throughput >= 0.85.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from bench.common import (
    add_device_args,
    build_denoiser,
    denoiser_inputs,
    device_setup,
    emit,
    random_lora,
    ratio,
    round_robin,
    spread,
)
from composer.adapters.host import AdapterHost
from composer.adapters.spatial import SpatialScale, TokenGeometry
from composer.backbones import BACKBONES
from composer.gates import GateBank, gated_denoiser
from composer.methods.cmlora import passes_plan
from composer.seams.streams import denoise_in_one_pass, denoise_in_streams

MIXED = 8  # images in the heterogeneous batch, each with its own LoRA
PLAN_STEPS = 20


def strips(k: int, side: int = 64) -> torch.Tensor:
    masks = torch.zeros(k, side, side)
    for i in range(k):
        masks[i, :, i * side // k : (i + 1) * side // k] = 1.0
    return masks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="mid", help="sdxl: tiny, toy, mid or real; flux: tiny or real")
    parser.add_argument("--k", type=int, default=3, help="LoRAs in the stack")
    parser.add_argument("--repeat", type=int, default=7)
    add_device_args(parser)
    args = parser.parse_args()
    device, dtype, sync, latent = device_setup(args)
    backbone = BACKBONES[args.family]
    model = build_denoiser(args.family, args.config, device, dtype)
    targets = backbone.target_modules(model)
    host = AdapterHost({backbone.denoiser: model}, args.family)
    names = [f"l{i}" for i in range(max(args.k, MIXED))]
    for seed, name in enumerate(names):
        host.add(name, random_lora(model, seed, args.rank, targets, backbone.denoiser, args.family)[0])
    guided = 2 if args.family == "sdxl" else 1  # SDXL: classifier-free guidance; FLUX-dev: embedded
    inputs = denoiser_inputs(model, guided, latent, device, dtype)
    grid = None if args.family == "sdxl" else (latent // 2, latent // 2)
    stack = names[: args.k]
    one = {name: 1.0 for name in stack}
    masks = strips(args.k)
    geometry = TokenGeometry()
    spatial = {name: SpatialScale(1.0, masks[i], geometry) for i, name in enumerate(stack)}

    def plain(scales):
        def call():
            host.set_active(scales)
            model(**inputs)

        return call

    def within(make_context, batch_inputs=None):
        def call():
            host.set_active({})
            with make_context():
                model(**(batch_inputs or inputs))

        return call

    bank = GateBank.for_stack(host, backbone.denoiser, stack).to(device)

    def gated():
        host.set_active(one)
        with gated_denoiser(model, backbone, host, bank):
            model(**inputs)

    mixed_inputs = denoiser_inputs(model, guided * MIXED, latent, device, dtype)
    rows = torch.arange(guided * MIXED) % MIXED  # row r is image r mod 8 (guidance repeats the images)
    per_image = {name: (rows == i).float().to(device) for i, name in enumerate(names[:MIXED])}
    fns = {
        "base": plain({}),
        "merge": plain(one),
        "switch": plain({stack[0]: 1.0}),
        "composite": within(
            lambda: denoise_in_streams(model, host, [{n: 1.0} for n in stack], torch.ones(args.k, 1, 1), grid)
        ),
        "regional, per region": within(
            lambda: denoise_in_streams(model, host, [{n: 1.0} for n in stack], masks, grid)
        ),
        "regional, single pass": within(lambda: denoise_in_one_pass(model, host, spatial, geometry, grid)),
        **{
            f"streams {n}": within(
                lambda n=n: denoise_in_streams(
                    model, host, [{m: 1.0} for m in stack[:n]], torch.ones(n, 1, 1), grid
                )
            )
            for n in range(1, args.k + 1)
        },
        "batch of 8, one LoRA": lambda: (host.set_active({names[0]: 1.0}), model(**mixed_inputs)),
        "batch of 8, 8 LoRAs": lambda: (host.set_active(per_image), model(**mixed_inputs)),
        "gated": gated,
    }
    with torch.inference_mode():
        times = round_robin(fns, args.repeat, sync)
    host.set_active({})
    plan = passes_plan(PLAN_STEPS, args.k)
    medians = {n: statistics.median(times[f"streams {n}"]) for n in range(1, args.k + 1)}
    cmlora_step = statistics.mean(medians[len(todo)] for _, todo in plan)
    figures: dict = {
        "over base": {
            label: ratio(times, label, "base", "x")
            for label in (
                "merge",
                "switch",
                "composite",
                "regional, per region",
                "regional, single pass",
                "gated",
            )
        },
        "gated / merge": ratio(times, "gated", "merge", "x"),
        "gate parameters": bank.parameter_count(),
        "gated layers": len(bank.keys),
        "switch / merge": ratio(times, "switch", "merge", "x"),
        "single pass / merge": ratio(times, "regional, single pass", "merge", "x"),
        "single pass / per region": ratio(times, "regional, single pass", "regional, per region", "x"),
        "cmlora / composite (plan mean of streams-n medians)": round(cmlora_step / medians[args.k], 3),
        "cmlora passes per step": round(sum(len(t) for _, t in plan) / PLAN_STEPS, 3),
        "mixed / same throughput": ratio(times, "batch of 8, one LoRA", "batch of 8, 8 LoRAs", "x"),
    }
    if device.startswith("cuda"):
        figures["ms per call"] = {label: spread(t, 1e3, 2) for label, t in times.items()}
    emit(
        "method_steps",
        figures,
        {
            "regional, single pass over base": "<= 1.3 at k = 3",
            "cmlora / composite": "<= 0.6 at k = 3",
            "mixed / same throughput": ">= 0.85",
        },
        {
            "family": args.family,
            "config": args.config,
            "k": args.k,
            "rank": args.rank,
            "latent": latent,
            "dtype": args.dtype,
            "repeat": args.repeat,
            "threads": torch.get_num_threads(),
        },
    )


if __name__ == "__main__":
    main()
