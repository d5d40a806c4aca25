"""Importing (an uploaded .safetensors, or every .safetensors of a server folder inside the import folder) and
finding duplicates by hash. Pickle checkpoints are refused by name before anything reads them, paths that
leave the import folder are refused, and every file gets its own line in the report."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from app.admin.catalog import split_list
from app.admin.core import AdminDep, FormDep, StudioDep, content_length, page, session_of
from app.admin.session import CSRF_FIELD, AdminError, check_csrf
from app.api.errors import ApiError
from app.api.guard import MIB, MULTIPART_SLACK
from app.api.loras import _store as store_upload
from app.facade import StudioFacade

router = APIRouter()
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")
PICKLE_MESSAGE = (
    "pickle checkpoint: loading one can run code, so it is never read; convert it to .safetensors"
)


@dataclass(frozen=True)
class Line:
    """One file of an import report."""

    file: str
    status: str  # imported | duplicate | failed
    detail: str


def refuse_by_name(filename: str) -> None:
    """Raises AdminError (415) for a pickle checkpoint or anything not named .safetensors."""
    suffix = PurePosixPath(filename).suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        raise AdminError(415, f"{filename}: {PICKLE_MESSAGE}")
    if suffix != ".safetensors":
        raise AdminError(415, f"{filename}: only .safetensors files are imported")


def resolve_folder(studio: StudioFacade, text: str) -> Path:
    """A folder inside the import folder, given relative to it or absolute.

    Raises:
        AdminError: empty, with '..', outside the import folder (symlinks resolved), or not a folder.
    """
    root = studio.settings.import_root
    text = text.strip()
    if not text:
        raise AdminError(400, f"name a folder inside the import folder {root}")
    raw = Path(text)
    if ".." in raw.parts:
        raise AdminError(400, f"folder {text!r}: '..' is not allowed; name a folder inside {root}")
    folder = (raw if raw.is_absolute() else root / raw).resolve()
    if not folder.is_relative_to(root):
        raise AdminError(403, f"folder {text!r} is outside the import folder {root}")
    if not folder.is_dir():
        raise AdminError(404, f"folder {text!r}: no such folder in {root}")
    return folder


def files_in(studio: StudioFacade, folder: Path) -> tuple[list[Path], list[Path]]:
    """(*.safetensors, pickle checkpoints) under `folder`, recursively; links that leave the import folder are
    skipped."""
    root = studio.settings.import_root
    found = sorted(p for p in folder.rglob("*") if p.is_file() and p.resolve().is_relative_to(root))
    return (
        [p for p in found if p.suffix.lower() == ".safetensors"],
        [p for p in found if p.suffix.lower() in PICKLE_SUFFIXES],
    )


@router.get("/import")
def import_form(request: Request, admin: AdminDep, studio: StudioDep):
    """Upload a file or import a server folder."""
    return page(request, "import.html", admin=admin, root=studio.settings.import_root, lines=None)


@router.post("/import/upload")
async def import_upload(request: Request, admin: AdminDep, studio: StudioDep):
    """Import one uploaded .safetensors (size limit: max_upload_mb)."""
    settings = studio.settings
    content_length(
        request,
        settings.max_upload_mb * MIB + MULTIPART_SLACK,
        f"{settings.max_upload_mb} MiB (max_upload_mb)",
    )
    async with request.form(max_files=1, max_fields=8) as form:
        check_csrf(session_of(request), form.get(CSRF_FIELD))
        upload = form.get("file")
        if not isinstance(upload, UploadFile) or not upload.filename:
            raise AdminError(422, "choose a .safetensors file to upload")
        filename = PurePosixPath(upload.filename.replace("\\", "/")).name
        refuse_by_name(filename)
        try:
            info = await run_in_threadpool(
                store_upload,
                studio,
                upload.file,
                filename,
                name=None,
                tags=split_list(form.get("tags")),
                description="",
            )
        except ApiError as exc:  # over the size limit while streaming
            raise AdminError(exc.status, exc.message) from None
    lines = [Line(filename, "imported", info.name)]
    return page(request, "import.html", 201, admin=admin, root=settings.import_root, lines=lines)


@router.post("/import/folder")
def import_folder(request: Request, admin: AdminDep, studio: StudioDep, form: FormDep):
    """Import every .safetensors under a folder inside the import folder; one report line per file."""
    folder = resolve_folder(studio, str(form.get("folder", "")))
    safetensors, pickles = files_in(studio, folder)
    outcomes = studio.library.import_paths(safetensors, tags=split_list(form.get("tags")))
    lines = [
        Line(str(o.path.relative_to(folder)), o.status, o.name if o.status == "imported" else o.message)
        for o in outcomes
    ]
    lines += [Line(str(p.relative_to(folder)), "failed", PICKLE_MESSAGE) for p in pickles]
    if not lines:
        raise AdminError(404, f"no .safetensors files in {folder}")
    return page(request, "import.html", admin=admin, root=studio.settings.import_root, lines=lines)


def folder_duplicates(studio: StudioFacade, folder: Path) -> list[dict]:
    """Files under `folder` grouped by tensor hash: groups of two or more, or any already in the catalog."""
    groups: dict[str, list[tuple[Path, str]]] = defaultdict(list)
    safetensors, _ = files_in(studio, folder)
    for path in safetensors:
        hashes = studio.file_hashes(path)
        groups[hashes.tensor_sha256].append((path, hashes.sha256))
    out = []
    library = studio.library
    for tensor_hash, files in sorted(groups.items()):
        entry = library.find(tensor_hash) or next(
            (a for a in (library.find(sha) for _, sha in files) if a is not None), None
        )
        if len(files) > 1 or entry is not None:
            out.append(
                {
                    "tensor_sha256": tensor_hash,
                    "catalog": entry.name if entry else None,
                    "files": [str(p.relative_to(folder)) for p, _ in files],
                }
            )
    return out


@router.get("/duplicates")
def duplicates(request: Request, admin: AdminDep, studio: StudioDep, folder: str = ""):
    """Duplicate files in a server folder (same tensors), and which are already catalogued; near-duplicates in
    the catalog (weights that do nearly the same)."""
    groups = folder_duplicates(studio, resolve_folder(studio, folder)) if folder else None
    return page(
        request,
        "duplicates.html",
        admin=admin,
        folder=folder,
        root=studio.settings.import_root,
        groups=groups,
        near=studio.near_duplicates(),
    )
