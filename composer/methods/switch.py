"""switch (LoRA Switch, Zhong et al. 2024): one LoRA of the stack active in the denoiser at a time, the next
one every `every` steps, round-robin from the first LoRA of the stack (put the subject first, as the paper
does). The text encoders see the whole stack, as with merge. Cost: one denoiser pass per step, as a merge.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from composer.errors import StudioError
from composer.methods.base import CompositionParams, MethodRun
from composer.seams.streams import each_call_with

MAX_EVERY = 1000


@dataclass(frozen=True)
class SwitchParams(CompositionParams):
    """How many denoising steps each LoRA stays active before the next one takes over."""

    every: int = field(
        default=5, metadata={"help": "steps each LoRA stays active before the next (paper: 5)"}
    )

    def __post_init__(self):
        if (
            not isinstance(self.every, int)
            or isinstance(self.every, bool)
            or not 1 <= self.every <= MAX_EVERY
        ):
            raise StudioError(f"every must be an integer in 1..{MAX_EVERY}, got {self.every!r}")

    def check(self, stack: list[str]) -> None:
        return None

    def active_at(self, step: int, count: int) -> int:
        """The index in the stack of the LoRA active at denoising step `step` (0-based) of a `count`-LoRA stack."""
        return (step // self.every) % count

    @contextmanager
    def apply(self, run: MethodRun) -> Iterator[None]:
        with run.host.activate(run.scales):  # text encoders: the whole stack
            if len(run.stack) < 2:  # nothing to switch between: a merge
                yield
                return
            sets = [{entry.resident: entry.weight} for entry in run.stack]
            state = {"step": 0}

            def step_end(pipe, step: int, timestep, tensors: dict) -> dict:
                state["step"] = step + 1
                return tensors

            run.step_end.append(step_end)
            denoiser = getattr(run.pipe, run.backbone.denoiser)
            with each_call_with(
                denoiser, run.host, lambda _batch: sets[self.active_at(state["step"], len(sets))]
            ):
                yield
