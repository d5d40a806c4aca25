"""Training speed per adapter type: one optimizer step (forward, backward, AdamW) of the UNet with adapters.

python -m bench.train_speed [--config real|mid|toy] [--device cuda] [--latent 128] [--repeat 20]
                            [--batch 1] [--targets attention|transformer|full]

The real SDXL UNet (random weights; fp16 on CUDA with fp32 adapter weights under autocast, as the trainer's
mixed precision) at latent 128 = 1024 px, batch 1. On a CPU use --config mid --latent 32 for ratios only,
or --config toy --latent 16 --batch 8 --targets full for the toy world's UNet as bench.adapters trains it.
"""

from __future__ import annotations

import argparse
import contextlib
from types import SimpleNamespace

import torch

from bench.common import build_unet, emit, ratio, round_robin, spread, unet_inputs
from composer.adapters.host import AdapterHost
from composer.backbones import get_backbone
from composer.train import TrainConfig, targets

KINDS = {
    "lora": dict(kind="lora", rank=4),
    "blora": dict(kind="blora", rank=64),
    "kron": dict(kind="kron", kron_factors=(16, 16)),
    "tensor": dict(kind="tensor"),
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="real", choices=["tiny", "mid", "real", "toy"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--latent", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--kinds", default="lora,blora,kron,tensor")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--targets", default="attention", choices=["attention", "transformer", "full"])
    args = parser.parse_args()
    cuda = args.device.startswith("cuda")
    dtype = torch.float16 if cuda else torch.float32
    unet = build_unet(args.config, args.device, dtype)
    backbone = get_backbone("sdxl")
    inputs = unet_inputs(unet, args.batch, args.latent, args.device, dtype)
    target = torch.randn_like(inputs["sample"])
    host = AdapterHost({"unet": unet}, "sdxl")
    optimizers, counts = {}, {}
    for kind in args.kinds.split(","):
        config = TrainConfig(
            prompt="x", targets=args.targets if kind != "blora" else "attention", **KINDS[kind]
        )
        keys = targets.target_keys(backbone, SimpleNamespace(unet=unet), config)
        built = targets.create_all(host.find, keys, config, torch.Generator().manual_seed(0))
        host.attach(kind, built)
        params = [p for _, a in built for p in a.parameters()]
        for p in params:
            p.data = p.data.float()
            p.requires_grad_(True)
        optimizers[kind] = torch.optim.AdamW(params, lr=1e-4)
        counts[kind] = sum(p.numel() for p in params)
    autocast = torch.autocast("cuda", dtype=torch.float16) if cuda else contextlib.nullcontext()
    scaler = torch.amp.GradScaler("cuda") if cuda else None

    def step(kind):
        def run():
            with host.activate({kind: 1.0}), autocast:
                loss = torch.nn.functional.mse_loss(unet(**inputs).sample.float(), target.float())
            opt = optimizers[kind]
            opt.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            else:
                loss.backward()
                opt.step()

        return run

    sync = torch.cuda.synchronize if cuda else (lambda: None)
    times = round_robin({k: step(k) for k in optimizers}, args.repeat, sync)
    figures: dict[str, float] = {"rounds": args.repeat}
    for k, ts in times.items():
        ms = spread(ts, 1e3, 1)
        figures.update({f"{k}_ms_per_step_{q}": ms[q] for q in ("min", "median", "max")})
        if k != "lora" and "lora" in times:
            figures.update(ratio(times, k, "lora", f"{k}_vs_lora"))
    emit(
        "train_speed",
        figures,
        {},
        {
            "config": args.config,
            "latent": args.latent,
            "batch": args.batch,
            "targets": args.targets,
            "dtype": str(dtype),
            "parameters": counts,
        },
    )


if __name__ == "__main__":
    main()
