"""Write LoRA files in diffusers/peft and kohya layouts, with peft, kohya (ss_*) and ModelSpec metadata."""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path

import torch

from composer.errors import LoraFileError, UnknownKeysError
from composer.formats import names
from composer.formats.model import LoraFile, ModuleDelta
from composer.formats.readers import PEFT_METADATA_KEY
from composer.formats.safetensors_io import serialize, tensor_bytes_sha256, write_bytes_atomic

BASE_MODEL_VERSION = {"sdxl": "sdxl_base_v1-0", "sd15": "sd_v1", "flux": "flux1"}
ARCHITECTURE = {
    "sdxl": "stable-diffusion-xl-v1-base/lora",
    "sd15": "stable-diffusion-v1/lora",
    "flux": "flux-1-dev/lora",
}
# Hashes of the source file no longer describe a rewritten file.
STALE_KEYS = (PEFT_METADATA_KEY, "sshs_model_hash", "sshs_legacy_hash", "modelspec.hash_sha256")


def _plain_loras(lora: LoraFile, path: Path) -> list[ModuleDelta]:
    other = sorted(m.key for m in lora.modules.values() if m.kind != "lora")
    if other:
        raise LoraFileError(
            f"{path}: only plain LoRA can be written; {other[0]} is {lora.modules[other[0]].kind}"
        )
    if not lora.modules:
        raise LoraFileError(f"{path}: no modules to write")
    return list(lora.modules.values())


def _alpha(m: ModuleDelta) -> float:
    return float(m.rank if m.alpha is None else m.alpha)


def _num(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


def _most_common(values: list) -> object:
    return Counter(values).most_common(1)[0][0]


def _base_metadata(lora: LoraFile, title: str | None, trigger_words: list[str] | None) -> dict[str, str]:
    """The source metadata minus stale hashes, with title and trigger words (arguments, else the file's)."""
    meta = {k: v for k, v in lora.metadata.items() if k not in STALE_KEYS}
    words = lora.trigger_words if trigger_words is None else trigger_words
    if words:
        meta["modelspec.trigger_phrase"] = ", ".join(words)
    if title:
        meta["modelspec.title"] = title
    return meta


def _peft_config(mods: list[ModuleDelta]) -> dict:
    """The LoraConfig of one component: r and lora_alpha most common, patterns for the rest."""
    text = mods[0].component.startswith("text_encoder")

    def pattern(path: str) -> str:
        # Text encoders may be flattened (no "text_model."), so match by suffix; anchor denoiser paths.
        return path.removeprefix("text_model.") if text else f"^{path}"

    r = _most_common([m.rank for m in mods])
    lora_alpha = _most_common([_alpha(m) for m in mods])
    return {
        "r": r,
        "lora_alpha": _num(lora_alpha),
        "rank_pattern": {pattern(m.path): m.rank for m in mods if m.rank != r},
        "alpha_pattern": {pattern(m.path): _num(_alpha(m)) for m in mods if _alpha(m) != lora_alpha},
        "target_modules": sorted({m.path.removeprefix("text_model.") if text else m.path for m in mods}),
        "use_dora": False,
        "lora_bias": False,
    }


def write_diffusers(
    lora: LoraFile,
    path: str | os.PathLike,
    metadata: Mapping[str, str] | None = None,
    *,
    title: str | None = None,
    trigger_words: list[str] | None = None,
) -> None:
    """Write `<component>.<path>.lora_A.weight` / `.lora_B.weight` with the LoraConfig per component in
    `__metadata__["lora_adapter_metadata"]` (keys "unet.r", "unet.lora_alpha", ..., as diffusers saves).

    When no module has an alpha the config is omitted (diffusers then uses scale 1), so alpha None survives a
    round trip; otherwise a missing alpha is written as alpha = rank (the same scale). `title` and
    `trigger_words` (default: the LoRA's own) go to modelspec.title / modelspec.trigger_phrase.

    Raises:
        LoraFileError: a module is not plain LoRA.
    """
    p = Path(path)
    mods = _plain_loras(lora, p)
    tensors: dict[str, torch.Tensor] = {}
    for m in mods:
        tensors[f"{m.component}.{m.path}.lora_A.weight"] = m.tensors["down"]
        tensors[f"{m.component}.{m.path}.lora_B.weight"] = m.tensors["up"]
    meta = _base_metadata(lora, title, trigger_words)
    meta["format"] = "pt"
    if any(m.alpha is not None for m in mods):
        config = {}
        for component in sorted({m.component for m in mods}):
            own = [m for m in mods if m.component == component]
            config.update({f"{component}.{k}": v for k, v in _peft_config(own).items()})
        meta[PEFT_METADATA_KEY] = json.dumps(config, indent=2, sort_keys=True)
    meta.update(metadata or {})
    write_bytes_atomic(p, serialize(tensors, meta))


def _kohya_prefix(component: str, family: str | None, components: set[str]) -> str:
    if component == "unet":
        return "lora_unet"
    if component == "transformer":
        return "lora_transformer"
    if component == "text_encoder":
        two = family in ("sdxl", "flux") or (family is None and "text_encoder_2" in components)
        return "lora_te1" if two else "lora_te"
    return "lora_te3" if family == "flux" else "lora_te2"


def kohya_name(m: ModuleDelta, family: str | None, components: set[str]) -> str:
    """The kohya module name of a delta, e.g. lora_unet_down_blocks_1_attentions_0_..._to_q.

    Raises UnknownKeysError when the underscore name would not read back as the same path.
    """
    name = m.path.replace(".", "_")
    try:
        readable = names.underscore_to_path(name) == m.path
    except UnknownKeysError:
        readable = False
    if not readable:
        raise UnknownKeysError(f"{m.key}: module path cannot be written as a kohya name", [m.key])
    return f"{_kohya_prefix(m.component, family, components)}_{name}"


def write_kohya(
    lora: LoraFile,
    path: str | os.PathLike,
    metadata: Mapping[str, str] | None = None,
    *,
    title: str | None = None,
    trigger_words: list[str] | None = None,
    tag_frequency: Mapping[str, Mapping[str, int]] | None = None,
    date: datetime | None = None,
) -> None:
    """Write kohya keys (`<prefix>_<name>.lora_down.weight` / `.lora_up.weight` / `.alpha`) with ss_* and
    ModelSpec metadata.

    Names are diffusers paths with "_" for ".": the UNet as `lora_unet_down_blocks_...` (not SGM names), FLUX
    as `lora_transformer_transformer_blocks_0_attn_to_q` (OneTrainer's layout: ComfyUI and Forge read every
    layer, diffusers only attention layers - give diffusers write_diffusers files; fused BFL names
    `lora_unet_double_blocks_...` are read but not written). Text encoders: `lora_te_` (sd15), `lora_te1_` / `lora_te2_`
    (sdxl), `lora_te1_` / `lora_te3_` (flux CLIP / T5, as sd-scripts). Alpha is a float32 scalar; a module
    without alpha gets no `.alpha` key. `modelspec.hash_sha256` is "0x" + the SHA-256 of the tensor bytes.
    `title` (default: the file stem) and `trigger_words` (default: the LoRA's own) as in write_diffusers.

    Raises:
        LoraFileError: a module is not plain LoRA.
        UnknownKeysError: a module path has no kohya name that reads back.
    """
    p = Path(path)
    mods = _plain_loras(lora, p)
    components = {m.component for m in mods}
    tensors: dict[str, torch.Tensor] = {}
    for m in mods:
        name = kohya_name(m, lora.family, components)
        tensors[f"{name}.lora_down.weight"] = m.tensors["down"]
        tensors[f"{name}.lora_up.weight"] = m.tensors["up"]
        if m.alpha is not None:
            tensors[f"{name}.alpha"] = torch.tensor(float(m.alpha), dtype=torch.float32)
    meta = _base_metadata(lora, title, trigger_words)
    meta.update(
        {
            "ss_network_module": "networks.lora",
            "ss_network_dim": str(_most_common([m.rank for m in mods])),
            "ss_network_alpha": str(_num(_most_common([_alpha(m) for m in mods]))),
            "modelspec.sai_model_spec": "1.0.0",
            "modelspec.implementation": "diffusers",
            "modelspec.title": meta.get("modelspec.title") or p.stem,
            "modelspec.date": (date or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%S"),
        }
    )
    if lora.family in BASE_MODEL_VERSION:
        meta["ss_base_model_version"] = BASE_MODEL_VERSION[lora.family]
        meta["modelspec.architecture"] = ARCHITECTURE[lora.family]
    if tag_frequency is not None:
        meta["ss_tag_frequency"] = json.dumps(tag_frequency)
    meta.update(metadata or {})
    tensor_hash = tensor_bytes_sha256(serialize(tensors))  # tensor bytes do not depend on the metadata
    meta["sshs_model_hash"] = tensor_hash
    meta["modelspec.hash_sha256"] = f"0x{tensor_hash}"
    write_bytes_atomic(p, serialize(tensors, meta))
