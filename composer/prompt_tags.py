"""A1111-style LoRA prompt tags: `<lora:NAME:WEIGHT>` in a prompt activates that catalog LoRA at that weight.

As in A1111, Forge and SD.Next, a tag is removed from the text the encoders see, and `<lora:NAME>` means weight
1.0. What those tools accept beyond one weight (a second, UNet-only weight; `te=` / `unet=` / `dyn=` options) is
refused rather than half-honoured: our stack has one weight per LoRA. Torch-free: `RenderRequest` reads prompts
through `parse_prompt_tags`, so every front end (CLI, REST, studio) gets the same rule.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from composer.errors import StudioError

_OPEN = re.compile(r"<lora:", re.IGNORECASE)
_SPACE = re.compile(r"\s+")


@dataclass(frozen=True)
class PromptTag:
    """One `<lora:...>` tag as written in the prompt, and what it asks for."""

    name: str
    weight: float
    text: str  # the tag as written, e.g. "<lora:ink:0.8>"


@dataclass(frozen=True)
class TaggedPrompt:
    """A prompt with its LoRA tags removed (whitespace collapsed where tags were), and the tags in order."""

    text: str
    tags: tuple[PromptTag, ...]


def _tag(text: str) -> PromptTag:
    body = text[len("<lora:") : -1]
    name, *weights = (part.strip() for part in body.split(":"))
    if not name:
        raise StudioError(f"prompt tag {text!r} names no LoRA; write <lora:NAME:WEIGHT>")
    if len(weights) > 1:
        raise StudioError(
            f"prompt tag {text!r} has {len(weights)} weights; one weight per LoRA is supported "
            "(separate text-encoder and UNet weights are not)"
        )
    if not weights:
        return PromptTag(name, 1.0, text)  # A1111: <lora:NAME> is weight 1
    try:
        weight = float(weights[0])
    except ValueError:
        raise StudioError(f"prompt tag {text!r}: weight {weights[0]!r} is not a number") from None
    if not math.isfinite(weight):
        raise StudioError(f"prompt tag {text!r}: weight must be finite")
    return PromptTag(name, weight, text)


def parse_lora_weight(text: str) -> tuple[str, float]:
    """'NAME' or 'NAME:WEIGHT' (the weight is the text after the last colon), as `--lora` writes a stack entry.

    Raises:
        StudioError: the weight is not a number.
    """
    name, sep, weight = text.rpartition(":")
    if not sep:
        return text.strip(), 1.0
    try:
        return name.strip(), float(weight)
    except ValueError:
        raise StudioError(f"LoRA weight in {text!r} is not a number") from None


def parse_prompt_tags(prompt: str) -> TaggedPrompt:
    """Split a prompt into its text and its `<lora:NAME[:WEIGHT]>` tags (the "lora" word in any case).

    Raises:
        StudioError: a malformed tag (unclosed, nested, no name, a weight that is not a number, several
            weights) or two tags naming the same LoRA, each naming the tag as written.
    """
    pieces: list[str] = []
    tags: list[PromptTag] = []
    seen: dict[str, PromptTag] = {}
    end = 0
    for match in _OPEN.finditer(prompt):
        start = match.start()
        close = prompt.find(">", start)
        inner = prompt.find("<", start + 1)
        if close < 0:
            raise StudioError(f"prompt tag {prompt[start : start + 40]!r} is not closed with '>'")
        if 0 <= inner < close:
            raise StudioError(f"prompt tags cannot nest: {prompt[start : close + 1]!r}")
        tag = _tag(prompt[start : close + 1])
        if tag.name in seen:
            raise StudioError(f"prompt tags {seen[tag.name].text!r} and {tag.text!r} name the same LoRA")
        seen[tag.name] = tag
        tags.append(tag)
        pieces.append(prompt[end:start])
        end = close + 1
    if not tags:
        return TaggedPrompt(prompt, ())
    pieces.append(prompt[end:])
    return TaggedPrompt(_SPACE.sub(" ", " ".join(pieces)).strip(), tuple(tags))


def has_prompt_tag(text: str) -> bool:
    """Whether `text` holds anything starting like a LoRA tag."""
    return _OPEN.search(text) is not None


__all__ = ["PromptTag", "TaggedPrompt", "has_prompt_tag", "parse_prompt_tags"]
