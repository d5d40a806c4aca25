"""Rendering: prompts and a LoRA stack through a pipeline whose adapters are resident on an AdapterHost."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from composer.adapters.host import AdapterHost
from composer.backbones.base import Backbone
from composer.errors import StudioError
from composer.gates import StoredGates
from composer.methods import (
    METHODS,
    MethodRun,
    StackEntry,
    method_name,
    params_class,
    params_from_json,
    params_to_json,
)
from composer.prompt_tags import has_prompt_tag, parse_lora_weight, parse_prompt_tags
from composer.seams.streams import each_call_with

Progress = Callable[[int, int], None]  # (step done, total steps)


@dataclass(frozen=True)
class LoraWeight:
    """A LoRA of the stack by catalog name, and its strength."""

    name: str
    weight: float = 1.0

    @classmethod
    def parse(cls, text: str) -> LoraWeight:
        """'NAME' or 'NAME:WEIGHT' (the weight is the text after the last colon)."""
        return cls(*parse_lora_weight(text))


MAX_LORA_WEIGHT = 20.0  # |weight| above this only burns the image (A1111 and ComfyUI users stay within +-5)


@dataclass(frozen=True)
class RenderRequest:
    """What to draw. Field names follow the diffusers pipeline call.

    `<lora:NAME:WEIGHT>` tags in the prompt (A1111's syntax, `composer.prompt_tags`) are taken out of the text and
    join the LoRA stack after the explicit entries; an explicit entry for the same LoRA wins (its weight is
    used). The tags as parsed stay in `prompt_tags` for the provenance.
    """

    prompt: str
    negative_prompt: str = ""
    num_inference_steps: int | None = None  # None: the backbone's default
    guidance_scale: float | None = None
    height: int | None = None  # None: the model's native size
    width: int | None = None
    seed: int = 0
    num_images: int = 1
    loras: tuple[LoraWeight, ...] = field(default_factory=tuple)
    method: str = "merge"  # a composer.methods name
    method_params: Any = None  # that method's parameters dataclass; None: its defaults
    prompt_tags: tuple[LoraWeight, ...] = field(
        default=(), init=False
    )  # the prompt's <lora:...> tags, parsed

    def __post_init__(self):
        if self.method_params is None and self.method in METHODS:  # one value for "the defaults"
            object.__setattr__(self, "method_params", METHODS[self.method]())
        tagged = parse_prompt_tags(self.prompt)
        if tagged.tags:
            tags = tuple(LoraWeight(tag.name, tag.weight) for tag in tagged.tags)
            explicit = {lw.name for lw in self.loras}
            object.__setattr__(self, "prompt", tagged.text)
            object.__setattr__(self, "prompt_tags", tags)
            object.__setattr__(self, "loras", self.loras + tuple(t for t in tags if t.name not in explicit))

    def megapixel_steps(self, backbone: Backbone) -> float:
        """What the request costs to run: width x height (in megapixels) x steps x images, with the backbone's
        defaults (`nominal_size`, `default_steps`) where the request leaves them out."""
        side = backbone.nominal_size
        pixels = (self.width or side) * (self.height or side) / 1e6
        return pixels * (self.num_inference_steps or backbone.default_steps) * self.num_images

    def params(self):
        """The composition method's parameters (its defaults when none were given)."""
        return params_class(self.method)() if self.method_params is None else self.method_params

    def validate(self) -> None:
        if not self.prompt.strip():
            raise StudioError(
                "prompt is empty" + (" once its LoRA tags are taken out" if self.prompt_tags else "")
            )
        if has_prompt_tag(self.negative_prompt):
            raise StudioError("LoRA tags (<lora:...>) are read from the prompt only, not the negative prompt")
        if self.num_inference_steps is not None and not 1 <= self.num_inference_steps <= 500:
            raise StudioError(f"num_inference_steps must be 1..500, got {self.num_inference_steps}")
        if not 1 <= self.num_images <= 16:
            raise StudioError(f"num_images must be 1..16, got {self.num_images}")
        for side in (self.height, self.width):
            if side is not None and (side < 8 or side > 4096 or side % 8):
                raise StudioError(f"height and width must be multiples of 8 in 8..4096, got {side}")
        for lw in self.loras:
            if not abs(lw.weight) <= MAX_LORA_WEIGHT:  # NaN fails this too
                raise StudioError(
                    f"LoRA {lw.name!r}: weight {lw.weight} is out of range -{MAX_LORA_WEIGHT:g}..{MAX_LORA_WEIGHT:g} "
                    "(1 is the LoRA as trained)"
                )
        names = [lw.name for lw in self.loras]
        if len(set(names)) != len(names):
            raise StudioError(f"a LoRA is listed twice: {names}")
        params_class(self.method)
        if self.method_params is not None and method_name(self.method_params) != self.method:
            raise StudioError(
                f"parameters of {method_name(self.method_params)!r} given for method {self.method!r}"
            )
        self.params().check(names)

    def to_json(self) -> dict[str, Any]:
        """JSON of the request (LoRAs as {name, weight}, method parameters as `params_to_json` writes them)."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.init}
        out["loras"] = [{"name": lw.name, "weight": lw.weight} for lw in self.loras]
        out["method_params"] = params_to_json(self.params())
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RenderRequest:
        """A request from JSON (REST bodies, stored jobs): what `to_json` writes; absent fields default.

        Raises:
            StudioError: an unknown field, a malformed LoRA entry or bad method parameters (named).
        """
        known = [f.name for f in fields(cls) if f.init]
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise StudioError(f"unknown request fields {', '.join(unknown)}; expected {', '.join(known)}")
        try:
            loras = tuple(LoraWeight(**entry) for entry in data.get("loras") or ())
        except TypeError as exc:
            raise StudioError(f"a LoRA entry must be {{name, weight}}: {exc}") from None
        method = data.get("method") or "merge"
        params = params_from_json(method, data.get("method_params"))
        return cls(**{**data, "loras": loras, "method": method, "method_params": params})


def batch_key(request: RenderRequest) -> tuple | None:
    """What requests must share to render in one pipeline call (`render_batch`); None: never batched.

    A request of several images stays alone: one generator drawing n latents does not give the numbers of
    n generators, so its images would change if it were merged with others. A method that mixes per sample
    (merge) shares a call between requests whose LoRAs differ (`render_batch`); parameters that say
    `one_prompt_per_call` (clora's per-lora prompts) share one only between requests of the same prompt.
    """
    if request.num_images != 1:
        return None
    params = request.params()
    return (
        "per image" if type(params).mixes_per_sample else request.loras,  # merge: each image its own LoRAs
        request.method,
        params,
        request.negative_prompt,
        request.num_inference_steps,
        request.guidance_scale,
        request.height,
        request.width,
        request.prompt if getattr(params, "one_prompt_per_call", False) else None,
    )


def sampling_defaults(request: RenderRequest, backbone: Backbone) -> tuple[int, float]:
    """(steps, guidance scale) a request renders with: its own, or the backbone's defaults where it has none."""
    steps = request.num_inference_steps or backbone.default_steps
    guidance = backbone.default_guidance if request.guidance_scale is None else request.guidance_scale
    return steps, guidance


def render(
    pipe,
    backbone: Backbone,
    host: AdapterHost,
    request: RenderRequest,
    adapter_names: dict[str, str] | None = None,
    progress: Progress | None = None,
    triggers: Mapping[str, Sequence[str]] | None = None,
):
    """Run the pipeline with the request's LoRAs active; returns PIL images.

    Args:
        adapter_names: catalog name -> resident adapter name on `host` (default: the same name).
        progress: called after every denoising step.
        triggers: catalog name -> trigger words (methods that find LoRAs' concepts in the prompt need them).
    """
    return render_batch(pipe, backbone, host, [request], adapter_names, progress, triggers=triggers)


def render_batch(
    pipe,
    backbone: Backbone,
    host: AdapterHost,
    requests: Sequence[RenderRequest],
    adapter_names: dict[str, str] | None = None,
    progress: Progress | None = None,
    pictures: list | None = None,
    triggers: Mapping[str, Sequence[str]] | None = None,
    profiles: dict[str, dict] | None = None,
    gates: StoredGates | None = None,
    report: dict | None = None,
):
    """Render several requests of one `batch_key` in one pipeline call: a list of prompts, and one generator
    per request seeded with its seed (diffusers draws each sample's latents from its own generator). Returns
    PIL images in request order (`num_images` of each; a batch of several holds single-image requests only).
    The composition method's pictures (e.g. the masks it used: (caption, PIL image)) go into `pictures`;
    `triggers` (catalog name -> trigger words) is what methods that look for concepts in the prompt read;
    `profiles` (catalog name -> stored frequency profile) what cmlora orders by: profiles it measures during the
    call are added to that same dict; `gates` the stack's stored trained gates (gated); what the method reports
    about the call goes into `report`.

    Raises:
        StudioError: no requests, an invalid one, or requests that cannot share a call.
    """
    if not requests:
        raise StudioError("no requests to render")
    for request in requests:
        request.validate()
    first = requests[0]
    if len(requests) > 1 and (
        batch_key(first) is None or any(batch_key(r) != batch_key(first) for r in requests[1:])
    ):
        raise StudioError("requests rendered in one call must share LoRAs, settings and size, one image each")
    single = len(requests) == 1
    adapter_names = adapter_names or {}
    mixed = len({r.loras for r in requests}) > 1  # a merge batch whose images have their own LoRAs
    steps, guidance = sampling_defaults(first, backbone)
    generators = [torch.Generator("cpu").manual_seed(r.seed) for r in requests]
    kwargs: dict = dict(
        prompt=first.prompt if single else [r.prompt for r in requests],
        num_inference_steps=steps,
        guidance_scale=guidance,
        height=first.height,
        width=first.width,
        num_images_per_prompt=first.num_images,
        generator=generators[0] if single else generators,
    )
    accepted = inspect.signature(pipe.__call__).parameters
    if first.negative_prompt and "negative_prompt" in accepted:
        kwargs["negative_prompt"] = first.negative_prompt if single else [r.negative_prompt for r in requests]
    if "max_sequence_length" in accepted and getattr(pipe, "tokenizer_2", None) is not None:
        # the length training and regional prompts encode at
        kwargs["max_sequence_length"] = backbone.prompt_length(pipe)
    run = MethodRun(
        pipe,
        backbone,
        host,
        []
        if mixed
        else [StackEntry(lw.name, adapter_names.get(lw.name, lw.name), lw.weight) for lw in first.loras],
        first.height or backbone.native_size(pipe),
        first.width or backbone.native_size(pipe),
        prompts=[r.prompt for r in requests],
        images_per_prompt=first.num_images,
        triggers={name: list(words) for name, words in (triggers or {}).items()},
        steps=steps,
        profiles=profiles if profiles is not None else {},
        gates=gates,
    )

    def on_step_end(step_pipe, step, timestep, tensors):
        for hook in run.step_end:
            tensors = hook(step_pipe, step, timestep, tensors)
        if progress is not None:
            progress(step + 1, steps)
        return tensors

    kwargs["callback_on_step_end"] = on_step_end
    params = first.params()
    grad_mode = torch.no_grad() if type(params).needs_grad else torch.inference_mode()
    method = per_sample_merge(pipe, backbone, host, requests, adapter_names) if mixed else params.apply(run)
    with method, grad_mode:
        images = pipe(**kwargs).images
    if pictures is not None:
        pictures.extend(run.pictures)
    if report is not None:
        report.update(run.report)
    if len(images) != len(requests) * first.num_images:
        raise StudioError(f"the pipeline returned {len(images)} images for {len(requests)} requests")
    return images


@contextmanager
def per_sample_merge(
    pipe, backbone: Backbone, host: AdapterHost, requests, adapter_names: dict
) -> Iterator[None]:
    """A merge whose images each have their own LoRAs and weights, in one denoiser pass per step: the rows of
    every denoiser and text-encoder call are the requests in order (once per half of classifier-free guidance,
    or per prompt list the pipeline encodes: row r is request r mod n), and each resident LoRA gets a per-row
    scale, so each image's prompt is also encoded under its own LoRAs."""
    n = len(requests)
    weights = [{adapter_names.get(lw.name, lw.name): lw.weight for lw in r.loras} for r in requests]
    names = sorted({name for w in weights for name in w})
    cache: dict[int, dict[str, torch.Tensor]] = {}

    def scales(batch: int) -> dict[str, torch.Tensor]:
        if batch % n:
            raise StudioError(f"a denoiser call of {batch} rows for {n} requests")
        if batch not in cache:
            cache[batch] = {
                name: torch.tensor([weights[row % n].get(name, 0.0) for row in range(batch)])
                for name in names
            }
        return cache[batch]

    with ExitStack() as stack:
        for component in (backbone.denoiser, *backbone.text_encoders):
            stack.enter_context(each_call_with(getattr(pipe, component), host, scales))
        yield
