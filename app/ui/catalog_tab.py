"""The Catalog tab: every adapter in a table, searchable, with the preview images that have one."""

from __future__ import annotations

from pathlib import Path

import gradio as gr
from PIL import Image

from app.catalog import AdapterInfo
from app.facade import StudioFacade
from app.ui.common import user_errors

HEADERS = ["name", "type", "family", "rank", "trigger words", "tags", "description", "sha256", "MiB"]
LIMIT = 500


def catalog_row(a: AdapterInfo) -> list:
    return [
        a.name,
        a.adapter_type,
        a.family,
        a.rank,
        ", ".join(a.trigger_words),
        ", ".join(a.tags),
        a.description,
        a.sha256[:12],
        round(a.file_size / 2**20, 2),
    ]


def previews(adapters: list[AdapterInfo]) -> list[tuple[Image.Image, str]]:
    """(image, name) for each adapter whose preview file exists (loaded here: the LoRA folder is not served)."""
    out = []
    for a in adapters:
        if a.preview_path and Path(a.preview_path).is_file():
            with Image.open(a.preview_path) as im:
                out.append((im.convert("RGB"), a.name))
    return out


def build_catalog_tab(studio: StudioFacade, demo: gr.Blocks) -> None:
    """The tab's components and events (call inside `gr.Tab`); the table fills when the page loads."""
    with gr.Row():
        query = gr.Textbox(
            label="Search the catalog", placeholder="name, trigger word, tag", elem_id="catalog-query"
        )
        refresh = gr.Button("Search", scale=0, elem_id="catalog-search")
    table = gr.Dataframe(headers=HEADERS, interactive=False, label="Adapters", elem_id="catalog-table")
    gallery = gr.Gallery(label="Previews", columns=6, format="png", elem_id="catalog-previews")

    def catalog(text: str):
        with user_errors():
            found = studio.library.list(query=(text or "").strip() or None, limit=LIMIT)
        return [catalog_row(a) for a in found], previews(found)

    query.submit(catalog, query, [table, gallery], api_name="catalog")
    refresh.click(catalog, query, [table, gallery], api_visibility="private")
    demo.load(catalog, query, [table, gallery], api_visibility="private")
