"""Small conversions shared by the studio's tabs."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import gradio as gr

from composer.errors import StudioError
from db.errors import CatalogError

T = TypeVar("T")


@contextmanager
def user_errors() -> Iterator[None]:
    """Project errors (bad input, unknown LoRA, refused file) reach the browser as their one-line message."""
    try:
        yield
    except (StudioError, CatalogError) as exc:
        raise gr.Error(str(exc), print_exception=False) from exc


def optional(kind: Callable[[Any], T], value: Any) -> T | None:
    """None for an empty field, else the value converted (int or float)."""
    return None if value is None or value == "" else kind(value)


def count(value: Any) -> int | None:
    """A step count or size from a number field; empty or 0 means "the default" (None): browsers show an
    empty number field as 0."""
    return optional(int, value) or None


def rows_of(value: Any) -> list[list[Any]]:
    """Rows of a Dataframe value however it arrives: a pandas DataFrame (the browser), a list of lists, or
    the `{"headers", "data"}` dict that API clients send."""
    if value is None:
        return []
    if isinstance(value, dict):
        value = value.get("data") or []
    if hasattr(value, "values") and hasattr(value, "columns"):  # pandas.DataFrame
        value = value.values.tolist()
    return [list(row) for row in value]
