"""merge: every LoRA of the stack is active at once and their weighted deltas add (the arithmetic lives in the
adapter layer's mixing context)."""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import ClassVar

from composer.methods.base import CompositionParams, MethodRun


@dataclass(frozen=True)
class MergeParams(CompositionParams):
    """Merge has no knobs beyond the per-LoRA weights of the stack."""

    mixes_per_sample: ClassVar[bool] = True  # a weighted sum of deltas: per-sample weights are one call

    def check(self, stack: list[str]) -> None:
        return None

    def apply(self, run: MethodRun) -> AbstractContextManager[None]:
        return run.host.activate(run.scales)
