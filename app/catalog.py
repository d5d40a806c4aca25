"""Catalog entries and render jobs as the CLI, API and UI see them: plain dataclasses, torch-free, so that the
web layer can build its schemas from them without importing the library's tensor code."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from db.models import Adapter, Render, RenderJob

EDITABLE_FIELDS = ("name", "trigger_words", "tags", "description")  # what users may change after import


AUTO_METHOD = "gated"  # how auto mode composes the LoRAs it picks unless a method is given
MAX_AUTO_LORAS = 8  # LoRAs auto mode picks at most


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
    frequency_profiles: dict[str, dict] = field(default_factory=dict)  # base model -> profile (cmlora)
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
            frequency_profiles=dict(a.frequency_profiles or {}),
            created_at=a.created_at,
            updated_at=a.updated_at,
        )


@dataclass(frozen=True)
class ImportOutcome:
    """What happened to one file: "imported", "duplicate" (already catalogued, nothing written) or "failed"."""

    path: Path
    status: str
    name: str | None = None
    message: str = ""


@dataclass(frozen=True)
class JobInfo:
    """A render job as the API and the admin page see it: the `RenderJob` row's fields under their own names
    (a plain copy, safe outside a session), plus its place in the queue."""

    id: int
    status: str
    progress: float
    completed: int
    total: int
    cancel_requested: bool
    attempts: int
    max_attempts: int
    error: str | None
    backbone: str
    model: str | None
    requests: list[dict]
    results: list[dict]
    api_key_id: int | None
    worker: str | None
    created_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    queue_position: int | None = None  # 1 for the next job to run; None once the job left the queue

    @classmethod
    def of(cls, job: RenderJob, queue_position: int | None = None) -> JobInfo:
        return cls(
            id=job.id,
            status=job.status,
            progress=job.progress or 0.0,
            completed=job.completed,
            total=job.total,
            cancel_requested=bool(job.cancel_requested),
            attempts=job.attempts,
            max_attempts=job.max_attempts,
            error=job.error,
            backbone=job.backbone,
            model=job.model,
            requests=[dict(r) for r in job.requests],
            results=[dict(r) for r in job.results],
            api_key_id=job.api_key_id,
            worker=job.worker,
            created_at=job.created_at,
            started_at=job.started_at,
            finished_at=job.finished_at,
            queue_position=queue_position,
        )


@dataclass(frozen=True)
class JobPage:
    """One page of render jobs and how many there are in all."""

    items: list[JobInfo]
    total: int


@dataclass(frozen=True)
class RenderInfo:
    """A past render as the studio's history shows it: what was asked, with what, and its PNG (None when the
    file was written outside the data dir's renders folder or is gone)."""

    id: int
    created_at: datetime | None
    prompt: str
    negative_prompt: str
    backbone: str
    model: str
    method: str
    params: dict
    seed: int
    loras: list[dict]
    image: Path | None

    @classmethod
    def of(cls, r: Render, renders_dir: Path) -> RenderInfo:
        image = None
        if r.output_path:
            path = Path(r.output_path).resolve()
            if path.is_relative_to(renders_dir.resolve()) and path.is_file():
                image = path
        return cls(
            id=r.id,
            created_at=r.created_at,
            prompt=r.prompt,
            negative_prompt=r.negative_prompt,
            backbone=r.backbone,
            model=r.model,
            method=r.method,
            params=dict(r.params or {}),
            seed=r.seed,
            loras=[dict(x) for x in r.loras or []],
            image=image,
        )


@dataclass(frozen=True)
class RenderPage:
    """One page of past renders (newest first) and how many there are in all."""

    items: list[RenderInfo]
    total: int
