"""Pure adapter math: tensors in, tensors out, no state. The stateful adapter modules and the file formats
both import it (formats never import the adapter modules for math).

Kronecker products without materialising them (DiffuseKronA), LyCORIS LoKr / LoHa reconstruction, factor
splits and scales, tensor-name rules, Kronecker <-> LoKr factor conversion, and tensor-ring (TLoRA)
contractions. Conventions in composer/adapters/lycoris.py, kron.py and tensor.py.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F

from composer.errors import AdapterError, LoraFileError

LOKR_TENSORS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
LOHA_TENSORS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")


# --- LyCORIS --------------------------------------------------------------------------------------------
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


def lokr_rank(tensors: Mapping[str, torch.Tensor]) -> int | None:
    """A LoKr's rank: lokr_w1_b's rows when w1 is low-rank, else lokr_w2_b's; None when both are full."""
    low = tensors.get("lokr_w1_b", tensors.get("lokr_w2_b"))
    return None if low is None else int(low.shape[0])


def loha_rank(tensors: Mapping[str, torch.Tensor]) -> int:
    """A LoHa's rank: hada_w1_b's rows (LyCORIS gives both sides one rank)."""
    return int(tensors["hada_w1_b"].shape[0])


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


def shape_of(t: torch.Tensor | None) -> tuple[int, ...] | None:
    return None if t is None else tuple(t.shape)


def with_alpha(tensors: Mapping[str, torch.Tensor], alpha: float | None) -> dict[str, torch.Tensor]:
    """A module's file tensors plus its alpha as a float32 scalar (none when alpha is None)."""
    extra = {} if alpha is None else {"alpha": torch.tensor(float(alpha), dtype=torch.float32)}
    return dict(tensors) | extra


# --- Kronecker ----------------------------------------------------------------------------------------
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
            f"Kronecker A must be a matrix and B a matrix or 4-d, got A {shape_of(a)} and B {shape_of(b)}"
        )
    if a.shape[0] > b.shape[0] or a.shape[1] > b.shape[1]:
        raise AdapterError(
            f"Kronecker A {shape_of(a)} is larger than B {shape_of(b)} on a side; LoKr keeps the small "
            f"factor in lokr_w1, so this (a1, a2) cannot be exported as LoKr"
        )
    return {"lokr_w1": a.detach().clone(), "lokr_w2": b.detach().clone(), "alpha": torch.tensor(1.0)}


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


# --- tensor ring (TLoRA) ---------------------------------------------------------------------------
def tensor_modes(n: int, order: int = 3) -> tuple[int, ...]:
    """The most balanced factorisation of n into `order` ascending factors (1280 -> (8, 10, 16)).

    Balanced means the least sum of squared factors, which is what a transform core costs
    (R^2 * sum I_k^2). Factors of 1 fill in where n has too few prime factors: 7 -> (1, 1, 7).
    """
    if n < 1 or order < 1:
        raise AdapterError(f"cannot tensorise {n} features into {order} modes")

    def ascending(m: int, k: int, low: int) -> Iterator[tuple[int, ...]]:
        """Every m = f_1 ... f_k with low <= f_1 <= ... <= f_k."""
        if k == 1:
            yield from [(m,)] if m >= low else []
            return
        f = low
        while f**k <= m:
            if m % f == 0:
                yield from ((f, *rest) for rest in ascending(m // f, k - 1, f))
            f += 1

    return min(ascending(n, order, 1), key=lambda fs: (sum(f * f for f in fs), fs))


def tr_matvec(x: torch.Tensor, cores: Sequence[torch.Tensor], dim: int = -1) -> torch.Tensor:
    """M x along one dimension of x, for the tensor-ring matrix M with these cores, never building M.

    Args:
        x: the input, with J_1 * ... * J_D features on `dim`: (..., d_in) for a Linear,
            (N, C, H, W) with dim=1 for a Conv2d (every pixel, no channels-last copy).
        cores: G_k of shape (O_k, J_k, R_k, R_{k+1}), R_{D+1} = R_1.
        dim: the feature dimension.

    Returns:
        x's shape with O_1 * ... * O_D (row-major in (o_1, ..., o_D)) on `dim`.

    Each core is one matrix product (one GEMM, not a batch of small ones, which ran 2x slower) against the
    state (R_1 O_1..O_k-1, R_k, B, J_k..J_D T), permuted so that the pair it contracts, the ring index R_k and
    the input mode J_k, forms its rows; the ring closes with a trace over R_1 and R_{D+1} at the end.
    """
    dim = dim % x.ndim
    lead, trail = x.shape[:dim], x.shape[dim + 1 :]
    b = math.prod(lead)
    o, j, r1, r2 = cores[0].shape
    z = x.reshape(b, j, -1).transpose(0, 1).reshape(j, -1)  # (J_1, B rest)
    z = cores[0].permute(2, 0, 3, 1).reshape(r1 * o * r2, j) @ z  # (R_1 O_1 R_2, B rest)
    out = o
    for g in cores[1:]:
        o, j, rc, rd = g.shape
        z = z.reshape(r1 * out, rc, b, j, -1).permute(1, 3, 0, 2, 4).reshape(rc * j, -1)  # (R_k J_k, ...)
        z = g.permute(0, 3, 2, 1).reshape(o * rd, rc * j) @ z  # (O_k R_k+1, R_1 O_1..O_k-1 B rest)
        z = z.reshape(o, rd, r1 * out, b, -1).permute(2, 0, 1, 3, 4)  # (R_1 O_1..O_k, R_k+1, B, rest)
        out *= o
    y = z.reshape(r1, out, r1, b, -1).diagonal(dim1=0, dim2=2).sum(-1)  # close the ring: (O, B, T)
    return y.transpose(0, 1).reshape(*lead, out, *trail)


def tr_matrix(cores: Sequence[torch.Tensor]) -> torch.Tensor:
    """The dense (prod O_k, prod J_k) tensor-ring matrix; for merging only."""
    cols = math.prod(g.shape[1] for g in cores)
    eye = torch.eye(cols, dtype=cores[0].dtype, device=cores[0].device)
    return tr_matvec(eye, cores).T  # row c of tr_matvec(I) is M[:, c]


# --- tensor-ring core names (TLoRA files: tr_t.<k>, tr_d.<k>) -------------------------------------------
TENSOR_CORES = ("tr_t", "tr_d")
_CORE = re.compile(r"^(tr_t|tr_d)\.(\d+)$")
_CORE_AT_END = re.compile(r"\.((?:tr_t|tr_d)\.\d+)$")


def is_core(role: str) -> bool:
    """True for an indexed tensor-ring core name, tr_t.<k> or tr_d.<k>."""
    return _CORE.match(role) is not None


def core_suffix(key: str) -> str | None:
    """The trailing "tr_t.<k>" / "tr_d.<k>" of a dotted key, or None."""
    m = _CORE_AT_END.search(key)
    return m.group(1) if m else None


def check_cores(names: Iterable[str], where: str) -> None:
    """Raise LoraFileError unless each core family present (tr_t, tr_d) is numbered 0, 1, ... without gaps."""
    found: dict[str, list[int]] = {}
    for name in names:
        m = _CORE.match(name)
        if m is None:
            raise LoraFileError(f"{where}: {name!r} is not a tensor core name (tr_t.<k> or tr_d.<k>)")
        found.setdefault(m.group(1), []).append(int(m.group(2)))
    if not found:
        raise LoraFileError(f"{where}: tensor delta holds no tr_t/tr_d cores")
    for family, idx in sorted(found.items()):
        if sorted(idx) != list(range(len(idx))):
            listed = ", ".join(str(i) for i in sorted(idx))
            raise LoraFileError(
                f"{where}: {family} cores are numbered {listed}; they must run 0, 1, ... without gaps"
            )
