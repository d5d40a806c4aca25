"""The History tab: past renders from the catalog, a page at a time (newest first), each with its provenance, and
"Reuse settings", which puts a render's prompt, LoRA stack, method, seed and sampling back in the Studio tab."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import gradio as gr

from app.catalog import RenderInfo
from app.facade import StudioFacade
from app.ui.common import user_errors
from app.ui.studio_tab import StudioControls, caption
from composer.errors import StudioError

PAGE_SIZE = 12


def provenance_of(r: RenderInfo) -> dict[str, Any]:
    """What a past render was: the record's fields as the studio's provenance panel shows them."""
    return {
        "render_id": r.id,
        "created_at": r.created_at.isoformat() if r.created_at else None,
        "prompt": r.prompt,
        "negative_prompt": r.negative_prompt,
        "backbone": r.backbone,
        "model": r.model,
        "method": r.method,
        "seed": r.seed,
        "loras": r.loras,
        **r.params,
    }


@dataclass
class Page:
    """A history page: gallery items, the "page i of n" line, the page number, and the render ids shown."""

    items: list[tuple[str, str]]
    where: str
    number: int
    ids: list[int]


def history_page(studio: StudioFacade, number: int) -> Page:
    """Page `number` (0: newest), clamped to the pages there are (read again only when it was past the end)."""
    number = max(0, int(number or 0))
    page = studio.list_renders(PAGE_SIZE, number * PAGE_SIZE)
    pages = max(1, math.ceil(page.total / PAGE_SIZE))
    if number >= pages:
        number = pages - 1
        page = studio.list_renders(PAGE_SIZE, number * PAGE_SIZE)
    total = page.total
    shown = [r for r in page.items if r.image is not None]
    items = [(str(r.image), caption(provenance_of(r))) for r in shown]
    where = f"page {number + 1} of {pages} ({total} render{'s' if total != 1 else ''})"
    return Page(items, where, number, [r.id for r in shown])


def build_history_tab(studio: StudioFacade, controls: StudioControls, tabs: gr.Tabs, demo: gr.Blocks) -> None:
    """The tab's components and events (call inside `gr.Tab`); it fills when the page loads and the tab opens."""
    number = gr.State(0)
    ids = gr.State([])
    with gr.Row():
        newer = gr.Button("Newer", scale=0, elem_id="history-newer")
        where = gr.Markdown(elem_id="history-page")
        older = gr.Button("Older", scale=0, elem_id="history-older")
        refresh = gr.Button("Refresh", scale=0, elem_id="history-refresh")
    gallery = gr.Gallery(label="Past renders", columns=4, format="png", elem_id="history-gallery")
    with gr.Row():
        chosen = gr.Number(label="Render id", precision=0, elem_id="history-chosen")
        reuse = gr.Button("Reuse settings", variant="primary", scale=0, elem_id="history-reuse")
    details = gr.JSON(label="Provenance", elem_id="history-provenance")

    def show(n: Any):
        with user_errors():
            page = history_page(studio, n)
        return page.items, page.where, page.number, page.ids

    def select(shown: list[int], evt: gr.SelectData):
        render_id = shown[evt.index]
        with user_errors():
            return render_id, provenance_of(studio.get_render(render_id))

    def reuse_settings(render_id: Any):
        """The render's settings back in the Studio tab (method parameters other than the method's name, such
        as painted regions, are not restored)."""
        with user_errors():
            if render_id in (None, ""):
                raise StudioError("pick a render in the gallery first")
            r = studio.get_render(int(render_id))
        params = r.params
        rows = [[x["name"], x["weight"]] for x in r.loras]
        return (
            r.prompt,
            r.negative_prompt,
            gr.Dropdown(value=[x["name"] for x in r.loras]),
            rows,
            r.method,
            r.seed,
            params.get("num_inference_steps") or 0,
            params.get("guidance_scale"),
            params.get("width") or 0,
            params.get("height") or 0,
            gr.Tabs(selected="studio"),
        )

    page_outputs = [gallery, where, number, ids]
    refresh.click(show, number, page_outputs, api_name="history")
    newer.click(lambda n: show(int(n) - 1), number, page_outputs, api_visibility="private")
    older.click(lambda n: show(int(n) + 1), number, page_outputs, api_visibility="private")
    demo.load(show, number, page_outputs, api_visibility="private")
    gallery.select(select, ids, [chosen, details], api_visibility="private")
    reuse.click(
        reuse_settings,
        chosen,
        [
            controls.prompt,
            controls.negative,
            controls.picker,
            controls.stack,
            controls.method,
            controls.seed,
            controls.steps,
            controls.guidance,
            controls.width,
            controls.height,
            tabs,
        ],
        api_name="reuse_render",
    )


__all__ = ["PAGE_SIZE", "build_history_tab", "history_page", "provenance_of"]
