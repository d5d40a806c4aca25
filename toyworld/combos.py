"""Which base-concept combinations the toy base model never sees in training, kept for its quality test.

A single-object combination is (shape, colour, position, background). About 1 in 8 of them, chosen by a fixed
hash, is withheld from training images (also as either object of a two-object scene), so the quality test
asks for pictures the model has to compose rather than remember.
"""

from __future__ import annotations

import hashlib

from toyworld import scenes

EVAL_SHARE = 8  # one combination in 8 is withheld


def is_withheld(shape: str, colour: str, position: str, background: str) -> bool:
    digest = hashlib.sha256(f"{shape}|{colour}|{position}|{background}".encode()).digest()
    return digest[0] % EVAL_SHARE == 0


def scene_is_withheld(scene: scenes.SceneSpec) -> bool:
    return any(is_withheld(o.shape, o.colour, o.position, scene.background) for o in scene.objects)


def withheld_single_object_scenes() -> list[scenes.SceneSpec]:
    """Every withheld (shape, colour, position, background) as a visible single-object base scene."""
    out = []
    for shape in scenes.SHAPES_BASE:
        for colour in scenes.COLOURS:
            for position in scenes.POSITIONS:
                for background in scenes.BACKGROUNDS_BASE:
                    if is_withheld(shape, colour, position, background) and scenes.contrasts(
                        colour, background
                    ):
                        obj = scenes.ObjectSpec(
                            shape, colour, scenes.DEFAULT_TEXTURE, scenes.DEFAULT_SIZE, position
                        )
                        out.append(scenes.SceneSpec((obj,), background))
    return out
