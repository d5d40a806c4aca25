"""Catalog entries as the CLI, API and UI see them: plain dataclasses, torch-free, so that the web layer
can build its schemas from them without importing the library's tensor code."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from db.models import Adapter

EDITABLE_FIELDS = ("name", "trigger_words", "tags", "description")  # what users may change after import


@dataclass(frozen=True)
class AdapterInfo:
    """A catalog entry as the CLI, API and UI see it (a plain copy, safe outside a session)."""

    name: str
    family: str
    adapter_type: str
    source_format: str
    rank: int | None
    alpha: float | None
    sha256: str
    autov2: str
    tensor_sha256: str
    file_path: str
    file_size: int
    trigger_words: list[str] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)
    description: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    training_config: dict | None = None
    preview_path: str | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None

    @classmethod
    def of(cls, a: Adapter) -> AdapterInfo:
        return cls(
            name=a.name,
            family=a.family,
            adapter_type=a.adapter_type,
            source_format=a.source_format,
            rank=a.rank,
            alpha=a.alpha,
            sha256=a.sha256,
            autov2=a.autov2,
            tensor_sha256=a.tensor_sha256,
            file_path=a.file_path,
            file_size=a.file_size,
            trigger_words=list(a.trigger_words or []),
            tags=list(a.tags or []),
            description=a.description or "",
            metadata=dict(a.metadata_json or {}),
            training_config=dict(a.training_config) if a.training_config else None,
            preview_path=a.preview_path,
            created_at=a.created_at,
            updated_at=a.updated_at,
        )
