"""LoRAs without a preview get one rendered in the background when the server starts, with progress; cards show
a small thumbnail of it."""

from __future__ import annotations

import time

from PIL import Image

from app.previews import PreviewFiller, thumbnail
from tests.live_server import LORAS, studio_with_loras


def test_missing_previews_are_rendered_in_the_background_with_progress(tmp_path, tiny_sdxl_factory):
    studio = studio_with_loras(tmp_path, tiny_sdxl_factory)
    assert all(not a.preview_path for a in studio.library.list())
    filler = PreviewFiller(studio, studio.served_family())
    assert sorted(filler.missing()) == sorted(LORAS)
    filler.start()
    deadline = time.monotonic() + 300
    while filler.progress.running and time.monotonic() < deadline:
        time.sleep(0.2)
    filler.stop()
    assert filler.progress.line() == f"LoRA previews: rendered {len(LORAS)} of {len(LORAS)}"
    previews = {a.name: a.preview_path for a in studio.library.list()}
    assert all(previews.values()) and filler.missing() == []
    card = thumbnail(previews["inkwell"], studio.thumbs_dir)
    assert card is not None and card.parent == studio.thumbs_dir
    with Image.open(previews["inkwell"]) as full, Image.open(card) as small:
        assert max(small.size) <= 160 and small.size[0] / small.size[1] == full.size[0] / full.size[1]
    second = PreviewFiller(studio, studio.served_family())
    second.start()  # nothing left to do: no thread, no line
    assert second.progress.total == 0 and second.progress.line() == ""


def test_a_foreign_family_is_not_tried(tmp_path, tiny_sdxl_factory):
    studio = studio_with_loras(tmp_path, tiny_sdxl_factory)
    assert PreviewFiller(studio, "flux").missing() == []
