"""Single-file checkpoints (one .safetensors in the original layout, as A1111, ComfyUI and Civitai share them),
loaded offline.

diffusers' `from_single_file` converts the original layout itself but fetches the model configs from the hub;
we hand it the configs this package ships (`configs/<family>/`: SDXL base 1.0, FLUX.1-dev) and tokenizers built
offline, so nothing is downloaded. The family is read from the key layout (the header only, no tensor is
loaded), and a checkpoint of another family, or one missing a component, is refused naming what was found.
"""

from __future__ import annotations

import json
import struct
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from composer.errors import BackboneError

if TYPE_CHECKING:
    from composer.backbones.base import Backbone

# Key prefixes of families no backbone serves, checked after the served ones (the first match names the file).
OTHER_LAYOUTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("a LoRA/LyCORIS adapter, not a model (import it with `lora-studio import`)", ("lora_", "lycoris_")),
    ("a Playground v2.5 checkpoint", ("edm_mean",)),
    ("a FLUX.2 checkpoint", ("single_stream_modulation.", "model.diffusion_model.single_stream_modulation.")),
    ("a Chroma checkpoint", ("distilled_guidance_layer.", "model.diffusion_model.distilled_guidance_layer.")),
    ("an SD 3 / 3.5 checkpoint", ("joint_blocks.", "model.diffusion_model.joint_blocks.")),
    ("an SDXL refiner checkpoint", ("conditioner.embedders.0.model.",)),
    ("an SD 2.x checkpoint", ("cond_stage_model.model.",)),
    ("an SD 1.x checkpoint", ("cond_stage_model.transformer.",)),
    ("an SDXL or SD UNet without its text encoders", ("model.diffusion_model.input_blocks.",)),
)
ADAPTER_MARKERS = (".lora_down.", ".lora_up.", ".lora_A.", ".lora_B.", ".hada_w1_a", ".lokr_w1")
MAX_HEADER = 100 * 2**20


def shipped_configs(family: str) -> Path:
    """The folder of diffusers configs (no weights) this package ships for a family's real model."""
    path = Path(str(resources.files("composer.backbones") / "configs" / family))
    if not (path / "model_index.json").is_file():
        raise BackboneError(f"no shipped single-file configs for the {family} family")
    return path


def checkpoint_keys(path: Path) -> list[str]:
    """The tensor names of a safetensors file, read from its header only.

    Raises:
        BackboneError: not a readable safetensors file.
    """
    try:
        with open(path, "rb") as fh:
            (length,) = struct.unpack("<Q", fh.read(8))
            if length > MAX_HEADER:
                raise ValueError(f"header of {length} bytes")
            header = json.loads(fh.read(length))
    except (OSError, ValueError, struct.error) as exc:
        raise BackboneError(f"{path}: not a readable safetensors checkpoint ({exc})") from None
    return [key for key in header if key != "__metadata__"]


def _has(keys: list[str], prefixes: tuple[str, ...]) -> bool:
    return any(key.startswith(prefixes) for key in keys)


def layout_of(keys: list[str], families: list[Backbone]) -> tuple[Backbone | None, str]:
    """The served family whose denoiser the keys hold (and its name), or None and what the keys look like."""
    for family in families:
        marked = family.checkpoint_marker and _has(keys, family.checkpoint_marker)
        if marked and not _has(keys, family.checkpoint_foreign):
            return family, f"a checkpoint of the {family.family} family"
    if any(marker in key for key in keys for marker in ADAPTER_MARKERS):
        return None, OTHER_LAYOUTS[0][0]
    for what, prefixes in OTHER_LAYOUTS:
        if _has(keys, prefixes):
            return None, what
    return None, "a file of no layout we know"


def check_checkpoint(backbone: Backbone, path: Path) -> None:
    """Refuse, naming what was found, a checkpoint that is not of `backbone`'s family or lacks a component.

    Raises:
        BackboneError: another family (SD 1.x, SD 3, the other served family, a LoRA...), or missing parts.
    """
    from composer.backbones import FAMILIES

    keys = checkpoint_keys(path)
    found, what = layout_of(keys, FAMILIES)
    if found is None or found.family != backbone.family:
        raise BackboneError(f"{path.name} is {what}, not one of the {backbone.family} family")
    missing = [name for name, prefixes in backbone.checkpoint_components.items() if not _has(keys, prefixes)]
    if missing:
        raise BackboneError(
            f"{path.name} holds the {backbone.family} {backbone.denoiser} but not its {', '.join(missing)}; "
            "use a checkpoint that carries them all, or a diffusers directory (--model DIR)"
        )


def load_single_file(backbone: Backbone, path: Path, *, dtype, configs: Path | None = None):
    """A pipeline from a single-file checkpoint, offline: configs from `configs` (default: the shipped ones),
    tokenizers from there or built by the backbone (`Backbone.checkpoint_tokenizers`).

    Raises:
        BackboneError: another family, a missing component or tokenizer, or weights that do not fit the configs.
    """
    from composer.backbones.base import pipeline_cls

    check_checkpoint(backbone, path)
    configs = configs or shipped_configs(backbone.family)
    tokenizers = backbone.checkpoint_tokenizers(configs, path)
    cls = pipeline_cls(backbone.pipeline_class)
    try:
        return cls.from_single_file(
            str(path), config=str(configs), local_files_only=True, dtype=dtype, **tokenizers
        )
    except (OSError, ValueError, RuntimeError, KeyError) as exc:  # diffusers' conversion and shape errors
        raise BackboneError(
            f"cannot load {path.name} as {backbone.family} with the configs in {configs}: {exc}"
        ) from exc


__all__ = [
    "OTHER_LAYOUTS",
    "check_checkpoint",
    "checkpoint_keys",
    "layout_of",
    "load_single_file",
    "shipped_configs",
]
