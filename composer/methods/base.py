"""What a composition method gets for one render, and the one signature every method's parameters share."""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol

from composer.adapters.host import AdapterHost
from composer.backbones.base import Backbone


@dataclass
class MethodRun:
    """One pipeline call's worth of context for a method.

    Attributes:
        stack: (catalog name, resident adapter name on `host`, weight) per LoRA, in the request's order.
        height, width: the size being rendered, in pixels.
        pictures: what the method shows beside the images (caption, PIL image), e.g. the masks it used.
    """

    pipe: Any
    backbone: Backbone
    host: AdapterHost
    stack: list[tuple[str, str, float]]
    height: int
    width: int
    pictures: list[tuple[str, Any]] = field(default_factory=list)

    @property
    def scales(self) -> dict[str, float]:
        """Resident name -> weight: every LoRA of the stack active at its weight (a merge)."""
        return {resident: weight for _, resident, weight in self.stack}


class CompositionParams(Protocol):
    """A method's parameters: a frozen dataclass of plain knobs (the API schema and UI controls come from its
    fields) that knows how to run its method."""

    def check(self, stack: list[str]) -> None:
        """Raise StudioError naming what does not fit the request's LoRA stack (catalog names)."""
        ...

    def apply(self, run: MethodRun) -> AbstractContextManager[None]:
        """The method in effect for one pipeline call; everything it changes is undone on exit."""
        ...
