"""LyCORIS LoKr and LoHa (Yeh et al., ICLR 2024) as adapter types, and Kronecker <-> LoKr conversion.

Tensor names, layouts and the alpha rule follow LyCORIS (`lycoris/functional/lokr.py`, `modules/lokr.py`,
`modules/loha.py`) and the loaders every UI uses (ComfyUI `comfy/weight_adapter/lokr.py`, `loha.py`):

- LoKr: dW = (alpha / rank) * kron(w1, w2), w1 = lokr_w1 or lokr_w1_a @ lokr_w1_b (out_l, in_m),
  w2 = lokr_w2, lokr_w2_a @ lokr_w2_b, or Tucker einsum(lokr_t2, lokr_w2_a, lokr_w2_b) (out_k, in_n[, kh, kw]).
  rank is lokr_w1_b's leading dim when w1 is low-rank, else lokr_w2_b's when w2 is; when both factors are
  full there is no rank and the scale is 1 whatever alpha says (LyCORIS sets alpha = lora_dim for full
  matrices, so a stored alpha is a placeholder).
- LoHa: dW = (alpha / rank) * (w1_a @ w1_b) * (w2_a @ w2_b), rank = hada_w1_b's leading dim; Tucker
  (hada_t1, hada_t2) rebuilds each side as einsum(t, w_a, w_b) (out, in, kh, kw).
- alpha absent or 0 means scale 1 (LyCORIS: alpha = lora_dim then).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from composer.adapters.base import conv_args
from composer.adapters.kron import KronAdapter, kron_delta_forward
from composer.errors import AdapterError

if TYPE_CHECKING:
    from composer.formats.model import ModuleDelta

LOKR_TENSORS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
LOHA_TENSORS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")


# --- pure math --------------------------------------------------------------------------------------
def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """LyCORIS's split of a dimension into (m, n), m <= n, m * n = dimension; m is w1's side of it.

    factor > 0 dividing the dimension gives (factor, dimension / factor), sorted. Otherwise m is the largest
    divisor with m <= sqrt(dimension) and m <= factor (factor < 0: no bound), e.g. 128 -> (8, 16),
    (1280, 16) -> (16, 80), (360, 16) -> (15, 24).
    """
    if factor > 0 and dimension % factor == 0:
        m, n = sorted((factor, dimension // factor))
        return m, n
    limit = dimension if factor < 0 else factor
    m = 1
    for d in range(2, math.isqrt(dimension) + 1):
        if d > limit:
            break
        if dimension % d == 0:
            m = d
    return m, dimension // m


def lokr_factor_shapes(d_out: int, d_in: int, factor: int = -1) -> tuple[tuple[int, int], tuple[int, int]]:
    """Shapes LyCORIS gives full LoKr factors on a (d_out, d_in) layer: w1 (out_l, in_m), w2 (out_k, in_n)."""
    out_l, out_k = factorization(d_out, factor)
    in_m, in_n = factorization(d_in, factor)
    return (out_l, in_m), (out_k, in_n)


def rebuild_tucker(t: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """Tucker core t (r1, r2, *k) with wa (r1, out), wb (r2, in) -> (out, in, *k)."""
    return torch.einsum("ij...,ip,jq->pq...", t, wa, wb)


def lycoris_scale(alpha: float | None, rank: int | None) -> float:
    """alpha / rank; 1 when there is no rank (full factors) or no alpha (absent or 0)."""
    if rank is None or alpha is None or float(alpha) == 0.0:
        return 1.0
    return float(alpha) / rank


def lokr_delta(w1: torch.Tensor, w2: torch.Tensor, scale: float, shape: torch.Size) -> torch.Tensor:
    """scale * kron(w1 (out_l, in_m), w2 (out_k, in_n * kh * kw)) as a weight of `shape`.

    The 2-D Kronecker product of w2 flattened over (in_n, kh, kw) equals the 4-D one of LyCORIS
    (w1 unsqueezed to (out_l, in_m, 1, 1)) once viewed as (out, in, kh, kw).
    """
    return torch.kron(w1 * scale, w2.flatten(1).contiguous()).reshape(shape)  # kron rejects odd strides


def loha_delta(m1: torch.Tensor, m2: torch.Tensor, scale: float, shape: torch.Size) -> torch.Tensor:
    """FedPara / LoHa (Hyeon-Woo et al., ICLR 2022): scale * (m1 Hadamard m2) as a weight of `shape`."""
    return (m1 * m2 * scale).reshape(shape)


# --- adapter types ----------------------------------------------------------------------------------
def _check_names(names: Collection[str], known: tuple[str, ...], what: str) -> None:
    unknown = sorted(set(names) - set(known))
    if unknown:
        raise AdapterError(f"{what} tensors not supported: {', '.join(unknown)} (known: {', '.join(known)})")


def _require(names: Collection[str], wanted: tuple[str, ...], what: str) -> None:
    missing = [n for n in wanted if n not in names]
    if missing:
        raise AdapterError(f"{what} weights missing: {', '.join(missing)}")


def check_lokr_names(names: Collection[str]) -> None:
    """Raise AdapterError unless the tensor names form a LoKr: lokr_w1 or lokr_w1_a + lokr_w1_b, and
    lokr_w2 or lokr_w2_a + lokr_w2_b (the latter optionally with lokr_t2)."""
    _check_names(names, LOKR_TENSORS, "LoKr")
    for side in ("1", "2"):
        full, low = f"lokr_w{side}", (f"lokr_w{side}_a", f"lokr_w{side}_b")
        if (full in names) == any(n in names for n in low):
            raise AdapterError(f"LoKr needs exactly one of {full} or {low[0]}/{low[1]}")
        if full not in names:
            _require(names, low, "LoKr")
    if "lokr_t2" in names and "lokr_w2" in names:
        raise AdapterError("LoKr lokr_t2 (Tucker) comes with lokr_w2_a/lokr_w2_b, not with lokr_w2")


def check_loha_names(names: Collection[str]) -> None:
    """Raise AdapterError unless the tensor names form a LoHa: hada_w1_a/_b, hada_w2_a/_b (+ both hada_t1/t2)."""
    _check_names(names, LOHA_TENSORS, "LoHa")
    _require(names, ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"), "LoHa")
    if ("hada_t1" in names) != ("hada_t2" in names):
        raise AdapterError("LoHa Tucker needs both hada_t1 and hada_t2")


def _shape(t: torch.Tensor | None) -> tuple[int, ...] | None:
    return None if t is None else tuple(t.shape)


class _LycorisAdapter(nn.Module):
    """Holds the file's tensors as frozen parameters under their LyCORIS names (absent ones are None)."""

    kind = ""
    title = ""  # for messages: "LoKr", "LoHa"
    names: tuple[str, ...] = ()
    check_names: Callable[[Collection[str]], None]  # raises AdapterError unless the names form this kind

    def __init__(self, base: nn.Module, tensors: Mapping[str, torch.Tensor], alpha: float | None):
        super().__init__()
        self._conv = conv_args(base, self.title)
        self.check_names(set(tensors))
        weight = base.weight
        for name in self.names:
            t = tensors.get(name)
            p = None if t is None else nn.Parameter(t.detach().to(weight).contiguous(), requires_grad=False)
            self.register_parameter(name, p)
        self.shape = weight.shape  # (out, in) or (out, in, kh, kw)
        self.kernel = tuple(weight.shape[2:])  # () for a Linear
        self.alpha = None if alpha is None else float(alpha)

    def _check_kernel(self, name: str, kernel: tuple[int, ...]) -> None:
        """A trailing kernel (kh, kw) of a factor must be the layer's; a Linear takes only 1x1 (or none)."""
        if self._conv is None and any(k != 1 for k in kernel):
            raise AdapterError(f"{self.title} {name} has kernel {kernel} but the layer is a Linear")
        if self._conv is not None and kernel and kernel != self.kernel:
            raise AdapterError(f"{self.title} {name} has kernel {kernel}; the Conv2d has {self.kernel}")

    @classmethod
    def from_delta(cls, base: nn.Module, delta: ModuleDelta) -> _LycorisAdapter:
        return cls(base, delta.tensors, delta.alpha)

    def forward_delta(self, x: torch.Tensor) -> torch.Tensor:
        if self._conv is None:
            return F.linear(x, self.delta_weight())
        return F.conv2d(x, self.delta_weight(), **self._conv)


class LokrAdapter(_LycorisAdapter):
    """LyCORIS LoKr on a Linear or Conv2d (see the module docstring for layouts and scale).

    forward_delta on a Linear never builds the dense delta (reshape plus two small matmuls, as the
    Kronecker adapter); on a Conv2d it convolves with the dense delta (one weight-sized temporary).
    """

    kind = "lokr"
    title = "LoKr"
    names = LOKR_TENSORS
    check_names = staticmethod(check_lokr_names)

    def __init__(self, base: nn.Module, tensors: Mapping[str, torch.Tensor], alpha: float | None = None):
        super().__init__(base, tensors, alpha)
        rank = None
        # w1 (out_l, in_m)
        if self.lokr_w1 is not None:
            if self.lokr_w1.ndim != 2:
                raise AdapterError(f"LoKr lokr_w1 must be a matrix, has shape {_shape(self.lokr_w1)}")
            out_l, in_m = self.lokr_w1.shape
        else:
            a, b = self.lokr_w1_a, self.lokr_w1_b
            if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
                raise AdapterError(f"LoKr lokr_w1_a {_shape(a)} and lokr_w1_b {_shape(b)} do not chain")
            (out_l, rank), in_m = a.shape, b.shape[1]
        # w2 (out_k, cols = in_n * kh * kw)
        if self.lokr_w2 is not None:
            w2 = self.lokr_w2
            self._check_kernel("lokr_w2", tuple(w2.shape[2:]))
            out_k, cols = w2.shape[0], math.prod(w2.shape[1:])
        else:
            a, b, t = self.lokr_w2_a, self.lokr_w2_b, self.lokr_t2
            w2_rank = b.shape[0]
            if t is None:  # (out_k, r) @ (r, in_n * kh * kw)
                if a.ndim != 2 or a.shape[1] != w2_rank:
                    raise AdapterError(f"LoKr lokr_w2_a {_shape(a)} and lokr_w2_b {_shape(b)} do not chain")
                self._check_kernel("lokr_w2_b", tuple(b.shape[2:]))
                out_k, cols = a.shape[0], math.prod(b.shape[1:])
            else:  # Tucker: t (r1, r2, kh, kw), a (r1, out_k), b (r2, in_n)
                if a.ndim != 2 or b.ndim != 2 or t.ndim < 2 or t.shape[:2] != (a.shape[0], w2_rank):
                    raise AdapterError(
                        f"LoKr Tucker lokr_t2 {_shape(t)} does not chain with lokr_w2_a {_shape(a)} "
                        f"and lokr_w2_b {_shape(b)}"
                    )
                self._check_kernel("lokr_t2", tuple(t.shape[2:]))
                out_k, cols = a.shape[1], b.shape[1] * math.prod(t.shape[2:])
            rank = rank if rank is not None else w2_rank
        d_out, d_in, kk = self.shape[0], self.shape[1], math.prod(self.kernel)
        if out_l * out_k != d_out or d_in % in_m or cols != (d_in // in_m) * kk:
            raise AdapterError(
                f"LoKr factors w1 ({out_l}, {in_m}) and w2 ({out_k}, {cols}) do not fit the layer weight "
                f"{tuple(self.shape)}"
            )
        self.rank = rank  # None: both factors full, alpha ignored
        self.scale = lycoris_scale(self.alpha, rank)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(w1 (out_l, in_m), w2 (out_k, in_n * kh * kw)) before the scale."""
        w1 = self.lokr_w1 if self.lokr_w1 is not None else self.lokr_w1_a @ self.lokr_w1_b
        if self.lokr_w2 is not None:
            w2 = self.lokr_w2
        elif self.lokr_t2 is not None:
            w2 = rebuild_tucker(self.lokr_t2, self.lokr_w2_a, self.lokr_w2_b)  # (out_k, in_n, kh, kw)
        else:
            w2 = self.lokr_w2_a @ self.lokr_w2_b.flatten(1)
        return w1, w2.flatten(1)

    def delta_weight(self) -> torch.Tensor:
        w1, w2 = self.factors()
        return lokr_delta(w1, w2, self.scale, self.shape)

    def forward_delta(self, x: torch.Tensor) -> torch.Tensor:
        if self._conv is not None:
            return super().forward_delta(x)  # dense delta through F.conv2d
        w1, w2 = self.factors()
        return kron_delta_forward(x, w1 * self.scale, w2)


class LohaAdapter(_LycorisAdapter):
    """LyCORIS LoHa on a Linear or Conv2d (see the module docstring for layouts and scale).

    forward_delta applies the dense delta: a Hadamard product of two low-rank matrices has no factored
    form to apply to x, so each call builds one weight-sized temporary.
    """

    kind = "loha"
    title = "LoHa"
    names = LOHA_TENSORS
    check_names = staticmethod(check_loha_names)

    def __init__(self, base: nn.Module, tensors: Mapping[str, torch.Tensor], alpha: float | None = None):
        super().__init__(base, tensors, alpha)
        for side in ("1", "2"):
            a, b = getattr(self, f"hada_w{side}_a"), getattr(self, f"hada_w{side}_b")
            t = getattr(self, f"hada_t{side}")
            if t is None:  # (out, r) @ (r, in * kh * kw)
                ok = a.ndim == 2 and a.shape[1] == b.shape[0]
                self._check_kernel(f"hada_w{side}_b", tuple(b.shape[2:]))
                out, cols = a.shape[0], math.prod(b.shape[1:])
            else:  # Tucker: t (r1, r2, kh, kw), a (r1, out), b (r2, in)
                ok = a.ndim == 2 and b.ndim == 2 and t.ndim >= 2 and t.shape[:2] == (a.shape[0], b.shape[0])
                self._check_kernel(f"hada_t{side}", tuple(t.shape[2:]))
                out, cols = a.shape[-1], b.shape[-1] * math.prod(t.shape[2:])
            if not ok:
                tucker = "" if t is None else f", hada_t{side} {_shape(t)}"
                raise AdapterError(
                    f"LoHa hada_w{side}_a {_shape(a)}, hada_w{side}_b {_shape(b)}{tucker} do not chain"
                )
            if out != self.shape[0] or cols != self.shape[1] * math.prod(self.kernel):
                raise AdapterError(
                    f"LoHa side {side} gives a ({out}, {cols}) matrix; the layer weight is {tuple(self.shape)}"
                )
        self.rank = self.hada_w1_b.shape[0]
        self.scale = lycoris_scale(self.alpha, self.rank)

    def _side(self, side: str) -> torch.Tensor:
        a, b = getattr(self, f"hada_w{side}_a"), getattr(self, f"hada_w{side}_b")
        t = getattr(self, f"hada_t{side}")
        if t is None:
            return a @ b.flatten(1)  # (out, in * kh * kw)
        return rebuild_tucker(t, a, b)  # (out, in, kh, kw)

    def delta_weight(self) -> torch.Tensor:
        return loha_delta(self._side("1"), self._side("2"), self.scale, self.shape)


# --- Kronecker <-> LoKr -----------------------------------------------------------------------------
def kron_factors_to_lokr(a: torch.Tensor, b: torch.Tensor) -> dict[str, torch.Tensor]:
    """Kronecker factors A (a1, a2), B (d_out / a1, d_in / a2[, kh, kw]) as LoKr tensors: lokr_w1 = A (small
    factor), lokr_w2 = B (large; 4-d on a Conv2d, as LyCORIS stores it), alpha.

    Both factors are full, so every LoKr reader applies scale 1; alpha = 1 is written as a placeholder.
    LyCORIS keeps the small factor in w1, so A must be no larger than B on either side.

    Raises:
        AdapterError: A or B is not a matrix, or A is larger than B on a side (LoKr's w1/w2 roles would be
            swapped).
    """
    if a.ndim != 2 or b.ndim not in (2, 4):
        raise AdapterError(
            f"Kronecker A must be a matrix and B a matrix or 4-d, got A {_shape(a)} and B {_shape(b)}"
        )
    if a.shape[0] > b.shape[0] or a.shape[1] > b.shape[1]:
        raise AdapterError(
            f"Kronecker A {_shape(a)} is larger than B {_shape(b)} on a side; LoKr keeps the small "
            f"factor in lokr_w1, so this (a1, a2) cannot be exported as LoKr"
        )
    return {"lokr_w1": a.detach().clone(), "lokr_w2": b.detach().clone(), "alpha": torch.tensor(1.0)}


def kron_to_lokr_tensors(adapter: KronAdapter) -> dict[str, torch.Tensor]:
    """A Kronecker adapter as LoKr tensors (see kron_factors_to_lokr)."""
    return kron_factors_to_lokr(adapter.a, adapter.b)


def lokr_kron_factors(tensors: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(A, B) = (lokr_w1, lokr_w2) when LoKr tensors are a textbook Kronecker product as stored, else None.

    That is: full matrices lokr_w1 and lokr_w2 and no other weights ("alpha" may be present): with both
    factors full there is no rank, so every LoKr reader applies scale 1 whatever alpha says.
    """
    weights = {k: v for k, v in tensors.items() if k != "alpha"}
    if set(weights) != {"lokr_w1", "lokr_w2"} or weights["lokr_w1"].ndim != 2:
        return None
    if weights["lokr_w2"].ndim not in (2, 4):
        return None
    return weights["lokr_w1"], weights["lokr_w2"]


def lokr_tensors_to_kron(
    base: nn.Module, tensors: Mapping[str, torch.Tensor], alpha: float | None = None
) -> KronAdapter:
    """A LoKr as a Kronecker adapter: A = scale * w1, B = w2 (low-rank factors multiplied out; on a Conv2d
    B is (out_k, in_n, kh, kw)).

    A LoKr with full factors is a textbook Kronecker adapter: then A, B are its tensors as they are
    (`lokr_kron_factors`).
    `tensors` may hold "alpha" (as `kron_to_lokr_tensors` returns); it wins over the argument.

    Raises:
        AdapterError: the layer is not a Linear or plain Conv2d, or the tensors do not form a LoKr on it.
    """
    weights = {k: v for k, v in tensors.items() if k != "alpha"}
    if "alpha" in tensors:
        alpha = float(tensors["alpha"])
    lokr = LokrAdapter(base, weights, alpha)  # checks the factors against the layer
    if (exact := lokr_kron_factors(weights)) is not None:
        return KronAdapter(base, *(t.detach() for t in exact))
    w1, w2 = lokr.factors()  # w2 (out_k, in_n * kh * kw)
    a = w1 if lokr.scale == 1.0 else w1 * lokr.scale
    if isinstance(base, nn.Conv2d):
        w2 = w2.reshape(w2.shape[0], -1, *base.kernel_size)  # (out_k, in_n, kh, kw)
    return KronAdapter(base, a.detach(), w2.detach())
