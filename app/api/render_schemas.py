"""Schemas of the batch render API. A request's fields are `composer.render.RenderRequest`'s, by the same
names (that dataclass lives beside torch, so it cannot be imported here; tests/test_api_renders.py checks
that the two agree field for field).

`method_params` is typed per method: `batch_schema(methods)` builds, when the app is built, one request variant
per registered composition method (`method: Literal[name]`, `method_params`: a model generated from the
method's parameters dataclass), and the batch of them, so that the OpenAPI spec documents every method's knobs.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Annotated, Any, Literal, Union

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    RootModel,
    SerializeAsAny,
    Tag,
    ValidatorFunctionWrapHandler,
    WrapValidator,
    create_model,
)

from app.catalog import MAX_AUTO_LORAS
from composer.errors import StudioError
from composer.masks import RegionMasks

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

    prompt: str = Field(
        min_length=1,
        max_length=4000,
        pattern=r"\S",
        description="what to draw; <lora:NAME:WEIGHT> tags (A1111) add catalog LoRAs and are taken out of the text",
    )
    negative_prompt: str = Field(default="", max_length=4000)
    num_inference_steps: int | None = Field(default=None, ge=1, le=500, description="denoising steps")
    guidance_scale: float | None = Field(default=None, ge=0, le=100, allow_inf_nan=False)
    height: int | None = Field(default=None, ge=8, le=4096, multiple_of=8, description="pixels")
    width: int | None = Field(default=None, ge=8, le=4096, multiple_of=8, description="pixels")
    seed: int = Field(default=0, ge=0, lt=2**63)
    num_images: int = Field(default=1, ge=1, le=16, description="images of this request (one batch)")
    loras: list[LoraWeightIn] = Field(default_factory=list, max_length=32)
    method: str = Field(
        default="merge", min_length=1, max_length=64, description="composition method (one per variant)"
    )
    method_params: dict[str, Any] = Field(
        default_factory=dict, description="the method's parameters (each variant documents its own)"
    )
    auto_loras: int = Field(
        default=0,
        ge=0,
        le=MAX_AUTO_LORAS,
        description="auto mode: the K LoRAs that hybrid search finds for the prompt join the stack (with their "
        "trigger words), fused by `gated` unless a method is given; the job is stored with the LoRAs picked, and "
        "the response names them with scores",
    )


class AutoPick(BaseModel):
    """A LoRA auto mode picked: its fused score and what full-text and weight search gave it (null: absent)."""

    name: str
    score: float
    text_score: float | None
    weight_score: float | None


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


@dataclasses.dataclass(frozen=True)
class WireType:
    """A knob type that travels as other JSON: its schema type, its value as JSON, and what the JSON holds."""

    annotation: Any
    to_json: Callable[[Any], Any]
    description: str


PLAIN_KNOBS = (bool, int, float, str)  # and Literal[...]: each is its own JSON type
WIRE_TYPES: dict[type, WireType] = {
    RegionMasks: WireType(
        dict[str, str],
        RegionMasks.to_json,
        "{LoRA name: PNG mask as a data URL or base64, white = inside}",
    ),
}
# Knobs a method does not have are let through to the Studio, which refuses them naming the ones it has (400);
# the spec says that none are taken.
PARAMS_CONFIG = ConfigDict(extra="allow", json_schema_extra={"additionalProperties": False})


def knob_field(method: str, field: dataclasses.Field, hint: Any) -> tuple[Any, Any]:
    """One knob of a parameters dataclass as a pydantic (annotation, Field): its default and its help kept.

    Raises:
        StudioError: a knob type with no JSON form (naming the method and the knob).
    """
    default: Any = ...
    if field.default is not dataclasses.MISSING:
        default = field.default
    elif field.default_factory is not dataclasses.MISSING:
        default = field.default_factory()
    help_ = field.metadata.get("help")
    wire = WIRE_TYPES.get(hint)
    if wire is not None:
        description = "; ".join(text for text in (help_, wire.description) if text)
        return wire.annotation, Field(
            default if default is ... else wire.to_json(default), description=description
        )
    if typing.get_origin(hint) is Literal:
        return hint, Field(default, description=help_)
    if hint in PLAIN_KNOBS:
        return hint, Field(default, description=help_, strict=True)  # strict: "4" is not 4, as in the Studio
    raise StudioError(f"{method}.{field.name}: knob type {hint!r} has no JSON form for the REST API")


def params_model(method: str, params: type) -> type[BaseModel]:
    """A pydantic model of a method's parameters dataclass (`composer.methods`), field for field."""
    hints = typing.get_type_hints(params)
    fields = {f.name: knob_field(method, f, hints[f.name]) for f in dataclasses.fields(params)}
    return create_model(  # type: ignore[call-overload]
        params.__name__, __config__=PARAMS_CONFIG, __doc__=params.__doc__, __module__=__name__, **fields
    )


DEFAULT_METHOD = RenderRequestIn.model_fields["method"].default
UNKNOWN_METHOD = ""  # the tag of a request naming no registered method


def request_variant(method: str, params: type) -> type[RenderRequestIn]:
    """RenderRequestIn narrowed to one method: `method` is its name, `method_params` its parameters model."""
    model = params_model(method, params)
    required = method != DEFAULT_METHOD  # only the default method's requests may leave `method` out
    name = params.__name__.removesuffix("Params") + "RequestIn"
    return create_model(  # type: ignore[call-overload]
        name,
        __base__=RenderRequestIn,
        __doc__=f"A request composed by {method}.",
        __module__=__name__,
        method=(Literal[method], Field(... if required else method, description="composition method")),
        method_params=(model, Field(default_factory=model, description=f"{method}'s parameters")),
    )


def request_schema(methods: Mapping[str, type]) -> type[RootModel]:
    """One render request: a union of one variant per method, told apart by `method`.

    The union is validated by picking the variant (not by pydantic's tagged union, which would put the tag in
    every error's location, e.g. `requests.0.merge.height`); a request naming no registered method is read
    as a plain RenderRequestIn, so that the Studio refuses it naming the methods it has (400).
    """
    variants = {method: request_variant(method, params) for method, params in methods.items()}

    def method_tag(value: Any) -> str:
        """The variant of a request (a dict, or a model when serialized): its method, "merge" when absent."""
        if isinstance(value, dict):
            method = value.get("method", DEFAULT_METHOD)
        else:
            method = getattr(value, "method", None)
        return method if isinstance(method, str) and method in variants else UNKNOWN_METHOD

    def dispatch(value: Any, handler: ValidatorFunctionWrapHandler) -> RenderRequestIn:
        return variants.get(method_tag(value), RenderRequestIn).model_validate(value)

    choices = [Annotated[variant, Tag(method)] for method, variant in variants.items()]
    union = Annotated[Union[tuple(choices)], Discriminator(method_tag)]  # noqa: UP007  # built at run time
    return create_model(  # type: ignore[call-overload]
        "RenderRequestIn",
        # serialized as what it is: a variant, or the plain RenderRequestIn of an unknown method
        __base__=RootModel[Annotated[union, WrapValidator(dispatch), SerializeAsAny()]],
        __doc__="One render: RenderRequest's fields; `method` picks the variant and its `method_params`.",
        __module__=__name__,
    )


def batch_schema(methods: Mapping[str, type]) -> type[RenderBatch]:
    """RenderBatch with `requests` typed by `request_schema(methods)`: the POST /renders body of an app whose
    Studio has these composition methods (name -> parameters dataclass)."""
    return create_model(  # type: ignore[call-overload]
        "RenderBatch",
        __base__=RenderBatch,
        __doc__=RenderBatch.__doc__,
        __module__=__name__,
        requests=(list[request_schema(methods)], RenderBatch.model_fields["requests"]),  # its limits kept
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
    auto_loras: list[list[AutoPick]] | None = Field(
        default=None,
        description="per request, the LoRAs auto mode picked (in the response that creates the job)",
    )


class JobPage(BaseModel):
    items: list[JobRead]
    total: int
    limit: int
    offset: int


__all__ = [
    "MAX_BATCH",
    "batch_schema",
    "JobPage",
    "JobRead",
    "LoraWeightIn",
    "RenderBatch",
    "RenderRequestIn",
    "RenderResultRead",
]
