"""Denoising in streams: every denoiser call runs once per stream (each stream its own set of active
adapters), all streams in one batched forward, and the streams' predictions are blended by per-pixel weights.

The seam regional masks use (and LoRA Composite's average and CLoRA's mask fusion are the same blend with other
weights): eps = sum_j M_j eps_j / sum_j M_j, applied to whatever batch the pipeline sends (both halves of
classifier-free guidance alike), before guidance and the scheduler step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F

from composer.adapters.base import Scale
from composer.adapters.host import AdapterHost
from composer.adapters.spatial import TokenGeometry
from composer.errors import StudioError

# arguments the denoiser takes with no batch dimension (FLUX's position ids), never repeated per stream
_UNBATCHED = frozenset({"img_ids", "txt_ids"})


def blend_weights(masks: torch.Tensor, shape: torch.Size, grid: tuple[int, int] | None) -> torch.Tensor:
    """Per-stream weights shaped to broadcast over a denoiser output of `shape`, summing to 1 at every pixel.

    Args:
        masks: (S, H, W) non-negative stream masks at any resolution (each pixel covered by some stream), the
            same for every sample, or (S, B, H, W), one per sample of the output's batch.
        shape: the output's shape: (B, C, h, w) for a UNet, (B, seq, C) for FLUX's packed 2x2 patches.
        grid: (rows, cols) of the packed patches, for a 3-d output.

    Returns:
        (S, b, 1, h, w) or (S, b, seq, 1), b = 1 or B.
    """
    if len(shape) == 4:
        size = tuple(shape[-2:])
    elif len(shape) == 3:
        if grid is None or grid[0] * grid[1] != shape[1]:
            raise StudioError(f"packed output {tuple(shape)} does not match the latent grid {grid}")
        size = grid
    else:
        raise StudioError(f"cannot blend a denoiser output of shape {tuple(shape)}")
    per_sample = masks if masks.ndim == 4 else masks[:, None]  # (S, b, H, W)
    streams, b = per_sample.shape[:2]
    flat = per_sample.reshape(streams * b, 1, *per_sample.shape[2:]).float()
    resized = F.interpolate(flat, size=size, mode="area").reshape(streams, b, *size)
    total = resized.sum(dim=0, keepdim=True)
    if bool((total <= 0).any()):
        raise StudioError("some pixels belong to no stream")
    weights = resized / total
    if len(shape) == 4:
        return weights[:, :, None]  # (S, b, 1, h, w)
    return weights.reshape(streams, b, -1, 1)  # (S, b, seq, 1)


def map_batched(value: Any, batch: int, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """`fn` applied to every tensor of a call argument whose first dimension is the batch (nested dicts too,
    like SDXL's `added_cond_kwargs`); anything else as it is."""
    if isinstance(value, torch.Tensor) and value.ndim >= 1 and value.shape[0] == batch:
        return fn(value)
    if isinstance(value, dict):
        return {k: map_batched(v, batch, fn) for k, v in value.items()}
    return value


def call_latents(args: tuple, kwargs: dict) -> torch.Tensor:
    """The (B, ...) latents of a denoiser call: UNets take them first, FLUX by name."""
    key = next((k for k in ("sample", "hidden_states") if k in kwargs), None)
    return kwargs[key] if key else args[0]


def _repeat(value: Any, batch: int, times: int) -> Any:
    return map_batched(value, batch, lambda tensor: torch.cat([tensor] * times))


@contextmanager
def denoise_in_streams(
    denoiser: torch.nn.Module,
    host: AdapterHost,
    streams: Sequence[Mapping[str, float]],
    masks: torch.Tensor | Callable[[int], torch.Tensor],
    grid: tuple[int, int] | None = None,
    on_call: Callable[[tuple, dict], None] | None = None,
    inputs: Callable[[dict, int], dict] | None = None,
) -> Iterator[None]:
    """While the block runs, every `denoiser(...)` call returns the mask-weighted blend of its streams.

    Args:
        denoiser: the pipeline's unet or transformer (its forward is replaced, then put back).
        host: the AdapterHost on the pipeline; its active set is replaced per call, then put back.
        streams: per stream, adapter name -> scale (an empty mapping: the base model).
        masks: (S, H, W) the streams' regions, any resolution; resized to the output by area. Or a function
            of the call's batch size, asked after the streams ran (their attention read), that returns the
            regions for this call: (S, H, W) or (S, batch, H, W) (CLoRA's masks change every step).
        grid: (rows, cols) of FLUX's packed latent patches.
        on_call: called after each blended call with the call's own (args, kwargs), before any repeat.
        inputs: (kwargs repeated per stream, the call's batch) -> the kwargs the streams run with: rows
            j * batch ... (j + 1) * batch are stream j's (regional prompts give a stream its own text).
    """
    fixed = isinstance(masks, torch.Tensor)
    if not streams or (fixed and masks.shape[0] != len(streams)):
        raise StudioError(f"{len(streams)} streams for {masks.shape[0] if fixed else '?'} masks")
    original = denoiser.forward
    cache: dict[tuple, object] = {}  # every step asks for the same scales and weights: build them once

    def scales_for(batch: int, device) -> dict[str, Scale]:
        key = ("scales", batch, device)
        if key not in cache:
            cache[key] = stream_scales(streams, batch, device)
        return cache[key]

    def weights_for(sample: torch.Tensor, batch: int) -> torch.Tensor:
        shape = sample[:batch].shape
        if not fixed:
            regions = masks(batch)
            if regions.shape[0] != len(streams):
                raise StudioError(f"{len(streams)} streams for {regions.shape[0]} masks")
            return blend_weights(regions.to(sample.device), shape, grid).to(sample.dtype)
        key = ("weights", shape, sample.device, sample.dtype)
        if key not in cache:
            cache[key] = blend_weights(masks.to(sample.device), shape, grid).to(sample.dtype)
        return cache[key]

    def forward(*call_args, **call_kwargs):
        batch = call_latents(call_args, call_kwargs).shape[0]
        out, stacked = call_in_streams(
            original, host, len(streams), scales_for, call_args, call_kwargs, inputs
        )
        blended = (stacked * weights_for(stacked[0], batch)).sum(dim=0)
        if on_call is not None:
            on_call(call_args, call_kwargs)
        return with_sample(out, blended)

    with shadow_forward(denoiser, forward):
        yield


def stream_scales(streams: Sequence[Mapping[str, float]], batch: int, device) -> dict[str, Scale]:
    """Per-sample scales for a call of `len(streams)` x `batch` rows: stream j's adapters on its rows only. One
    stream is the whole call: plain numbers (the adapter layer's fastest path)."""
    if len(streams) == 1:
        return {name: float(scale) for name, scale in streams[0].items()}
    names = sorted({n for s in streams for n in s})
    return {
        name: torch.tensor([float(s.get(name, 0.0)) for s in streams for _ in range(batch)], device=device)
        for name in names
    }


def call_in_streams(
    original: Callable,
    host: AdapterHost,
    count: int,
    scales_for: Callable[[int, torch.device], Mapping[str, Scale]],
    call_args: tuple,
    call_kwargs: dict,
    inputs: Callable[[dict, int], dict] | None = None,
) -> tuple[Any, torch.Tensor]:
    """One denoiser call run as `count` streams in one batched forward: the call's inputs repeated per stream,
    the host's active set `scales_for(batch, device)` (per-sample scales: stream j owns rows j * batch ...
    (j + 1) * batch) while it runs. Returns the raw output and the streams' predictions, (count, batch, ...)."""
    hidden = call_latents(call_args, call_kwargs)
    batch = hidden.shape[0]
    args = tuple(_repeat(a, batch, count) for a in call_args)
    kwargs = {k: (v if k in _UNBATCHED else _repeat(v, batch, count)) for k, v in call_kwargs.items()}
    if inputs is not None:
        kwargs = inputs(kwargs, batch)
    with host.activate(scales_for(batch, hidden.device)):
        out = original(*args, **kwargs)
    sample = out[0] if isinstance(out, tuple) else out.sample
    return out, sample.reshape(count, batch, *sample.shape[1:])


def with_sample(out: Any, sample: torch.Tensor) -> Any:
    """A denoiser's output (a tuple, or an output object) with its sample replaced."""
    if isinstance(out, tuple):
        return (sample, *out[1:])
    out.sample = sample
    return out


@contextmanager
def shadow_forward(denoiser: torch.nn.Module, forward: Callable) -> Iterator[None]:
    """`denoiser.forward` is `forward` while the block runs, then what it was (the class's own, or someone's
    hook such as accelerate's offload, put back)."""
    original = denoiser.forward
    patched_before = "forward" in vars(denoiser)
    denoiser.forward = forward
    try:
        yield
    finally:
        if patched_before:
            denoiser.forward = original
        else:
            del denoiser.forward  # the class's forward shows through again


@contextmanager
def each_call_with(
    module: torch.nn.Module, host: AdapterHost, scales: Callable[[int], Mapping[str, Scale]]
) -> Iterator[None]:
    """While the block runs, every `module(...)` call (a denoiser, or a text encoder: its batch is its first
    argument) runs with the adapter set `scales(batch)` returns for it at that moment (LoRA Switch's set of
    the step; per-sample scales of a batch whose images have their own LoRAs); the host's active set is put
    back after."""
    original = module.forward

    def forward(*args, **kwargs):
        with host.activate(scales(call_latents(args, kwargs).shape[0])):
            return original(*args, **kwargs)

    with shadow_forward(module, forward):
        yield


@contextmanager
def denoise_in_one_pass(
    denoiser: torch.nn.Module,
    host: AdapterHost,
    scales: Mapping[str, Scale],
    geometry: TokenGeometry,
    grid: tuple[int, int] | None = None,
    inputs: Callable[[dict, int], dict] | None = None,
) -> Iterator[None]:
    """While the block runs, every `denoiser(...)` call runs once with `scales` (region-masked scales among
    them: `composer.adapters.spatial`), after `geometry` is told the call's latent grid and text length.

    Args:
        grid: (rows, cols) of FLUX's packed latent patches; None: the latents' own (h, w) (a UNet).
        inputs: (kwargs, batch) -> the kwargs the call runs with (regional prompts' texts side by side).
    """
    original = denoiser.forward

    def forward(*args, **kwargs):
        hidden = call_latents(args, kwargs)
        if inputs is not None:
            kwargs = inputs(kwargs, hidden.shape[0])
        text = kwargs.get("encoder_hidden_states")
        geometry.grid = grid if grid is not None else tuple(hidden.shape[-2:])
        geometry.depth = 1 if grid is not None else geometry.depth  # packed patches: one level
        geometry.text_tokens = text.shape[1] if isinstance(text, torch.Tensor) else 0
        if geometry.ambiguous():
            raise StudioError(
                f"a single pass cannot tell image tokens from the {geometry.text_tokens} text tokens at this "
                f"size (an image level of {geometry.text_tokens} tokens too): use passes=per-region, or "
                "another size"
            )
        with host.activate(scales):
            return original(*args, **kwargs)

    with shadow_forward(denoiser, forward):
        yield
