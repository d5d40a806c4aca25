"""merge: every LoRA of the stack is active at once and their weighted deltas add (what `Studio.render` does;
the arithmetic lives in the adapter layer's mixing context)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MergeParams:
    """Merge has no knobs beyond the per-LoRA weights of the stack."""
