"""Controls for a composition method built from its parameters dataclass, and the dataclass back from their
values: a method registered in `composer.methods` shows up in the studio with no UI code of its own."""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from typing import Any, Literal

import gradio as gr

from composer.errors import StudioError
from composer.masks import COLOUR_NAMES, PALETTE, RegionMasks

CANVAS_SIZE = (512, 512)  # the painting is stretched to the render's size


def colour_legend(stack: list[str]) -> str:
    """Which colour paints which LoRA of the stack, as shown beside the canvas."""
    if not stack:
        return "Pick LoRAs first; then paint each one's region in its colour."
    pairs = [f"**{name}**: {COLOUR_NAMES[i]}" for i, name in enumerate(stack[: len(PALETTE)])]
    return "Paint: " + ", ".join(pairs) + ". Unpainted LoRAs act everywhere; blank pixels get no masked LoRA."


def has_canvas(params: type) -> bool:
    """Whether a method's parameters include regions to paint."""
    return RegionMasks in typing.get_type_hints(params).values()


def region_canvas(label: str, info: str | None) -> gr.ImageEditor:
    """A blank canvas with one brush colour per stack position (`composer.masks.PALETTE`) and an eraser."""
    colours = ["#{:02x}{:02x}{:02x}".format(*c) for c in PALETTE]
    return gr.ImageEditor(
        label=f"{label} ({info})" if info else label,
        type="pil",
        image_mode="RGBA",
        canvas_size=CANVAS_SIZE,
        sources=(),
        brush=gr.Brush(colors=colours, default_color=colours[0], color_mode="fixed", default_size=40),
        eraser=gr.Eraser(default_size=40),
        layers=False,
        transforms=(),
        format="png",  # lossless: the palette colours must come back exactly
        elem_classes=["region-canvas"],
    )


def regions_from(value: Any, stack: list[str]) -> RegionMasks:
    """The canvas's painting as one mask per LoRA of the stack (nothing painted: no masks)."""
    composite = value.get("composite") if isinstance(value, dict) else value
    if composite is None:
        return RegionMasks()
    return RegionMasks.from_colour_map(composite, stack)


@dataclasses.dataclass(frozen=True)
class MethodControls:
    """One method's controls, in field order, inside a group shown only while the method is selected."""

    method: str
    params: type
    group: gr.Group
    controls: list[tuple[str, gr.components.Component]]


def control_for(field: dataclasses.Field, hint: Any) -> gr.components.Component:
    """A Gradio control for one dataclass field: Literal -> dropdown, bool -> checkbox, int/float -> number,
    str -> textbox, RegionMasks -> a canvas to paint regions on. Other types are refused."""
    default = None if field.default is dataclasses.MISSING else field.default
    label = field.name.replace("_", " ")
    info = field.metadata.get("help")
    if typing.get_origin(hint) is Literal:
        return gr.Dropdown(choices=list(typing.get_args(hint)), value=default, label=label, info=info)
    if hint is bool:
        return gr.Checkbox(value=bool(default), label=label, info=info)
    if hint in (int, float):
        return gr.Number(value=default, label=label, info=info, precision=0 if hint is int else None)
    if hint is str:
        return gr.Textbox(value=default or "", label=label, info=info, lines=field.metadata.get("lines", 1))
    if hint is RegionMasks:
        return region_canvas(label, info)
    raise TypeError(
        f"{field.name}: {hint!r} has no UI control (use bool, int, float, str, a Literal or RegionMasks)"
    )


def build_method_controls(methods: Mapping[str, type], selected: str) -> list[MethodControls]:
    """Controls for every method; only the selected method's group is visible. Call inside a Blocks context."""
    out = []
    for name, params in methods.items():
        hints = typing.get_type_hints(params)
        with gr.Group(visible=name == selected) as group:
            controls = [(f.name, control_for(f, hints[f.name])) for f in dataclasses.fields(params)]
        out.append(MethodControls(name, params, group, controls))
    return out


def params_from(
    groups: list[MethodControls], method: str, values: list[Any], stack: list[str] | None = None
) -> object:
    """The selected method's parameters dataclass from the flat list of every method's control values;
    `stack` (the LoRA names in order) tells which LoRA each canvas colour paints.

    Raises:
        StudioError: an unknown method, or a value the dataclass refuses (named).
    """
    chosen = next((g for g in groups if g.method == method), None)
    if chosen is None:
        raise StudioError(
            f"unknown composition method {method!r}; choose {', '.join(g.method for g in groups)}"
        )
    start = sum(len(g.controls) for g in groups[: groups.index(chosen)])
    hints = typing.get_type_hints(chosen.params)
    kwargs = {}
    for (name, _), value in zip(chosen.controls, values[start : start + len(chosen.controls)], strict=True):
        hint = hints[name]
        if hint is RegionMasks:
            kwargs[name] = regions_from(value, stack or [])
            continue
        if value is None:
            raise StudioError(f"{method}: {name} needs a value")
        kwargs[name] = hint(value) if hint in (int, float, bool, str) else value
    try:
        return chosen.params(**kwargs)
    except (TypeError, ValueError, StudioError) as exc:
        raise StudioError(f"{method}: {exc}") from None
