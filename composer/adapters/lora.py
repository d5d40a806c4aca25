"""Plain LoRA (Hu et al., 2021): dW = (alpha / r) * up @ down, for Linear and Conv2d layers.

On a Conv2d with a kernel larger than 1x1, LyCORIS's LoCon may store a Tucker core between the two
(`use_tucker`, key `lora_mid.weight`): down (r, in, 1, 1), mid (r, r, kh, kw), up (out, r, 1, 1), applied as
three convolutions, the layer's stride / padding / dilation on the middle one (LyCORIS `modules/locon.py`);
dW = (alpha / r) * einsum(mid, up, down). Same rank (r) and alpha rule as plain LoRA.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from composer.adapters.base import Recipe, TrainSpec, all_targets, conv_args, count_parameters, no_metadata
from composer.errors import AdapterError

if TYPE_CHECKING:
    from composer.formats.model import ModuleDelta


class LoraAdapter(nn.Module):
    """LoRA on a Linear (down (r, in), up (out, r)) or Conv2d (down (r, in, kh, kw), up (out, r, 1, 1));
    on a Conv2d optionally with a LoCon Tucker core `mid` (r, r, kh, kw) and down (r, in, 1, 1)."""

    kind = "lora"
    file_kind = "lora"
    recipe = Recipe(steps=500, learning_rate=1e-4, rank=4, conv=True, ranked=True)
    lycoris_algo = None
    network_module = "networks.lora"
    file_roles = ()  # lora_down.weight, lora_A.weight, ...: the readers map every spelling to down / up
    select_targets = staticmethod(all_targets)
    file_metadata = staticmethod(no_metadata)

    def __init__(
        self,
        base: nn.Module,
        down: torch.Tensor,
        up: torch.Tensor,
        alpha: float | None = None,
        mid: torch.Tensor | None = None,
    ):
        super().__init__()
        rank = down.shape[0]
        if up.shape[1] != rank:
            raise AdapterError(
                f"LoRA up {tuple(up.shape)} does not match down {tuple(down.shape)} (rank {rank})"
            )
        if mid is not None:
            self._check_mid(base, down, mid)
        if isinstance(base, nn.Linear):
            want_down, want_up = (rank, base.in_features), (base.out_features, rank)
            down, up = down.reshape(down.shape[0], -1), up.reshape(up.shape[0], -1)
        elif isinstance(base, nn.Conv2d):
            kernel = (1, 1) if mid is not None else base.kernel_size  # the core holds the kernel
            want_down = (rank, base.in_channels // base.groups, *kernel)
            want_up = (base.out_channels, rank, 1, 1)
            if down.ndim == 2 and kernel == (1, 1):
                down = down[:, :, None, None]
            if up.ndim == 2:
                up = up[:, :, None, None]
        else:
            raise AdapterError(f"LoRA cannot adapt a {type(base).__name__}")
        if tuple(down.shape) != want_down or tuple(up.shape) != want_up:
            raise AdapterError(
                f"LoRA shapes down {tuple(down.shape)} / up {tuple(up.shape)} do not fit the layer "
                f"(expected {want_down} / {want_up})"
            )
        if rank > min(want_down[1], want_up[0]):
            raise AdapterError(f"LoRA rank {rank} exceeds the layer's dimensions {want_down[1]}x{want_up[0]}")
        weight = base.weight
        self.down = nn.Parameter(down.detach().to(weight), requires_grad=False)
        self.up = nn.Parameter(up.detach().to(weight), requires_grad=False)
        self.mid = None if mid is None else nn.Parameter(mid.detach().to(weight), requires_grad=False)
        self.rank = rank
        self.alpha = float(alpha) if alpha is not None else float(rank)
        self._conv = conv_args(base, "LoRA")

    @staticmethod
    def _check_mid(base: nn.Module, down: torch.Tensor, mid: torch.Tensor) -> None:
        """A LoCon Tucker core must sit on a Conv2d, after a 1x1 down, shaped (r, r, kh, kw)."""
        if not isinstance(base, nn.Conv2d):
            raise AdapterError(
                f"LoCon Tucker (lora_mid {tuple(mid.shape)}) adapts a Conv2d, not a {type(base).__name__}"
            )
        r = down.shape[0]
        if down.ndim != 4 or tuple(down.shape[2:]) != (1, 1):
            raise AdapterError(
                f"LoCon Tucker: down must be (r, in, 1, 1) beside lora_mid, has {tuple(down.shape)}"
            )
        if tuple(mid.shape) != (r, r, *base.kernel_size):
            raise AdapterError(
                f"LoCon Tucker lora_mid {tuple(mid.shape)} does not fit rank {r} and the kernel "
                f"{tuple(base.kernel_size)} (expected {(r, r, *base.kernel_size)})"
            )

    @classmethod
    def create(
        cls, base: nn.Module, rank: int, alpha: float | None = None, generator: torch.Generator | None = None
    ) -> LoraAdapter:
        """A fresh trainable LoRA: down ~ U(-1/sqrt(in), 1/sqrt(in)) (peft's Kaiming-uniform), up = 0.

        Raises:
            AdapterError: the layer is not a Linear/Conv2d, or the rank exceeds the layer's dimensions.
        """
        if isinstance(base, nn.Linear):
            shape_down, shape_up = (rank, base.in_features), (base.out_features, rank)
        elif isinstance(base, nn.Conv2d):
            shape_down = (rank, base.in_channels // base.groups, *base.kernel_size)
            shape_up = (base.out_channels, rank, 1, 1)
        else:
            raise AdapterError(f"LoRA cannot adapt a {type(base).__name__}")
        if rank < 1:
            raise AdapterError(f"LoRA rank must be at least 1, got {rank}")
        fan_in = int(torch.tensor(shape_down[1:]).prod())
        bound = 1.0 / fan_in**0.5
        down = (torch.rand(shape_down, generator=generator) * 2 - 1) * bound  # drawn on CPU: generator-stable
        adapter = cls(base, down, torch.zeros(shape_up), alpha)
        adapter.requires_grad_(True)
        return adapter

    @classmethod
    def create_for(cls, base: nn.Module, config: TrainSpec, generator: torch.Generator) -> LoraAdapter:
        return cls.create(base, config.rank, config.alpha, generator=generator)

    @classmethod
    def from_delta(cls, base: nn.Module, delta: ModuleDelta) -> LoraAdapter:
        """Build from a ModuleDelta of kind "lora" (tensors "down", "up"; alpha: None means alpha = rank)."""
        missing = [n for n in ("down", "up") if n not in delta.tensors]
        if missing:
            raise AdapterError(f"lora delta needs tensors down and up (missing: {', '.join(missing)})")
        t = delta.tensors
        return cls(base, t["down"], t["up"], delta.alpha, mid=t.get("mid"))

    @classmethod
    def reads_role(cls, role: str) -> bool:
        return role in ("down", "up", "mid")

    @classmethod
    def kohya_keys(cls, delta: ModuleDelta, where: str) -> None:
        return None  # lora_down / lora_up: the writer's own layout (it also splits fused FLUX layers)

    def parameter_count(self) -> int:
        return count_parameters(self)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The state as ModuleDelta tensors ("down", "up", and "mid" with a Tucker core); alpha is `self.alpha`."""
        out = {"down": self.down.detach().clone(), "up": self.up.detach().clone()}
        if self.mid is not None:
            out["mid"] = self.mid.detach().clone()
        return out

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta_weight(self) -> torch.Tensor:
        if self._conv is None:
            return self.scale * (self.up @ self.down)  # (out, in)
        if self.mid is not None:  # (out, in, kh, kw) = einsum over the core's two rank axes
            dw = torch.einsum("ij...,oi,jn->on...", self.mid, self.up.flatten(1), self.down.flatten(1))
            return self.scale * dw
        dw = self.up.flatten(1) @ self.down.flatten(1)  # (out, in * kh * kw)
        return self.scale * dw.view(self.up.shape[0], *self.down.shape[1:])

    def forward_delta(self, x: torch.Tensor) -> torch.Tensor:
        if self._conv is None:
            return F.linear(F.linear(x, self.down), self.up) * self.scale
        if self.mid is not None:  # 1x1 down, the layer's geometry on the core, 1x1 up
            h = F.conv2d(F.conv2d(x, self.down), self.mid, **self._conv)
        else:
            h = F.conv2d(x, self.down, **self._conv)
        return F.conv2d(h, self.up) * self.scale

    @property
    def is_linear(self) -> bool:
        return self._conv is None
