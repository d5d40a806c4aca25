"""Base-model family (sd15, sdxl, flux) of a LoRA, from metadata strings or from its module structure."""

from __future__ import annotations

import re
from collections.abc import Mapping

from composer.formats.model import LoraFile, ModuleDelta

METADATA_FAMILY_KEYS = ("ss_base_model_version", "modelspec.architecture")
_XL_WORDS = ("sdxl", "stable-diffusion-xl", "sd_xl", "xl 1.0", "pony", "illustrious", "noobai")
_SD15_WORDS = ("sd_v1", "sd1", "sd 1", "stable-diffusion-v1", "v1-5", "sd15")
_BLOCK = re.compile(r"transformer_blocks\.(\d+)\.")


def family_from_string(text: str | None) -> str | None:
    """Map a base-model string (kohya, ModelSpec, Civitai, A1111) to a family; None when unknown."""
    s = (text or "").strip().lower()
    if not s:
        return None
    if "flux" in s:
        return "flux"
    if any(w in s for w in _XL_WORDS):
        return "sdxl"
    if any(w in s for w in _SD15_WORDS):
        return "sd15"
    return None


def family_from_metadata(metadata: Mapping[str, str]) -> str | None:
    """Family named by ss_base_model_version or modelspec.architecture, when one is present and known."""
    for key in METADATA_FAMILY_KEYS:
        family = family_from_string(metadata.get(key))
        if family:
            return family
    return None


def _in_features(m: ModuleDelta) -> int | None:
    return int(m.tensors["down"].shape[1]) if m.kind in ("lora", "dora") else None


def family_from_structure(modules: Mapping[str, ModuleDelta]) -> str | None:
    """Family from components, paths and cross-attention widths; None when nothing decides it."""
    mods = list(modules.values())
    components = {m.component for m in mods}
    unet = [m.path for m in mods if m.component == "unet"]
    if "transformer" in components or any(p.startswith("single_transformer_blocks") for p in unet):
        return "flux"
    if "text_encoder_2" in components:
        t5 = any(
            ".block." in m.path or m.path.startswith("shared")
            for m in mods
            if m.component == "text_encoder_2"
        )
        return "flux" if t5 else "sdxl"
    widths = {_in_features(m) for m in mods if m.component == "unet" and m.path.endswith("attn2.to_k")}
    if 2048 in widths:
        return "sdxl"
    if 768 in widths:
        return "sd15"
    if any(p.startswith("add_embedding") for p in unet):
        return "sdxl"
    if any(int(b) >= 1 for p in unet for b in _BLOCK.findall(p)):
        return "sdxl"  # SD1.5 attention blocks hold one transformer block; SDXL's hold 2 or 10
    if any(p.startswith(("down_blocks.3", "up_blocks.3")) for p in unet):
        return "sd15"
    return None


def detect_family(
    lora: LoraFile | Mapping[str, ModuleDelta], metadata: Mapping[str, str] | None = None
) -> str | None:
    """Family of a LoRA: metadata (ss_base_model_version, modelspec.architecture) wins, then structure."""
    if isinstance(lora, LoraFile):
        modules, metadata = lora.modules, lora.metadata if metadata is None else metadata
    else:
        modules = lora
    return family_from_metadata(metadata or {}) or family_from_structure(modules)
