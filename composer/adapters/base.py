"""The contract every adapter type fulfils, and the mixing context the adapter layer reads."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from composer.errors import AdapterError

Scale = float | torch.Tensor  # a number, or one number per sample of the batch: shape (B,)


@runtime_checkable
class AdapterType(Protocol):
    """One adapter on one wrapped module. Implementations are nn.Modules (their weights are parameters)."""

    kind: str

    def delta_weight(self) -> torch.Tensor:
        """The dense weight change at scale 1, shaped like the base weight. Used to fuse, never in forward."""
        ...

    def forward_delta(self, x: torch.Tensor) -> torch.Tensor:
        """The output change at scale 1 for input x, computed without materialising the dense delta."""
        ...


@dataclass
class MixingContext:
    """Which resident adapters are active, with what scale. Shared by every wrapped module of one host.

    Switching a LoRA set changes this object only: no weights move, nothing recompiles.
    A per-sample scale is a tensor of shape (B,) over the batch the denoiser sees (with classifier-free
    guidance that is 2 x images: unconditional half first).
    """

    active: dict[str, Scale] = field(default_factory=dict)
    fused: dict[str, float] = field(
        default_factory=dict
    )  # adapters folded into base weights, and their scale

    def effective(self) -> list[tuple[str, Scale]]:
        """Scales still to apply in forward: active minus what is already fused into the weights."""
        out: list[tuple[str, Scale]] = []
        for name in dict.fromkeys([*self.active, *self.fused]):
            scale = self.active.get(name, 0.0)
            fused = self.fused.get(name)
            if fused is not None:
                scale = scale - fused
            if isinstance(scale, torch.Tensor) or scale != 0.0:
                out.append((name, scale))
        return out


def broadcast_scale(scale: Scale, y: torch.Tensor) -> Scale:
    """Shape a per-sample scale (B,) to broadcast over y (B, ...)."""
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
