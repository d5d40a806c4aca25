"""One render: a prompt and a LoRA stack through a pipeline whose adapters are resident on an AdapterHost."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from composer.adapters.host import AdapterHost
from composer.backbones.base import Backbone
from composer.errors import StudioError

Progress = Callable[[int, int], None]  # (step done, total steps)


@dataclass(frozen=True)
class LoraWeight:
    """A LoRA of the stack by catalog name, and its strength."""

    name: str
    weight: float = 1.0

    @classmethod
    def parse(cls, text: str) -> LoraWeight:
        """'NAME' or 'NAME:WEIGHT' (the weight is the text after the last colon)."""
        name, sep, weight = text.rpartition(":")
        if not sep:
            return cls(text.strip())
        try:
            return cls(name.strip(), float(weight))
        except ValueError:
            raise StudioError(f"LoRA weight in {text!r} is not a number") from None


@dataclass(frozen=True)
class RenderRequest:
    """What to draw. Field names follow the diffusers pipeline call."""

    prompt: str
    negative_prompt: str = ""
    num_inference_steps: int | None = None  # None: the backbone's default
    guidance_scale: float | None = None
    height: int | None = None  # None: the model's native size
    width: int | None = None
    seed: int = 0
    num_images: int = 1
    loras: tuple[LoraWeight, ...] = field(default_factory=tuple)

    def validate(self) -> None:
        if not self.prompt.strip():
            raise StudioError("prompt is empty")
        if self.num_inference_steps is not None and not 1 <= self.num_inference_steps <= 500:
            raise StudioError(f"num_inference_steps must be 1..500, got {self.num_inference_steps}")
        if not 1 <= self.num_images <= 16:
            raise StudioError(f"num_images must be 1..16, got {self.num_images}")
        for side in (self.height, self.width):
            if side is not None and (side < 8 or side > 4096 or side % 8):
                raise StudioError(f"height and width must be multiples of 8 in 8..4096, got {side}")
        names = [lw.name for lw in self.loras]
        if len(set(names)) != len(names):
            raise StudioError(f"a LoRA is listed twice: {names}")

    def to_dict(self) -> dict:
        return asdict(self)


def render(
    pipe,
    backbone: Backbone,
    host: AdapterHost,
    request: RenderRequest,
    adapter_names: dict[str, str] | None = None,
    progress: Progress | None = None,
):
    """Run the pipeline with the request's LoRAs active; returns PIL images.

    Args:
        adapter_names: catalog name -> resident adapter name on `host` (default: the same name).
        progress: called after every denoising step.
    """
    request.validate()
    adapter_names = adapter_names or {}
    scales = {adapter_names.get(lw.name, lw.name): lw.weight for lw in request.loras}
    steps = request.num_inference_steps or backbone.default_steps
    kwargs: dict = dict(
        prompt=request.prompt,
        num_inference_steps=steps,
        guidance_scale=backbone.default_guidance
        if request.guidance_scale is None
        else request.guidance_scale,
        height=request.height,
        width=request.width,
        num_images_per_prompt=request.num_images,
        generator=torch.Generator("cpu").manual_seed(request.seed),
    )
    accepted = inspect.signature(pipe.__call__).parameters
    if request.negative_prompt and "negative_prompt" in accepted:
        kwargs["negative_prompt"] = request.negative_prompt
    if "max_sequence_length" in accepted and getattr(pipe, "tokenizer_2", None) is not None:
        kwargs["max_sequence_length"] = min(512, pipe.tokenizer_2.model_max_length)
    if progress is not None:

        def on_step_end(_pipe, step, _timestep, callback_kwargs):
            progress(step + 1, steps)
            return callback_kwargs

        kwargs["callback_on_step_end"] = on_step_end
    with host.activate(scales), torch.inference_mode():
        return pipe(**kwargs).images
