"""Previews for LoRAs that have none (bundled ones on first start, imported ones): rendered in one background
thread after the server starts, one LoRA at a time, with progress the studio shows ("previews: 3 of 12"); and
small card thumbnails of them, kept beside the previews, so that a page of LoRA cards stays light however large
the previews are."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from app.facade import StudioFacade
from composer.errors import StudioError
from db.errors import CatalogError

log = logging.getLogger(__name__)

THUMB = 160  # pixels a side of a card thumbnail


def thumbnail(preview: str | Path | None, folder: Path) -> Path | None:
    """A card-sized PNG of a preview image, made once and kept in `folder` (the data dir's `thumbs`, which the
    studio serves; the LoRA folder is not served), or None without a readable preview."""
    if not preview or not Path(preview).is_file():
        return None
    path = Path(preview)
    thumb = folder / f"{path.stem}.png"
    try:
        if not thumb.is_file() or thumb.stat().st_mtime < path.stat().st_mtime:
            folder.mkdir(parents=True, exist_ok=True)
            with Image.open(path) as im:
                small = im.convert("RGB")
                small.thumbnail((THUMB, THUMB))
                small.save(thumb)
        return thumb
    except OSError as exc:
        log.warning("preview %s unreadable: %s", path, exc)
        return None


def placeholder(name: str, folder: Path) -> Path:
    """The card of a LoRA without a preview yet: its initials on grey (one file per pair of initials)."""
    initials = "".join(c for c in name[:2].upper() if c.isalnum()) or "?"
    path = folder / f"placeholder-{initials.encode().hex()}.png"
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        card = Image.new("RGB", (THUMB, THUMB), (60, 63, 70))
        ImageDraw.Draw(card).text(
            (THUMB // 2, THUMB // 2), initials, fill=(220, 220, 220), anchor="mm", font_size=48
        )
        card.save(path)
    return path


@dataclass
class PreviewProgress:
    done: int = 0
    total: int = 0
    failed: int = 0
    running: bool = False

    def line(self) -> str:
        if not self.total:
            return ""
        state = "rendering" if self.running else "rendered"
        failed = f", {self.failed} failed (see the log)" if self.failed else ""
        return f"LoRA previews: {state} {self.done} of {self.total}{failed}"


class PreviewFiller:
    """Renders a preview for every catalog LoRA of the server's family that has none, in a daemon thread."""

    def __init__(self, studio: StudioFacade, family: str | None = None) -> None:
        self.studio, self.family = studio, family
        self.progress = PreviewProgress()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def missing(self) -> list[str]:
        adapters = self.studio.library.list(family=self.family, limit=100_000)
        return [a.name for a in adapters if not (a.preview_path and Path(a.preview_path).is_file())]

    def start(self) -> None:
        names = self.missing()
        self.progress = PreviewProgress(total=len(names), running=bool(names))
        if names:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, args=(names,), name="previews", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=120)

    def _run(self, names: list[str]) -> None:
        for name in names:
            if self._stop.is_set():
                break
            try:
                self.studio.regenerate_preview(name)
            except (StudioError, CatalogError, OSError) as exc:
                log.warning("preview of %s not rendered: %s", name, exc)
                self.progress.failed += 1
            self.progress.done += 1
        self.progress.running = False
        log.info("%s", self.progress.line())


__all__ = ["PreviewFiller", "PreviewProgress", "placeholder", "thumbnail"]
