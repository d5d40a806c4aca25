"""`/renders`: batch render jobs. A batch is checked in full, queued as one job and run by the executor;
clients poll the job and fetch its PNGs. Jobs belong to the API key that made them."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Header, Path, Query, Request, Response
from fastapi.responses import FileResponse

from app.api.auth import PrincipalDep
from app.api.errors import ApiError
from app.api.render_schemas import AutoPick, JobPage, JobRead, RenderBatch, RenderResultRead
from app.api.schemas import MAX_OFFSET, ErrorResponse
from app.api.service import StudioDep
from app.catalog import AUTO_METHOD, JobInfo
from db.errors import IdempotencyConflictError, JobFinishedError, JobNotFoundError, QueueFullError
from db.models import JOB_STATUSES

router = APIRouter(
    prefix="/renders",
    tags=["renders"],
    responses={401: {"model": ErrorResponse}, 404: {"model": ErrorResponse}, 429: {"model": ErrorResponse}},
)


MAX_JOB_ID = 2**31 - 1  # job ids are 32-bit integers in the catalog (PostgreSQL's integer)
JobId = Annotated[int, Path(ge=1, le=MAX_JOB_ID, description="the job's id")]


def require_executor(request: Request) -> None:
    """503 unless this app runs a render executor (jobs submitted here would never run)."""
    if request.app.state.executor is None:
        raise ApiError(503, "no_executor", "this server runs no render executor (see `lora-studio serve`)")


ExecutorRequired = Depends(require_executor)


@contextmanager
def job_errors() -> Iterator[None]:
    """The job errors as HTTP answers (the catalog's own errors keep their handlers)."""
    try:
        yield
    except JobNotFoundError as exc:
        raise ApiError(404, "not_found", str(exc)) from None
    except JobFinishedError as exc:
        raise ApiError(409, "job_finished", str(exc)) from None
    except IdempotencyConflictError as exc:
        raise ApiError(422, "idempotency_conflict", str(exc)) from None
    except QueueFullError as exc:
        raise ApiError(
            429, "queue_full", str(exc), {"Retry-After": str(exc.retry_after)}, retry_after=exc.retry_after
        ) from None


def job_url(request: Request, job_id: int) -> str:
    return str(request.url_for("get_render", job_id=job_id).path)


def to_read(request: Request, job: JobInfo) -> JobRead:
    base = job_url(request, job.id)
    results, n = [], 0
    for result in sorted(job.results, key=lambda r: r["index"]):
        urls = [f"{base}/images/{n + k}" for k in range(len(result["images"]))]
        n += len(urls)
        results.append(
            RenderResultRead(
                index=result["index"],
                render_id=result["render_id"],
                images=urls,
                provenance=result["provenance"],
            )
        )
    return JobRead(
        id=job.id,
        status=job.status,  # type: ignore[arg-type]
        progress=job.progress,
        completed=job.completed,
        total=job.total,
        queue_position=job.queue_position,
        cancel_requested=job.cancel_requested,
        attempts=job.attempts,
        max_attempts=job.max_attempts,
        error=job.error,
        backbone=job.backbone,
        model=job.model,
        requests=len(job.requests),
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        results=results,
    )


def read_job(request: Request, studio: StudioDep, job_id: int, key_id: int) -> JobRead:
    with job_errors():
        return to_read(request, studio.get_job(job_id, key_id))


CREATE_RESPONSES: dict[int | str, dict] = {
    400: {
        "model": ErrorResponse,
        "description": "a batch the server cannot run (e.g. a model not served)",
    },
    409: {"model": ErrorResponse},
    422: {"model": ErrorResponse},
    503: {"model": ErrorResponse},
}


def create_render(
    batch: RenderBatch,
    request: Request,
    response: Response,
    studio: StudioDep,
    principal: PrincipalDep,
    idempotency_key: Annotated[
        str | None,
        Header(min_length=1, max_length=255, description="a repeat with the same key and body: the same job"),
    ] = None,
) -> JobRead:
    """Queue a batch of renders as one job; every request is checked (LoRA names too) before it is stored."""
    body = batch.model_dump(mode="json")
    for given, item in zip(batch.requests, body["requests"], strict=True):
        if item.get("auto_loras") and "method" not in given.model_fields_set:
            item["method"] = AUTO_METHOD  # auto mode fuses its picks with learned gates unless told
    with job_errors():
        picks = studio.expand_auto(body["requests"], body["backbone"], body["model"])
        job, created = studio.submit_job(
            body["requests"],
            backbone=body["backbone"],
            model=body["model"],
            api_key_id=principal.key_id,
            idempotency_key=idempotency_key,
        )
    response.headers["Location"] = job_url(request, job.id)
    if not created:
        response.headers["Idempotent-Replayed"] = "true"
    read = read_job(request, studio, job.id, principal.key_id)
    if any(picks):
        read.auto_loras = [[AutoPick(**p) for p in chosen] for chosen in picks]
    return read


@router.get("", response_model=JobPage)
def list_renders(
    request: Request,
    studio: StudioDep,
    principal: PrincipalDep,
    status: Annotated[Literal[JOB_STATUSES] | None, Query()] = None,  # type: ignore[valid-type]
    limit: Annotated[int, Query(ge=1, le=200)] = 20,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
) -> JobPage:
    """The caller's render jobs, newest first."""
    page = studio.list_jobs(status, principal.key_id, limit, offset)
    return JobPage(
        items=[to_read(request, job) for job in page.items], total=page.total, limit=limit, offset=offset
    )


@router.get("/{job_id}", response_model=JobRead, name="get_render")
def get_render(job_id: JobId, request: Request, studio: StudioDep, principal: PrincipalDep) -> JobRead:
    """A render job: status, progress, queue position, error, and the results so far."""
    return read_job(request, studio, job_id, principal.key_id)


@router.get(
    "/{job_id}/images/{n}",
    response_class=FileResponse,
    responses={200: {"content": {"image/png": {}}, "description": "the PNG, provenance in its text chunks"}},
)
def get_render_image(
    job_id: JobId, n: Annotated[int, Path(ge=0)], studio: StudioDep, principal: PrincipalDep
) -> FileResponse:
    """Image `n` of a job (numbered across the batch, in request order)."""
    with job_errors():
        path = studio.job_image(job_id, n, principal.key_id)
    return FileResponse(path, media_type="image/png", filename=f"job-{job_id}-{n}.png")


@router.delete(
    "/{job_id}",
    response_model=JobRead,
    responses={
        202: {"model": JobRead, "description": "running: its worker was asked to stop"},
        409: {"model": ErrorResponse},
    },
    dependencies=[ExecutorRequired],
)
def cancel_render(
    job_id: JobId, request: Request, response: Response, studio: StudioDep, principal: PrincipalDep
) -> JobRead:
    """Cancel a job: a queued one at once (200), a running one between denoising steps (202); 409 if it
    already finished."""
    with job_errors():
        job = studio.cancel_job(job_id, principal.key_id)
    if job.status == "running":
        response.status_code = 202
    return read_job(request, studio, job_id, principal.key_id)


def router_for(batch: type[RenderBatch]) -> APIRouter:
    """The /renders routes, POST taking `batch`: `render_schemas.batch_schema` of the Studio's composition
    methods, built with the app (so that the spec documents each method's parameters)."""
    signature = inspect.signature(create_render, eval_str=True)

    @functools.wraps(create_render)
    def typed(*args, **kwargs):
        return create_render(*args, **kwargs)

    typed.__signature__ = signature.replace(  # type: ignore[attr-defined]  # FastAPI reads the body type here
        parameters=[
            p.replace(annotation=batch) if p.name == "batch" else p for p in signature.parameters.values()
        ]
    )
    routes = APIRouter()
    routes.add_api_route(
        router.prefix,
        typed,
        methods=["POST"],
        status_code=202,
        response_model=JobRead,
        tags=router.tags,
        responses={**router.responses, **CREATE_RESPONSES},
        dependencies=[ExecutorRequired],
    )
    routes.include_router(router)
    return routes


__all__ = ["router_for"]
