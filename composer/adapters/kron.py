"""Kronecker adapter, DiffuseKronA (Marjit et al., WACV 2025): dW = A kron B, no alpha.

This is the textbook A kron B (row i * b1 + j = A[i] kron B[j]), not the official code's row-permuted
product, so that a model maps losslessly to LyCORIS LoKr (`lycoris.kron_to_lokr_tensors`).
On a Conv2d (as LyCORIS LoKr does) B carries the kernel: B (out / a1, in / a2, kh, kw) and
dW = A[:, :, None, None] kron B, so A mixes channel groups and B is a small convolution.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn

from composer.adapters.base import (
    Recipe,
    TrainSpec,
    all_targets,
    conv_args,
    count_parameters,
    no_metadata,
    require_no_alpha,
)
from composer.adapters.functional import kron_conv_forward, kron_delta_forward, kron_factors_to_lokr
from composer.errors import AdapterError, LoraFileError

if TYPE_CHECKING:
    from composer.formats.model import ModuleDelta


def kron_factor_shapes(base: nn.Module, a1: int, a2: int) -> tuple[tuple[int, int], tuple[int, ...]]:
    """The shapes of A (a1, a2) and B (d_out / a1, d_in / a2) on a Linear, (..., kh, kw) on a Conv2d.

    Raises:
        AdapterError: the layer is not a Linear or plain Conv2d, or a1 does not divide d_out / a2 does
            not divide d_in.
    """
    conv = conv_args(base, "a Kronecker adapter")
    if conv is None:
        d_out, d_in, kernel, what = base.out_features, base.in_features, (), "Linear"
    else:
        d_out, d_in, kernel, what = base.out_channels, base.in_channels, tuple(base.kernel_size), "Conv2d"
    if a1 < 1 or a2 < 1 or d_out % a1 or d_in % a2:
        raise AdapterError(
            f"Kronecker factor (a1, a2)=({a1}, {a2}) does not fit a {what} {d_in}->{d_out} "
            f"(weight {d_out}x{d_in}): a1 must divide {d_out} and a2 must divide {d_in}"
        )
    return (a1, a2), (d_out // a1, d_in // a2, *kernel)


class KronAdapter(nn.Module):
    """A (a1, a2) kron B (d_out / a1, d_in / a2[, kh, kw]) on a Linear or Conv2d; the delta at scale 1 is
    exactly kron(A, B)."""

    kind = "kron"
    file_kind = "kron"
    recipe = Recipe(steps=500, learning_rate=1e-3, rank=4, conv=True)
    lycoris_algo = "lokr"  # written as a LoKr with full factors; metadata names it back (formats.kinds)
    network_module = "lycoris.kohya"
    file_roles = ()
    alpha = None
    select_targets = staticmethod(all_targets)
    file_metadata = staticmethod(no_metadata)

    def __init__(self, base: nn.Module, a: torch.Tensor, b: torch.Tensor, *, trainable: bool = False):
        super().__init__()
        if a.ndim != 2 or b.ndim not in (2, 4):
            raise AdapterError(
                f"Kronecker A must be a matrix and B a matrix (Linear) or 4-d (Conv2d), "
                f"got A {tuple(a.shape)} and B {tuple(b.shape)}"
            )
        _, want_b = kron_factor_shapes(base, *a.shape)
        self._conv = conv_args(base, "a Kronecker adapter")
        if self._conv is not None and b.ndim == 2 and want_b[2:] == (1, 1):
            b = b[:, :, None, None]  # a 1x1 convolution's factor may come as a matrix
        if tuple(b.shape) != want_b:
            raise AdapterError(
                f"Kronecker B {tuple(b.shape)} does not fit A {tuple(a.shape)} on a "
                f"{type(base).__name__} with weight {tuple(base.weight.shape)} (expected B {want_b})"
            )
        weight = base.weight
        self.a = nn.Parameter(a.detach().to(weight).contiguous(), requires_grad=trainable)  # (a1, a2)
        self.b = nn.Parameter(
            b.detach().to(weight).contiguous(), requires_grad=trainable
        )  # (d_out / a1, d_in / a2)

    @classmethod
    def create(
        cls, base: nn.Module, a1: int, a2: int, generator: torch.Generator | None = None
    ) -> KronAdapter:
        """A fresh trainable adapter: A ~ N(0, 1/a1) (variance), B = 0, so dW = 0 at the start.

        Raises:
            AdapterError: (a1, a2) does not divide the layer's (d_out, d_in), or the layer is not a Linear
                or plain Conv2d.
        """
        shape_a, shape_b = kron_factor_shapes(base, a1, a2)
        a = torch.randn(shape_a, generator=generator) / math.sqrt(a1)  # drawn on CPU: generator-stable
        b = torch.zeros(shape_b, device=base.weight.device)  # (d_out / a1, d_in / a2[, kh, kw])
        return cls(base, a, b, trainable=True)

    @classmethod
    def from_delta(cls, base: nn.Module, delta: ModuleDelta) -> KronAdapter:
        """Build from a ModuleDelta of kind "kron" (tensors "kron_a", "kron_b"; no alpha)."""
        missing = [n for n in ("kron_a", "kron_b") if n not in delta.tensors]
        extra = sorted(set(delta.tensors) - {"kron_a", "kron_b"})
        if missing or extra:
            raise AdapterError(
                f"kron delta needs tensors kron_a and kron_b "
                f"(missing: {', '.join(missing) or 'none'}; unknown: {', '.join(extra) or 'none'})"
            )
        require_no_alpha(delta.alpha, "Kronecker")
        return cls(base, delta.tensors["kron_a"], delta.tensors["kron_b"])

    @classmethod
    def create_for(cls, base: nn.Module, config: TrainSpec, generator: torch.Generator) -> KronAdapter:
        return cls.create(base, *config.kron_factors, generator=generator)

    @classmethod
    def reads_role(cls, role: str) -> bool:
        return False  # read as a LoKr, then named back by the file's metadata (formats.kinds.as_kron)

    @classmethod
    def kohya_keys(cls, delta: ModuleDelta, where: str) -> dict[str, torch.Tensor]:
        """LoKr lokr_w1 = A (small factor), lokr_w2 = B, alpha 1 (a placeholder: full factors mean scale 1)."""
        if set(delta.tensors) != {"kron_a", "kron_b"}:
            raise LoraFileError(
                f"{where}: a kron delta holds kron_a and kron_b, not {', '.join(sorted(delta.tensors))}"
            )
        if delta.alpha is not None and float(delta.alpha) != 1.0:
            raise LoraFileError(
                f"{where}: a Kronecker adapter has no alpha scaling; the delta carries alpha={delta.alpha}"
            )
        try:
            return kron_factors_to_lokr(delta.tensors["kron_a"], delta.tensors["kron_b"])
        except AdapterError as e:
            raise LoraFileError(f"{where}: {e}") from e

    def parameter_count(self) -> int:
        return count_parameters(self)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The state as ModuleDelta tensors ("kron_a", "kron_b"); no alpha."""
        return {"kron_a": self.a.detach().clone(), "kron_b": self.b.detach().clone()}

    @property
    def a1(self) -> int:
        return self.a.shape[0]

    @property
    def a2(self) -> int:
        return self.a.shape[1]

    def delta_weight(self) -> torch.Tensor:
        if self._conv is None:
            return torch.kron(self.a, self.b)  # (d_out, d_in)
        return torch.kron(self.a[:, :, None, None], self.b)  # (d_out, d_in, kh, kw)

    def forward_delta(self, x: torch.Tensor) -> torch.Tensor:
        if self._conv is None:
            return kron_delta_forward(x, self.a, self.b)
        return kron_conv_forward(x, self.a, self.b, self._conv)
