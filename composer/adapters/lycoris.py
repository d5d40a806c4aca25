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

from composer.adapters.base import Recipe, TrainSpec, all_targets, conv_args, count_parameters, no_metadata
from composer.adapters.functional import (
    LOHA_TENSORS,
    LOKR_TENSORS,
    check_loha_names,
    check_lokr_names,
    kron_delta_forward,
    kron_factors_to_lokr,
    loha_delta,
    loha_rank,
    lokr_delta,
    lokr_kron_factors,
    lokr_rank,
    lycoris_scale,
    rebuild_tucker,
    shape_of,
    with_alpha,
)
from composer.adapters.kron import KronAdapter
from composer.errors import AdapterError, LoraFileError

if TYPE_CHECKING:
    from composer.formats.model import ModuleDelta


# --- adapter types ----------------------------------------------------------------------------------
class _LycorisAdapter(nn.Module):
    """Holds the file's tensors as frozen parameters under their LyCORIS names (absent ones are None)."""

    kind = ""
    title = ""  # for messages: "LoKr", "LoHa"
    recipe: Recipe | None = None  # applied from community files; the studio trains "kron" instead
    network_module = "lycoris.kohya"
    select_targets = staticmethod(all_targets)
    file_metadata = staticmethod(no_metadata)
    names: tuple[str, ...] = ()
    check_names: Callable[[Collection[str]], None]  # raises AdapterError unless the names form this kind
    file_rank: Callable[[Mapping[str, torch.Tensor]], int | None]  # the rank a module's tensors have

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

    @classmethod
    def create_for(cls, base: nn.Module, config: TrainSpec, generator: torch.Generator) -> _LycorisAdapter:
        raise AdapterError(f"{cls.title} is applied from files, not trained here")

    @classmethod
    def reads_role(cls, role: str) -> bool:
        return role in cls.file_roles

    @classmethod
    def kohya_keys(cls, delta: ModuleDelta, where: str) -> dict[str, torch.Tensor]:
        """The LyCORIS tensors as they are, and alpha; only a set every LyCORIS reader loads."""
        try:
            cls.check_names(set(delta.tensors))
        except AdapterError as e:
            raise LoraFileError(f"{where}: {e}") from e
        return with_alpha(delta.tensors, delta.alpha)

    def parameter_count(self) -> int:
        return count_parameters(self)

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
    file_kind = "lokr"
    lycoris_algo = "lokr"
    title = "LoKr"
    names = file_roles = LOKR_TENSORS
    check_names = staticmethod(check_lokr_names)
    file_rank = staticmethod(lokr_rank)

    def __init__(self, base: nn.Module, tensors: Mapping[str, torch.Tensor], alpha: float | None = None):
        super().__init__(base, tensors, alpha)
        # w1 (out_l, in_m)
        if self.lokr_w1 is not None:
            if self.lokr_w1.ndim != 2:
                raise AdapterError(f"LoKr lokr_w1 must be a matrix, has shape {shape_of(self.lokr_w1)}")
            out_l, in_m = self.lokr_w1.shape
        else:
            a, b = self.lokr_w1_a, self.lokr_w1_b
            if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
                raise AdapterError(f"LoKr lokr_w1_a {shape_of(a)} and lokr_w1_b {shape_of(b)} do not chain")
            out_l, in_m = a.shape[0], b.shape[1]
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
                    raise AdapterError(
                        f"LoKr lokr_w2_a {shape_of(a)} and lokr_w2_b {shape_of(b)} do not chain"
                    )
                self._check_kernel("lokr_w2_b", tuple(b.shape[2:]))
                out_k, cols = a.shape[0], math.prod(b.shape[1:])
            else:  # Tucker: t (r1, r2, kh, kw), a (r1, out_k), b (r2, in_n)
                if a.ndim != 2 or b.ndim != 2 or t.ndim < 2 or t.shape[:2] != (a.shape[0], w2_rank):
                    raise AdapterError(
                        f"LoKr Tucker lokr_t2 {shape_of(t)} does not chain with lokr_w2_a {shape_of(a)} "
                        f"and lokr_w2_b {shape_of(b)}"
                    )
                self._check_kernel("lokr_t2", tuple(t.shape[2:]))
                out_k, cols = a.shape[1], b.shape[1] * math.prod(t.shape[2:])
        d_out, d_in, kk = self.shape[0], self.shape[1], math.prod(self.kernel)
        if out_l * out_k != d_out or d_in % in_m or cols != (d_in // in_m) * kk:
            raise AdapterError(
                f"LoKr factors w1 ({out_l}, {in_m}) and w2 ({out_k}, {cols}) do not fit the layer weight "
                f"{tuple(self.shape)}"
            )
        self.rank = lokr_rank(tensors)  # None: both factors full, alpha ignored
        self.scale = lycoris_scale(self.alpha, self.rank)

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
    file_kind = "loha"
    lycoris_algo = "loha"
    title = "LoHa"
    names = file_roles = LOHA_TENSORS
    check_names = staticmethod(check_loha_names)
    file_rank = staticmethod(loha_rank)

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
                tucker = "" if t is None else f", hada_t{side} {shape_of(t)}"
                raise AdapterError(
                    f"LoHa hada_w{side}_a {shape_of(a)}, hada_w{side}_b {shape_of(b)}{tucker} do not chain"
                )
            if out != self.shape[0] or cols != self.shape[1] * math.prod(self.kernel):
                raise AdapterError(
                    f"LoHa side {side} gives a ({out}, {cols}) matrix; the layer weight is {tuple(self.shape)}"
                )
        self.rank = loha_rank(tensors)
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
def kron_to_lokr_tensors(adapter: KronAdapter) -> dict[str, torch.Tensor]:
    """A Kronecker adapter as LoKr tensors (see kron_factors_to_lokr)."""
    return kron_factors_to_lokr(adapter.a, adapter.b)


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
