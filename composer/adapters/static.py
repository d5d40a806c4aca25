"""Fixed-shape slots that let a compiled denoiser serve every LoRA set without recompiling.

torch.compile guards on the Python state a forward reads. The adapter layer's eager forward reads the mixing
context (which adapters, what scales), so a compiled graph would be specialised to one set and a switch would
recompile. In static mode each wrapped layer instead holds two non-persistent buffers of a fixed rank R:

    slot_down (R, in[, kh, kw])   slot_up (out, R[, 1, 1])     forward: base(x) + up(down(x))

and a switch writes the active set into them in place: every plain LoRA's down rows and up columns side by
side, its scale (weight x alpha / rank) folded into the up columns, zeros in the unused rank. Adapter types
that are not a plain down/up pair (LoKr, LoHa, DoRA, TLoRA, LoCon Tucker) are folded into the base weight
instead (the exact original is kept and restored on the next switch). The graph reads only the buffers and
weights, whose storage never changes, so five switches run on the graph compiled for the first. This is
diffusers' LoRA hotswap idea (pad to a maximum rank, copy in place) on our layer.

Limits, each refused by name: per-sample scales (heterogeneous batches, regional streams), fusing on top,
and a set whose LoRAs on one layer add up to more rank than the slots hold.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from composer.adapters.lora import LoraAdapter
from composer.errors import AdapterError

if TYPE_CHECKING:
    from composer.adapters.layer import AdaptedModule

DEFAULT_SLOT_RANK = 64


def slottable(adapter: torch.nn.Module) -> bool:
    """A plain down/up LoRA (B-LoRA included): it goes into the slots; anything else is folded."""
    return isinstance(adapter, LoraAdapter) and adapter.mid is None


def make_static(layer: AdaptedModule, rank: int) -> None:
    """Give `layer` zeroed slots of `rank` in its weight's dtype and device (non-persistent: they never
    reach a state dict or a saved model)."""
    base = layer.base
    weight = base.weight
    if isinstance(base, torch.nn.Conv2d):
        down_shape = (rank, base.in_channels, *base.kernel_size)
        up_shape = (base.out_channels, rank, 1, 1)
        layer._conv_args = dict(stride=base.stride, padding=base.padding, dilation=base.dilation)
        if base.groups != 1 or base.padding_mode != "zeros":
            raise AdapterError(f"{layer.key}: a grouped or non-zero-padded Conv2d cannot hold slots")
    else:
        down_shape, up_shape = (rank, base.in_features), (base.out_features, rank)
        layer._conv_args = None
    layer.register_buffer(
        "slot_down", torch.zeros(down_shape, dtype=weight.dtype, device=weight.device), False
    )
    layer.register_buffer("slot_up", torch.zeros(up_shape, dtype=weight.dtype, device=weight.device), False)
    layer.slot_rank = rank
    load(layer, plan(layer))


def drop_static(layer: AdaptedModule) -> None:
    layer.unfuse()
    for name in ("slot_down", "slot_up"):
        layer._buffers.pop(name, None)
    layer.slot_rank = 0


Plan = tuple[list[tuple[LoraAdapter, float]], dict[str, float]]


def plan(layer: AdaptedModule) -> Plan:
    """What the active set puts in the slots and what it folds into the weight; AdapterError when the set
    cannot be held (checked for every layer before any is written)."""
    slots: list[tuple[LoraAdapter, float]] = []
    folded: dict[str, float] = {}
    for name, scale in layer.active_work():
        if not isinstance(scale, (int, float)):
            raise AdapterError(
                f"LoRA {name!r} has per-sample or per-region weights, which a compiled denoiser does not take "
                "(render without --compile for this method or batch)"
            )
        adapter = layer.adapters[name]
        if slottable(adapter):
            slots.append((adapter, float(scale) * adapter.scale))
        else:
            folded[name] = float(scale)
    total = sum(a.rank for a, _ in slots)
    if total > layer.slot_rank:
        names = [n for n, _ in layer.active_work() if slottable(layer.adapters[n])]
        raise AdapterError(
            f"{layer.key}: the active LoRAs {', '.join(names)} add up to rank {total}, more than the compiled "
            f"slots' {layer.slot_rank} (raise the compile rank)"
        )
    return slots, folded


@torch.no_grad()
def load(layer: AdaptedModule, planned: Plan) -> None:
    """Write a checked plan into the slots and the weight, in place (the buffers' storage never changes)."""
    slots, folded = planned
    down, up = layer.slot_down, layer.slot_up
    down.zero_()
    up.zero_()
    offset = 0
    for adapter, scale in slots:
        r = adapter.rank
        down[offset : offset + r].copy_(adapter.down.to(down))
        up[:, offset : offset + r].copy_((adapter.up * scale).to(up))
        offset += r
    layer.unfuse()
    if folded:
        layer.fuse(folded)


def compile_denoiser(pipe, backbone, host, rank: int = DEFAULT_SLOT_RANK, mode: str = "default") -> None:
    """Compile the pipeline's denoiser in place (`nn.Module.compile`: the module keeps its identity, so the
    host's wrappers and the pipeline still hold it) after giving its layers slots of `rank`. The first call
    at each size compiles; switching LoRA sets or weights afterwards reuses the graph."""
    host.make_static(backbone.denoiser, rank)
    getattr(pipe, backbone.denoiser).compile(mode=None if mode == "default" else mode)
