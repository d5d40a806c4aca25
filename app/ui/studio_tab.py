"""The Studio tab: prompt, a LoRA stack picked by catalog search (weights per LoRA, trigger words put into the
prompt), the composition method and its controls, sampling settings, a progress bar, and a gallery whose
captions carry each image's provenance."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr

from app.facade import StudioFacade
from app.previews import PreviewFiller, placeholder, thumbnail
from app.ui.common import count, optional, rows_of, user_errors
from app.ui.methods import build_method_controls, colour_legend, has_canvas, params_from
from composer.errors import StudioError
from db.errors import AdapterNotFoundError

STACK_HEADERS = ["LoRA", "weight"]
MATCH_HEADERS = ["name", "type", "family", "trigger words", "tags", "sha256"]
SEARCH_LIMIT = 50
DEFAULT_METHOD = "merge"


def insert_triggers(prompt: str, words: list[str]) -> str:
    """The prompt with each trigger word appended (comma-separated) unless it is already in it as a word."""
    out = prompt.strip()
    for word in words:
        if not re.search(rf"(?<!\w){re.escape(word)}(?!\w)", out, flags=re.IGNORECASE):
            out = f"{out}, {word}" if out else word
    return out


def remove_triggers(prompt: str, words: list[str]) -> str:
    """The prompt without each of `words` as a whole word (case-insensitive), with the comma that joined it:
    what `insert_triggers` put in comes out again when its LoRA leaves the stack."""
    out = prompt
    for word in words:
        if not word.strip():
            continue
        w = rf"(?<!\w){re.escape(word.strip())}(?!\w)"
        out = re.sub(rf"\s*,\s*{w}|{w}\s*,\s*|{w}", "", out, flags=re.IGNORECASE)
    return re.sub(r"\s{2,}", " ", out).strip(" ,")


def stack_entries(value: Any) -> list[tuple[str, float]]:
    """(name, weight) pairs from the stack table; empty rows are skipped, a weight must be a number.

    Raises:
        StudioError: a weight that is not a number (naming the LoRA).
    """
    entries = []
    for row in rows_of(value):
        name = str(row[0] if row else "").strip()
        if not name:
            continue
        raw = row[1] if len(row) > 1 else 1.0
        try:
            entries.append((name, float(1.0 if raw in (None, "") else raw)))
        except (TypeError, ValueError):
            raise StudioError(f"weight of LoRA {name!r} is not a number: {raw!r}") from None
    return entries


def caption(provenance: dict) -> str:
    """One line of provenance under a gallery image: LoRAs (name, sha256 prefix, weight), method, seed."""
    loras = " + ".join(f"{x['name']} [{x['sha256'][:10]}] x{x['weight']:g}" for x in provenance["loras"])
    return f"{loras or 'no LoRA'} | {provenance['method']} | seed {provenance['seed']}"


@dataclass(frozen=True)
class StudioControls:
    """The Studio tab's inputs other tabs fill (History's "Reuse settings")."""

    prompt: gr.Textbox
    negative: gr.Textbox
    picker: gr.Dropdown
    stack: gr.Dataframe
    method: gr.Dropdown
    seed: gr.Number
    steps: gr.Number
    guidance: gr.Number
    width: gr.Number
    height: gr.Number


def cards(found: list, folder: Path) -> list[tuple[str, str]]:
    """(thumbnail file, caption) for each LoRA found: its preview, or a placeholder until one is rendered. Files,
    not images: Gradio serves them as they are, where a PIL image would be encoded again on every search."""
    out = []
    for a in found:
        words = f" · {', '.join(a.trigger_words)}" if a.trigger_words else ""
        card = thumbnail(a.preview_path, folder) or placeholder(a.name, folder)
        out.append((str(card), f"{a.name}{words}"))
    return out


def build_studio_tab(
    studio: StudioFacade, demo: gr.Blocks, previews: PreviewFiller | None = None
) -> StudioControls:
    """The tab's components and events (call inside `gr.Tab`); the picker and the cards fill when the page
    loads; clicking a card adds its LoRA to the stack."""
    library = studio.library
    methods = studio.composition_methods()
    defaults = studio.default_sampling()

    with gr.Row():
        with gr.Column(scale=3):
            prompt = gr.Textbox(
                label="Prompt",
                lines=2,
                elem_id="prompt",
                info="<lora:NAME:WEIGHT> in the prompt adds that catalog LoRA (the stack's own row wins)",
            )
            negative = gr.Textbox(label="Negative prompt", elem_id="negative-prompt")
            with gr.Row():
                query = gr.Textbox(
                    label="Find LoRAs",
                    placeholder="name, trigger word, tag, or what it should draw",
                    elem_id="lora-query",
                    info="hybrid search: words in the catalog and what each LoRA's weights draw, fused",
                )
                search_btn = gr.Button("Search", scale=0, elem_id="lora-search")
            picker = gr.Dropdown(
                label="LoRAs",
                multiselect=True,
                allow_custom_value=True,  # API clients name any LoRA; unknown names fail with suggestions
                elem_id="lora-picker",
            )
            card_gallery = gr.Gallery(
                label="LoRAs (click a card to add it)",
                columns=6,
                height="auto",
                object_fit="contain",
                allow_preview=False,
                format="png",
                elem_id="lora-cards",
            )
            shown = gr.State([])  # the names of the cards, in order
            preview_status = gr.Markdown(elem_id="preview-status")
            with gr.Accordion("Matches as a table", open=False):
                matches = gr.Dataframe(
                    headers=MATCH_HEADERS, label="Matches", interactive=False, elem_id="lora-matches"
                )
            stack = gr.Dataframe(
                headers=STACK_HEADERS,
                datatype=["str", "number"],
                label="Stack (edit the weights)",
                interactive=True,
                static_columns=[0],
                elem_id="lora-stack",
            )
            sliders = gr.Column(elem_id="lora-sliders")
            method = gr.Dropdown(
                label="Composition method",
                choices=list(methods),
                value=DEFAULT_METHOD,
                elem_id="method",
            )
            groups = build_method_controls(methods, DEFAULT_METHOD)
            legend = gr.Markdown(
                colour_legend([]),
                visible=has_canvas(methods[DEFAULT_METHOD]),
                elem_id="region-legend",
            )
            with gr.Row():
                seed = gr.Number(label="Seed", value=0, precision=0, elem_id="seed")
                steps = gr.Number(label="Steps", value=defaults.steps, precision=0, elem_id="steps")
                guidance = gr.Number(label="Guidance", value=defaults.guidance, elem_id="guidance")
                auto = gr.Number(
                    label="Auto LoRAs",
                    value=0,
                    precision=0,
                    minimum=0,
                    maximum=8,
                    elem_id="auto-loras",
                    info="K > 0: add the K LoRAs search finds for the prompt (picks in the provenance)",
                )
            with gr.Row():
                width = gr.Number(
                    label="Width (0: the model's native)", value=0, precision=0, elem_id="width"
                )
                height = gr.Number(
                    label="Height (0: the model's native)", value=0, precision=0, elem_id="height"
                )
            go = gr.Button("Render", variant="primary", elem_id="render")
        with gr.Column(scale=2):
            gallery = gr.Gallery(label="Renders", format="png", columns=2, elem_id="gallery")
            provenance = gr.JSON(label="Provenance", elem_id="provenance")

    def search(text: str, selected: list[str] | None):
        with user_errors():
            if text.strip():
                found = [hit.info for hit in studio.search_loras(text.strip(), "hybrid", SEARCH_LIMIT)]
            else:
                found = library.list(limit=SEARCH_LIMIT)
        names = list(dict.fromkeys([*(selected or []), *(a.name for a in found)]))
        rows = [
            [a.name, a.adapter_type, a.family, ", ".join(a.trigger_words), ", ".join(a.tags), a.sha256[:12]]
            for a in found
        ]
        # choices only: setting the value would fire `pick` with the prompt as it was when the search started,
        # wiping what was typed since (the page-load search)
        return gr.Dropdown(choices=names), rows, cards(found, studio.thumbs_dir), [a.name for a in found]

    def add_card(selected: list[str] | None, names: list[str], evt: gr.SelectData):
        name = names[evt.index]
        selected = list(selected or [])
        return gr.Dropdown(value=selected if name in selected else [*selected, name])

    def preview_line():
        """The background previews' progress; the timer stops once they are done."""
        progress = previews.progress if previews is not None else None
        running = progress is not None and progress.running
        return (progress.line() if progress else ""), gr.Timer(active=running)

    def pick(selected: list[str] | None, current: Any, text: str):
        """The stack follows the picker: a LoRA added brings its trigger words into the prompt, one removed
        takes its own out (words another LoRA of the stack also uses stay); the prompt is left untouched when
        no LoRA came or went."""
        with user_errors():
            weights = dict(stack_entries(current))
            selected = selected or []
            added = [name for name in selected if name not in weights]
            removed = [name for name in weights if name not in selected]
            stack_rows = [[name, weights.get(name, 1.0)] for name in selected]
            if not added and not removed:
                return stack_rows, gr.update()
            kept = {w.lower() for name in selected for w in library.get(name).trigger_words}
            for name in removed:
                try:
                    words = library.get(name).trigger_words
                except AdapterNotFoundError:  # deleted from the catalog since it was picked
                    continue
                text = remove_triggers(text, [w for w in words if w.lower() not in kept])
            for name in added:
                text = insert_triggers(text, library.get(name).trigger_words)
            return stack_rows, text

    def render(progress=gr.Progress(), *values):
        text, neg, table, chosen, seed_, steps_, guidance_, width_, height_, auto_, *method_values = values
        with user_errors():
            loras = stack_entries(table)
            params = params_from(groups, chosen, method_values, [name for name, _ in loras])
            result = studio.render_image(
                prompt=text,
                negative_prompt=neg,
                loras=loras,
                method=chosen,
                params=params,
                seed=int(seed_ or 0),
                steps=count(steps_),
                guidance=optional(float, guidance_),
                width=count(width_),
                height=count(height_),
                progress=lambda done, total: progress((done, total), desc="denoising", unit="steps"),
                auto_loras=int(auto_ or 0),
            )
        label = caption(result.provenance)
        shown = [(str(path), label) for path in result.paths]
        shown += [(picture, text) for text, picture in getattr(result, "pictures", [])]  # e.g. the masks used
        return shown, result.provenance

    def set_weight(name: str):
        def update(value: float, table: Any):
            with user_errors():
                return [[n, float(value) if n == name else w] for n, w in stack_entries(table)]

        return update

    with sliders:

        @gr.render(inputs=[stack], triggers=[stack.change, demo.load])
        def weight_sliders(table: Any) -> None:
            """A weight slider per LoRA of the stack (the table stays the record: a slider writes its cell)."""
            try:
                entries = stack_entries(table)
            except StudioError:
                return  # a cell that is not a number: the render names it
            for name, weight in entries:
                slider = gr.Slider(
                    minimum=min(-2.0, weight),
                    maximum=max(2.0, weight),
                    step=0.05,
                    value=weight,
                    label=f"{name} weight",
                    elem_classes=["lora-weight"],
                    interactive=True,
                )
                slider.release(set_weight(name), [slider, stack], stack, api_visibility="private")

    def show_method(chosen: str):
        return [gr.Group(visible=g.method == chosen) for g in groups] + [
            gr.Markdown(visible=has_canvas(methods[chosen]))
        ]

    def show_legend(table: Any):
        return colour_legend([str(row[0]).strip() for row in rows_of(table) if row and str(row[0]).strip()])

    search_inputs = [query, picker]
    search_outputs = [picker, matches, card_gallery, shown]
    query.submit(search, search_inputs, search_outputs, api_name="search_loras")
    search_btn.click(search, search_inputs, search_outputs, api_visibility="private")
    demo.load(search, search_inputs, search_outputs, api_visibility="private")
    card_gallery.select(add_card, [picker, shown], picker, api_visibility="private")
    if previews is not None:  # their progress while they render in the background (Search shows new ones)
        timer = gr.Timer(2.0)
        timer.tick(preview_line, None, [preview_status, timer], api_visibility="private")
        demo.load(preview_line, None, [preview_status, timer], api_visibility="private")
    picker.change(pick, [picker, stack, prompt], [stack, prompt], api_name="pick_loras")
    method.change(show_method, method, [g.group for g in groups] + [legend], api_visibility="private")
    stack.change(show_legend, stack, legend, api_visibility="private")
    go.click(
        render,
        [prompt, negative, stack, method, seed, steps, guidance, width, height, auto]
        + [c for g in groups for _, c in g.controls],
        [gallery, provenance],
        api_name="render",
        concurrency_id="gpu",
        concurrency_limit=1,
    )
    return StudioControls(prompt, negative, picker, stack, method, seed, steps, guidance, width, height)
