"""API keys (create - the secret shown once -, list, revoke) and the render-job monitor (read-only)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request

from app.accounts import DEFAULT_RATE_LIMIT, Accounts
from app.admin.core import AccountsDep, AdminDep, FormDep, StudioDep, checked_name, page, redirect
from app.admin.session import AdminError
from db.models import JOB_STATUSES

router = APIRouter()


def key_rows(accounts: Accounts) -> list:
    return [
        {
            "name": k.name,
            "prefix": k.prefix,
            "rate": k.rate_limit_per_minute,
            "created": k.created_at,
            "last_used": k.last_used_at,
            "revoked": k.revoked_at,
        }
        for k in accounts.list_api_keys()
    ]


@router.get("/keys")
def keys(request: Request, admin: AdminDep, accounts: AccountsDep):
    """API keys for the REST API."""
    return page(request, "keys.html", admin=admin, keys=key_rows(accounts), secret=None, error=None)


@router.post("/keys")
def create_key(request: Request, admin: AdminDep, accounts: AccountsDep, form: FormDep):
    """Create a key; its secret is on this response only (the catalog keeps its hash)."""
    name = str(form.get("name", "")).strip()
    raw_rate = str(form.get("rate_limit", "") or DEFAULT_RATE_LIMIT)
    if not raw_rate.isdigit():
        raise AdminError(422, f"rate limit {raw_rate!r}: requests per minute, a whole number")
    key, secret = accounts.create_api_key(name, rate_limit_per_minute=int(raw_rate))
    return page(
        request,
        "keys.html",
        201,
        admin=admin,
        keys=key_rows(accounts),
        secret=secret,
        created=key.name,
        error=None,
    )


@router.post("/keys/{name}/revoke")
def revoke_key(request: Request, admin: AdminDep, accounts: AccountsDep, form: FormDep, name: str):
    """Revoke a key: requests with it are refused from now on."""
    accounts.revoke_api_key(checked_name(name))
    return redirect(request, "/keys")


@router.get("/jobs")
def jobs(
    request: Request,
    admin: AdminDep,
    studio: StudioDep,
    status: Annotated[str, Query(max_length=16)] = "",
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
):
    """Render jobs, newest first (read-only)."""
    if status and status not in JOB_STATUSES:
        raise AdminError(400, f"job status {status!r}: expected one of {', '.join(JOB_STATUSES)}")
    found = studio.list_jobs(status or None, limit=limit)
    rows = [
        {
            "id": j.id,
            "status": j.status,
            "created": j.created_at,
            "started": j.started_at,
            "finished": j.finished_at,
            "backbone": j.backbone,
            "done": f"{j.completed}/{j.total}",
            "progress": round(100 * (j.progress or 0.0)),
            "attempts": j.attempts,
            "worker": j.worker or "",
            "error": j.error or "",
        }
        for j in found.items
    ]
    total = found.total
    return page(
        request, "jobs.html", admin=admin, jobs=rows, total=total, status=status, statuses=JOB_STATUSES
    )
