"""Controls for a composition method built from its parameters dataclass, and the dataclass back from their
values: a method registered in `composer.methods` shows up in the studio with no UI code of its own."""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from typing import Any, Literal

import gradio as gr

from composer.errors import StudioError


@dataclasses.dataclass(frozen=True)
class MethodControls:
    """One method's controls, in field order, inside a group shown only while the method is selected."""

    method: str
    params: type
    group: gr.Group
    controls: list[tuple[str, gr.components.Component]]


def control_for(field: dataclasses.Field, hint: Any) -> gr.components.Component:
    """A Gradio control for one dataclass field: Literal -> dropdown, bool -> checkbox, int/float -> number,
    str -> textbox. Other types are refused (a method's knobs must be plain values)."""
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
        return gr.Textbox(value=default or "", label=label, info=info)
    raise TypeError(f"{field.name}: {hint!r} has no UI control (use bool, int, float, str or a Literal)")


def build_method_controls(methods: Mapping[str, type], selected: str) -> list[MethodControls]:
    """Controls for every method; only the selected method's group is visible. Call inside a Blocks context."""
    out = []
    for name, params in methods.items():
        hints = typing.get_type_hints(params)
        with gr.Group(visible=name == selected) as group:
            controls = [(f.name, control_for(f, hints[f.name])) for f in dataclasses.fields(params)]
        out.append(MethodControls(name, params, group, controls))
    return out


def params_from(groups: list[MethodControls], method: str, values: list[Any]) -> object:
    """The selected method's parameters dataclass from the flat list of every method's control values.

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
        if value is None:
            raise StudioError(f"{method}: {name} needs a value")
        kwargs[name] = hint(value) if hint in (int, float, bool, str) else value
    try:
        return chosen.params(**kwargs)
    except (TypeError, ValueError) as exc:
        raise StudioError(f"{method}: {exc}") from None
