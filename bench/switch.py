"""Switching LoRA sets, timed with the forward that pays for it: ours vs diffusers `set_adapters` vs a fresh load.

python -m bench.switch [--family sdxl|flux] [--config mid] [--rank 16] [--repeat 15] [--sets 2,6] [--ks 2] [--device cpu|cuda] [--dtype float16]

A switch is not done when the call returns: our layer builds the new set's stacked matrices in the next
forward, while diffusers' `set_adapters` walks every peft layer up front. So the figure that counts is a switch
plus the forward after it, for both, timed round-robin in one run (each round: ours switch + forward, ours
forward again on the same set, diffusers switch + forward, diffusers forward again, a fresh load + forward).
With `--sets 2` two sets alternate and stay in our per-layer cache of stacked sets; with 6 they cycle beyond
its 4 entries, so every one of our switches pays the cache miss. The call-only figures (`set_active`, a dict copy,
against `set_adapters`) are reported apart and labelled as such: they are not a switch.
"""

from __future__ import annotations

import argparse
import copy
import itertools

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
from composer.backbones import BACKBONES


def time_switches(host, unet, theirs, fresh, loras, sets, inputs, repeat, sync) -> dict[str, list[float]]:
    """Seconds per round of each way to switch and run a forward, round-robin."""
    ours_next, theirs_next, fresh_next = (itertools.cycle(sets) for _ in range(3))

    def ours_switch():
        host.set_active(next(ours_next))
        unet(**inputs)

    def theirs_switch():
        s = next(theirs_next)
        theirs.set_adapters(list(s), list(s.values()))
        theirs(**inputs)

    def fresh_load():
        s = next(fresh_next)
        fresh.unload_lora()
        for name in s:
            fresh.load_lora_adapter(loras[int(name[1:])][1], adapter_name=name, prefix=None)
        fresh.set_adapters(list(s), list(s.values()))
        fresh(**inputs)

    return round_robin(
        {
            "ours_switch_forward": ours_switch,
            "ours_warm_forward": lambda: unet(**inputs),
            "diffusers_switch_forward": theirs_switch,
            "diffusers_warm_forward": lambda: theirs(**inputs),
            "fresh_load_forward": fresh_load,
        },
        repeat,
        sync,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--config",
        default="mid",
        help="sdxl: tiny, toy, mid (SDXL widths) or real (SDXL base); flux: tiny or real",
    )
    parser.add_argument("--repeat", type=int, default=15, help="rounds per number of sets")
    parser.add_argument("--sets", default="2,6", help="numbers of sets to cycle through")
    parser.add_argument("--ks", default="2", help="LoRAs per set (e.g. 1,2,4,8)")
    add_device_args(parser)
    args = parser.parse_args()
    device, dtype, sync, latent = device_setup(args)
    set_counts = [int(n) for n in args.sets.split(",")]
    ks = [int(k) for k in args.ks.split(",")]

    backbone = BACKBONES[args.family]
    unet = build_denoiser(args.family, args.config, device, dtype)
    theirs = copy.deepcopy(unet)
    fresh = copy.deepcopy(unet)
    targets = backbone.target_modules(unet)
    loras = [
        random_lora(unet, seed, args.rank, targets, backbone.denoiser, args.family)
        for seed in range(max(ks) * max(set_counts))
    ]
    host = AdapterHost({backbone.denoiser: unet}, args.family)
    for i, (lora, state) in enumerate(loras):
        host.add(f"l{i}", lora)
        theirs.load_lora_adapter(state, adapter_name=f"l{i}", prefix=None)
    batch = 2 if args.family == "sdxl" else 1  # SDXL: classifier-free guidance; FLUX-dev: guidance embedded
    inputs = denoiser_inputs(unet, batch, latent, device, dtype)

    figures: dict[str, object] = {"rounds": args.repeat}
    with torch.inference_mode():
        for k, n_sets in itertools.product(ks, set_counts):
            sets = [{f"l{k * s + j}": 0.5 + 0.1 * j for j in range(k)} for s in range(n_sets)]
            times = time_switches(host, unet, theirs, fresh, loras, sets, inputs, args.repeat, sync)
            key = f"k{k}_{n_sets}_sets"
            for num, den, name in (
                ("diffusers_switch_forward", "ours_switch_forward", "diffusers_over_ours"),
                ("fresh_load_forward", "ours_switch_forward", "fresh_load_over_ours"),
                ("ours_switch_forward", "ours_warm_forward", "ours_switch_forward_over_warm"),
                ("diffusers_switch_forward", "diffusers_warm_forward", "diffusers_switch_forward_over_warm"),
            ):
                figures.update(ratio(times, num, den, f"{key}_{name}"))
            if device.startswith("cuda"):
                for name, ts in times.items():
                    ms = spread(ts, 1e3, 2)
                    figures.update({f"{key}_{name}_ms_{q}": ms[q] for q in ("min", "median", "max")})

        # The calls alone: ours is a dict copy (the per-layer work comes in the next forward), labelled as such.
        pair = itertools.cycle(sets[:2])
        pair_theirs = itertools.cycle(sets[:2])

        def set_adapters_call():
            s = next(pair_theirs)
            theirs.set_adapters(list(s), list(s.values()))

        calls = round_robin(
            {
                "set_active_dict_copy": lambda: host.set_active(next(pair)),
                "set_adapters_call": set_adapters_call,
            },
            args.repeat * 4,
            sync,
        )
        figures.update(
            ratio(
                calls,
                "set_adapters_call",
                "set_active_dict_copy",
                "call_only_set_adapters_over_set_active",
                1,
            )
        )
    goals = {f"k{k}_{n}_sets_diffusers_over_ours": ">= 1.0" for k, n in itertools.product(ks, set_counts)}
    emit(
        "switch",
        figures,
        goals,
        {
            "family": args.family,
            "config": args.config,
            "batch": batch,
            "latent": latent,
            "rank": args.rank,
            "loras_per_set": ks,
            "adapted_layers": len(targets),
            "rounds": args.repeat,
            "threads": torch.get_num_threads(),
        },
    )


if __name__ == "__main__":
    main()
