"""The whole web application: the REST API under /api/v1, the admin page under /admin, our static files under
/studio-static and the Gradio studio at / (mounted last: every other route is matched before it, and Gradio
keeps /static and /assets for its own files). Everything is built here, over one ready Studio, never at import; each
front end gets that same Studio, typed as `app.facade.StudioFacade` (importing app.web never imports torch)."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import RedirectResponse
from fastapi.staticfiles import StaticFiles

from app.api.service import Executor
from app.facade import StudioFacade

STATIC_DIR = Path(__file__).resolve().parents[1] / "static"
STATIC_PATH = "/studio-static"


def create_web_app(
    studio: StudioFacade,
    executor: Executor | None = None,
    *,
    login: bool = False,
    previews: bool = False,
    handoff_url: str | None = None,
) -> FastAPI:
    """REST API (/api/v1) + admin (/admin) + static files (/studio-static) + Gradio studio (/); with `login`
    the studio asks for a catalog user's name and password (`app.serving.studio_login`); with `previews` the
    LoRAs of the served family that have no preview get one rendered in the background once the app starts
    (`app.previews.PreviewFiller`, its progress shown in the studio); with `handoff_url` (where this machine
    reaches the server) `lora-studio render` on the same data dir hands its renders to it while it runs
    (`app.handoff`)."""
    import gradio as gr

    from app.admin import create_admin_app
    from app.api import create_app
    from app.handoff import HandoffOffer
    from app.previews import PreviewFiller
    from app.serving import studio_login
    from app.ui import create_ui

    filler = PreviewFiller(studio, studio.served_family()) if previews else None
    offer = HandoffOffer(studio, handoff_url) if handoff_url and executor is not None else None
    app = create_app(studio, executor, services=[s for s in (offer, filler) if s is not None])
    app.state.handoff = offer
    studio.renders_dir.mkdir(parents=True, exist_ok=True)
    studio.thumbs_dir.mkdir(parents=True, exist_ok=True)
    app.add_api_route("/admin", lambda: RedirectResponse("/admin/", status_code=302), include_in_schema=False)
    app.mount("/admin", create_admin_app(studio))
    app.mount(STATIC_PATH, StaticFiles(directory=STATIC_DIR), name="static")
    return gr.mount_gradio_app(
        app,
        create_ui(studio, filler),
        path="/",
        allowed_paths=[str(studio.renders_dir), str(studio.thumbs_dir)],
        max_file_size=f"{studio.settings.max_upload_mb}mb",  # training images, like LoRA uploads
        css_paths=[STATIC_DIR / "studio.css"],
        footer_links=["api"],
        auth=studio_login(studio) if login else None,
        auth_message="LoRA Studio: sign in with a catalog user (lora-studio admin create)" if login else None,
    )
