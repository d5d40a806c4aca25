"""Backbones, devices and dtypes as settings name them, and render results with their PNG files."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from PIL import PngImagePlugin

import toyworld
from composer.backbones import TINY, Backbone, get_backbone
from composer.errors import AdapterRuntimeError, StudioError, first_line
from composer.render import Progress
from db.errors import CatalogError

log = logging.getLogger(__name__)


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
        toy = replace(get_backbone("sdxl"), default_guidance=7.5, nominal_size=toyworld.IMAGE_SIZE)
        return toy, str(model or toyworld.model_dir())
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


class RenderFailed(StudioError):
    """A render failed for a reason the studio did not check beforehand; the message is one line naming the
    LoRA and module (an adapter failed) or the LoRAs and settings, and the full trace is in the log."""


@contextmanager
def render_errors(names: Mapping[str, str], setting: str, progress: Progress | None):
    """Turn any exception of the block into one line: yields the progress callback to pass on, whose own
    exceptions (a cancelled job) pass through unchanged, as do project errors other than an adapter's.

    Args:
        names: the user's LoRA name by resident adapter name (a file hash).
        setting: what was rendered, for the message ("sdxl tiny, 32x32, 2 steps").
    """
    own: list[BaseException] = []

    def relay(done: int, total: int) -> None:
        try:
            progress(done, total)
        except BaseException as exc:
            own.append(exc)
            raise

    try:
        yield None if progress is None else relay
    except Exception as exc:
        if any(exc is e for e in own) or (
            isinstance(exc, (StudioError, CatalogError)) and not isinstance(exc, AdapterRuntimeError)
        ):
            raise
        line = _failure_line(exc, names, setting)
        log.error("%s", line, exc_info=exc)
        raise RenderFailed(line) from exc


def _failure_line(exc: BaseException, names: Mapping[str, str], setting: str) -> str:
    if isinstance(exc, AdapterRuntimeError):
        loras = ", ".join(repr(names.get(a, a)) for a in exc.adapters)
        return f"render failed: LoRA {loras} on module {exc.module}: {exc.cause_line}"
    loras = ", ".join(repr(n) for n in names.values()) or "none"
    return f"render failed ({setting}; LoRAs: {loras}): {first_line(exc)}"


def name_lora(exc: BaseException, key: str, name: str) -> None:
    """Re-word an adapter-host error about resident adapter `key` (a file hash) to name the LoRA."""
    if exc.args and isinstance(exc.args[0], str):
        exc.args = (exc.args[0].replace(repr(key), repr(name)), *exc.args[1:])
