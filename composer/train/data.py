"""Instance images for training: read, checked, captioned and sized before any training step runs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from composer.errors import StudioError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class TrainingDataError(StudioError):
    """Too few images, an unreadable one (named), or a folder that does not exist."""


@dataclass(frozen=True)
class TrainingImage:
    path: Path | None
    pixels: torch.Tensor  # (3, H, W) in [-1, 1]
    caption: str


def _square(image: Image.Image, size: int) -> Image.Image:
    """Centre-crop to a square and resize (Lanczos down, bicubic up)."""
    w, h = image.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    image = image.crop((left, top, left + side, top + side))
    if side != size:
        image = image.resize((size, size), Image.LANCZOS if side > size else Image.BICUBIC)
    return image


def to_pixels(image: Image.Image, size: int) -> torch.Tensor:
    arr = np.asarray(_square(image.convert("RGB"), size), dtype=np.float32)
    return torch.from_numpy(arr).permute(2, 0, 1) / 127.5 - 1.0


def image_files(folder: Path) -> list[Path]:
    """The images of a folder, sorted by name; hidden files (macOS ._x.png) are skipped.

    Raises:
        TrainingDataError: the folder does not exist.
    """
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise TrainingDataError(f"{folder}: not a folder of training images")
    return sorted(
        p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
    )


def count_images(folder: Path, needed: int) -> int:
    """Raise TrainingDataError unless the folder holds at least `needed` image files."""
    found = len(image_files(folder))
    if found < needed:
        raise TrainingDataError(
            f"{folder}: {found} image(s); this run needs at least {needed} ({', '.join(IMAGE_SUFFIXES)})"
        )
    return found


def load_images(
    source: Path | list[Image.Image], prompt: str, size: int, min_images: int = 1
) -> list[TrainingImage]:
    """Images of a folder (sorted by name, with kohya-style IMG.txt captions) or given PIL images.

    Every image is opened and decoded here, so a bad file fails the run before training starts.

    Raises:
        TrainingDataError: the folder is missing, an image cannot be read (named), or fewer than min_images.
    """
    items: list[TrainingImage] = []
    if isinstance(source, list):
        items = [TrainingImage(None, to_pixels(img, size), prompt) for img in source]
        where = "the given images"
    else:
        folder = Path(source).expanduser()
        for path in image_files(folder):
            try:
                with Image.open(path) as img:
                    img.load()
                    pixels = to_pixels(ImageOps.exif_transpose(img), size)  # phone photos: EXIF rotation
            except (UnidentifiedImageError, OSError, ValueError) as exc:
                raise TrainingDataError(f"{path}: not a readable image ({exc})") from None
            caption_file = path.with_suffix(".txt")
            try:
                caption = caption_file.read_text(encoding="utf-8").strip() if caption_file.is_file() else ""
            except UnicodeDecodeError:
                raise TrainingDataError(f"{caption_file}: caption is not UTF-8 text") from None
            items.append(TrainingImage(path, pixels, caption or prompt))
        where = str(folder)
    if len(items) < min_images:
        raise TrainingDataError(
            f"{where}: {len(items)} image(s); this run needs at least {min_images} "
            f"({', '.join(IMAGE_SUFFIXES)})"
        )
    return items
