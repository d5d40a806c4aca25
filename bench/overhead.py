"""Denoiser step time with k = 1, 2, 4, 8 unfused LoRAs over base step time: ours and diffusers/peft.

python -m bench.overhead [--family sdxl|flux] [--configs toy,mid] [--rank 16] [--repeat 7] [--device cpu|cuda] [--dtype float16]
"""

from __future__ import annotations

import argparse
import copy

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


def measure(
    family: str,
    config: str,
    rank: int,
    ks: list[int],
    repeat: int,
    device: str,
    dtype,
    batch: int,
    latent: int,
):
    backbone = BACKBONES[family]
    unet = build_denoiser(family, config, device, dtype)
    theirs = copy.deepcopy(unet)
    plain = copy.deepcopy(unet)  # the base: no wrappers, no peft layers
    targets = backbone.target_modules(unet)
    inputs = denoiser_inputs(unet, batch, latent, device, dtype)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def step(model):
        return lambda: model(**inputs)

    host = AdapterHost({backbone.denoiser: unet}, family)
    loras = [random_lora(unet, seed, rank, targets, backbone.denoiser, family) for seed in range(max(ks))]
    for i, (lora, state) in enumerate(loras):
        host.add(f"l{i}", lora)
        theirs.load_lora_adapter(state, adapter_name=f"l{i}", prefix=None)
    out: dict[str, float] = {}
    with torch.inference_mode():
        for k in ks:
            names = [f"l{i}" for i in range(k)]
            host.set_active({n: 1.0 for n in names})
            theirs.set_adapters(names, [1.0] * k)
            times = round_robin(
                {"base": step(plain), "ours": step(unet), "theirs": step(theirs)}, repeat, sync
            )
            name = f"{config}_r{rank}_k{k}" if family == "sdxl" else f"{family}_{config}_r{rank}_k{k}"
            out.update(ratio(times, "ours", "base", f"{name}_ours_over_base"))
            out.update(ratio(times, "theirs", "base", f"{name}_diffusers_over_base"))
            out.update(ratio(times, "theirs", "ours", f"{name}_diffusers_over_ours"))
            if device.startswith("cuda"):
                for who in ("base", "ours", "theirs"):
                    ms = spread(times[who], 1e3, 2)
                    out.update({f"{name}_{who}_ms_per_step_{q}": ms[q] for q in ("min", "median", "max")})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--configs",
        default="toy,mid",
        help="sdxl: tiny, toy (the toy world's widths), mid (SDXL widths), real; flux: tiny, real",
    )
    parser.add_argument("--ks", default="1,2,4,8")
    parser.add_argument("--repeat", type=int, default=7)
    add_device_args(parser)
    args = parser.parse_args()
    torch.manual_seed(0)
    _, dtype, _, latent = device_setup(args)
    figures: dict[str, float] = {"rounds": args.repeat}
    batch = 2 if args.family == "sdxl" else 1  # SDXL: classifier-free guidance; FLUX-dev: guidance embedded
    for config in args.configs.split(","):
        figures.update(
            measure(
                args.family,
                config,
                args.rank,
                [int(k) for k in args.ks.split(",")],
                args.repeat,
                args.device,
                dtype,
                batch,
                latent,
            )
        )
    goals = {
        k: "<= 1.3"
        for k in figures
        if k.endswith("_k4_ours_over_base") and not k.startswith(("tiny_", "toy_", "flux_tiny_"))
    }
    emit(
        "overhead",
        figures,
        goals,
        {
            "family": args.family,
            "latent": latent,
            "batch": batch,
            "dtype": args.dtype,
            "rounds": args.repeat,
            "threads": torch.get_num_threads(),
        },
    )


if __name__ == "__main__":
    main()
