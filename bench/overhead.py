"""Denoiser step time with k = 1, 2, 4, 8 unfused LoRAs over base step time: ours and diffusers/peft.

python -m bench.overhead [--configs tiny,mid] [--rank 16] [--repeat 7] [--device cpu|cuda] [--dtype float16]
"""

from __future__ import annotations

import argparse
import copy

import torch

from bench.common import build_unet, emit, interleaved_medians, random_lora, unet_inputs
from composer.adapters.host import AdapterHost
from composer.backbones import sdxl


def measure(config: str, rank: int, ks: list[int], repeat: int, device: str, dtype, batch: int, latent: int):
    unet = build_unet(config, device, dtype)
    theirs = copy.deepcopy(unet)
    plain = copy.deepcopy(unet)  # the base: no wrappers, no peft layers
    targets = sdxl.BACKBONE.target_modules(unet)
    inputs = unet_inputs(unet, batch, latent, device, dtype)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def step(model):
        return lambda: model(**inputs)

    host = AdapterHost({"unet": unet}, "sdxl")
    loras = [random_lora(unet, seed, rank, targets) for seed in range(max(ks))]
    for i, (lora, state) in enumerate(loras):
        host.add(f"l{i}", lora)
        theirs.load_lora_adapter(state, adapter_name=f"l{i}", prefix=None)
    out: dict[str, float] = {}
    with torch.inference_mode():
        for k in ks:
            names = [f"l{i}" for i in range(k)]
            host.set_active({n: 1.0 for n in names})
            theirs.set_adapters(names, [1.0] * k)
            m = interleaved_medians(
                {"base": step(plain), "ours": step(unet), "theirs": step(theirs)}, repeat, sync
            )
            out[f"{config}_r{rank}_k{k}_ours_over_base"] = round(m["ours"] / m["base"], 3)
            out[f"{config}_r{rank}_k{k}_diffusers_over_base"] = round(m["theirs"] / m["base"], 3)
            base = m["base"]
    if device.startswith("cuda"):
        out[f"{config}_base_ms_per_step_batch{batch}"] = round(base * 1000, 2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--configs", default="tiny,mid")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--ks", default="1,2,4,8")
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument(
        "--latent", type=int, default=0, help="latent side; 0 = 16 on CPU, 128 (1024 px) on GPU"
    )
    args = parser.parse_args()
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    latent = args.latent or (128 if args.device.startswith("cuda") else 16)
    figures: dict[str, float] = {}
    for config in args.configs.split(","):
        figures.update(
            measure(
                config,
                args.rank,
                [int(k) for k in args.ks.split(",")],
                args.repeat,
                args.device,
                dtype,
                2,
                latent,
            )
        )
    goals = {k: "<= 1.3" for k in figures if k.startswith("mid_") and "_k4_ours" in k}
    emit("overhead", figures, goals, {"latent": latent, "batch": 2, "dtype": args.dtype})


if __name__ == "__main__":
    main()
