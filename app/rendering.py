"""Backbones, devices and dtypes as settings name them, and render results with their PNG files."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from PIL import PngImagePlugin

import toyworld
from composer.backbones import TINY, Backbone, get_backbone


@dataclass
class RenderResult:
    images: list  # PIL images
    provenance: dict
    render_id: int
    paths: list[Path] = field(default_factory=list)
    pictures: list = field(default_factory=list)  # (caption, PIL image): what the method used, e.g. masks


def resolve_backbone(name: str, model: str | None) -> tuple[Backbone, str]:
    """A backbone name as users type it, and the model to load: "toy" is SDXL with the shipped toy model;
    "sdxl" and "flux" default to their tiny random-weight variants."""
    if name == "toy":  # measured best guidance for the toy model (docs/BENCHMARKS.md)
        return replace(get_backbone("sdxl"), default_guidance=7.5), str(model or toyworld.model_dir())
    return get_backbone(name), str(model or TINY)


def resolve_device(setting: str) -> str:
    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return setting


def resolve_dtype(setting: str, device: str) -> torch.dtype:
    if setting == "auto":
        return torch.float16 if device.startswith("cuda") else torch.float32
    try:
        return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[setting]
    except KeyError:
        raise ValueError(f"unknown dtype {setting!r}: float32, float16 or bfloat16") from None


def save_images(images: list, out: Path, provenance: dict) -> list[Path]:
    """PNG files with the provenance as JSON text (key "lora_studio") and A1111-style "parameters"."""
    out = Path(out).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    loras = " ".join(f"<lora:{x['name']}:{x['weight']}>" for x in provenance["loras"])
    a1111 = (
        f"{provenance['prompt']} {loras}".strip()
        + f"\nNegative prompt: {provenance['negative_prompt']}\nSteps: {provenance['num_inference_steps']}, "
        + f"CFG scale: {provenance['guidance_scale']}, Seed: {provenance['seed']}, "
        + f"Size: {provenance['width']}x{provenance['height']}, Model: {provenance['model']}"
    )
    paths = []
    for i, image in enumerate(images):
        path = out if len(images) == 1 else out.with_name(f"{out.stem}_{i}{out.suffix or '.png'}")
        info = PngImagePlugin.PngInfo()
        info.add_text("lora_studio", json.dumps(provenance, sort_keys=True))
        info.add_text("parameters", a1111)
        image.save(path, format="PNG", pnginfo=info)
        paths.append(path)
    return paths
