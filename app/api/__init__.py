"""The REST API under /api/v1: a thin layer over the Studio facade (it never imports torch)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI
from fastapi.openapi.docs import get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

from app.api import loras, renders, search
from app.api.auth import TokenBucket, authenticate
from app.api.errors import FALLBACK_ROUTE, HTTP_METHODS, install_error_handlers, unmatched
from app.api.guard import RequestGuard
from app.api.render_schemas import batch_schema
from app.api.service import Executor
from app.facade import StudioFacade

API_PREFIX = "/api/v1"
DOCS = f"{API_PREFIX}/docs"
OPENAPI = f"{API_PREFIX}/openapi.json"
DOCS_ASSETS = f"{DOCS}/assets"  # Swagger UI's files from the installed fastapi-offline package, not a CDN


def _swagger_assets() -> StaticFiles:
    import fastapi_offline

    return StaticFiles(packages=[(fastapi_offline.__name__, "static")])


def add_docs(app: FastAPI) -> None:
    """Swagger UI at /api/v1/docs, served whole from this server (it works offline)."""

    @app.get(DOCS, include_in_schema=False)
    def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=OPENAPI,
            title="LoRA Studio API",
            oauth2_redirect_url=f"{DOCS}/oauth2-redirect",
            swagger_js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{DOCS_ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{DOCS_ASSETS}/favicon.png",
        )

    @app.get(f"{DOCS}/oauth2-redirect", include_in_schema=False)
    def oauth2_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    app.mount(DOCS_ASSETS, _swagger_assets(), name="docs_assets")


def create_app(
    studio: StudioFacade, executor: Executor | None = None, services: Sequence[Executor] = ()
) -> FastAPI:
    """The web application over one ready Studio; OpenAPI docs at /api/v1/docs.

    Every /api/v1 path other than the docs needs an API key, checked before the body is read, and bodies are
    bounded while they are read (`app.api.guard`); a path or method no API route takes is answered here, in
    the API's error shape, so that nothing mounted behind the API (the studio at /) sees it.

    `executor` runs render jobs (`app.jobs.make_executor`); it is started and stopped with the app. Without
    one, the render routes answer 503. `services` (anything with start/stop, e.g. `app.previews.PreviewFiller`)
    start after it and stop before it.
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if executor is not None:
            executor.start()
        for service in services:
            service.start()
        try:
            yield
        finally:
            for service in reversed(services):
                service.stop()
            if executor is not None:
                executor.stop()

    app = FastAPI(
        lifespan=lifespan,
        title="LoRA Studio",
        summary="Catalog, search and render diffusion-model LoRAs",
        docs_url=None,
        openapi_url=OPENAPI,
        redoc_url=None,
    )
    app.state.studio = studio
    app.state.executor = executor
    app.state.rate_limiter = TokenBucket()
    install_error_handlers(app)
    app.add_middleware(RequestGuard, prefix=API_PREFIX, public=(DOCS, OPENAPI))
    render_routes = renders.router_for(batch_schema(studio.composition_methods()))
    for router in (loras.router, search.router, render_routes):
        app.include_router(router, prefix=API_PREFIX, dependencies=[Depends(authenticate)])
    add_docs(app)
    app.add_api_route(
        f"{API_PREFIX}{{path:path}}",
        unmatched,
        methods=list(HTTP_METHODS),
        name=FALLBACK_ROUTE,
        include_in_schema=False,
    )
    return app


__all__ = ["API_PREFIX", "create_app"]
