"""Backbones: one file per model family, one registry line each.

A family's file defines a frozen dataclass subclass of `Backbone` overriding what differs between families
(latent grid and packing, prompt tokens, attention capture, replaying a denoiser call, the training loss) and
one instance of it, `BACKBONE`; `FAMILIES` lists the instances.
"""

from composer.backbones import flux, sdxl
from composer.backbones.base import TINY, Backbone, count_params, load_pipeline
from composer.errors import BackboneError

# One line per family: its file's instance (a subclass of Backbone overriding the family methods).
FAMILIES: list[Backbone] = [
    sdxl.BACKBONE,
    flux.BACKBONE,
]
BACKBONES: dict[str, Backbone] = {backbone.family: backbone for backbone in FAMILIES}


def get_backbone(name: str) -> Backbone:
    try:
        return BACKBONES[name]
    except KeyError:
        raise BackboneError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}") from None


__all__ = ["BACKBONES", "FAMILIES", "TINY", "Backbone", "count_params", "get_backbone", "load_pipeline"]
