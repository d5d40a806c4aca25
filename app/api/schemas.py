"""Request and response schemas, generated from the dataclasses the library uses (`app.catalog`), so that a
field added there appears here; server-side paths are left out of what clients see."""

from __future__ import annotations

import dataclasses
from typing import Any, get_type_hints

from pydantic import BaseModel, ConfigDict, Field, create_model

from app.catalog import EDITABLE_FIELDS, AdapterInfo

SERVER_ONLY = ("file_path", "preview_path")  # paths on the server's disk: never sent to clients
# The largest offset of a listing: larger ones overflowed the database's integers (a 500, not an empty page).
MAX_OFFSET = 2**31 - 1


def model_from_dataclass(
    cls: type,
    name: str,
    *,
    exclude: tuple[str, ...] = (),
    include: tuple[str, ...] | None = None,
    partial: bool = False,
    doc: str | None = None,
) -> type[BaseModel]:
    """A pydantic model with the dataclass's fields, types and defaults.

    Args:
        exclude, include: fields to leave out, or the only ones to keep.
        partial: every field optional with no default (for PATCH: an absent field is left unchanged, an
            explicit null is refused by the field's type); unknown fields are refused.
    """
    hints = get_type_hints(cls)
    fields: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name in exclude or (include is not None and f.name not in include):
            continue
        if partial:
            fields[f.name] = (hints[f.name], None)
        elif f.default is not dataclasses.MISSING:
            fields[f.name] = (hints[f.name], f.default)
        elif f.default_factory is not dataclasses.MISSING:
            fields[f.name] = (hints[f.name], Field(default_factory=f.default_factory))
        else:
            fields[f.name] = (hints[f.name], ...)
    config = ConfigDict(extra="forbid") if partial else ConfigDict(from_attributes=True)
    return create_model(name, __config__=config, __doc__=doc or cls.__doc__, **fields)


LoraRead = model_from_dataclass(
    AdapterInfo, "LoraRead", exclude=SERVER_ONLY, doc="A catalogued LoRA: identity, hashes and metadata."
)
LoraUpdate = model_from_dataclass(
    AdapterInfo,
    "LoraUpdate",
    include=EDITABLE_FIELDS,
    partial=True,
    doc="Metadata to change; absent fields stay as they are, `name` renames the entry.",
)


def to_read(info: AdapterInfo) -> BaseModel:
    return LoraRead.model_validate(info)


class LoraPage(BaseModel):
    """One page of a listing; `total` counts every match."""

    items: list[LoraRead]  # type: ignore[valid-type]
    total: int
    limit: int
    offset: int


class SearchHit(BaseModel):
    lora: LoraRead  # type: ignore[valid-type]
    score: float | None = Field(
        default=None, description="how well the hit matches (the mode's score; higher is better)"
    )
    text_score: float | None = Field(default=None, description="full-text score (null: not found by text)")
    weight_score: float | None = Field(
        default=None, description="cosine of the query and the LoRA's weight embedding (null: not found so)"
    )


class SearchResults(BaseModel):
    query: str
    mode: str = "text"
    results: list[SearchHit]


class ErrorInfo(BaseModel):
    model_config = ConfigDict(extra="allow")  # suggestions, existing_name, details, ... by error type

    type: str = Field(description="stable machine-readable kind, e.g. not_found, name_taken, rate_limited")
    message: str = Field(description="what went wrong, naming the offending value")


class ErrorResponse(BaseModel):
    error: ErrorInfo
