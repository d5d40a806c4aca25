"""Which modules a run adapts, fresh trainable adapters for them, and the trained result as a LoraFile."""

from __future__ import annotations

import re

import torch
from torch import nn

from composer.adapters.registry import adapter_type
from composer.backbones.base import Backbone
from composer.errors import AdapterError
from composer.formats.model import LoraFile, ModuleDelta
from composer.train.config import TrainConfig, TrainConfigError

TRANSFORMER = r"(^|\.)(attentions|transformer_blocks|single_transformer_blocks)\."
RESNET_CONVS = (
    r"(^|\.)(resnets\.\d+\.(conv1|conv2|conv_shortcut)|downsamplers\.\d+\.conv|upsamplers\.\d+\.conv)$"
)
CLIP_ATTENTION = re.compile(r"self_attn\.(q_proj|k_proj|v_proj|out_proj)$")


def target_keys(backbone: Backbone, pipe, config: TrainConfig) -> list[str]:
    """ "component.path" keys of the modules to adapt: the backbone's attention targets (B-LoRA: its blocks)."""
    denoiser = getattr(pipe, backbone.denoiser)
    names = backbone.target_modules(denoiser)
    if config.targets == "transformer":  # also proj_in/out and the feed-forward layers (kohya's default set)
        names = backbone.target_modules(denoiser, TRANSFORMER)
    if config.targets == "full":  # and the ResNet and resampling convolutions (kohya's LoCon set)
        names = backbone.target_modules(denoiser, TRANSFORMER, RESNET_CONVS)
    try:  # B-LoRA: the targets in its two blocks; every other type: all of them
        names = adapter_type(config.kind).select_targets(names, backbone.blora_blocks or {})
    except AdapterError as exc:
        raise TrainConfigError(f"this {backbone.family} model: {exc}") from None
    if not names:
        raise TrainConfigError(f"no target modules match {backbone.target_pattern!r} in this model")
    keys = [f"{backbone.denoiser}.{n}" for n in names]
    if config.text_encoder:
        keys += text_encoder_keys(backbone, pipe)
    return keys


def text_encoder_keys(backbone: Backbone, pipe) -> list[str]:
    """The self-attention q/k/v/out projections of the pipeline's CLIP text encoders (kohya's TE targets;
    FLUX's T5 is left alone, as sd-scripts does by default)."""
    keys = []
    for component in backbone.text_encoders:
        model = getattr(pipe, component, None)
        if model is None or "CLIP" not in type(model).__name__:
            continue
        keys += [
            f"{component}.{n}"
            for n, m in model.named_modules()
            if isinstance(getattr(m, "base", m), nn.Linear) and CLIP_ATTENTION.search(n)
        ]
    if not keys:
        raise TrainConfigError(f"this {backbone.family} model has no CLIP text encoder to adapt")
    return keys


def create(base: nn.Module, config: TrainConfig, generator: torch.Generator) -> nn.Module:
    """A fresh trainable adapter of the run's kind whose delta is zero."""
    return adapter_type(config.kind).create_for(base, config, generator)


def create_all(host_find, keys: list[str], config: TrainConfig, generator) -> list[tuple[str, nn.Module]]:
    """One fresh adapter per key; an impossible setting names the module it does not fit."""
    built = []
    for key in keys:
        try:
            built.append((key, create(host_find(key), config, generator)))
        except AdapterError as exc:
            raise TrainConfigError(f"{config.kind} adapter on {key}: {exc}") from None
    return built


def to_lora_file(
    adapters: dict[str, nn.Module], config: TrainConfig, backbone: Backbone, metadata: dict[str, str]
) -> LoraFile:
    """The trained adapters as a LoraFile (tensors in the adapter's dtype, detached copies)."""
    modules = {}
    typ = adapter_type(config.kind)
    kind = typ.file_kind  # a B-LoRA is saved as a LoRA file
    for key, adapter in adapters.items():
        component, _, path = key.partition(".")
        alpha = adapter.alpha
        tensors = {n: t.float().cpu() for n, t in adapter.tensors().items()}
        modules[key] = ModuleDelta(component=component, path=path, kind=kind, tensors=tensors, alpha=alpha)
    meta = dict(metadata)  # the writer records the file kind; a B-LoRA is a LoRA file naming its blocks
    meta |= typ.file_metadata(backbone.blora_blocks or {})
    return LoraFile(modules=modules, source_format="kohya", family=backbone.family, metadata=meta)


def check_exportable(
    built: list[tuple[str, nn.Module]], config: TrainConfig, backbone: Backbone, run_dir
) -> None:
    """Write the fresh adapters once to a scratch file: shapes the file format cannot hold (a Kronecker A
    larger than B for LoKr, a non-LoRA kind on a fused FLUX layer) fail before training, not after it."""
    import tempfile
    from pathlib import Path

    from composer.errors import LoraFileError
    from composer.formats.writers import write_kohya

    lora = to_lora_file(dict(built), config, backbone, {})
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=run_dir, prefix=".export-check-") as tmp:
        try:
            write_kohya(lora, Path(tmp) / "check.safetensors")
        except LoraFileError as exc:
            message = str(exc).split(": ", 1)[-1]
            raise TrainConfigError(
                f"this {config.kind} adapter could not be saved after training: {message}"
            ) from None
