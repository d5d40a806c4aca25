"""The whole web application: the REST API under /api/v1, the admin page under /admin, static files under
/static and the Gradio studio at /. Everything is built here, over one ready Studio, never at import."""

from __future__ import annotations

import threading
import uuid
from pathlib import Path

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from app.frontend import Frontend

STATIC_DIR = Path(__file__).resolve().parents[1] / "static"


def frontend_for(studio) -> Frontend:
    """The Studio's render and train entry points as the front ends call them (they never build torch-side
    request objects themselves). Torch-side modules are imported here, not at the top: importing app.web
    must not import torch (tested)."""
    from app import training
    from app.studio import resolve_backbone
    from composer.formats.safetensors_io import file_hashes
    from composer.methods import METHODS
    from composer.render import LoraWeight, RenderRequest
    from composer.train import TrainConfig
    from composer.train.config import ADAPTER_KINDS

    backbone, _ = resolve_backbone(studio.settings.backbone, studio.settings.model)
    front: Frontend
    lock = threading.Lock()  # one pipeline user at a time: the studio's events and the admin's previews

    def render(
        *,
        prompt,
        negative_prompt="",
        loras=(),
        method="merge",
        params=None,
        seed=0,
        steps=None,
        guidance=None,
        height=None,
        width=None,
        progress=None,
    ):
        request = RenderRequest(
            prompt=prompt,
            negative_prompt=negative_prompt,
            num_inference_steps=steps,
            guidance_scale=guidance,
            height=height,
            width=width,
            seed=seed,
            loras=tuple(LoraWeight(name, float(weight)) for name, weight in loras),
            method=method,
            method_params=params,
        )
        out = front.renders_dir / f"{uuid.uuid4().hex[:16]}.png"
        with lock:
            return studio.render(request, out=out, progress=progress)

    def train(*, images, name, kind, prompt, steps=None, trigger_words=None, progress=None):
        config = TrainConfig(kind=kind, prompt=prompt, steps=steps).validate()
        with lock:
            return training.train(
                studio, config, images, name, trigger_words=trigger_words or [], progress=progress
            )

    front = Frontend(
        studio=studio,
        render=render,
        train=train,
        file_hashes=file_hashes,
        methods=dict(METHODS),
        adapter_types=tuple(ADAPTER_KINDS),
        defaults={"steps": backbone.default_steps, "guidance": backbone.default_guidance},
    )
    return front


def create_web_app(studio, executor=None) -> FastAPI:
    """REST API (/api/v1, unchanged) + admin (/admin) + static files (/static) + Gradio studio (/)."""
    import gradio as gr

    from app.admin import create_admin_app
    from app.api import create_app
    from app.ui import create_ui

    app = create_app(studio, executor)
    front = frontend_for(studio)
    front.renders_dir.mkdir(parents=True, exist_ok=True)
    app.mount("/admin", create_admin_app(front))
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return gr.mount_gradio_app(
        app,
        create_ui(front),
        path="/",
        allowed_paths=[str(front.renders_dir)],
        max_file_size=f"{studio.settings.max_upload_mb}mb",  # training images, like LoRA uploads
        css_paths=[STATIC_DIR / "studio.css"],
        footer_links=["api"],
    )
