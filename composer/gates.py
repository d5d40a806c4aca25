"""Gated fusion (AutoLoRA, Li et al. 2025): LoRAs kept unmerged and joined in every adapted layer of the
denoiser by learned gates, per token and channel.

    y = y0 + sum_i w_o * g_i * y_i
    g_i = sigmoid(w_b * LN(y0) + w_l * LN(y_i) + w_x * LN(y0) * LN(y_i) + b + w_t . phi(t))

y0 is the layer's base output, y_i the i-th LoRA's scaled output change, LN a LayerNorm over the channels
without affine, phi(t) a small sinusoidal feature of the call's timestep (the paper lets the timestep reach the
gates through the activations; a learned per-channel bias makes it explicit). The gate parameters are per layer
and shared across LoRAs, so one bank fuses any number of them. Initialised with w_o = 2 and everything else 0,
every gate is sigmoid(0) = 1/2 and the layer adds each LoRA whole: untrained gates are a merge.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import safetensors.torch
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from torch import nn

from composer.adapters.host import AdapterHost
from composer.errors import StudioError
from composer.formats.safetensors_io import serialize
from composer.seams.streams import shadow_forward

TIME_FEATURES = 8  # sin and cos of the timestep at 4 frequencies
PARAMS = ("w_b", "w_l", "w_x", "b", "w_o", "w_t")  # one layer's gate tensors, as stored
EPS = 1e-5  # LayerNorm's


class GateError(StudioError):
    """Gates that do not fit the layers they are asked to gate, or stored gates that cannot be read (named)."""


@dataclass(frozen=True)
class StoredGates:
    """Trained gates of one LoRA set on one base model, as the catalog keeps them: the gate tensors by
    "component.path.param" and the training record (steps, seconds, losses, ...)."""

    tensors: dict[str, torch.Tensor]
    record: dict[str, Any] = field(default_factory=dict)


def gate_set_key(entries: Iterable[tuple[str, str]]) -> str:
    """The identity of a LoRA set: SHA-256 over its (catalog name, file SHA-256) pairs in sorted order, so the
    stack's order does not matter and a changed file (another hash) is another set."""
    lines = sorted(f"{name}\t{sha}" for name, sha in entries)
    if not lines:
        raise GateError("a gate set needs at least one LoRA")
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def time_features(t: torch.Tensor) -> torch.Tensor:
    """phi(t): (B,) or scalar shares of noise in [0, 1] -> (B or 1, TIME_FEATURES) sines and cosines."""
    t = torch.as_tensor(t).float().reshape(-1, 1)  # (B, 1)
    freqs = math.pi * 2.0 ** torch.arange(TIME_FEATURES // 2, device=t.device, dtype=t.dtype)
    angles = t * freqs  # (B, F/2)
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


def layer_norm(y: torch.Tensor, axis: int) -> torch.Tensor:
    """LayerNorm without affine over the channel axis (-1 for a Linear's output, 1 for a Conv2d's)."""
    if axis in (-1, y.ndim - 1):
        return F.layer_norm(y, y.shape[-1:], eps=EPS)
    mean = y.mean(dim=axis, keepdim=True)
    var = y.var(dim=axis, keepdim=True, unbiased=False)
    return (y - mean) * torch.rsqrt(var + EPS)


def _channels(p: torch.Tensor, y: torch.Tensor, axis: int) -> torch.Tensor:
    """A (C,) parameter shaped to broadcast along y's channel axis."""
    return p if axis in (-1, y.ndim - 1) else p.view(-1, *([1] * (y.ndim - 2)))


def _rows_channels(bias: torch.Tensor, y: torch.Tensor, axis: int, where: str) -> torch.Tensor:
    """A (B', C) per-row bias (B' = 1 or y's batch) shaped to broadcast over y."""
    if bias.shape[0] not in (1, y.shape[0]):
        raise GateError(f"{where}: {bias.shape[0]} timesteps for a batch of {y.shape[0]}")
    if axis in (-1, y.ndim - 1):
        return bias.view(bias.shape[0], *([1] * (y.ndim - 2)), -1)
    return bias.view(*bias.shape, *([1] * (y.ndim - 2)))


def gated_sum(
    y0: torch.Tensor,
    ys: Sequence[torch.Tensor],
    gate: Mapping[str, torch.Tensor],
    time_bias: torch.Tensor,
    axis: int,
    where: str = "",
) -> torch.Tensor:
    """y0 + sum_i w_o * g_i * y_i (AutoLoRA's fine-grained gated fusion), in float32, returned in y0's dtype.

    Args:
        y0: the base output, (B, ..., C) for a Linear (axis -1) or (B, C, H, W) for a Conv2d (axis 1).
        ys: each LoRA's scaled output change, shaped like y0.
        gate: the layer's w_b, w_l, w_x, b, w_o, each (C,).
        time_bias: (B' , C), w_t . phi(t) per row (B' = 1: the same timestep for every row).
    """
    base = y0.float()
    n0 = layer_norm(base, axis)
    w_l, w_o = _channels(gate["w_l"], base, axis), _channels(gate["w_o"], base, axis)
    shared = _channels(gate["w_b"], base, axis) * n0 + _channels(gate["b"], base, axis)
    shared = shared + _rows_channels(time_bias, base, axis, where)
    mixed = w_l + _channels(gate["w_x"], base, axis) * n0  # w_l + w_x * LN(y0)
    out = base
    for y in ys:
        yi = y.float()
        out = out + w_o * torch.sigmoid(shared + mixed * layer_norm(yi, axis)) * yi
    return out.to(y0.dtype)


class LayerGate(nn.Module):
    """One layer's gate parameters, per output channel; initialised so the gate adds each LoRA whole."""

    def __init__(self, channels: int):
        super().__init__()
        self.w_b = nn.Parameter(torch.zeros(channels))
        self.w_l = nn.Parameter(torch.zeros(channels))
        self.w_x = nn.Parameter(torch.zeros(channels))
        self.b = nn.Parameter(torch.zeros(channels))
        self.w_o = nn.Parameter(torch.full((channels,), 2.0))  # w_o * sigmoid(0) = 1: a merge
        self.w_t = nn.Parameter(torch.zeros(channels, TIME_FEATURES))

    def forward(
        self, y0: torch.Tensor, ys: Sequence[torch.Tensor], time: torch.Tensor, axis: int, where: str = ""
    ) -> torch.Tensor:
        time_bias = time.to(self.w_t) @ self.w_t.T  # (B', C)
        tensors = {"w_b": self.w_b, "w_l": self.w_l, "w_x": self.w_x, "b": self.b, "w_o": self.w_o}
        return gated_sum(y0, ys, tensors, time_bias, axis, where)


def out_channels(layer: nn.Module) -> int:
    """Output channels of an adapted Linear or Conv2d."""
    return int(layer.out_channels if isinstance(layer, nn.Conv2d) else layer.out_features)


class GateBank(nn.Module):
    """The gates of every adapted layer of a denoiser for one LoRA set; `combine` is the adapter layer's
    combiner (`composer.adapters.base.Combiner`), `set_time` takes each denoiser call's timestep."""

    def __init__(self, layers: Mapping[str, int]):
        """`layers`: "component.path" key -> output channels."""
        super().__init__()
        self.keys = sorted(layers)
        self.gates = nn.ModuleList([LayerGate(layers[k]) for k in self.keys])
        self._index = {k: i for i, k in enumerate(self.keys)}
        self._time: torch.Tensor | None = None

    @classmethod
    def for_stack(cls, host: AdapterHost, component: str, residents: Iterable[str]) -> GateBank:
        """Untrained gates for every layer of `component` (the denoiser) where a resident of the set lives.

        Raises:
            GateError: a layer holds fixed-shape slots for a compiled denoiser (it would bypass the gates).
        """
        layers: dict[str, int] = {}
        for name in residents:
            for key, layer in host.layers(name).items():
                if key.partition(".")[0] != component:
                    continue
                if layer.slot_rank:
                    raise GateError(
                        "gated fuses each LoRA's output through gates in every layer, which a compiled "
                        "denoiser does not take; render without --compile for this method"
                    )
                layers[key] = out_channels(layer)
        if not layers:
            raise GateError(f"none of the LoRAs adapts a layer of the {component}: nothing to gate")
        return cls(layers)

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def set_time(self, t: torch.Tensor | None) -> None:
        """The timestep of the denoiser call about to run (None: no call is running)."""
        self._time = None if t is None else time_features(t)

    def combine(
        self, layer: nn.Module, y0: torch.Tensor, outputs: list[tuple[str, torch.Tensor]]
    ) -> torch.Tensor:
        """The gated sum for `layer` (a layer without gates adds its LoRAs' outputs, as a merge)."""
        index = self._index.get(getattr(layer, "key", ""))
        if index is None:
            return y0 + sum(y for _, y in outputs)
        if self._time is None:
            raise GateError(f"{layer.key}: gated without a timestep (the denoiser call was not seen)")
        axis = 1 if isinstance(layer, nn.Conv2d) else -1
        return self.gates[index](y0, [y for _, y in outputs], self._time, axis, layer.key)

    # --- stored form ---------------------------------------------------------------------------------
    def tensors(self) -> dict[str, torch.Tensor]:
        """Every gate tensor by "component.path.param", detached CPU copies (what the catalog stores)."""
        return {
            f"{key}.{name}": getattr(gate, name).detach().to("cpu", torch.float32).clone()
            for key, gate in zip(self.keys, self.gates, strict=True)
            for name in PARAMS
        }

    @torch.no_grad()
    def load(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Take stored gate tensors; they must be exactly this bank's layers, parameters and shapes.

        Raises:
            GateError: naming the missing, unexpected or misshapen tensors.
        """
        expected = {f"{key}.{name}" for key in self.keys for name in PARAMS}
        missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        if missing or unexpected:
            shown = [f"missing {', '.join(missing[:3])}"] if missing else []
            shown += [f"unexpected {', '.join(unexpected[:3])}"] if unexpected else []
            raise GateError(
                f"stored gates do not fit these LoRAs' layers ({len(missing)} missing, {len(unexpected)} "
                f"unexpected: {'; '.join(shown)}); train the set's gates again"
            )
        for key, gate in zip(self.keys, self.gates, strict=True):
            for name in PARAMS:
                target, value = getattr(gate, name), tensors[f"{key}.{name}"]
                if tuple(value.shape) != tuple(target.shape):
                    raise GateError(
                        f"stored gate {key}.{name} has shape {tuple(value.shape)}, the layer needs "
                        f"{tuple(target.shape)}; train the set's gates again"
                    )
                target.copy_(value)


def gates_to_bytes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> bytes:
    """Gate tensors as safetensors bytes (how the catalog stores them)."""
    return serialize(tensors, metadata)


def gates_from_bytes(blob: bytes) -> dict[str, torch.Tensor]:
    """Gate tensors from safetensors bytes. Raises GateError when they are not readable or not finite."""
    try:
        tensors = safetensors.torch.load(bytes(blob))
    except (SafetensorError, ValueError) as exc:
        raise GateError(f"stored gates are not readable safetensors: {exc}") from None
    bad = [k for k, v in tensors.items() if not torch.isfinite(v).all()]
    if bad:
        raise GateError(f"stored gates hold non-finite values: {', '.join(bad[:3])}")
    return tensors


@contextmanager
def gated_denoiser(denoiser: nn.Module, backbone, host: AdapterHost, bank: GateBank) -> Iterator[None]:
    """While the block runs, every denoiser call tells `bank` its timestep (`Backbone.call_time`) and runs
    with `bank.combine` as the adapter layers' combiner; the text encoders keep the layers' own sum. The
    combiner, the timestep and the denoiser's forward are put back after each call and on exit."""
    original = denoiser.forward
    context = host.context

    def forward(*args, **kwargs):
        previous = context.combiner
        bank.set_time(backbone.call_time(args, kwargs))
        context.combiner = bank.combine
        try:
            return original(*args, **kwargs)
        finally:
            context.combiner = previous
            bank.set_time(None)

    with shadow_forward(denoiser, forward):
        yield
