"""What a composition method gets for one render, and the one signature every method's parameters share."""

from __future__ import annotations

from collections.abc import Callable
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
        prompts: the call's prompts, one per request; each gives `images_per_prompt` samples, in order.
        triggers: catalog name -> the LoRA's trigger words.
        pictures: what the method shows beside the images (caption, PIL image), e.g. the masks it used.
        step_end: hooks run after every denoising step as diffusers' `callback_on_step_end` runs them
            (pipe, step, timestep, tensors) -> tensors; the latents they return replace the pipeline's.
        needs_grad: the method takes gradients during the call (the call runs under no_grad, not
            inference_mode, and the method enables grad where it needs it).
    """

    pipe: Any
    backbone: Backbone
    host: AdapterHost
    stack: list[tuple[str, str, float]]
    height: int
    width: int
    prompts: list[str] = field(default_factory=list)
    images_per_prompt: int = 1
    triggers: dict[str, list[str]] = field(default_factory=dict)
    pictures: list[tuple[str, Any]] = field(default_factory=list)
    step_end: list[Callable[[Any, int, Any, dict], dict]] = field(default_factory=list)
    needs_grad: bool = False

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
