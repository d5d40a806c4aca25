"""Composition methods: how several LoRAs act together in one render. One file per method, one registry line
each. A method's knobs are the fields of its frozen parameters dataclass, so that the API schema and the UI
controls are generated from them (STYLE rule 3). This module and the parameter dataclasses stay torch-free."""

from __future__ import annotations

from composer.methods.merge import MergeParams

METHODS: dict[str, type] = {
    "merge": MergeParams,
}

__all__ = ["METHODS", "MergeParams"]
