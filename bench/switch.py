"""Switching between two resident LoRA sets: our mixing context vs diffusers set_adapters vs a fresh load.

python -m bench.switch [--config mid] [--rank 16] [--repeat 21] [--device cpu|cuda] [--dtype float16]
"""

from __future__ import annotations

import argparse
import copy
import itertools

import torch

from bench.common import build_unet, emit, median_time, random_lora, unet_inputs
from composer.adapters.host import AdapterHost
from composer.backbones import sdxl


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="mid")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=21)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    device, dtype = args.device, getattr(torch, args.dtype)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    unet = build_unet(args.config, device, dtype)
    theirs = copy.deepcopy(unet)
    fresh = copy.deepcopy(unet)
    targets = sdxl.BACKBONE.target_modules(unet)
    loras = [random_lora(unet, seed, args.rank, targets) for seed in range(4)]
    sets = [({"l0": 0.8, "l1": 0.6}), ({"l2": 0.7, "l3": 0.9})]

    host = AdapterHost({"unet": unet}, "sdxl")
    for i, (lora, state) in enumerate(loras):
        host.add(f"l{i}", lora)
        theirs.load_lora_adapter(state, adapter_name=f"l{i}", prefix=None)

    flip = itertools.cycle(sets)
    ours = median_time(lambda: host.set_active(next(flip)), args.repeat, sync)
    flip = itertools.cycle(sets)

    def diffusers_switch():
        s = next(flip)
        theirs.set_adapters(list(s), list(s.values()))

    peft = median_time(diffusers_switch, args.repeat, sync)
    flip = itertools.cycle(sets)

    def fresh_load():
        s = next(flip)
        fresh.unload_lora()
        for name in s:
            fresh.load_lora_adapter(loras[int(name[1:])][1], adapter_name=name, prefix=None)
        fresh.set_adapters(list(s), list(s.values()))

    load = median_time(fresh_load, max(3, args.repeat // 4), sync)

    # The first forward after switching to a set builds that set's stacked matrices once per layer; measure it.
    inputs = unet_inputs(unet, 2, 16 if device == "cpu" else 128, device, dtype)
    with torch.inference_mode():
        host.set_active(sets[0])
        warm = median_time(lambda: unet(**inputs), 5, sync)
        cold_times = []
        for _ in range(3):
            for layer in unet.modules():
                if hasattr(layer, "_stacks"):
                    layer._stacks.clear()
            cold_times.append(median_time(lambda: unet(**inputs), 1, sync, warmup=False))
        cold = sorted(cold_times)[1]

    figures = {
        "set_adapters_over_ours": round(peft / ours, 1),
        "fresh_load_over_ours": round(load / ours, 1),
        "ours_switch_us": round(ours * 1e6, 2),
        "first_forward_after_new_set_over_warm": round(cold / warm, 3),
    }
    if device.startswith("cuda"):
        figures.update({"set_adapters_ms": round(peft * 1e3, 3), "fresh_load_ms": round(load * 1e3, 2)})
    emit(
        "switch",
        figures,
        {"set_adapters_over_ours": ">= 20"},
        {"config": args.config, "rank": args.rank, "loras_per_set": 2},
    )


if __name__ == "__main__":
    main()
