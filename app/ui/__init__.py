"""The Gradio studio at /: Studio, History, Training and Catalog tabs over one Studio (typed as `app.facade.StudioFacade`).
Thin: every event converts its inputs, makes one call into the Studio and converts the result; never imports
torch.

Named endpoints for `gradio_client`: /render, /search_loras, /pick_loras, /history, /reuse_render, /train,
/catalog.
"""

from __future__ import annotations

import gradio as gr

from app.facade import StudioFacade
from app.previews import PreviewFiller
from app.ui.catalog_tab import build_catalog_tab
from app.ui.history_tab import build_history_tab
from app.ui.studio_tab import build_studio_tab
from app.ui.train_tab import build_train_tab

QUEUE_SIZE = 64


def create_ui(studio: StudioFacade, previews: PreviewFiller | None = None) -> gr.Blocks:
    """The studio's Blocks, queued; renders and training share one concurrency slot ("gpu"). With `previews`,
    the Studio tab shows their background rendering's progress."""
    # delete_cache: Gradio's copies of uploads and results older than a day go, checked hourly
    with gr.Blocks(title="LoRA Studio", analytics_enabled=False, delete_cache=(3600, 86400)) as demo:
        gr.Markdown("# LoRA Studio\n[Admin](/admin/) · [REST API](/api/v1/docs)")
        with gr.Tabs() as tabs:
            with gr.Tab("Studio", id="studio"):
                controls = build_studio_tab(studio, demo, previews)
            with gr.Tab("History", id="history"):
                build_history_tab(studio, controls, tabs, demo)
            with gr.Tab("Training", id="training"):
                build_train_tab(studio)
            with gr.Tab("Catalog", id="catalog"):
                build_catalog_tab(studio, demo)
    return demo.queue(max_size=QUEUE_SIZE)


__all__ = ["create_ui"]
