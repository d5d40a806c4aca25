"""Composition methods: how several LoRAs act together in one render. One file per method, one registry line
each. A method's knobs are the fields of its frozen parameters dataclass (STYLE rule 3): the UI controls are
built from them, the API takes them as JSON (`params_from_json`), and the dataclass runs its method
(`CompositionParams.apply`). Knob types: bool, int, float, str, a Literal, or `composer.masks.RegionMasks`. A method that takes
gradients says so with `needs_grad = True` on its parameters class. The mechanisms methods share (the
multi-stream blend, attention capture) live in `composer.seams`."""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Literal

from composer.errors import StudioError
from composer.masks import MaskError, RegionMasks
from composer.methods.base import CompositionParams, MethodRun, StackEntry, missing_trigger
from composer.methods.clora import CLoRAParams
from composer.methods.cmlora import CMLoRAParams
from composer.methods.composite import CompositeParams
from composer.methods.gated import GatedParams
from composer.methods.merge import MergeParams
from composer.methods.regional import RegionalParams
from composer.methods.switch import SwitchParams

METHODS: dict[str, type] = {
    "merge": MergeParams,
    "switch": SwitchParams,
    "composite": CompositeParams,
    "cmlora": CMLoRAParams,
    "regional": RegionalParams,
    "clora": CLoRAParams,
    "gated": GatedParams,
}


def params_class(method: str) -> type:
    """The parameters dataclass of a registered method. Raises StudioError naming the choices."""
    try:
        return METHODS[method]
    except KeyError:
        raise StudioError(f"unknown composition method {method!r}; choose {', '.join(METHODS)}") from None


def params_from_json(method: str, data: dict[str, Any] | None) -> CompositionParams:
    """A method's parameters from JSON (REST bodies, stored jobs); absent knobs take their defaults.

    Raises:
        StudioError: an unknown method or knob, or a value of the wrong type (named).
    """
    cls = params_class(method)
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise StudioError(
            f"{method} has no parameter {', '.join(unknown)} (it has: {', '.join(known) or 'none'})"
        )
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        where = f"{method}.{name}"
        if hint is RegionMasks:
            try:
                kwargs[name] = RegionMasks.from_json(value)
            except MaskError as exc:
                raise StudioError(f"{where}: {exc}") from None
        elif typing.get_origin(hint) is Literal:
            if value not in typing.get_args(hint):
                raise StudioError(f"{where} must be one of {typing.get_args(hint)}, got {value!r}")
            kwargs[name] = value
        elif hint is float and isinstance(value, int | float) and not isinstance(value, bool):
            kwargs[name] = float(value)
        elif hint in (int, bool, str) and type(value) is hint:
            kwargs[name] = value
        else:
            raise StudioError(f"{where} must be {getattr(hint, '__name__', hint)}, got {value!r}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise StudioError(f"{method}: {exc}") from None


def params_to_json(params: object) -> dict[str, Any]:
    """The knobs of a parameters dataclass as JSON (masks as PNG data URLs): what `params_from_json` reads."""
    out = {}
    for f in dataclasses.fields(params):
        value = getattr(params, f.name)
        out[f.name] = value.to_json() if isinstance(value, RegionMasks) else value
    return out


def method_name(params: object) -> str:
    """The registry name of a parameters object."""
    for name, cls in METHODS.items():
        if type(params) is cls:
            return name
    raise StudioError(f"{type(params).__name__} is not a registered method's parameters")


__all__ = [
    "METHODS",
    "CLoRAParams",
    "CMLoRAParams",
    "CompositeParams",
    "CompositionParams",
    "GatedParams",
    "MergeParams",
    "MethodRun",
    "RegionalParams",
    "StackEntry",
    "SwitchParams",
    "method_name",
    "missing_trigger",
    "params_class",
    "params_from_json",
    "params_to_json",
]
