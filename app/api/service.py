"""What the REST API needs of the Studio, as protocols: the web layer never imports the Studio (and so never
torch); `create_app` is handed a ready one (`app.studio.Studio` satisfies these)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Protocol, runtime_checkable

from fastapi import Depends, Request
from sqlalchemy.orm import Session, sessionmaker

from app.catalog import AdapterInfo
from app.settings import Settings
from db.models import RenderJob


class Catalog(Protocol):
    """The catalog side of the Studio (`app.library.Library`)."""

    def list(
        self,
        query: str | None = None,
        family: str | None = None,
        tag: str | None = None,
        limit: int = 100,
        *,
        adapter_type: str | None = None,
        offset: int = 0,
    ) -> list[AdapterInfo]: ...

    def count(
        self,
        query: str | None = None,
        family: str | None = None,
        tag: str | None = None,
        *,
        adapter_type: str | None = None,
    ) -> int: ...

    def get(self, ref: str) -> AdapterInfo: ...

    def import_file(
        self,
        path: Path,
        name: str | None = None,
        tags: list[str] | None = None,
        *,
        exact_name: bool = False,
        description: str = "",
    ) -> AdapterInfo: ...

    def update(self, ref: str, **changes: Any) -> AdapterInfo: ...

    def delete(self, ref: str) -> AdapterInfo: ...


@runtime_checkable
class StudioService(Protocol):
    """The one service object the web layer talks to."""

    settings: Settings
    library: Catalog
    sessions: sessionmaker[Session]


class JobExecutor(Protocol):
    """Runs render jobs (`app.jobs`: in-process workers or a Ray cluster); the API only submits and cancels,
    and reads jobs from the database."""

    def submit(
        self,
        requests: list[dict[str, Any]],
        *,
        backbone: str | None = None,
        model: str | None = None,
        api_key_id: int | None = None,
        idempotency_key: str | None = None,
    ) -> tuple[RenderJob, bool]: ...

    def cancel(self, job_id: int, api_key_id: int | None = None) -> RenderJob: ...

    def start(self) -> None: ...

    def stop(self) -> None: ...


def get_studio(request: Request) -> StudioService:
    return request.app.state.studio


StudioDep = Annotated[StudioService, Depends(get_studio)]
