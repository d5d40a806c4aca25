"""The ground-truth evaluator: a small CNN that reads a toy world image back into its scene attributes.

Design: a strided CNN maps a 64 px image to an 8x8 feature map (B, C, 8, 8). A global branch predicts the
layout (which of the seven one- or two-object arrangements, so count and positions at once) and the background.
Each of the five position slots reads the half-size window of the map centred on its position (cell by cell,
so the silhouette survives, plus the window mean) and a shared head predicts shape, colour, texture and size of
the object in that slot; a slot is read only when the layout says it is
occupied. Every attribute the scene generator varies is one classification, so the detector is exact on clean
scenes and its softmax probabilities are the confidences reported.

It can also say what is not a toy world scene (trained on `toyworld.negatives`): the layout "none" (no object:
noise, flat fields, an empty background), the shape "unknown" (an object that is no known shape: random
polygons, blobs, broken shapes) and the background "other" (none of the backgrounds).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from toyworld import scenes
from toyworld.negatives import NO_OBJECT, OTHER_BACKGROUND, UNKNOWN_SHAPE

DEFAULT_WEIGHTS = Path(__file__).resolve().parent / "weights" / "evaluator.safetensors"
ATTRIBUTES = ("shape", "colour", "texture", "size")
READ_LAYOUTS = (*scenes.LAYOUTS, ())  # what the layout head chooses from: the scene layouts and no object
LABELS = {  # the class order of every head; stored in the weights file and checked on load
    "layout": (*("+".join(lay) for lay in scenes.LAYOUTS), NO_OBJECT),
    "background": (*scenes.BACKGROUNDS, OTHER_BACKGROUND),
    "shape": (*scenes.SHAPES, UNKNOWN_SHAPE),
    "colour": scenes.COLOURS,
    "texture": scenes.TEXTURES,
    "size": scenes.SIZES,
}
SCORE_KEYS = ("shape", "colour", "texture", "size", "position", "background", "count")


@dataclass(frozen=True)
class EvaluatorConfig:
    """Architecture of the detector; saved in the weights file's metadata."""

    image_size: int = 64
    stem: int = 32  # a 16-channel full-resolution layer, then stride 2: 64 -> 32
    widths: tuple[int, ...] = (64, 128)  # one stride-2 stage each: 32 -> 16 -> 8
    hidden: int = 128
    slot_channels: int = 32  # per-cell features a slot head sees in its window (keeps the silhouette)


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
    )


class DetectorNet(nn.Module):
    """Layout + background from the whole map; shape/colour/texture/size per position slot."""

    def __init__(self, config: EvaluatorConfig) -> None:
        super().__init__()
        self.config = config
        layers: list[nn.Module] = [
            _conv(3, 16),
            _conv(16, config.stem, stride=2),
            _conv(config.stem, config.stem),
        ]
        cin = config.stem
        for w in config.widths:
            layers += [_conv(cin, w, stride=2), _conv(w, w)]
            cin = w
        self.features = nn.Sequential(*layers)
        grid = config.image_size // 2 ** (1 + len(config.widths))
        self.reduce = nn.Conv2d(cin, 16, 1)
        self.global_mlp = nn.Sequential(
            nn.Linear(16 * grid * grid + 2 * cin, config.hidden), nn.ReLU(inplace=True)
        )
        self.layout = nn.Linear(config.hidden, len(LABELS["layout"]))
        self.background = nn.Linear(config.hidden, len(LABELS["background"]))
        # Each slot reads the half-image window centred on its position (the slot centres sit on cell corners).
        self.window = grid // 2
        self.corners = tuple(
            (round(cy / 64 * grid) - self.window // 2, round(cx / 64 * grid) - self.window // 2)
            for cx, cy in (scenes.CENTRES[p] for p in scenes.POSITIONS)
        )
        self.slot_reduce = nn.Sequential(nn.Conv2d(cin, config.slot_channels, 1), nn.ReLU(inplace=True))
        self.slot_mlp = nn.Sequential(
            nn.Linear(config.slot_channels * self.window**2 + cin, config.hidden), nn.ReLU(inplace=True)
        )
        self.heads = nn.ModuleDict({a: nn.Linear(config.hidden, len(LABELS[a])) for a in ATTRIBUTES})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """x: (B, 3, S, S) normalised images -> logits: layout (B, 8), background (B, 10), attr (B, 5, K)."""
        f = self.features(x)  # (B, C, g, g)
        flat = f.flatten(2)  # (B, C, g*g)
        g = torch.cat([self.reduce(f).flatten(1), flat.mean(2), flat.amax(2)], dim=1)
        g = self.global_mlp(g)  # (B, hidden)
        r, k = self.slot_reduce(f), self.window  # (B, c, g, g)
        slots = torch.stack(
            [
                torch.cat(
                    [r[:, :, y : y + k, x : x + k].flatten(1), f[:, :, y : y + k, x : x + k].mean((2, 3))], 1
                )
                for y, x in self.corners
            ],
            dim=1,
        )  # (B, 5, c*k*k + C)
        h = self.slot_mlp(slots)  # (B, 5, hidden)
        out = {"layout": self.layout(g), "background": self.background(g)}
        out.update({a: head(h) for a, head in self.heads.items()})
        return out


def to_tensor(images: Sequence[Image.Image] | np.ndarray, size: int = 64) -> torch.Tensor:
    """Images (PIL of any size and mode, or uint8 (N, H, W, 3)) -> normalised (N, 3, size, size) float."""
    if isinstance(images, np.ndarray):
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(f"expected a uint8 array (N, H, W, 3), got {images.dtype} {images.shape}")
        batches = [torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)]
    else:
        batches = [torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1)[None] for im in images]
    out = []
    for b in batches:  # (n, 3, H, W) uint8
        x = b.float() / 255.0
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out.append(x)
    x = torch.cat(out) if out else torch.zeros(0, 3, size, size)
    return (x - 0.5) / 0.25


@dataclass(frozen=True)
class Prediction:
    label: str
    confidence: float


@dataclass(frozen=True)
class ObjectReport:
    position: Prediction
    shape: Prediction
    colour: Prediction
    texture: Prediction
    size: Prediction


@dataclass(frozen=True)
class SceneReport:
    """What the evaluator sees in one image."""

    background: Prediction
    objects: tuple[ObjectReport, ...]
    layout_confidence: float = 1.0

    @property
    def count(self) -> int:
        return len(self.objects)

    def object_at(self, position: str) -> ObjectReport | None:
        return next((o for o in self.objects if o.position.label == position), None)

    def to_spec(self) -> scenes.SceneSpec:
        """The scene as read (labels only). Raises ValueError when it read no object, an unknown shape or
        another background (no SceneSpec says so)."""
        return scenes.SceneSpec(
            tuple(
                scenes.ObjectSpec(
                    o.shape.label, o.colour.label, o.texture.label, o.size.label, o.position.label
                )
                for o in self.objects
            ),
            self.background.label,
        )


@dataclass
class Evaluator:
    """A loaded detector. Build with `Evaluator.load()`; call `evaluate(images)`."""

    net: DetectorNet
    config: EvaluatorConfig = field(default_factory=EvaluatorConfig)

    @classmethod
    def load(cls, path: str | Path | None = None) -> Evaluator:
        """Load weights written by `save` (default: the shipped toyworld/weights/evaluator.safetensors).

        Raises:
            FileNotFoundError: no such file.
            ValueError: the file's labels differ from the current concept lists (retrain the evaluator).
        """
        path = Path(path) if path is not None else DEFAULT_WEIGHTS
        if not path.is_file():
            raise FileNotFoundError(f"no evaluator weights at {path}")
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
        labels = json.loads(meta.get("labels", "{}"))
        if labels != {k: list(v) for k, v in LABELS.items()}:
            raise ValueError(f"evaluator weights {path} were trained on other concept lists; retrain them")
        raw = json.loads(meta["config"])
        config = EvaluatorConfig(**{**raw, "widths": tuple(raw["widths"])})
        net = DetectorNet(config)
        net.load_state_dict({k: v.float() for k, v in load_file(path).items()})
        return cls(net.eval(), config)

    def save(self, path: str | Path, **extra_metadata: str) -> None:
        """Write the weights (fp16) with config and labels in the safetensors metadata."""
        state = {k: v.detach().contiguous() for k, v in self.net.state_dict().items()}
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
        meta = {
            "config": json.dumps(asdict(self.config)),
            "labels": json.dumps({k: list(v) for k, v in LABELS.items()}),
            **extra_metadata,
        }
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        save_file(state, str(path), metadata=meta)

    @torch.inference_mode()
    def logits(
        self, images: Sequence[Image.Image] | np.ndarray, batch_size: int = 256
    ) -> dict[str, torch.Tensor]:
        """Raw head outputs for a batch of images (see DetectorNet.forward)."""
        self.net.eval()
        n = len(images)
        parts = [
            self.net(to_tensor(images[i : i + batch_size], self.config.image_size))
            for i in range(0, n, batch_size)
        ]
        if not parts:
            parts = [self.net(torch.zeros(0, 3, self.config.image_size, self.config.image_size))]
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}

    def evaluate(
        self, images: Sequence[Image.Image] | np.ndarray, batch_size: int = 256
    ) -> list[SceneReport]:
        """Read each image (any size 32..128, resized internally) into a SceneReport."""
        probs = {k: v.softmax(-1) for k, v in self.logits(images, batch_size).items()}
        return reports_from_probs(probs)


def reports_from_probs(probs: dict[str, torch.Tensor]) -> list[SceneReport]:
    """Turn head probabilities (layout (B, 8), background (B, 10), attr (B, 5, K)) into reports."""
    layout_p, layout_i = probs["layout"].max(-1)
    bg_p, bg_i = probs["background"].max(-1)
    attr = {a: probs[a].max(-1) for a in ATTRIBUTES}  # values, indices: (B, 5)
    # P(slot occupied) = total probability of the layouts that use the slot.
    uses = torch.tensor(
        [[p in lay for p in scenes.POSITIONS] for lay in READ_LAYOUTS], dtype=probs["layout"].dtype
    )
    occupied = probs["layout"] @ uses  # (B, 5)
    reports = []
    for b in range(layout_i.shape[0]):
        objects = []
        for pos in READ_LAYOUTS[int(layout_i[b])]:
            s = scenes.POSITIONS.index(pos)
            preds = {
                a: Prediction(LABELS[a][int(attr[a][1][b, s])], float(attr[a][0][b, s])) for a in ATTRIBUTES
            }
            objects.append(ObjectReport(position=Prediction(pos, float(occupied[b, s])), **preds))
        background = Prediction(LABELS["background"][int(bg_i[b])], float(bg_p[b]))
        reports.append(SceneReport(background, tuple(objects), float(layout_p[b])))
    return reports


def score(report: SceneReport, expected: scenes.SceneSpec) -> dict[str, bool]:
    """Per-attribute correctness of one report. Objects are matched by position; an attribute is right only if
    it is right for every expected object (an object missing at its position fails all its attributes)."""
    matched = [(o, report.object_at(o.position)) for o in expected.objects]
    result = {
        a: all(got is not None and getattr(got, a).label == getattr(want, a) for want, got in matched)
        for a in ATTRIBUTES
    }
    result["position"] = sorted(o.position.label for o in report.objects) == sorted(
        o.position for o in expected.objects
    )
    result["background"] = report.background.label == expected.background
    result["count"] = report.count == len(expected.objects)
    return result


def accuracy(reports: Sequence[SceneReport], specs: Sequence[scenes.SceneSpec]) -> dict[str, float]:
    """Fraction of scenes scored correct, per attribute (keys as in `score`)."""
    if len(reports) != len(specs) or not specs:
        raise ValueError(f"need as many reports as specs (and at least one): {len(reports)} vs {len(specs)}")
    scores = [score(r, s) for r, s in zip(reports, specs, strict=True)]
    return {k: sum(s[k] for s in scores) / len(scores) for k in SCORE_KEYS}
