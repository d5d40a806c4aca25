"""The catalog pages: the table with search, one adapter's metadata form, preview regeneration, and delete
behind a confirmation step (the name typed again)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated
from urllib.parse import quote

from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse

from app.admin.core import AdminDep, FormDep, StudioDep, checked_name, page, redirect
from app.admin.session import AdminError
from app.api.errors import status_of
from app.catalog import EDITABLE_FIELDS
from composer.errors import StudioError
from db.errors import CatalogError

router = APIRouter()
PAGE = 100


def split_list(text: object) -> list[str]:
    """Comma-separated words from a form field, trimmed, empties dropped."""
    return [w.strip() for w in str(text or "").split(",") if w.strip()]


@router.get("/")
def catalog(
    request: Request,
    admin: AdminDep,
    studio: StudioDep,
    q: Annotated[str, Query(max_length=500)] = "",
    offset: Annotated[int, Query(ge=0)] = 0,
):
    """Every adapter, searched by name, trigger word, tag or description."""
    library = studio.library
    rows = library.list(q or None, limit=PAGE, offset=offset)
    total = library.count(q or None)
    return page(
        request, "catalog.html", admin=admin, rows=rows, q=q, offset=offset, total=total, page_size=PAGE
    )


@router.get("/loras/{name}")
def lora(request: Request, admin: AdminDep, studio: StudioDep, name: str, saved: str = ""):
    """One adapter: metadata form, preview, hashes."""
    info = studio.library.get(checked_name(name))
    return page(request, "lora.html", admin=admin, info=info, saved=saved, error=None, fields=EDITABLE_FIELDS)


@router.post("/loras/{name}")
def edit(request: Request, admin: AdminDep, studio: StudioDep, form: FormDep, name: str):
    """Save name, trigger words, tags and description (the file is not touched)."""
    library = studio.library
    info = library.get(checked_name(name))
    changes = {
        "name": str(form.get("name", info.name)).strip(),
        "trigger_words": split_list(form.get("trigger_words")),
        "tags": split_list(form.get("tags")),
        "description": str(form.get("description", "")),
    }
    try:
        info = library.update(info.name, **changes)
    except (StudioError, CatalogError) as exc:  # the form again, with what the user typed kept
        status, _ = status_of(exc)
        return page(
            request,
            "lora.html",
            status,
            admin=admin,
            info=info,
            saved="",
            error=str(exc),
            fields=EDITABLE_FIELDS,
        )
    return redirect(request, f"/loras/{quote(info.name)}?saved=1")


@router.get("/loras/{name}/preview.png")
def preview(admin: AdminDep, studio: StudioDep, name: str):
    """The adapter's preview image."""
    info = studio.library.get(checked_name(name))
    if not info.preview_path or not Path(info.preview_path).is_file():
        raise AdminError(404, f"{info.name!r} has no preview yet")
    return FileResponse(info.preview_path)


@router.post("/loras/{name}/preview")
def regenerate_preview(request: Request, admin: AdminDep, studio: StudioDep, form: FormDep, name: str):
    """Render the adapter's trigger words (or its name) with it at weight 1 and keep the image as its preview."""
    info = studio.regenerate_preview(checked_name(name))
    return redirect(request, f"/loras/{quote(info.name)}?saved=preview")


@router.get("/loras/{name}/delete")
def confirm_delete(request: Request, admin: AdminDep, studio: StudioDep, name: str):
    """The confirmation step: the name must be typed again."""
    info = studio.library.get(checked_name(name))
    return page(request, "delete.html", admin=admin, info=info, error=None)


@router.post("/loras/{name}/delete")
def delete(request: Request, admin: AdminDep, studio: StudioDep, form: FormDep, name: str):
    """Delete the entry and its stored file, if the confirmation names it."""
    info = studio.library.get(checked_name(name))
    if form.get("confirm") != info.name:
        return page(
            request,
            "delete.html",
            400,
            admin=admin,
            info=info,
            error=f"type the name {info.name!r} exactly to confirm; nothing was deleted",
        )
    studio.library.delete(info.name)
    return redirect(request, f"/?deleted={quote(info.name)}")
