"""Backbones: one file per model family, one registry line each."""

from composer.backbones import flux, sdxl
from composer.backbones.base import TINY, Backbone, count_params, load_pipeline
from composer.errors import BackboneError

BACKBONES: dict[str, Backbone] = {
    "sdxl": sdxl.BACKBONE,
    "flux": flux.BACKBONE,
}


def get_backbone(name: str) -> Backbone:
    try:
        return BACKBONES[name]
    except KeyError:
        raise BackboneError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}") from None


__all__ = ["BACKBONES", "TINY", "Backbone", "count_params", "get_backbone", "load_pipeline"]
