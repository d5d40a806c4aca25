"""What every backbone family provides, and the loading code they share."""

from __future__ import annotations

import json
import logging
import os
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from composer.errors import BackboneError

log = logging.getLogger(__name__)

TINY = "tiny"  # the --model value that builds a family's tiny random-weight variant offline
# diffusers resolves its classes by lazy imports that are not thread-safe (two threads loading their first
# pipeline at once fail with "module 'diffusers' has no attribute ..."): one load at a time per process,
# whoever loads (render workers, the studio UI, a training run).
_LOADING = threading.Lock()


@dataclass(frozen=True)
class Backbone:
    """A model family: how to load it, build it small or on the meta device, and where adapters go.

    Adding a family = one file that builds one of these + one line in `composer.backbones.BACKBONES`.
    """

    family: str  # "sdxl" | "flux" (the LoRA file family it accepts)
    pipeline_class: str  # diffusers pipeline class name
    denoiser: str  # pipeline attribute holding the denoiser: "unet" | "transformer"
    text_encoders: tuple[str, ...]  # pipeline attributes of the text encoders, in LoRA-component order
    target_pattern: str  # regex on denoiser module names: default LoRA targets (Linear layers)
    build_tiny: Callable[[int], Any]  # seed -> pipeline with tiny random weights, built offline
    build_meta_denoiser: Callable[[], nn.Module]  # the real architecture on the meta device
    blora_blocks: dict[str, str] = field(default_factory=dict)  # role -> block module path (B-LoRA)
    default_steps: int = 30
    default_guidance: float = 5.0

    def components(self, pipe) -> dict[str, nn.Module]:
        """LoRA component name -> module, as LoRA files name them."""
        names = (self.denoiser, *self.text_encoders)
        return {name: getattr(pipe, name) for name in names if getattr(pipe, name, None) is not None}

    def native_size(self, pipe) -> int:
        """The pixel size the model was built for (toy 64, SDXL and FLUX 1024 for the real ones)."""
        if self.family == "sdxl":
            return int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)
        return int(getattr(pipe, "default_sample_size", 64)) * int(pipe.vae_scale_factor)

    def target_modules(
        self, denoiser: nn.Module, pattern: str | None = None, conv_pattern: str | None = None
    ) -> list[str]:
        """Names of the denoiser's Linear layers matching `pattern` (default: the LoRA targets), and of its
        Conv2d layers matching `conv_pattern` (none by default).

        A layer an adapter host has wrapped counts under its own name (never as "<name>.base").
        """
        regex = re.compile(pattern or self.target_pattern)
        conv_regex = re.compile(conv_pattern) if conv_pattern else None
        found, inner = [], set()
        for n, m in denoiser.named_modules():  # parents come before their children
            if n in inner:
                continue
            layer = getattr(m, "base", m)
            if layer is not m:
                inner.add(f"{n}.base")
            linear = isinstance(layer, nn.Linear) and regex.search(n)
            conv = conv_regex is not None and isinstance(layer, nn.Conv2d) and conv_regex.search(n)
            if linear or conv:
                found.append(n)
        return found


def pipeline_cls(name: str):
    import diffusers

    return getattr(diffusers, name)


def load_pipeline(
    backbone: Backbone,
    model: str | os.PathLike,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
):
    """Load a diffusers pipeline of `backbone`'s family.

    Args:
        model: "tiny" for the built-in random-weight variant, a local diffusers directory, a local single-file
            checkpoint (.safetensors), or a hub id (only from the local cache when HF_HUB_OFFLINE=1).
        dtype, device: where the pipeline lives.
        seed: weight seed of the tiny variant.

    Raises:
        BackboneError: the model cannot be found or is of another family.
    """
    with _LOADING:
        return _load_pipeline(backbone, model, dtype=dtype, device=device, seed=seed)


def _load_pipeline(backbone: Backbone, model, *, dtype, device, seed):
    cls = pipeline_cls(backbone.pipeline_class)
    text = str(model)
    if text == TINY:
        pipe = backbone.build_tiny(seed)
    else:
        path = Path(text).expanduser()
        try:
            if path.is_dir():
                if not (path / "model_index.json").is_file():
                    raise BackboneError(f"{path} is not a diffusers pipeline directory (no model_index.json)")
                found = json.loads((path / "model_index.json").read_text()).get("_class_name")
                if found != backbone.pipeline_class:
                    raise BackboneError(
                        f"{path} holds a {found}, not a {backbone.pipeline_class} ({backbone.family})"
                    )
                pipe = cls.from_pretrained(path, dtype=dtype, local_files_only=True)
            elif path.suffix == ".safetensors" and path.is_file():
                pipe = cls.from_single_file(path, dtype=dtype)
            elif path.suffix in {".ckpt", ".pt", ".pth", ".bin"}:
                raise BackboneError(f"{path}: pickle checkpoints are refused; convert it to safetensors")
            elif path.exists() or text.startswith((".", "/", "~")):
                raise BackboneError(f"{path}: not a diffusers directory or a .safetensors checkpoint")
            else:
                pipe = cls.from_pretrained(text, dtype=dtype)
        except BackboneError:
            raise
        except (OSError, ValueError) as exc:
            offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
            hint = " (HF_HUB_OFFLINE is set: only the local cache is used)" if offline else ""
            raise BackboneError(f"cannot load {backbone.family} model {text!r}{hint}: {exc}") from exc
    if type(pipe).__name__ != backbone.pipeline_class:
        raise BackboneError(f"{text!r} is a {type(pipe).__name__}, expected {backbone.pipeline_class}")
    for module in pipe.components.values():
        if isinstance(module, nn.Module):
            module.eval()  # freshly built modules start in train mode (T5 dropout would be live)
            module.requires_grad_(False)
            if next(module.parameters()).dtype != dtype:
                module.to(dtype=dtype)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def on_meta(model_class: str, config: dict) -> nn.Module:
    """A diffusers model class built from a config on the meta device: exact architecture, no memory."""
    import diffusers

    with torch.device("meta"):
        return getattr(diffusers, model_class)(**config)


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
