"""The adapter types: a list, one line each. Every table by kind (training, file keys, the catalog's list)
is derived from it at call time, so a type registered later (`registered`) is seen everywhere."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from composer.adapters.base import AdapterType
from composer.adapters.blora import BloraAdapter
from composer.adapters.dora import DoraAdapter
from composer.adapters.kron import KronAdapter
from composer.adapters.lora import LoraAdapter
from composer.adapters.lycoris import LohaAdapter, LokrAdapter
from composer.adapters.tensor import TensorAdapter
from composer.errors import AdapterError
from composer.formats.model import ModuleDelta

ADAPTER_TYPES: list[type[AdapterType]] = [
    LoraAdapter,
    BloraAdapter,
    KronAdapter,
    LokrAdapter,
    LohaAdapter,
    DoraAdapter,
    TensorAdapter,
]


def kinds() -> tuple[str, ...]:
    """Every registered kind, in registry order (the catalog's adapter types)."""
    return tuple(t.kind for t in ADAPTER_TYPES)


def trainable_kinds() -> tuple[str, ...]:
    return tuple(t.kind for t in ADAPTER_TYPES if t.recipe is not None)


def adapter_type(kind: str) -> type[AdapterType]:
    """The type registered under `kind` (AdapterError naming the known kinds otherwise)."""
    for t in ADAPTER_TYPES:
        if t.kind == kind:
            return t
    raise AdapterError(f"adapter kind {kind!r} is not registered (known: {', '.join(kinds())})")


@contextmanager
def registered(cls: type[AdapterType]) -> Iterator[type[AdapterType]]:
    """Register `cls` for the duration of the block (a plugin, or a test's own type), then remove it."""
    if any(t.kind == cls.kind for t in ADAPTER_TYPES):
        raise AdapterError(f"adapter kind {cls.kind!r} is registered already")
    ADAPTER_TYPES.append(cls)
    try:
        yield cls
    finally:
        ADAPTER_TYPES.remove(cls)


def build_adapter(base: nn.Module, delta: ModuleDelta) -> AdapterType:
    """The adapter a file's ModuleDelta describes on `base`."""
    readable = {t.kind: t for t in ADAPTER_TYPES if t.file_kind == t.kind}  # B-LoRA files hold "lora"
    if delta.kind not in readable:
        raise AdapterError(
            f"{delta.key}: adapter kind {delta.kind!r} cannot be applied yet (known: {', '.join(readable)})"
        )
    return readable[delta.kind].from_delta(base, delta)
