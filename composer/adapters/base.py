"""The contract every adapter type fulfils, and the mixing context the adapter layer reads."""

from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, ClassVar, Protocol

import torch
from torch import nn

from composer.adapters.spatial import SpatialScale
from composer.errors import AdapterError

if TYPE_CHECKING:
    from composer.formats.model import ModuleDelta

Scale = float | torch.Tensor | SpatialScale
"""A number; one number per sample of the batch, shape (B,); or a weight times a region mask (SpatialScale)."""


@dataclass(frozen=True)
class Recipe:
    """A trainable type's training defaults (METHODS.md): steps, learning rate, rank, whether it adapts
    convolutions (targets "full"), how few images it learns from, whether it may adapt the text encoder,
    and whether its files carry kohya's network dim/alpha (rank-based types)."""

    steps: int
    learning_rate: float
    rank: int  # LoRA-like kinds train at this rank; Kronecker and TLoRA size by their factors and ignore it
    conv: bool
    min_images: int = 3  # the subject trainers want a few views (DreamBooth uses 3-5)
    text_encoder: bool = True  # False: the type adapts the denoiser only
    ranked: bool = False  # True: `rank` and `alpha` are its size (ss_network_dim / ss_network_alpha)


class TrainSpec(Protocol):
    """What `create_for` reads of a training config (composer.train.config.TrainConfig)."""

    kind: str
    rank: int | None
    alpha: float | None
    kron_factors: tuple[int, int]
    tensor_rank: int
    transform_rank: int


class AdapterType(Protocol):
    """One adapter type: the class the registry (composer.adapters.registry) holds, and its instances, one
    adapter on one wrapped module (nn.Modules: their weights are parameters).

    The class describes itself to everything that handles the type: its kind name, its file keys (readers
    and writers), its training defaults and target selection (composer.train), and the catalog's list.
    """

    kind: ClassVar[str]  # the ModuleDelta kind (and the training config's kind)
    file_kind: ClassVar[str]  # the kind a trained adapter is saved as (B-LoRA: "lora")
    recipe: ClassVar[Recipe | None]  # training defaults; None: the type is applied from files, not trained
    lycoris_algo: ClassVar[str | None]  # the LyCORIS algorithm holding it in kohya files (ss_network_args)
    network_module: ClassVar[str]  # kohya's ss_network_module for a file of this type
    file_roles: ClassVar[tuple[str, ...]]  # fixed key suffixes (after the module name) that mark this kind
    alpha: float | None  # what a file stores as the module's alpha (None: no alpha scaling)

    @classmethod
    def create_for(cls, base: nn.Module, config: TrainSpec, generator: torch.Generator) -> AdapterType:
        """A fresh trainable adapter on `base` whose delta is zero (AdapterError when it cannot fit)."""
        ...

    @classmethod
    def from_delta(cls, base: nn.Module, delta: ModuleDelta) -> AdapterType:
        """The adapter a file's ModuleDelta describes (AdapterError naming what does not fit)."""
        ...

    @classmethod
    def reads_role(cls, role: str) -> bool:
        """True for a role of a read module ("down", "lokr_w1", "tr_t.0", ...) that marks this kind."""
        ...

    @classmethod
    def kohya_keys(cls, delta: ModuleDelta, where: str) -> dict[str, torch.Tensor] | None:
        """Key suffix -> tensor written after a kohya module name (alpha included); None: LoRA's own layout
        (lora_down / lora_up, written by composer.formats.writers). LoraFileError names what cannot be held."""
        ...

    @classmethod
    def select_targets(cls, names: list[str], blocks: Mapping[str, str]) -> list[str]:
        """The module names it adapts among the backbone's targets (blocks: the backbone's B-LoRA blocks)."""
        ...

    @classmethod
    def file_metadata(cls, blocks: Mapping[str, str]) -> dict[str, str]:
        """Metadata a trained file of this type carries beyond the writer's own."""
        ...

    def tensors(self) -> dict[str, torch.Tensor]:
        """The state as ModuleDelta tensors (detached copies), the inverse of `from_delta`."""
        ...

    def parameter_count(self) -> int: ...

    def delta_weight(self) -> torch.Tensor:
        """The dense weight change at scale 1, shaped like the base weight. Used to fuse, never in forward."""
        ...

    def forward_delta(self, x: torch.Tensor) -> torch.Tensor:
        """The output change at scale 1 for input x, computed without materialising the dense delta.

        A type whose delta needs the layer's own output W x + b (DoRA) sets the class attribute
        `reads_base_output = True` and is called as `forward_delta(x, base_out=...)` by the adapter layer."""
        ...


def count_parameters(adapter: nn.Module) -> int:
    return sum(p.numel() for p in adapter.parameters())


def all_targets(names: list[str], blocks: Mapping[str, str]) -> list[str]:
    """The default target selection: every target the backbone offers."""
    return names


def no_metadata(blocks: Mapping[str, str]) -> dict[str, str]:
    return {}


class Combiner(Protocol):
    """How an adapted layer joins its output with its active adapters' own outputs, instead of adding them
    (gated fusion, `composer.gates`): (the adapted layer, y0 = its base output, [(adapter name, s_i * delta_i),
    ...] in the context's order) -> the layer's output. Summing them is what the layer does without one."""

    def __call__(
        self, layer: nn.Module, base: torch.Tensor, outputs: list[tuple[str, torch.Tensor]]
    ) -> torch.Tensor: ...


class MixingContext:
    """Which resident adapters are active, with what scale. Shared by every wrapped module of one host.

    Switching a LoRA set changes this object only: no weights move, nothing recompiles.
    A per-sample scale is a tensor of shape (B,) over the batch the denoiser sees (with classifier-free
    guidance that is 2 x images: unconditional half first).

    `active` and `fused` are replaced, never edited in place: each assignment bumps `version` (which the
    adapter layers key their per-set plans on), recomputes `effective()` once for every layer, and tells
    the listeners (a host refreshing the fixed-shape slots of a compiled denoiser).

    `combiner`, while set, makes every adapted layer with active adapters compute each one's scaled output
    apart and return `combiner(layer, y0, outputs)` (see `Combiner`); None (the default) keeps the layers'
    own paths, at no cost.
    """

    def __init__(self, active: Mapping[str, Scale] | None = None, fused: Mapping[str, float] | None = None):
        self.combiner: Combiner | None = None
        self.version = 0
        self.listeners: list[Callable[[], None]] = []
        self._active: dict[str, Scale] = dict(active or {})
        self._fused: dict[str, float] = dict(fused or {})
        self._effective: tuple[tuple[str, Scale], ...] = ()
        self._changed()

    @property
    def active(self) -> Mapping[str, Scale]:
        return MappingProxyType(self._active)

    @active.setter
    def active(self, scales: Mapping[str, Scale]) -> None:
        self._set(dict(scales), self._fused)

    @property
    def fused(self) -> Mapping[str, float]:  # adapters folded into base weights, and their scale
        return MappingProxyType(self._fused)

    @fused.setter
    def fused(self, scales: Mapping[str, float]) -> None:
        self._set(self._active, dict(scales))

    def _set(self, active: dict[str, Scale], fused: dict[str, float]) -> None:
        """Take a new state; when a listener refuses it (it checks before it writes anything), the previous
        state comes back and the error propagates."""
        previous = (self._active, self._fused, self._effective)
        self._active, self._fused = active, fused
        self._changed()
        try:
            for listener in self.listeners:
                listener()
        except BaseException:
            self._active, self._fused, self._effective = previous
            self.version += 1
            raise

    def _changed(self) -> None:
        out: list[tuple[str, Scale]] = []
        for name in dict.fromkeys([*self._active, *self._fused]):
            scale = self._active.get(name, 0.0)
            fused = self._fused.get(name)
            if fused is not None:
                scale = scale - fused
            if isinstance(scale, torch.Tensor) or scale != 0.0:
                out.append((name, scale))
        self._effective = tuple(out)
        self.version += 1

    def effective(self) -> tuple[tuple[str, Scale], ...]:
        """Scales still to apply in forward: active minus what is already fused into the weights."""
        return self._effective


_ROWS: dict[int, tuple[weakref.ref, torch.Tensor | None]] = {}  # id(scale) -> (the scale, its rows)


def active_rows(scale: Scale) -> torch.Tensor | None:
    """The batch rows a per-sample scale keeps (non-zero), or None when it keeps every row (or is a number):
    an adapter that only some images of a batch use runs on those rows alone. Cached per scale tensor, which
    callers build once and reuse for every call (one device sync per tensor, not per layer)."""
    if not isinstance(scale, torch.Tensor):
        return None
    cached = _ROWS.get(id(scale))
    if cached is None or cached[0]() is not scale:
        rows = torch.nonzero(scale).flatten()
        key = id(scale)
        cached = (
            weakref.ref(scale, lambda _, key=key: _ROWS.pop(key, None)),
            None if len(rows) == len(scale) else rows,
        )
        _ROWS[key] = cached
    return cached[1]


def broadcast_scale(scale: Scale, y: torch.Tensor) -> float | torch.Tensor:
    """Shape a per-sample scale (B,), or a region's mask, to broadcast over y (B, ...)."""
    if isinstance(scale, SpatialScale):
        return scale.weights_for(y)
    if not isinstance(scale, torch.Tensor):
        return scale
    if scale.ndim != 1 or scale.shape[0] != y.shape[0]:
        raise ValueError(f"per-sample scale has shape {tuple(scale.shape)}, batch is {y.shape[0]}")
    return scale.to(y).view(-1, *([1] * (y.ndim - 1)))


def is_trainable(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def require_no_alpha(alpha: float | None, what: str) -> None:
    """Kinds without alpha scaling (Kronecker, TLoRA) accept a missing alpha or 1, nothing else."""
    if alpha is not None and float(alpha) != 1.0:
        raise AdapterError(f"a {what} adapter has no alpha scaling; the delta carries alpha={alpha}")


def conv_args(base: nn.Module, what: str) -> dict | None:
    """None for a Linear; F.conv2d keyword arguments for a plain Conv2d; AdapterError for anything else.

    `what` names the adapter type in the error ("LoRA", "LoKr", ...).
    """
    if isinstance(base, nn.Linear):
        return None
    if not isinstance(base, nn.Conv2d):
        raise AdapterError(f"{what} adapts Linear and Conv2d layers, not a {type(base).__name__}")
    if base.groups != 1:
        raise AdapterError(f"{what} on a grouped Conv2d (groups={base.groups}) is not supported")
    if base.padding_mode != "zeros":
        raise AdapterError(f"{what} on a Conv2d with padding_mode={base.padding_mode!r} is not supported")
    return dict(stride=base.stride, padding=base.padding, dilation=base.dilation)
