"""Region masks as plain data (no torch): what a user paints on the studio's canvas or sends to the REST API,
and what the regional composition method turns into denoiser weights.

A `Mask` is an 8-bit greyscale picture (255: the region, 0: not); `RegionMasks` maps LoRA names of the stack
to masks. On the canvas every LoRA of the stack gets one colour of `PALETTE`, in stack order; `from_colour_map`
reads such a painting back as one mask per LoRA. Over the API a mask is a PNG, as a data URL or plain base64.
"""

from __future__ import annotations

import base64
import binascii
import io
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, UnidentifiedImageError

from composer.errors import StudioError

MAX_SIDE = 4096
# one colour per LoRA of the stack, in order: distinct under any of the common colour-vision deficiencies
PALETTE: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75),  # red
    (0, 130, 200),  # blue
    (60, 180, 75),  # green
    (255, 225, 25),  # yellow
    (145, 30, 180),  # purple
    (245, 130, 48),  # orange
    (70, 240, 240),  # cyan
    (240, 50, 230),  # magenta
)
COLOUR_NAMES = ("red", "blue", "green", "yellow", "purple", "orange", "cyan", "magenta")
_MATCH = 60  # largest per-channel distance at which a painted pixel still counts as a palette colour


class MaskError(StudioError):
    """A mask that cannot be read or does not fit the render."""


@dataclass(frozen=True)
class Mask:
    """One region: width x height 8-bit coverage values, row-major (255 = inside)."""

    width: int
    height: int
    data: bytes = field(repr=False)

    def __post_init__(self):
        if not (1 <= self.width <= MAX_SIDE and 1 <= self.height <= MAX_SIDE):
            raise MaskError(f"a mask must be 1..{MAX_SIDE} pixels a side, got {self.width}x{self.height}")
        if len(self.data) != self.width * self.height:
            raise MaskError(f"mask data holds {len(self.data)} bytes for {self.width}x{self.height} pixels")

    @classmethod
    def from_image(cls, image: Image.Image) -> Mask:
        """A picture as a mask: its alpha channel where it has one that is not all opaque, else its grey."""
        if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
            alpha = image.convert("RGBA").getchannel("A")
            if alpha.getextrema() != (255, 255):
                return cls(image.width, image.height, alpha.tobytes())
        grey = image.convert("L")
        return cls(grey.width, grey.height, grey.tobytes())

    @classmethod
    def decode(cls, text: str, what: str = "mask") -> Mask:
        """A PNG (or any picture Pillow reads) as a data URL (`data:image/png;base64,...`) or plain base64."""
        payload = text.split(",", 1)[1] if text.startswith("data:") else text
        try:
            raw = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise MaskError(f"{what} is not base64 (send a PNG as a data URL or base64)") from None
        try:
            with Image.open(io.BytesIO(raw)) as image:
                if image.width > MAX_SIDE or image.height > MAX_SIDE:
                    raise MaskError(f"{what} is {image.width}x{image.height}; at most {MAX_SIDE} a side")
                image.load()
                return cls.from_image(image)
        except (UnidentifiedImageError, OSError):
            raise MaskError(f"{what} is not a picture Pillow can read") from None

    def encode(self) -> str:
        """The mask as a PNG data URL (what `decode` reads)."""
        buffer = io.BytesIO()
        self.to_image().save(buffer, format="PNG")
        return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")

    def to_image(self) -> Image.Image:
        return Image.frombytes("L", (self.width, self.height), self.data)

    def coverage(self) -> float:
        """The share of the picture inside the region, 0..1."""
        return sum(self.data) / (255 * len(self.data))


@dataclass(frozen=True)
class RegionMasks:
    """LoRA name -> the region it acts in. A LoRA of the stack with no mask acts everywhere."""

    items: tuple[tuple[str, Mask], ...] = ()

    def __post_init__(self):
        names = [name for name, _ in self.items]
        if len(set(names)) != len(names):
            raise MaskError(f"a LoRA has two masks: {names}")
        if len({(m.width, m.height) for _, m in self.items}) > 1:
            sizes = ", ".join(f"{n} {m.width}x{m.height}" for n, m in self.items)
            raise MaskError(f"all masks must have one size; got {sizes}")

    @classmethod
    def of(cls, masks: dict[str, Mask]) -> RegionMasks:
        return cls(tuple(masks.items()))

    def __iter__(self) -> Iterator[tuple[str, Mask]]:
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)

    def names(self) -> list[str]:
        return [name for name, _ in self.items]

    def get(self, name: str) -> Mask | None:
        return next((m for n, m in self.items if n == name), None)

    def to_json(self) -> dict[str, str]:
        return {name: mask.encode() for name, mask in self.items}

    @classmethod
    def from_json(cls, data: object) -> RegionMasks:
        """{LoRA name: PNG data URL or base64} as sent to the REST API."""
        if not isinstance(data, dict):
            raise MaskError("regions must be an object: {LoRA name: PNG as a data URL or base64}")
        items = []
        for name, text in data.items():
            if not isinstance(text, str):
                raise MaskError(f"the mask of {name!r} must be a PNG as a data URL or base64 string")
            items.append((str(name), Mask.decode(text, f"the mask of {name!r}")))
        return cls(tuple(items))

    @classmethod
    def from_colour_map(cls, painting: Image.Image, names: Sequence[str]) -> RegionMasks:
        """Masks from a canvas painted in `PALETTE`'s colours: the i-th colour marks the i-th LoRA of `names`.

        Pixels of no palette colour (the blank canvas) belong to no LoRA's region. A LoRA whose colour is
        not painted gets no mask (it acts everywhere).

        Raises:
            MaskError: more LoRAs than colours.
        """
        if len(names) > len(PALETTE):
            raise MaskError(f"the canvas has {len(PALETTE)} colours; the stack has {len(names)} LoRAs")
        rgba = np.asarray(painting.convert("RGBA"), dtype=np.int16)  # (H, W, 4)
        height, width = rgba.shape[:2]
        palette = np.array(PALETTE[: len(names)], dtype=np.int16)  # (k, 3)
        distance = np.abs(rgba[None, :, :, :3] - palette[:, None, None, :]).max(axis=-1)  # (k, H, W)
        nearest = distance.argmin(axis=0)  # (H, W)
        painted = (distance.min(axis=0) <= _MATCH) & (rgba[:, :, 3] >= 128)
        channels = [((nearest == k) & painted).astype(np.uint8) * 255 for k in range(len(names))]
        return cls(
            tuple(
                (name, Mask(width, height, channel.tobytes()))
                for name, channel in zip(names, channels, strict=True)
                if channel.any()
            )
        )
