"""Tensor-decomposed adapter, TLoRA (Tao et al., ICCV 2025): y = (W0 T + D) x on Linear layers.

The delta at scale 1 is dW = W0 (T - I) + D, so forward_delta(x) = W0 (T x - x) + D x.

Both T (d_in x d_in) and D (d_out x d_in) are tensor-ring matrices: with the input tensorised as
d_in = J_1 ... J_D and the output as d_out = O_1 ... O_D (row-major multi-indices), cores G_k of shape
(O_k, J_k, R_k, R_{k+1}) with R_{D+1} = R_1 give M[o, j] = trace(G_1[o_1, j_1] @ ... @ G_D[o_D, j_D]).
A matrix-vector product contracts the tensorised input core by core and traces at the end, so neither
matrix is built in forward; `delta_weight` materialises them, once, to fuse.

Initialisation (`create`): T = I exactly and D = 0, so a fresh adapter leaves the layer unchanged.
T's diagonal slices G_k[i, i] are c * I_R and its off-diagonal slices 0, with c = R_t ** (-1 / D), so
T[i, i] = trace(c^D I_R) = 1 and any off-diagonal entry takes at least one zero slice. (METHODS writes
"every slice I/R", which traces to R^(1-D); c is the per-core root that makes it 1. It is exact for R_t = 1,
the recipe default, and whenever R_t^(1/D) is a power of two; otherwise T = I to float rounding.)
D's first core is zero and the others N(0, 1/R): a product of R x R matrices with variance-1/R entries keeps
its scale, so D's entries grow at the rate of the first core whatever the order and rank.

W0 is read from the base layer at call time, so with another adapter fused into the same layer T
transforms the fused weight: TLoRA is multiplicative and composes with whatever lies below it.

On a Conv2d (our extension; the paper adapts attention projections) T acts on the input channels, so
conv(x, W0 T) = conv(T x, W0) with T mixing channels at every pixel, and D (out_ch x in_ch) sits at the
kernel's centre tap: D applied as a 1x1 convolution with the layer's stride. That needs "same"-style
padding (padding = dilation * (k - 1) / 2 on odd kernels, as every SDXL convolution has).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
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
from composer.adapters.functional import check_cores, is_core, tensor_modes, tr_matrix, tr_matvec, with_alpha
from composer.errors import AdapterError

if TYPE_CHECKING:
    from composer.formats.model import ModuleDelta

_NAME = re.compile(r"tr_([td])\.(0|[1-9][0-9]*)")


def _layer_sizes(base: nn.Module) -> tuple[int, int, dict | None]:
    """(d_out, d_in, conv args or None) of a Linear or a centre-tap-compatible Conv2d."""
    conv = conv_args(base, "a tensor (TLoRA) adapter")
    if conv is None:
        return base.out_features, base.in_features, None
    for k, p, d in zip(base.kernel_size, base.padding, base.dilation, strict=True):
        if isinstance(base.padding, str) or k % 2 == 0 or p != d * (k - 1) // 2:
            raise AdapterError(
                f"a tensor (TLoRA) adapter on a Conv2d needs an odd kernel with 'same' padding "
                f"(its residual sits at the kernel centre); got kernel {tuple(base.kernel_size)}, "
                f"padding {base.padding}"
            )
    return base.out_channels, base.in_channels, dict(stride=base.stride)


def _check_ring(what: str, cores: Sequence[torch.Tensor], rows: int, cols: int, layer: str) -> None:
    if not cores:
        raise AdapterError(f"TLoRA {what} has no cores ({layer})")
    for k, g in enumerate(cores):
        if g.ndim != 4:
            raise AdapterError(
                f"TLoRA {what} core {k} {tuple(g.shape)} is not 4-d (rows, cols, R_k, R_k+1) ({layer})"
            )
    for k, g in enumerate(cores):
        nxt = cores[(k + 1) % len(cores)]
        if g.shape[3] != nxt.shape[2]:
            raise AdapterError(
                f"TLoRA {what} core {k} {tuple(g.shape)} does not chain to core {(k + 1) % len(cores)} "
                f"{tuple(nxt.shape)}: cores are (rows, cols, R_k, R_k+1), ring ranks must match ({layer})"
            )
    got = (math.prod(g.shape[0] for g in cores), math.prod(g.shape[1] for g in cores))
    if got != (rows, cols):
        shapes = ", ".join(str(tuple(g.shape)) for g in cores)
        raise AdapterError(
            f"TLoRA {what} cores [{shapes}] give a {got[0]}x{got[1]} matrix; {layer} needs {rows}x{cols}"
        )


class TensorAdapter(nn.Module):
    """TLoRA on a Linear or Conv2d: a tensor-ring transform T of the input side plus a tensor-ring residual D."""

    kind = "tensor"
    file_kind = "tensor"
    recipe = Recipe(steps=2000, learning_rate=1e-4, rank=4, conv=True)
    lycoris_algo = None
    network_module = "composer.adapters.tensor"
    file_roles = ()  # indexed cores tr_t.<k>, tr_d.<k> (functional.is_core)
    alpha = None
    select_targets = staticmethod(all_targets)
    file_metadata = staticmethod(no_metadata)

    def __init__(
        self,
        base: nn.Module,
        t_cores: Sequence[torch.Tensor],
        d_cores: Sequence[torch.Tensor],
        *,
        trainable: bool = False,
    ):
        super().__init__()
        d_out, d_in, self._conv = _layer_sizes(base)
        layer = f"{type(base).__name__} {d_in}->{d_out}"
        _check_ring("T", t_cores, d_in, d_in, layer)
        _check_ring("D", d_cores, d_out, d_in, layer)
        for k, g in enumerate(t_cores):
            if g.shape[0] != g.shape[1]:
                raise AdapterError(f"TLoRA T core {k} {tuple(g.shape)} is not square in its modes ({layer})")
        weight = base.weight
        self.t_cores = nn.ParameterList(
            nn.Parameter(g.detach().to(weight).contiguous(), requires_grad=trainable) for g in t_cores
        )  # (J_k, J_k, R_t, R_t)
        self.d_cores = nn.ParameterList(
            nn.Parameter(g.detach().to(weight).contiguous(), requires_grad=trainable) for g in d_cores
        )  # (O_k, J_k, R, R)
        self._base = [base]  # a plain list: W0 is neither this module's parameter nor in its state dict

    @classmethod
    def create(
        cls,
        base: nn.Module,
        rank: int = 1,
        transform_rank: int = 1,
        order: int = 3,
        generator: torch.Generator | None = None,
    ) -> TensorAdapter:
        """A fresh trainable adapter with T = I and D = 0 (see the module docstring for the init).

        Args:
            rank: D's ring rank R.
            transform_rank: T's ring rank R_t.
            order: modes per side, chosen by `tensor_modes`.
            generator: draws D's cores 2..order (on CPU, so a meta-device layer works too).

        Raises:
            AdapterError: the layer is not a Linear or a "same"-padded plain Conv2d, or a rank or order
                is below 1.
        """
        d_out, d_in, _ = _layer_sizes(base)
        if rank < 1 or transform_rank < 1:
            raise AdapterError(f"TLoRA ranks must be >= 1, got rank={rank}, transform_rank={transform_rank}")
        ins, outs = tensor_modes(d_in, order), tensor_modes(d_out, order)
        c = transform_rank ** (-1.0 / order)
        eye_r = torch.eye(transform_rank)
        t_cores = [c * torch.eye(j)[:, :, None, None] * eye_r for j in ins]  # (J, J, R_t, R_t)
        d_cores = [torch.zeros(outs[0], ins[0], rank, rank)]  # drawn on CPU: generator-stable, meta-safe
        for o, j in zip(outs[1:], ins[1:], strict=True):
            d_cores.append(torch.randn(o, j, rank, rank, generator=generator) / math.sqrt(rank))
        return cls(base, t_cores, d_cores, trainable=True)

    @classmethod
    def from_delta(cls, base: nn.Module, delta: ModuleDelta) -> TensorAdapter:
        """Build from a ModuleDelta of kind "tensor": tensors tr_t.0, tr_t.1, ... and tr_d.0, ...; no alpha."""
        found: dict[str, dict[int, torch.Tensor]] = {"t": {}, "d": {}}
        unknown = []
        for name, tensor in delta.tensors.items():
            m = _NAME.fullmatch(name)
            if m is None:
                unknown.append(name)
            else:
                found[m[1]][int(m[2])] = tensor
        missing = [
            f"tr_{s}.{k}" for s, got in found.items() for k in range(max(got, default=0) + 1) if k not in got
        ]
        if missing or unknown:
            raise AdapterError(
                f"tensor delta needs tensors tr_t.0, tr_t.1, ... and tr_d.0, tr_d.1, ... "
                f"(missing: {', '.join(missing) or 'none'}; unknown: {', '.join(sorted(unknown)) or 'none'})"
            )
        require_no_alpha(delta.alpha, "tensor (TLoRA)")
        t_cores, d_cores = ([got[k] for k in sorted(got)] for got in found.values())
        return cls(base, t_cores, d_cores)

    @classmethod
    def create_for(cls, base: nn.Module, config: TrainSpec, generator: torch.Generator) -> TensorAdapter:
        return cls.create(
            base, rank=config.tensor_rank, transform_rank=config.transform_rank, generator=generator
        )

    @classmethod
    def reads_role(cls, role: str) -> bool:
        return is_core(role)

    @classmethod
    def kohya_keys(cls, delta: ModuleDelta, where: str) -> dict[str, torch.Tensor]:
        """tr_t.<k> and tr_d.<k> as they are (numbered 0, 1, ... without gaps); shapes go to metadata."""
        check_cores(delta.tensors, where)
        return with_alpha(delta.tensors, delta.alpha)

    def parameter_count(self) -> int:
        return count_parameters(self)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The cores under their file names (detached copies), the inverse of `from_delta`."""
        out = {f"tr_t.{k}": g.detach().clone() for k, g in enumerate(self.t_cores)}
        return out | {f"tr_d.{k}": g.detach().clone() for k, g in enumerate(self.d_cores)}

    @property
    def t_modes(self) -> tuple[int, ...]:
        """How the input is tensorised for T (T is square: the same modes on both sides)."""
        return tuple(g.shape[1] for g in self.t_cores)

    @property
    def d_modes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """D's (output modes, input modes)."""
        return tuple(g.shape[0] for g in self.d_cores), tuple(g.shape[1] for g in self.d_cores)

    @property
    def rank(self) -> int:
        return self.d_cores[0].shape[2]

    @property
    def transform_rank(self) -> int:
        return self.t_cores[0].shape[2]

    def delta_weight(self) -> torch.Tensor:
        w0 = self._base[0].weight  # (d_out, d_in[, kh, kw]), as it stands now
        t = tr_matrix(self.t_cores)  # (d_in, d_in)
        t_minus_i = t - torch.eye(t.shape[0], dtype=t.dtype, device=t.device)
        d = tr_matrix(self.d_cores)  # (d_out, d_in)
        if self._conv is None:
            return w0 @ t_minus_i + d
        delta = torch.einsum("oihw,ic->ochw", w0, t_minus_i)  # (d_out, d_in, kh, kw)
        kh, kw = w0.shape[2:]
        delta[:, :, kh // 2, kw // 2] += d  # the residual at the centre tap
        return delta

    def forward_delta(self, x: torch.Tensor) -> torch.Tensor:
        base = self._base[0]
        w0 = base.weight.to(x.dtype)  # an fp32 adapter on an fp16 layer computes in fp32
        if self._conv is None:
            return nn.functional.linear(tr_matvec(x, self.t_cores) - x, w0) + tr_matvec(x, self.d_cores)
        mixed = tr_matvec(x, self.t_cores, dim=1) - x  # T mixes the channels at every pixel: (N, d_in, H, W)
        y = nn.functional.conv2d(mixed, w0, None, base.stride, base.padding, base.dilation)
        sh, sw = self._conv["stride"]
        return y + tr_matvec(x[:, :, ::sh, ::sw], self.d_cores, dim=1)

    def identity_regulariser(self) -> torch.Tensor:
        """||T - I||_F^2 from the cores, without building T (an optional loss term).

        ||T||^2 = trace(prod_k E_k) with E_k = sum_ij G_k[i, j] kron G_k[i, j] (trace(A)^2 = trace(A kron A)),
        and trace(T) = trace(prod_k sum_i G_k[i, i]). Computed in float64: at T = I the two terms cancel to
        d_in - 2 d_in + d_in, which float32 would leave as noise of order d_in * 1e-7.
        """
        cores = [g.double() for g in self.t_cores]
        ra = cores[0].shape[2]
        sq = torch.eye(ra * ra, dtype=torch.float64, device=cores[0].device)
        tr = torch.eye(ra, dtype=torch.float64, device=cores[0].device)
        for g in cores:
            r1, r2 = g.shape[2:]
            sq = sq @ torch.einsum("ijab,ijcd->acbd", g, g).reshape(r1 * r1, r2 * r2)
            tr = tr @ g.diagonal(dim1=0, dim2=1).sum(-1)  # (R_k, R_k+1)
        d_in = math.prod(self.t_modes)
        return (sq.trace() - 2 * tr.trace() + d_in).to(self.t_cores[0].dtype)
