"""What a composition method gets for one render, and the one signature every method's parameters share."""

from __future__ import annotations

import re
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from composer.adapters.host import AdapterHost
from composer.backbones.base import Backbone
from composer.errors import StudioError

if TYPE_CHECKING:
    from composer.gates import StoredGates


@dataclass(frozen=True)
class StackEntry:
    """One LoRA of a render's stack: its catalog name, its resident adapter name on the host, its weight."""

    name: str
    resident: str
    weight: float


@dataclass
class MethodRun:
    """One pipeline call's worth of context for a method.

    Attributes:
        stack: one StackEntry per LoRA, in the request's order.
        height, width: the size being rendered, in pixels.
        prompts: the call's prompts, one per request; each gives `images_per_prompt` samples, in order.
        triggers: catalog name -> the LoRA's trigger words.
        pictures: what the method shows beside the images (caption, PIL image), e.g. the masks it used.
        steps: the render's number of denoising steps.
        profiles: catalog name -> the LoRA's stored frequency profile ({"score", "radial"}, for this base
            model and file); a method that measures a missing one adds it here for the caller to store.
        step_end: hooks run after every denoising step as diffusers' `callback_on_step_end` runs them
            (pipe, step, timestep, tensors) -> tensors; the latents they return replace the pipeline's.
        gates: the stack's trained gates (gated fusion) stored for this set and base model, or None.
        report: what the method says about the call (JSON values), e.g. whether its gates were trained; the
            studio keeps it in the render's provenance (`method_report`).
    """

    pipe: Any
    backbone: Backbone
    host: AdapterHost
    stack: list[StackEntry]
    height: int
    width: int
    prompts: list[str] = field(default_factory=list)
    images_per_prompt: int = 1
    triggers: dict[str, list[str]] = field(default_factory=dict)
    pictures: list[tuple[str, Any]] = field(default_factory=list)
    step_end: list[Callable[[Any, int, Any, dict], dict]] = field(default_factory=list)
    steps: int = 0
    profiles: dict[str, dict] = field(default_factory=dict)
    gates: StoredGates | None = None
    report: dict[str, Any] = field(default_factory=dict)

    @property
    def scales(self) -> dict[str, float]:
        """Resident name -> weight: every LoRA of the stack active at its weight (a merge)."""
        return {entry.resident: entry.weight for entry in self.stack}


class CompositionParams(Protocol):
    """A method's parameters: a frozen dataclass of plain knobs (the API schema and UI controls come from its
    fields) that knows how to run its method.

    Parameters classes subclass this protocol (so they inherit `needs_grad`) and are frozen dataclasses.
    """

    needs_grad: ClassVar[bool] = False
    """The method takes gradients during the call: the render runs it under no_grad, not inference_mode (the
    method enables grad where it needs it). Read from the class before `apply`."""

    mixes_per_sample: ClassVar[bool] = False
    """Images of one pipeline call may each have their own LoRA stack (per-sample scales): requests that
    differ only in prompt, seed and LoRAs share a call (`composer.render.batch_key`)."""

    needs_profiles: ClassVar[bool] = False
    """The method orders LoRAs by their frequency profiles (`composer.frequency`): the caller passes the stored
    ones and stores those the method measured (`MethodRun.profiles`)."""

    needs_gates: ClassVar[bool] = False
    """The method fuses the stack through trained gates (`composer.gates`): the caller passes those stored for
    the set and base model (`MethodRun.gates`), if any."""

    needs_triggers: ClassVar[bool] = False
    """The method finds each LoRA's concept by its trigger words in the prompt: a request whose prompt lacks a
    LoRA's trigger word is refused when it is submitted (`missing_trigger`), not when it runs."""

    @property
    def one_prompt_per_call(self) -> bool:
        """These parameters render one prompt per pipeline call (requests of different prompts are not batched
        together)."""
        return False

    def check(self, stack: list[str]) -> None:
        """Raise StudioError naming what does not fit the request's LoRA stack (catalog names)."""
        ...

    def apply(self, run: MethodRun) -> AbstractContextManager[None]:
        """The method in effect for one pipeline call; everything it changes is undone on exit."""
        ...


def whole_word(word: str) -> re.Pattern:
    """`word` as a whole word anywhere in a text, case-insensitively (how prompts hold trigger words)."""
    return re.compile(rf"(?<!\w){re.escape(word)}(?!\w)", re.IGNORECASE)


def missing_trigger(method: str, prompt: str, triggers: dict[str, list[str]]) -> str | None:
    """Why a prompt cannot run with a method that finds LoRAs by their trigger words (naming the first LoRA
    that has none, or none in the prompt), or None. Words match whole and case-insensitively; the tokenizer's
    own check (a word cut off by the prompt's length) still runs with the render."""
    for name, words in triggers.items():
        if not words:
            return (
                f"{method} finds each LoRA's concept by its trigger words; {name!r} has none in the catalog"
            )
        if not any(whole_word(w).search(prompt) for w in words):
            shown = ", ".join(repr(w) for w in words)
            return f"{method}: the prompt does not contain {name!r}'s trigger word ({shown}); write it where {name!r}'s concept goes"
    return None


MAX_LINE_VALUE = 2000  # characters of one `name: value` line's value


def parse_named_lines(text: str, what: str, value: str = "word") -> dict[str, str]:
    """`name: value` per line (or separated by ";"), blank lines ignored -> {name: value}. `what` and `value`
    name the lines in errors ("region prompt", "prompt").

    Raises:
        StudioError: a line with no name or no value, a name given twice, or an overlong value (named).
    """
    out: dict[str, str] = {}
    for line in text.replace(";", "\n").splitlines():
        if not line.strip():
            continue
        name, colon, rest = line.partition(":")
        name, rest = name.strip(), rest.strip()
        if not colon or not name or not rest:
            raise StudioError(f"{what} {line.strip()!r}: write `name: its {value}`, one LoRA per line")
        if name in out:
            raise StudioError(f"{what}s: {name!r} is given twice")
        if len(rest) > MAX_LINE_VALUE:
            raise StudioError(f"{what} of {name!r} has {len(rest)} characters; at most {MAX_LINE_VALUE}")
        out[name] = rest
    return out
