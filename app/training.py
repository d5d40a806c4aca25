"""Training from the studio (`Studio.train`): images in, a catalogued adapter out. The catalog never holds a
half-made one.

The run folder (<data dir>/training/<name>) keeps checkpoints, the loss log and sample images; the adapter is
written and imported only after the last step, in one transaction.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.library import AdapterInfo, Library
from app.rendering import resolve_backbone
from app.settings import Settings
from composer.formats.writers import write_kohya
from composer.train import TrainConfig, Trainer, load_images
from composer.train.config import recipe
from composer.train.data import count_images
from composer.train.loop import Progress
from db.errors import NameTakenError
from db.models import validate_name

# (backbone, model) -> the loaded pipeline (`.pipe`, `.host`) the caller holds the lock of (`Studio.pipeline`)
PipelineSource = Callable[[str, str | None], Any]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainOutcome:
    adapter: AdapterInfo
    run_dir: Path
    steps: int
    seconds: float
    final_loss: float
    parameters: int
    samples: list[Path]


def min_images(kind: str) -> int:
    """How few images a kind learns from (its recipe: B-LoRA one, the subject trainers a few views)."""
    return recipe(kind).min_images


class TrainingRuns:
    """The Studio's training runs: their folders under <data dir>/training, their adapters in its catalog."""

    def __init__(self, settings: Settings, library: Library, pipeline: PipelineSource) -> None:
        self.settings = settings
        self.library = library
        self.pipeline = pipeline

    def run(
        self,
        config: TrainConfig,
        images: Path,
        name: str,
        *,
        backbone: str | None = None,
        model: str | None = None,
        trigger_words: list[str] | None = None,
        tags: list[str] | None = None,
        description: str = "",
        resume: bool = False,
        progress: Progress | None = None,
    ) -> TrainOutcome:
        """Train an adapter on a folder of images and add it to the catalog under `name` (the caller holds
        the pipeline: `Studio.train`).

        Everything that can be checked is checked before the first step: the name (valid and free), the
        settings, the images (readable, enough of them).

        Raises:
            NameTakenError / InvalidFieldError: the name is taken or not allowed.
            TrainConfigError, TrainingDataError: bad settings or images (named).
        """
        validate_name(name)
        if name in self.library.names():
            raise NameTakenError(f"adapter name {name!r} is taken; choose another name", name)
        config = config.validate()
        needed = max(config.min_images, min_images(config.kind))
        count_images(images, needed)  # before loading a model: a bad folder fails in a second
        backbone = backbone or self.settings.backbone
        bb, _ = resolve_backbone(backbone, model or self.settings.model)
        loaded = self.pipeline(backbone, model or self.settings.model)
        trainer = Trainer(
            loaded.pipe,
            bb,
            config,
            self.settings.root / "training" / name,
            progress=progress,
            host=loaded.host,
        )
        data = load_images(images, config.prompt, trainer.size, min_images=needed)
        result = trainer.run(data, resume=resume)
        run_dir = trainer.run_dir
        samples = []
        for i, image in enumerate(result.samples):
            path = run_dir / "samples" / f"sample_{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            image.save(path)
            samples.append(path)
        (run_dir / "loss.json").write_text(json.dumps({"losses": result.losses}) + "\n")
        out = run_dir / f"{name}.safetensors"
        write_kohya(result.lora, out, title=name, trigger_words=trigger_words or [])
        info = self.library.import_file(
            out,
            name=name,
            tags=tags,
            exact_name=True,
            description=description,
            training_config={
                **config.to_json(),
                "seconds": round(result.seconds, 1),
                "steps_done": result.steps,
            },
            preview=samples[0] if samples else None,
        )
        return TrainOutcome(
            info,
            run_dir,
            result.steps,
            result.seconds,
            result.losses[-1] if result.losses else float("nan"),
            result.parameters,
            samples,
        )
