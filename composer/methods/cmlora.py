"""cmlora (CMLoRA, Zou et al. 2025): LoRA Composite with a rotating dominant LoRA, the LoRAs ordered by their
frequency profiles, and the other LoRAs' noise predictions cached between refreshes.

- Order: each LoRA's frequency profile is measured from its own renders (`composer.frequency`: the share of
  high spatial frequencies in the change it makes over the base model) and stored with its catalog entry; the
  highest-frequency LoRA (subject, texture, style) leads, the lowest (background, global colour) comes last.
- Blend: every step the LoRAs' noise predictions (both halves of classifier-free guidance) are averaged with
  the dominant LoRA's share (N - 0.5) / (2N - 1.5) (0.60, 0.556, 0.538, 0.529 for N = 2..5), the rest sharing
  equally. The dominant LoRA moves to the next in order at every refresh step.
- Caching: the refresh steps follow the paper's non-uniform schedule (every 2 steps in the first 37.5 %, every 3
  until 87.5 %, every 2 after). The dominant LoRA runs every step; another LoRA runs only on a refresh step,
  and only when its cached prediction is older than the previous step (the LoRA that was dominant until now
  has one from the previous step). Other steps reuse the cache, so they really skip those passes: the
  denoiser runs `passes_plan` times, not N per step (the published code computes them anyway in this mode).
The passes of one step run as one batched call. The text encoders see the whole stack, as with merge.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar

import torch

from composer.errors import StudioError
from composer.frequency import measure_profile
from composer.methods.base import CompositionParams, MethodRun
from composer.seams.streams import call_in_streams, shadow_forward, stream_scales, with_sample


def dominant_share(count: int) -> float:
    """The dominant LoRA's share of the blend with `count` LoRAs."""
    return (count - 0.5) / (2 * count - 1.5) if count > 1 else 1.0


def refresh_steps(steps: int) -> list[int]:
    """The non-uniform refresh schedule: every 2 steps to 37.5 % of the steps, every 3 to 87.5 %, every 2 after."""
    early, late = int(0.375 * steps), int(0.875 * steps)
    return sorted(
        {0, *range(0, early, 2), *range(early, late, 3), *range(late, steps, 2)} & set(range(steps))
    )


def passes_plan(steps: int, count: int) -> list[tuple[int, list[int]]]:
    """Per step: (the dominant LoRA's index in the frequency order, the indices whose predictions are computed
    at that step). Every other index reuses its cached prediction."""
    refresh = set(refresh_steps(steps))
    last = [-2] * count  # the step each LoRA's cached prediction was computed at
    dominant = -1
    plan = []
    for step in range(steps):
        if step in refresh:
            dominant = (dominant + 1) % count
        todo = [i for i in range(count) if i == dominant or (step in refresh and last[i] < step - 1)]
        for i in todo:
            last[i] = step
        plan.append((dominant, todo))
    return plan


@dataclass(frozen=True)
class CMLoRAParams(CompositionParams):
    """CMLoRA has no knobs beyond the stack's weights: its order comes from the LoRAs' frequency profiles."""

    needs_profiles: ClassVar[bool] = True

    def check(self, stack: list[str]) -> None:
        return None

    def order(self, run: MethodRun) -> list[int]:
        """Stack indices from the highest-frequency LoRA to the lowest (the stack's order breaks ties); a LoRA
        with no stored profile is measured now (its profile goes into `run.profiles` for the catalog)."""
        for entry in run.stack:
            if entry.name not in run.profiles:
                prompt = ", ".join(run.triggers.get(entry.name) or [entry.name])
                profile = measure_profile(
                    run.pipe, run.backbone, run.host, entry.resident, prompt, run.height, run.width
                )
                run.profiles[entry.name] = profile.to_json()
        scores = []
        for entry in run.stack:
            score = run.profiles[entry.name].get("score")
            if not isinstance(score, (int, float)):
                raise StudioError(f"cmlora: the frequency profile of {entry.name!r} has no score")
            scores.append(float(score))
        return sorted(range(len(run.stack)), key=lambda i: -scores[i])

    @contextmanager
    def apply(self, run: MethodRun) -> Iterator[None]:
        if len(run.stack) < 2:  # one LoRA: its own prediction every step, a plain render
            with run.host.activate(run.scales):
                yield
            return
        if run.steps < 1:
            raise StudioError("cmlora needs the render's number of steps")
        order = self.order(run)
        streams = [{run.stack[i].resident: run.stack[i].weight} for i in order]
        count = len(streams)
        plan = passes_plan(run.steps, count)
        share = dominant_share(count)
        rest = (1.0 - share) / (count - 1)
        state = {"step": 0, "call": 0}
        cache: dict[int, dict[int, torch.Tensor]] = {}  # call of the step -> stream -> its last prediction
        scales_cache: dict[tuple, dict] = {}

        def step_end(pipe, step: int, timestep, tensors: dict) -> dict:
            state["step"], state["call"] = step + 1, 0
            return tensors

        def forward(*args, **kwargs):
            step = min(state["step"], len(plan) - 1)
            dominant, todo = plan[step]
            call = state["call"]
            state["call"] += 1
            mine = cache.setdefault(call, {})
            missing = [i for i in range(count) if i not in todo and i not in mine]
            if missing:
                raise StudioError(f"cmlora: no cached prediction for call {call} of step {step}")

            def scales_for(rows: int, device) -> dict:
                key = (tuple(todo), rows, device)
                if key not in scales_cache:
                    scales_cache[key] = stream_scales([streams[i] for i in todo], rows, device)
                return scales_cache[key]

            out, stacked = call_in_streams(original, run.host, len(todo), scales_for, args, kwargs)
            for i, prediction in zip(todo, stacked, strict=True):
                mine[i] = prediction
            blended = sum((share if i == dominant else rest) * mine[i] for i in range(count))
            return with_sample(out, blended)

        denoiser = getattr(run.pipe, run.backbone.denoiser)
        original = denoiser.forward
        run.step_end.append(step_end)
        with run.host.activate(run.scales), shadow_forward(denoiser, forward):  # text encoders: the stack
            yield
