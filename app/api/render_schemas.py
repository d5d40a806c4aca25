"""Schemas of the batch render API. A request's fields are `composer.render.RenderRequest`'s, by the same
names (that dataclass lives beside torch, so it cannot be imported here; tests/test_api_renders.py checks
that the two agree field for field)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_BATCH = 64  # requests in one job
BACKBONES = ("toy", "sdxl", "flux")


class LoraWeightIn(BaseModel):
    """A LoRA of the stack, by catalog name or hash (`NAME.content` / `NAME.style`: a B-LoRA half)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200)
    weight: float = Field(default=1.0, allow_inf_nan=False)


class RenderRequestIn(BaseModel):
    """One render: RenderRequest's fields (diffusers names); absent fields take the backbone's defaults."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, max_length=4000, pattern=r"\S", description="what to draw")
    negative_prompt: str = Field(default="", max_length=4000)
    num_inference_steps: int | None = Field(default=None, ge=1, le=500, description="denoising steps")
    guidance_scale: float | None = Field(default=None, ge=0, le=100, allow_inf_nan=False)
    height: int | None = Field(default=None, ge=8, le=4096, multiple_of=8, description="pixels")
    width: int | None = Field(default=None, ge=8, le=4096, multiple_of=8, description="pixels")
    seed: int = Field(default=0, ge=0, lt=2**63)
    num_images: int = Field(default=1, ge=1, le=16, description="images of this request (one batch)")
    loras: list[LoraWeightIn] = Field(default_factory=list, max_length=32)
    method: str = Field(
        default="merge", min_length=1, max_length=64, description="composition method: merge or regional"
    )
    method_params: dict[str, Any] = Field(
        default_factory=dict,
        description="the method's parameters; regional: {'regions': {LoRA name: PNG mask as a data URL or "
        "base64, white = inside}, 'feather': pixels}. A LoRA without a mask acts everywhere.",
    )


class RenderBatch(BaseModel):
    """A batch of renders, run as one job in order; backbone and model apply to all of them."""

    model_config = ConfigDict(extra="forbid")

    requests: list[RenderRequestIn] = Field(min_length=1, max_length=MAX_BATCH)
    backbone: Literal[BACKBONES] | None = Field(  # type: ignore[valid-type]
        default=None, description="default: the server's"
    )
    model: str | None = Field(
        default=None, max_length=500, description="the server's model (default) or 'tiny'"
    )


class RenderResultRead(BaseModel):
    """One finished request: its images (URLs) and full provenance."""

    index: int = Field(description="the request's position in the batch")
    render_id: int
    images: list[str] = Field(description="URLs of the PNGs, which carry the provenance too")
    provenance: dict[str, Any]


class JobRead(BaseModel):
    """A render job: where it stands, and what it made so far."""

    id: int
    status: Literal["queued", "running", "done", "failed", "cancelled"]
    progress: float = Field(description="0..1, denoising steps included")
    completed: int = Field(description="images made")
    total: int = Field(description="images the job makes")
    queue_position: int | None = Field(description="1: next to run; null once it left the queue")
    cancel_requested: bool
    attempts: int = Field(description="runs lost with their worker")
    max_attempts: int
    error: str | None
    backbone: str
    model: str | None
    requests: int = Field(description="requests in the batch")
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    results: list[RenderResultRead]


class JobPage(BaseModel):
    items: list[JobRead]
    total: int
    limit: int
    offset: int


__all__ = [
    "MAX_BATCH",
    "JobPage",
    "JobRead",
    "LoraWeightIn",
    "RenderBatch",
    "RenderRequestIn",
    "RenderResultRead",
]
