"""What every backbone family provides, and the loading code they share."""

from __future__ import annotations

import json
import logging
import os
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from composer.backbones.single_file import load_single_file, shipped_configs
from composer.errors import BackboneError, StudioError

log = logging.getLogger(__name__)

TINY = "tiny"  # the --model value that builds a family's tiny random-weight variant offline
# diffusers resolves its classes by lazy imports that are not thread-safe (two threads loading their first
# pipeline at once fail with "module 'diffusers' has no attribute ..."): one load at a time per process,
# whoever loads (render workers, the studio UI, a training run).
_LOADING = threading.Lock()
SEMANTIC_SIDE = 32  # the longest side of the cross-attention maps read (CLoRA reads SDXL's 32x32 at 1024 px)


@dataclass
class Conditioning:
    """Text conditioning of one caption, computed once (text encoders are frozen)."""

    embeds: torch.Tensor  # (1, seq, dim)
    pooled: torch.Tensor  # (1, dim)
    text_ids: torch.Tensor | None = None  # FLUX only


@dataclass(frozen=True)
class Backbone:
    """A model family: how to load it, build it small or on the meta device, where adapters go, and every
    computation that differs between families (latent grid, prompt tokens, attention capture, replaying a
    denoiser call, the training loss). Methods and the trainer ask the backbone and never branch on `family`.

    Adding a family = one file with a subclass overriding the family methods below and an instance of it, + one
    line in `composer.backbones.BACKBONES`. The base class holds what every family shares; a family method the
    base cannot answer raises BackboneError naming the family.
    """

    family: str  # "sdxl" | "flux" (the LoRA file family it accepts)
    pipeline_class: str  # diffusers pipeline class name
    denoiser: str  # pipeline attribute holding the denoiser: "unet" | "transformer"
    text_encoders: tuple[str, ...]  # pipeline attributes of the text encoders, in LoRA-component order
    target_pattern: str  # regex on denoiser module names: default LoRA targets (Linear layers)
    build_tiny: Callable[[int], Any]  # seed -> pipeline with tiny random weights, built offline
    build_meta_denoiser: Callable[[], nn.Module]  # the real architecture on the meta device
    blora_blocks: dict[str, str] = field(default_factory=dict)  # role -> block module path (B-LoRA)
    # Single-file checkpoints (composer.backbones.single_file): key prefixes that mark the family, prefixes of
    # variants whose configs are not shipped (refused), and each pipeline component's prefixes in the file.
    checkpoint_marker: tuple[str, ...] = ()
    checkpoint_foreign: tuple[str, ...] = ()
    checkpoint_components: dict[str, tuple[str, ...]] = field(default_factory=dict)
    default_steps: int = 30
    default_guidance: float = 5.0
    nominal_size: int = 1024  # pixels a side when no pipeline is at hand to ask (`native_size`): job budgets

    def components(self, pipe) -> dict[str, nn.Module]:
        """LoRA component name -> module, as LoRA files name them."""
        names = (self.denoiser, *self.text_encoders)
        return {name: getattr(pipe, name) for name in names if getattr(pipe, name, None) is not None}

    def native_size(self, pipe) -> int:
        """The pixel size the model was built for (toy 64, SDXL and FLUX 1024 for the real ones)."""
        return int(getattr(pipe, "default_sample_size", 64)) * int(pipe.vae_scale_factor)

    def checkpoint_tokenizers(self, configs: Path, checkpoint: Path) -> dict[str, Any]:
        """Tokenizers to hand `from_single_file` (a single-file checkpoint carries none): {} where the config
        folder `configs` has them. Raises BackboneError naming a tokenizer that cannot be had offline."""
        raise self._unsupported("single-file checkpoints")

    def _unsupported(self, what: str) -> BackboneError:
        return BackboneError(f"the {self.family} backbone does not support {what}")

    # --- latent grid ---------------------------------------------------------------------------------
    def latent_size(self, pipe, height: int, width: int) -> tuple[int, int]:
        """(rows, cols) of the VAE latents of a render of that size in pixels (before any packing)."""
        vsf = int(pipe.vae_scale_factor)
        return height // vsf, width // vsf

    def patch_grid(self, pipe, height: int, width: int) -> tuple[int, int] | None:
        """(rows, cols) of the packed latent patches the denoiser sees as a sequence (FLUX's 2x2 patches);
        None when the denoiser takes the latents as an image (SDXL's UNet)."""
        return None

    def train_size_problem(self, size: int) -> str | None:
        """Why the family cannot train at `size` pixels, or None when it can."""
        return None

    # --- prompt tokens -------------------------------------------------------------------------------
    def prompt_tokenizer(self, pipe):
        """The tokenizer of the text stream the denoiser attends to."""
        raise self._unsupported("reading prompt tokens")

    def prompt_length(self, pipe) -> int:
        """The sequence length of that text stream, as the pipeline encodes prompts."""
        return int(self.prompt_tokenizer(pipe).model_max_length)

    def token_ids(self, pipe, text: str, special: bool) -> list[int]:
        """The ids of `text` as the denoiser's text stream sees it."""
        tokenizer = self.prompt_tokenizer(pipe)
        return list(tokenizer(text, add_special_tokens=special, truncation=False).input_ids)

    def trigger_positions(
        self, pipe, prompt: str, triggers: Sequence[str], limit: int | None = None
    ) -> list[int]:
        """Token positions of every occurrence of any of `triggers` in `prompt`, below `limit` (default: the
        text stream's sequence length). Multi-token triggers give all their tokens. Empty: none is there."""
        limit = self.prompt_length(pipe) if limit is None else limit
        ids = self.token_ids(pipe, prompt, special=True)[:limit]
        found: set[int] = set()
        for trigger in triggers:
            word = self.token_ids(pipe, trigger, special=False)
            if not word:
                continue
            for start in range(len(ids) - len(word) + 1):
                if ids[start : start + len(word)] == word:
                    found.update(range(start, start + len(word)))
        return sorted(found)

    # --- attention capture ---------------------------------------------------------------------------
    def semantic_grid(self, denoiser, latent_rows: int, latent_cols: int) -> tuple[int, int]:
        """(rows, cols) of the cross-attention maps read for a latent of that size (at most SEMANTIC_SIDE)."""
        raise StudioError(f"cannot read cross-attention maps of a {self.family} denoiser")

    def attention_capture(self, name: str, processor, store, latent: tuple[int, int]):
        """The processor that replaces the denoiser's `name` processor while maps are read into `store`
        (a `composer.seams.attention.MapStore`), or None to leave that layer alone.

        Args:
            latent: (rows, cols) of the latents, before packing.
        """
        raise StudioError(f"cannot read cross-attention maps of a {self.family} denoiser")

    def cross_attention(self, name: str) -> bool:
        """Whether the denoiser's `name` attention processor is a cross-attention layer that reads the prompt
        tokens as keys, apart from the image (SDXL's `attn2`; FLUX's joint attention mixes them: none)."""
        return False

    # --- replaying a denoiser call -------------------------------------------------------------------
    def replay_inputs(self, pipe, args: tuple, kwargs: dict, latents: torch.Tensor, timestep) -> tuple:
        """(args, kwargs) of a recorded denoiser call, at new `latents` (as the scheduler holds them) and
        `timestep` (a value of `pipe.scheduler.timesteps`), scaled as the pipeline would pass them."""
        raise self._unsupported("replaying a denoiser call")

    # --- a denoiser call's timestep --------------------------------------------------------------------
    def call_time(self, args: tuple, kwargs: dict) -> torch.Tensor:
        """A denoiser call's timestep as a share of the noise schedule, float: 0 clean, 1 pure noise; a
        scalar, or one value per row of the call's batch (B,)."""
        raise self._unsupported("reading a denoiser call's timestep")

    # --- a denoiser call's text conditioning ----------------------------------------------------------
    def call_text(self, kwargs: dict) -> torch.Tensor:
        """The (B, seq, dim) prompt embeddings a denoiser call was given (both families pass them by name)."""
        text = kwargs.get("encoder_hidden_states")
        if not isinstance(text, torch.Tensor):
            raise StudioError(f"this {self.family} denoiser call carries no encoder_hidden_states")
        return text

    def with_text(self, kwargs: dict, rows: torch.Tensor, cond: Conditioning) -> dict:
        """A denoiser call's kwargs with the text conditioning of `rows` (indices into its batch) replaced by
        `cond` (prompt embeddings and the pooled embedding); the call's own tensors are left as they were."""
        raise self._unsupported("replacing a denoiser call's text conditioning")

    # --- training ------------------------------------------------------------------------------------
    def training_noise(self, pipe, snr_gamma: float | None):
        """What the training loss draws noise and timesteps from (a scheduler, or None when the family's
        loss samples them itself). Raises StudioError on a setting the family's objective cannot honour."""
        raise self._unsupported("training")

    def encode_caption(self, pipe, caption: str, device) -> Conditioning:
        """A training caption's text conditioning, as the pipeline encodes prompts."""
        raise self._unsupported("training")

    def training_loss(self, objective, x0: torch.Tensor, cond: list[Conditioning], generator, dtype):
        """The denoising loss of a batch of latents x0 (B, C, h, w): timestep sampling, noising, the
        denoiser's prediction and its target. `objective` is the `composer.train.objectives.Objective` (pipe,
        size, guidance, noise, snr_weights)."""
        raise self._unsupported("training")

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
                pipe = load_single_file(backbone, path, dtype=dtype)
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


def replace_rows(tensor: torch.Tensor, rows: torch.Tensor, value: torch.Tensor, what: str) -> torch.Tensor:
    """A copy of `tensor` whose `rows` (batch indices) hold `value` (shaped as one row, or with a leading 1)."""
    one = value[0] if value.ndim == tensor.ndim and value.shape[0] == 1 else value
    if tuple(one.shape) != tuple(tensor.shape[1:]):
        raise StudioError(f"{what} {tuple(value.shape)} do not fit the call's rows {tuple(tensor.shape[1:])}")
    out = tensor.clone()
    out[rows] = one.to(device=tensor.device, dtype=tensor.dtype)
    return out


def on_meta(family: str, component: str) -> nn.Module:
    """A diffusers model of a family's real architecture (its shipped config, `single_file.shipped_configs`)
    built on the meta device: exact architecture, no memory."""
    import diffusers

    config = json.loads((shipped_configs(family) / component / "config.json").read_text())
    with torch.device("meta"):
        return getattr(diffusers, config["_class_name"]).from_config(config)


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
