"""The admin page at /admin: server-rendered HTML (Jinja2) over the catalog, API keys and render jobs.

Sign-in with a username and an Argon2-hashed password (`lora-studio admin create`); the session lives in a
signed cookie whose key is kept in the data dir; every POST form carries a CSRF token. Thin like the REST API:
each route converts the form, calls the Studio (typed as `app.facade.StudioFacade`) and renders a page.
"""

from __future__ import annotations

from fastapi import FastAPI

from app.admin import auth, catalog, files, ops
from app.admin.core import install_handlers
from app.admin.session import SessionCodec, load_secret
from app.admin.throttle import LoginThrottle
from app.facade import StudioFacade


def create_admin_app(studio: StudioFacade) -> FastAPI:
    """The admin application, to be mounted at /admin (its cookie is scoped to that path)."""
    settings = studio.settings
    app = FastAPI(title="LoRA Studio admin", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.studio = studio
    app.state.codec = SessionCodec(
        load_secret(settings.session_secret_path), max_age_s=int(settings.admin_session_hours * 3600)
    )
    app.state.throttle = LoginThrottle(
        per_user=settings.admin_login_attempts, window_s=settings.admin_login_window_s
    )
    install_handlers(app)
    for module in (auth, catalog, files, ops):
        app.include_router(module.router)
    return app


__all__ = ["create_admin_app"]
