"""Shared set-up for the benchmarks: denoisers of three sizes, random LoRAs for ours and for diffusers."""

from __future__ import annotations

import json
import math
import os
import platform
import socket
import statistics
import sys
import time
from collections.abc import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from composer.backbones import sdxl  # noqa: E402
from composer.backbones.single_file import shipped_configs  # noqa: E402
from composer.formats.model import LoraFile, ModuleDelta  # noqa: E402

# SDXL-like widths on CPU: two levels at 640 and 1280 channels, SDXL head size 64.
MID_UNET = dict(
    sdxl.TINY_UNET,
    block_out_channels=(320, 640, 1280),
    transformer_layers_per_block=(1, 1, 1),
    layers_per_block=1,
    attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048,
    projection_class_embeddings_input_dim=6 * 256 + 1280,
    addition_time_embed_dim=256,
    norm_num_groups=32,
)
CONFIGS = {"tiny": sdxl.TINY_UNET, "mid": MID_UNET}  # "real": SDXL base's shipped config


def build_unet(config: str, device: str, dtype: torch.dtype):
    return build_denoiser("sdxl", config, device, dtype)


def build_denoiser(family: str, config: str, device: str, dtype: torch.dtype):
    """A denoiser with random weights (they cost the same time as trained ones), in eval mode, no grads.

    sdxl: "tiny", "toy" (the toy world's UNet), "mid" (SDXL widths, two levels) or "real" (SDXL base's config).
    flux: "tiny" or "real" (FLUX.1-dev's transformer config: 12 B parameters, built on `device` in `dtype`).
    """
    from diffusers import FluxTransformer2DModel, UNet2DConditionModel

    if family == "flux":
        from composer.backbones import flux

        if config == "real":
            kwargs = FluxTransformer2DModel.load_config(shipped_configs("flux") / "transformer")
        else:
            kwargs = flux.TINY_TRANSFORMER
        cls = FluxTransformer2DModel
    elif config == "toy":  # the toy world's UNet architecture (random weights, like the others)
        from toyworld import model_dir

        kwargs, cls = UNet2DConditionModel.load_config(model_dir() / "unet"), UNet2DConditionModel
    elif config == "real":
        kwargs, cls = UNet2DConditionModel.load_config(shipped_configs("sdxl") / "unet"), UNet2DConditionModel
    else:
        kwargs, cls = CONFIGS[config], UNet2DConditionModel
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in its dtype on its device: no fp32 copy of a 12 B model first
    try:
        with torch.device(device):
            model = cls.from_config(kwargs)
    finally:
        torch.set_default_dtype(previous)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def denoiser_inputs(
    model, batch: int, latent: int, device: str, dtype: torch.dtype, tokens: int = 77
) -> dict:
    """Keyword arguments of one denoiser call at latent side `latent` (a UNet's or FLUX's, by the model)."""
    if not hasattr(model.config, "joint_attention_dim"):
        return unet_inputs(model, batch, latent, device, dtype, tokens)
    cfg = model.config
    g = torch.Generator().manual_seed(0)
    side = latent // 2  # 2x2 latent patches packed into one token

    def r(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    img_ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3)
    return dict(
        hidden_states=r(batch, side * side, cfg.in_channels),
        encoder_hidden_states=r(batch, tokens, cfg.joint_attention_dim),
        pooled_projections=r(batch, cfg.pooled_projection_dim),
        timestep=torch.full((batch,), 0.5, device=device, dtype=dtype),
        img_ids=img_ids.to(device=device, dtype=dtype),
        txt_ids=torch.zeros(tokens, 3, device=device, dtype=dtype),
        guidance=torch.full((batch,), 3.5, device=device, dtype=dtype) if cfg.guidance_embeds else None,
    )


def unet_inputs(unet, batch: int, latent: int, device: str, dtype: torch.dtype, tokens: int = 77):
    cfg = unet.config
    g = torch.Generator().manual_seed(0)
    pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim

    def r(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    return dict(
        sample=r(batch, cfg.in_channels, latent, latent),
        timestep=torch.tensor(500, device=device),
        encoder_hidden_states=r(batch, tokens, cfg.cross_attention_dim),
        added_cond_kwargs={"text_embeds": r(batch, pooled), "time_ids": r(batch, 6)},
    )


def random_lora(
    model, seed: int, rank: int, targets: list[str], component: str = "unet", family: str = "sdxl"
) -> tuple[LoraFile, dict[str, torch.Tensor]]:
    """One LoRA as our LoraFile and as a diffusers/peft state dict (same tensors)."""
    g = torch.Generator().manual_seed(seed)
    modules, state = {}, {}
    for name in targets:
        m = model.get_submodule(name)
        m = getattr(m, "base", m)
        down = (torch.randn(rank, m.in_features, generator=g) * 0.01).to(m.weight)
        up = (torch.randn(m.out_features, rank, generator=g) * 0.01).to(m.weight)
        modules[f"{component}.{name}"] = ModuleDelta(
            component, name, "lora", {"down": down, "up": up}, float(rank)
        )
        state[f"{name}.lora_A.weight"] = down
        state[f"{name}.lora_B.weight"] = up
    return LoraFile(modules, "diffusers", family), state


def spread(values: list[float], scale: float = 1.0, digits: int = 3, p95: bool = False) -> dict[str, float]:
    """min / median / (p95) / max of `values` (times `scale`), rounded, and how many there were."""
    v = sorted(x * scale for x in values)
    if not v:
        return {}
    at = lambda q: v[min(len(v) - 1, math.ceil(q * len(v)) - 1)]  # noqa: E731 (nearest-rank percentile)
    out = {"min": v[0], "median": statistics.median(v)} | ({"p95": at(0.95)} if p95 else {})
    return {k: round(x, digits) for k, x in (out | {"max": v[-1]}).items()} | {"n": len(v)}


def round_robin(
    fns: dict[str, Callable[[], object]],
    repeat: int,
    sync: Callable[[], None] = lambda: None,
    warmup: bool = True,
) -> dict[str, list[float]]:
    """Seconds of each call of each function over `repeat` rounds, timed round-robin (one call of each per
    round, in order) so that load from elsewhere and the machine's drift hit all of them alike."""
    if warmup:
        for fn in fns.values():
            fn()
        sync()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            sync()
            t = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t)
    return times


def ratio(times: dict[str, list[float]], num: str, den: str, name: str, digits: int = 3) -> dict[str, float]:
    """`num` over `den` as flat figures: `name` is the ratio of their medians; `name_min` and `name_max` the
    extremes of the per-round ratios (rounds are paired, so a slow moment of the machine cancels out of each)."""
    per_round = [a / b for a, b in zip(times[num], times[den], strict=True)]
    median = statistics.median(times[num]) / statistics.median(times[den])
    return {name: round(median, digits), f"{name}_min": round(min(per_round), digits)} | {
        f"{name}_max": round(max(per_round), digits)
    }


def add_device_args(parser) -> None:
    """--family, --rank, --device, --dtype and --latent, as every denoiser benchmark takes them (see
    `device_setup`)."""
    parser.add_argument("--family", default="sdxl", choices=["sdxl", "flux"])
    parser.add_argument("--rank", type=int, default=16, help="rank of each random LoRA")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument(
        "--latent", type=int, default=0, help="latent side; 0 = 16 on CPU, 128 (1024 px) on GPU"
    )


def device_setup(args) -> tuple[str, torch.dtype, Callable[[], None], int]:
    """(device, dtype, sync, latent side) from `add_device_args`' options."""
    cuda = args.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    return args.device, getattr(torch, args.dtype), sync, args.latent or (128 if cuda else 16)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} / torch {torch.__version__}"
    return f"{platform.processor() or platform.machine()} x{os.cpu_count()} CPU / torch {torch.__version__}"


def emit(name: str, figures: dict, goals: dict, extra: dict | None = None) -> None:
    print(
        json.dumps(
            {
                "benchmark": name,
                "figures": figures,
                "goals": goals,
                "machine": machine(),
                "command": "python -m bench." + name + " " + " ".join(sys.argv[1:]),
                **(extra or {}),
            }
        )
    )
