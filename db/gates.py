"""Gate sets: the only code that queries `gate_sets`. The caller owns the transaction, as with every repository.

One row per (backbone, model, set key): storing a set's gates again replaces its row. A set whose files change
gets another key, so stale gates are never found for it (`db.models.GateSet`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from db.models import GateSet
from db.repository import _flush


class GateSetRepository:
    """Gate sets by base model and set key."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def find(self, backbone: str, model: str, set_key: str) -> GateSet | None:
        """The set's gates on this base model, or None."""
        return self.session.scalars(
            select(GateSet).where(
                GateSet.backbone == backbone, GateSet.model == model, GateSet.set_key == set_key
            )
        ).one_or_none()

    def put(
        self,
        *,
        backbone: str,
        model: str,
        set_key: str,
        adapters: list[dict[str, Any]],
        gates: bytes,
        record: dict[str, Any],
    ) -> GateSet:
        """Store a set's gates, replacing any the set had on this base model.

        Raises:
            InvalidFieldError: a field that does not validate (named).
            CatalogError: a concurrent writer stored the same set first.
        """
        self.session.execute(
            delete(GateSet).where(
                GateSet.backbone == backbone, GateSet.model == model, GateSet.set_key == set_key
            )
        )
        row = GateSet(
            backbone=backbone, model=model, set_key=set_key, adapters=adapters, gates=gates, record=record
        )
        self.session.add(row)
        _flush(self.session, f"gate set {set_key[:12]}")
        return row

    def list(self, backbone: str | None = None, model: str | None = None) -> Sequence[GateSet]:
        """Every stored set (newest first), optionally of one backbone and model."""
        query = select(GateSet).order_by(GateSet.created_at.desc(), GateSet.id.desc())
        if backbone is not None:
            query = query.where(GateSet.backbone == backbone)
        if model is not None:
            query = query.where(GateSet.model == model)
        return self.session.scalars(query).all()
