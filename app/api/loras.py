"""`/loras`: list, read, upload, edit and delete catalogued LoRAs."""

from __future__ import annotations

import re
import tempfile
from pathlib import Path, PurePosixPath
from typing import Annotated, BinaryIO, Literal
from urllib.parse import quote

from fastapi import APIRouter, Depends, Query, Request, Response
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from app.api.errors import ApiError
from app.api.guard import MIB
from app.api.schemas import MAX_OFFSET, ErrorResponse, LoraPage, LoraRead, LoraUpdate, to_read
from app.api.service import StudioDep
from app.catalog import AdapterInfo
from app.facade import StudioFacade
from composer.errors import StudioError
from db.errors import CatalogError, InvalidFieldError
from db.models import ADAPTER_TYPES, FAMILIES, validate_name

_SUFFIX = re.compile(r"\.[a-z0-9]{1,16}")

router = APIRouter(
    prefix="/loras",
    tags=["loras"],
    responses={401: {"model": ErrorResponse}, 422: {"model": ErrorResponse}, 429: {"model": ErrorResponse}},
)
NOT_FOUND = {400: {"model": ErrorResponse}, 404: {"model": ErrorResponse}}


def checked_ref(name: str) -> str:
    """A name or hash from the path; anything that could be a path (`../x`, `a/b`, `..`) is refused."""
    try:
        validate_name(name.removeprefix("sha256:"), "LoRA name")
    except InvalidFieldError as exc:
        raise ApiError(400, "invalid_name", str(exc)) from None
    return name


Ref = Annotated[str, Depends(checked_ref)]


@router.get("", response_model=LoraPage)
def list_loras(
    studio: StudioDep,
    q: Annotated[
        str | None, Query(max_length=500, description="words in name, triggers, tags, notes")
    ] = None,
    family: Annotated[Literal[FAMILIES] | None, Query()] = None,  # type: ignore[valid-type]
    adapter_type: Annotated[
        Literal[ADAPTER_TYPES] | None,  # type: ignore[valid-type]
        Query(alias="type", description="adapter type"),
    ] = None,
    tag: Annotated[str | None, Query(max_length=200, description="an exact tag")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
) -> LoraPage:
    """List catalogued LoRAs sorted by name, searched and filtered."""
    items = studio.library.list(q, family, tag, limit, adapter_type=adapter_type, offset=offset)
    total = studio.library.count(q, family, tag, adapter_type=adapter_type)
    return LoraPage(items=[to_read(i) for i in items], total=total, limit=limit, offset=offset)


UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {"type": "string", "format": "binary", "description": "a .safetensors LoRA"},
                        "name": {
                            "type": "string",
                            "description": "catalog name, used as given (409 if taken); default: the file "
                            "name, with a numeric suffix if taken",
                        },
                        "tags": {"type": "string", "description": "comma-separated tags"},
                        "description": {"type": "string"},
                    },
                }
            }
        },
    }
}


@router.post(
    "",
    status_code=201,
    response_model=LoraRead,
    openapi_extra=UPLOAD_BODY,
    responses={
        400: {"model": ErrorResponse, "description": "a malformed multipart body"},
        409: {"model": ErrorResponse},
        411: {"model": ErrorResponse},
        413: {"model": ErrorResponse},
        415: {"model": ErrorResponse},
    },
)
async def upload_lora(request: Request, response: Response, studio: StudioDep) -> LoraRead:
    """Upload a LoRA (multipart field `file`); it is validated, hashed and catalogued, or nothing is kept."""
    length = request.headers.get("content-length")  # its bound was checked before the body (app.api.guard)
    if length is None or not length.isdigit():
        raise ApiError(411, "length_required", "uploads need a Content-Length header")
    async with request.form(max_files=1, max_fields=8) as form:
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise ApiError(422, "validation_error", "send the LoRA file as the multipart form field 'file'")
        texts = {k: v for k, v in form.multi_items() if isinstance(v, str)}
        tags = [t.strip() for v in form.getlist("tags") if isinstance(v, str) for t in v.split(",")]
        info = await run_in_threadpool(
            _store,
            studio,
            upload.file,
            upload.filename or "upload.safetensors",
            name=texts.get("name") or None,
            tags=[t for t in tags if t],
            description=texts.get("description", ""),
        )
    response.headers["Location"] = f"{request.url.path}/{quote(info.name)}"
    return to_read(info)


def _too_large(size: int, studio: StudioFacade) -> ApiError:
    return ApiError(
        413,
        "payload_too_large",
        f"upload of {size / MIB:.1f} MiB is over the {studio.settings.max_upload_mb} MiB limit "
        "(max_upload_mb)",
    )


def _store(
    studio: StudioFacade,
    source: BinaryIO,
    filename: str,
    *,
    name: str | None,
    tags: list[str],
    description: str,
) -> AdapterInfo:
    """Copy the upload into a private folder under the data dir and import it from there; the folder is
    removed whatever happens, and the import itself writes nothing on error."""
    client_name = PurePosixPath(filename.replace("\\", "/")).name or "upload.safetensors"
    suffix = PurePosixPath(client_name).suffix.lower()
    local = f"lora-upload{suffix if _SUFFIX.fullmatch(suffix) else ''}"
    limit = studio.settings.max_upload_mb * MIB
    with tempfile.TemporaryDirectory(dir=studio.settings.root, prefix=".upload-") as folder:
        path = Path(folder) / local
        with path.open("wb") as out:
            size = 0
            while chunk := source.read(MIB):
                size += len(chunk)
                if size > limit:
                    raise _too_large(size, studio)
                out.write(chunk)
        try:
            return studio.library.import_file(
                path,
                name=name or PurePosixPath(client_name).stem,
                tags=tags,
                exact_name=name is not None,
                description=description,
            )
        except (StudioError, CatalogError) as exc:  # name the client's file, not our temporary copy
            exc.args = tuple(
                a.replace(str(path), client_name).replace(path.name, client_name) if isinstance(a, str) else a
                for a in exc.args
            )
            raise


@router.get("/{name:path}", response_model=LoraRead, responses=NOT_FOUND)
def get_lora(name: Ref, studio: StudioDep) -> LoraRead:
    """One LoRA by name or hash (SHA-256, AutoV2, tensor hash, or a prefix of 8+ hex)."""
    return to_read(studio.library.get(name))


@router.patch("/{name:path}", response_model=LoraRead, responses={**NOT_FOUND, 409: {"model": ErrorResponse}})
def update_lora(name: Ref, changes: LoraUpdate, studio: StudioDep) -> LoraRead:  # type: ignore[valid-type]
    """Edit trigger words, tags, description, or rename; the file is not touched."""
    return to_read(studio.library.update(name, **changes.model_dump(exclude_unset=True)))


@router.delete("/{name:path}", status_code=204, response_class=Response, responses=NOT_FOUND)
def delete_lora(name: Ref, studio: StudioDep) -> Response:
    """Remove a LoRA from the catalog and its stored file."""
    studio.library.delete(name)
    return Response(status_code=204)


__all__ = ["router"]
