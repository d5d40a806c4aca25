"""The catalog side of gated fusion: a LoRA set's trained gates stored per base model and found again by the
set (`db.gates`), and the checks a gate-training request passes before any model is loaded.

A set is identified by its catalog names and file SHA-256s, in any order (`composer.gates.gate_set_key`): a
LoRA whose file changed makes another set, whose gates must be trained again.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from app.catalog import AdapterInfo
from composer.errors import StudioError
from composer.gates import StoredGates, gate_set_key, gates_from_bytes, gates_to_bytes
from db.gates import GateSetRepository
from db.models import GateSet
from db.session import unit_of_work

log = logging.getLogger(__name__)

_CACHE_SIZE = 4  # gate sets kept decoded in memory (a render asks for its set's gates every time)

# (catalog name or NAME.half) -> (its entry, the B-LoRA half or None), as `Studio.resolve_lora` answers
Resolver = Callable[[str], tuple[AdapterInfo, str | None]]


@dataclass(frozen=True)
class GateSetInfo:
    """A stored gate set as the front ends see it (no tensors)."""

    backbone: str
    model: str
    set_key: str
    adapters: list[dict[str, Any]]  # [{name, sha256}]
    record: dict[str, Any]
    created_at: datetime

    @classmethod
    def of(cls, row: GateSet) -> GateSetInfo:
        return cls(row.backbone, row.model, row.set_key, list(row.adapters), dict(row.record), row.created_at)


def resolve_gate_set(names: Sequence[str], resolve: Resolver) -> dict[str, tuple[AdapterInfo, str | None]]:
    """A gate set's LoRAs by name, checked: two or more, each once, each in the catalog.

    Raises:
        StudioError: fewer than two LoRAs, or one named twice.
        AdapterNotFoundError: a name the catalog does not have (close names suggested).
    """
    names = [n.strip() for n in names if n.strip()]
    if len(names) < 2:
        shown = ", ".join(repr(n) for n in names) or "none"
        raise StudioError(f"gated fusion joins two or more LoRAs; got {shown} (name the set: --loras a,b)")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise StudioError(f"the gate set names {', '.join(repr(n) for n in twice)} more than once")
    return {name: resolve(name) for name in names}


def default_caption(entries: dict[str, tuple[AdapterInfo, str | None]]) -> str:
    """The caption of an image with no IMG.txt beside it: every LoRA's trigger words (else its name)."""
    return ", ".join(
        ", ".join(info.trigger_words) if info.trigger_words else name for name, (info, _) in entries.items()
    )


class GateStore:
    """Trained gates in the catalog, per LoRA set and base model (`backbone`, `model` as renders name them)."""

    def __init__(self, sessions: sessionmaker[Session]):
        self.sessions = sessions
        self._cache: OrderedDict[tuple, StoredGates] = OrderedDict()  # (row id, created) -> decoded gates
        self._lock = threading.Lock()

    @staticmethod
    def key(entries: Sequence[tuple[str, str]]) -> str:
        """The set key of (catalog name, file key) pairs in any order; a file key is the entry's SHA-256
        (#half for one half of a B-LoRA: the name it is resident under)."""
        return gate_set_key(entries)

    def find(self, backbone: str, model: str, entries: Sequence[tuple[str, str]]) -> StoredGates | None:
        """The set's trained gates on this base model, or None when it has none (or its files changed)."""
        set_key = self.key(entries)
        with self.sessions() as session:
            row = GateSetRepository(session).find(backbone, model, set_key)
            if row is None:
                return None
            ident = (row.id, row.created_at)
            with self._lock:
                if ident in self._cache:
                    self._cache.move_to_end(ident)
                    return self._cache[ident]
            gates = StoredGates(gates_from_bytes(row.gates), {**row.record, "set_key": set_key})
        with self._lock:
            self._cache[ident] = gates
            while len(self._cache) > _CACHE_SIZE:
                self._cache.popitem(last=False)
        return gates

    def store(
        self, backbone: str, model: str, entries: Sequence[tuple[str, str]], gates: StoredGates
    ) -> GateSetInfo:
        """Keep a set's trained gates (replacing those it had on this base model)."""
        set_key = self.key(entries)
        with unit_of_work(self.sessions) as session:
            row = GateSetRepository(session).put(
                backbone=backbone,
                model=model,
                set_key=set_key,
                adapters=[{"name": name, "sha256": sha} for name, sha in entries],
                gates=gates_to_bytes(gates.tensors),
                record=dict(gates.record),
            )
            info = GateSetInfo.of(row)
        log.info("stored gates for %s on %s %s", ", ".join(n for n, _ in entries), backbone, model)
        return info

    def list(self, backbone: str | None = None, model: str | None = None) -> list[GateSetInfo]:
        """Every stored gate set, newest first."""
        with self.sessions() as session:
            return [GateSetInfo.of(r) for r in GateSetRepository(session).list(backbone, model)]
