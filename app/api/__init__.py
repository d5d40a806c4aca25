"""The REST API under /api/v1: a thin layer over the Studio facade (it never imports torch)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI

from app.api import loras, renders, search
from app.api.auth import TokenBucket, authenticate, key_refused
from app.api.errors import install_error_handlers
from app.api.render_schemas import batch_schema
from app.api.service import Executor
from app.facade import StudioFacade

API_PREFIX = "/api/v1"


def create_app(studio: StudioFacade, executor: Executor | None = None) -> FastAPI:
    """The web application over one ready Studio; OpenAPI docs at /api/v1/docs.

    `executor` runs render jobs (`app.jobs.make_executor`); it is started and stopped with the app. Without
    one, the render routes answer 503.
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if executor is not None:
            executor.start()
        try:
            yield
        finally:
            if executor is not None:
                executor.stop()

    app = FastAPI(
        lifespan=lifespan,
        title="LoRA Studio",
        summary="Catalog, search and render diffusion-model LoRAs",
        docs_url=f"{API_PREFIX}/docs",
        openapi_url=f"{API_PREFIX}/openapi.json",
        swagger_ui_oauth2_redirect_url=f"{API_PREFIX}/docs/oauth2-redirect",
        redoc_url=None,
    )
    app.state.studio = studio
    app.state.executor = executor
    app.state.rate_limiter = TokenBucket()
    install_error_handlers(app, key_refused)
    render_routes = renders.router_for(batch_schema(studio.composition_methods()))
    for router in (loras.router, search.router, render_routes):
        app.include_router(router, prefix=API_PREFIX, dependencies=[Depends(authenticate)])
    return app


__all__ = ["API_PREFIX", "create_app"]
