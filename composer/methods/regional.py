"""regional: each LoRA acts inside its own painted region, with no bleeding into the others.

Every LoRA given a mask gets a denoising stream of its own (itself plus the unmasked LoRAs); the pixels no mask
covers get a stream of the unmasked LoRAs alone (the base model when every LoRA has a mask). All streams run in
one batched denoiser call per step and their noise predictions are blended by the masks (`streams`), the
multi-stream masked fusion of MultiDiffusion (Bar-Tal et al., 2023) and CLoRA, here with masks the user draws.
Cost: one denoiser pass per stream that covers some pixel. The text encoders see the whole stack (merge).

Regional prompts (`prompts`, one line `name: text` per painted LoRA) give a painted region a prompt of its own,
encoded with that region's LoRAs on the text encoders (the Regional Prompter / ComfyUI "conditioning set mask"
practice). `prompt_mode` "attention" (the default): the region's pixels read its prompt in every cross-attention
layer (`seams.attention.cross_attention_by_region`); "streams": that LoRA's stream is denoised with its prompt
instead of the whole one. The unconditional half of classifier-free guidance and unpainted pixels keep the
request's prompts.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from PIL import Image, ImageFilter

from composer.adapters.spatial import SpatialScale, TokenGeometry
from composer.backbones.base import Conditioning
from composer.errors import StudioError
from composer.masks import RegionMasks
from composer.methods.base import CompositionParams, MethodRun, parse_named_lines
from composer.seams.attention import cross_attention_by_region
from composer.seams.streams import denoise_in_one_pass, denoise_in_streams

MAX_FEATHER = 256


def parse_region_prompts(text: str) -> dict[str, str]:
    """`name: prompt` per line (or separated by ";") -> {name: prompt} (`parse_named_lines`)."""
    return parse_named_lines(text, "region prompt", "prompt")


@dataclass(frozen=True)
class RegionalParams(CompositionParams):
    """Masks by LoRA name (a LoRA of the stack without one acts everywhere) and their edge softness."""

    regions: RegionMasks = field(
        default_factory=RegionMasks,
        metadata={"help": "paint each LoRA's region in its colour; an unpainted LoRA acts everywhere"},
    )
    feather: int = field(
        default=0, metadata={"help": "blur the mask edges by this many pixels (0: hard edges)"}
    )
    passes: Literal["per-region", "single"] = field(
        default="per-region",
        metadata={
            "help": "per-region: one denoising stream per painted LoRA, blended by the masks; single: one pass, "
            "each LoRA's change masked inside every layer (cheaper with many regions)"
        },
    )
    prompts: str = field(
        default="",
        metadata={
            "help": "optional, one line per painted LoRA: `name: the prompt of its region` (empty: every "
            "region uses the whole prompt)",
            "lines": 3,
        },
    )
    prompt_mode: Literal["attention", "streams"] = field(
        default="attention",
        metadata={
            "help": "attention: each region's pixels read its prompt in every cross-attention layer (SDXL); "
            "streams: each painted LoRA's denoising stream runs on its region's prompt (any family)"
        },
    )

    def __post_init__(self):
        if not isinstance(self.feather, int) or not 0 <= self.feather <= MAX_FEATHER:
            raise StudioError(f"feather must be an integer in 0..{MAX_FEATHER}, got {self.feather!r}")
        if not isinstance(self.prompts, str):
            raise StudioError(f"prompts must be text (`name: prompt` per line), got {self.prompts!r}")
        if parse_region_prompts(self.prompts) and self.prompt_mode == "streams" and self.passes == "single":
            raise StudioError(
                "region prompts in streams mode need a stream per region: use passes=per-region, or "
                "prompt_mode=attention with passes=single"
            )

    def check(self, stack: list[str]) -> None:
        unknown = [n for n in self.regions.names() if n not in stack]
        if unknown:
            raise StudioError(
                f"regional: masks for LoRAs not in the stack: {', '.join(unknown)} "
                f"(stack: {', '.join(stack) or 'empty'})"
            )
        unpainted = [n for n in parse_region_prompts(self.prompts) if n not in self.regions.names()]
        if unpainted:
            raise StudioError(
                f"regional: a region prompt for {', '.join(unpainted)}, which has no painted region "
                f"(painted: {', '.join(self.regions.names()) or 'none'})"
            )

    def stream_masks(self, stack: list[str], height: int, width: int) -> list[tuple[str | None, np.ndarray]]:
        """(LoRA name or None for the rest, (height, width) float mask in 0..1) per stream that covers a pixel.

        Masks are stretched to the render's size, then feathered; the rest is what no mask covers.
        """
        self.check(stack)
        out: list[tuple[str | None, np.ndarray]] = []
        for name in stack:
            mask = self.regions.get(name)
            if mask is None:
                continue
            image = mask.to_image().resize((width, height), Image.Resampling.BILINEAR)
            if self.feather:
                image = image.filter(ImageFilter.GaussianBlur(self.feather))
            values = np.asarray(image, dtype=np.float32) / 255.0
            if values.any():
                out.append((name, values))
        covered = np.clip(sum((m for _, m in out), np.zeros((height, width), np.float32)), 0.0, 1.0)
        rest = 1.0 - covered
        if rest.max() > 1e-3:
            out.append((None, rest))
        return out

    @contextmanager
    def apply(self, run: MethodRun) -> Iterator[None]:
        catalog = [entry.name for entry in run.stack]
        resident = {entry.name: (entry.resident, entry.weight) for entry in run.stack}
        masked = set(self.regions.names())
        everywhere = {res: w for name, (res, w) in resident.items() if name not in masked}
        streams = self.stream_masks(catalog, run.height, run.width) if masked else []
        for name, values in streams:
            label = "no mask" if name is None else name
            run.pictures.append(
                (f"region: {label} ({values.mean():.0%})", Image.fromarray((values * 255).astype(np.uint8)))
            )
        with ExitStack() as stack:
            stack.enter_context(run.host.activate(run.scales))  # text encoders: the whole stack
            if masked:
                scales = [
                    {**everywhere, **({} if name is None else {resident[name][0]: resident[name][1]})}
                    for name, _ in streams
                ]
                masks = torch.from_numpy(np.stack([values for _, values in streams]))  # (S, H, W)
                grid = run.backbone.patch_grid(run.pipe, run.height, run.width)
                denoiser = getattr(run.pipe, run.backbone.denoiser)
                inputs = None
                texts = parse_region_prompts(self.prompts)
                if texts:
                    inputs = self.region_prompt_inputs(run, denoiser, streams, scales, texts, stack)
                if self.passes == "single":
                    geometry = TokenGeometry()
                    painted = {
                        resident[name][0]: SpatialScale(resident[name][1], torch.from_numpy(values), geometry)
                        for name, values in streams
                        if name is not None
                    }
                    stack.enter_context(
                        denoise_in_one_pass(
                            denoiser, run.host, {**everywhere, **painted}, geometry, grid, inputs=inputs
                        )
                    )
                else:
                    stack.enter_context(
                        denoise_in_streams(denoiser, run.host, scales, masks, grid, inputs=inputs)
                    )
            yield

    def region_prompt_inputs(
        self, run: MethodRun, denoiser, streams: list, scales: list[dict], texts: dict, stack
    ):
        """The streams' `inputs` hook that gives painted regions their prompts (entering, in attention mode, the
        cross-attention swap on `stack`). Each region prompt is encoded once, with its stream's LoRAs on the
        text encoders; the request's prompts are encoded too, to tell the conditional rows of a call."""
        prompted = [j for j, (name, _) in enumerate(streams) if name in texts]
        requested, encoded = encode_for_streams(run, [(scales[j], texts[streams[j][0]]) for j in prompted])
        if self.prompt_mode == "streams":
            own: list[Conditioning | None] = [None] * len(streams)
            for j, cond in zip(prompted, encoded, strict=True):
                own[j] = cond
            return swap_texts(run.backbone, requested, own)
        painted = torch.from_numpy(np.stack([streams[j][1] for j in prompted]))
        rest = (1.0 - painted.sum(dim=0)).clamp(min=0.0)
        latent = run.backbone.latent_size(run.pipe, run.height, run.width)
        stack.enter_context(
            cross_attention_by_region(run.backbone, denoiser, torch.cat([rest[None], painted]), latent)
        )
        return texts_side_by_side(run.backbone, requested, [cond.embeds for cond in encoded])


def encode_for_streams(
    run: MethodRun, texts: list[tuple[dict, str]]
) -> tuple[list[torch.Tensor], list[Conditioning]]:
    """The request's prompt embeddings, encoded with the whole stack as the pipeline encodes them (what tells a
    call's conditional rows: `conditional_rows`), and each (adapter set, text) encoded with that set on the
    text encoders."""
    device = getattr(run.pipe, "_execution_device", None) or torch.device("cpu")
    with torch.no_grad():
        requested = [run.backbone.encode_caption(run.pipe, p, device).embeds for p in run.prompts]
        encoded = []
        for scales, text in texts:
            with run.host.activate(scales):
                encoded.append(run.backbone.encode_caption(run.pipe, text, device))
    return requested, encoded


def conditional_rows(backbone, kwargs: dict, batch: int, requested: list[torch.Tensor]) -> torch.Tensor:
    """(batch,) bool: the rows of a denoiser call whose prompt embeddings are one of the request's prompts (the
    conditional rows; classifier-free guidance's unconditional rows carry the negative prompt)."""
    call = backbone.call_text(kwargs)[:batch].float()
    rows = torch.tensor(
        [any(torch.allclose(row, r[0].to(row), rtol=1e-3, atol=1e-3) for r in requested) for row in call]
    )
    if not bool(rows.any()):
        raise StudioError("region prompts: no row of the denoiser call carries the request's prompt")
    return rows


def swap_texts(backbone, requested: list[torch.Tensor], own: list[Conditioning | None]):
    """Streams mode: in stream j, the conditional rows get stream j's own text (None: the request's)."""

    def inputs(kwargs: dict, batch: int) -> dict:
        rows = torch.nonzero(conditional_rows(backbone, kwargs, batch, requested)).flatten()
        for j, cond in enumerate(own):
            if cond is not None:
                kwargs = backbone.with_text(kwargs, rows + j * batch, cond)
        return kwargs

    return inputs


def texts_side_by_side(backbone, requested: list[torch.Tensor], region_embeds: list[torch.Tensor]):
    """Attention mode: every row's text becomes [its own | region 1 | ...] along the tokens; a conditional row
    gets the region prompts, any other row its own text again (so its attention is unchanged)."""

    def inputs(kwargs: dict, batch: int) -> dict:
        text = backbone.call_text(kwargs)  # (streams * batch, tokens, dim)
        conditional = conditional_rows(backbone, kwargs, batch, requested).repeat(text.shape[0] // batch)
        chunks = [text]
        for embeds in region_embeds:
            if tuple(embeds.shape[1:]) != tuple(text.shape[1:]):
                raise StudioError(
                    f"a region prompt's {tuple(embeds.shape[1:])} do not fit {tuple(text.shape[1:])}"
                )
            chunks.append(torch.where(conditional[:, None, None].to(text.device), embeds.to(text), text))
        return {**kwargs, "encoder_hidden_states": torch.cat(chunks, dim=1)}

    return inputs
