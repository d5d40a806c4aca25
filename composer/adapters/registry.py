"""Adapter types by kind: one line each. A kind turns a file's ModuleDelta into a module for one layer."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from composer.adapters.kron import KronAdapter
from composer.adapters.lora import LoraAdapter
from composer.adapters.lycoris import LohaAdapter, LokrAdapter
from composer.adapters.tensor import TensorAdapter
from composer.errors import AdapterError
from composer.formats.model import ModuleDelta


def _lora(base: nn.Module, delta: ModuleDelta) -> nn.Module:
    return LoraAdapter(base, delta.tensors["down"], delta.tensors["up"], delta.alpha)


ADAPTER_TYPES: dict[str, Callable[[nn.Module, ModuleDelta], nn.Module]] = {
    "lora": _lora,
    "kron": KronAdapter.from_delta,
    "lokr": LokrAdapter.from_delta,
    "loha": LohaAdapter.from_delta,
    "tensor": TensorAdapter.from_delta,
}


def build_adapter(base: nn.Module, delta: ModuleDelta) -> nn.Module:
    try:
        make = ADAPTER_TYPES[delta.kind]
    except KeyError:
        raise AdapterError(
            f"{delta.key}: adapter kind {delta.kind!r} cannot be applied yet (known: {', '.join(ADAPTER_TYPES)})"
        ) from None
    return make(base, delta)
