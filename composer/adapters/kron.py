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
import torch.nn.functional as F
from torch import nn

from composer.adapters.base import conv_args, require_no_alpha
from composer.errors import AdapterError

if TYPE_CHECKING:
    from composer.formats.model import ModuleDelta


def kron_delta_forward(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """x @ (a kron b)^T without building the Kronecker product (two small matmuls).

    Args:
        x: (..., a2 * b2) input.
        a: (a1, a2) small factor.
        b: (b1, b2) large factor.

    Returns:
        (..., a1 * b1): row i * b1 + j of (a kron b) is a[i] kron b[j], so
        y[..., i, j] = sum_{k, l} a[i, k] * b[j, l] * x[..., k, l].
    """
    a1, a2 = a.shape
    b1, b2 = b.shape
    if x.shape[-1] != a2 * b2:
        raise AdapterError(f"input has {x.shape[-1]} features; the Kronecker factors expect {a2} x {b2}")
    lead = x.shape[:-1]
    h = F.linear(x.reshape(*lead, a2, b2), b)  # (..., a2, b1)
    y = torch.matmul(a, h)  # (a1, a2) @ (..., a2, b1) -> (..., a1, b1)
    return y.reshape(*lead, a1 * b1)


def kron_conv_forward(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, conv: dict) -> torch.Tensor:
    """conv2d(x, A[:, :, None, None] kron B) without building the product: B convolves each of the a2
    input channel groups, then A mixes the groups.

    Args:
        x: (N, a2 * b2, H, W) input.
        a: (a1, a2) small factor.
        b: (b1, b2, kh, kw) convolution factor.
        conv: the layer's F.conv2d keyword arguments (stride, padding, dilation).

    Returns:
        (N, a1 * b1, H', W').
    """
    a1, a2 = a.shape
    b1, b2 = b.shape[:2]
    n, c, h, w = x.shape
    if c != a2 * b2:
        raise AdapterError(f"input has {c} channels; the Kronecker factors expect {a2} x {b2}")
    y = F.conv2d(x.reshape(n * a2, b2, h, w), b, **conv)  # (N * a2, b1, H', W')
    y = y.reshape(n, a2, b1, *y.shape[2:])
    y = torch.einsum("ik,nkjhw->nijhw", a, y)  # (N, a1, b1, H', W')
    return y.reshape(n, a1 * b1, *y.shape[3:])


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
