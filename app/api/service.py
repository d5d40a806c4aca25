"""What the REST API is handed: the Studio, typed as `app.facade.StudioFacade` (so the web layer never imports
the Studio, nor torch), and the executor it starts and stops with the app."""

from __future__ import annotations

from typing import Annotated, Protocol

from fastapi import Depends, Request

from app.facade import StudioFacade


class Executor(Protocol):
    """Runs the Studio's render jobs (`app.jobs`: in-process workers or a Ray cluster); the API starts and
    stops it with the app, and submits, reads and cancels jobs through the Studio."""

    def start(self) -> None: ...

    def stop(self) -> None: ...


def get_studio(request: Request) -> StudioFacade:
    return request.app.state.studio


StudioDep = Annotated[StudioFacade, Depends(get_studio)]
