"""What a training run is: one dataclass for every adapter type, validated before any work starts."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

from composer.adapters.base import Recipe
from composer.adapters.registry import adapter_type, trainable_kinds
from composer.errors import StudioError

MIXED_PRECISION = ("no", "fp16", "bf16")
TARGETS = ("attention", "transformer", "full")
ADAPTER_KINDS = trainable_kinds()  # the built-in trainable kinds at import; validation asks the registry


def conv_kinds() -> tuple[str, ...]:
    """Trainable kinds that adapt Conv2d layers too (targets "full")."""
    return tuple(k for k in trainable_kinds() if recipe(k).conv)


def recipe(kind: str) -> Recipe:
    """A trainable kind's defaults (steps, learning rate, rank: METHODS.md), from its adapter type."""
    found = adapter_type(kind).recipe
    if found is None:
        raise TrainConfigError(
            f"adapter type {kind!r} is not trainable; choose {', '.join(trainable_kinds())}"
        )
    return found


class TrainConfigError(StudioError):
    """A training setting out of range or inconsistent; the message names it."""


@dataclass(frozen=True)
class TrainConfig:
    """One training run. Defaults follow each method's recipe where METHODS.md gives one.

    kind: "lora" (rank, alpha on the backbone's attention targets), "blora" (LoRA on the backbone's two
    B-LoRA blocks only), "kron" (DiffuseKronA, factor (a1, a2)), "tensor" (TLoRA, rank and transform rank).
    prompt: the instance prompt ("a photo of sks dog"); a caption file next to an image (IMG.txt) wins.
    class_prompt + prior_weight > 0: DreamBooth prior preservation with `class_images` images the base model
    renders for the class prompt before training.
    """

    kind: str = "lora"
    prompt: str = ""
    steps: int | None = None  # None: the kind's recipe (its adapter type's Recipe)
    learning_rate: float | None = None  # None: the kind's recipe (see recipe_lr)
    batch_size: int = 1
    seed: int = 0
    resolution: int | None = None  # None: the model's native size
    rank: int | None = None  # None: 4 for LoRA, 64 for B-LoRA (its recipe)
    alpha: float | None = None  # None: alpha = rank (scale 1)
    kron_factors: tuple[int, int] = (16, 16)  # (a1, a2); a1 * a2 = 256 is DiffuseKronA's headline
    tensor_rank: int = 1
    transform_rank: int = 1
    class_prompt: str = ""
    prior_weight: float = 0.0
    class_images: int = 8
    checkpoint_every: int = 100
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    targets: str = (
        "attention"  # "attention" (q/k/v/out), "transformer" (every Linear of the transformer blocks) or
        # "full" (those and the ResNet/resampling convolutions, kohya's LoCon set; conv_kinds() only)
    )
    text_encoder: bool = False  # also adapt the CLIP text encoders' attention (kohya trains them by default)
    snr_gamma: float | None = None  # Min-SNR-gamma loss weighting (SDXL; kohya/diffusers use 5); None: off
    flip: bool = False  # horizontal flip augmentation (off: positions are part of many prompts)
    min_images: int = 1

    def recipe_lr(self) -> float:
        if self.learning_rate is not None:
            return self.learning_rate
        return recipe(self.kind).learning_rate

    def validate(self) -> TrainConfig:
        """Raise TrainConfigError naming the first bad setting; return the config with recipe defaults filled."""
        if self.kind not in trainable_kinds():
            raise TrainConfigError(
                f"adapter type {self.kind!r} is not trainable; choose {', '.join(trainable_kinds())}"
            )
        if self.steps is None or self.rank is None:
            defaults = recipe(self.kind)
            return replace(
                self,
                steps=defaults.steps if self.steps is None else self.steps,
                rank=defaults.rank if self.rank is None else self.rank,
            ).validate()
        if not self.prompt.strip():
            raise TrainConfigError(
                "the instance prompt is empty; say what the images show, e.g. 'a photo of sks dog'"
            )
        checks = [
            ("steps", self.steps, 1, 1_000_000),
            ("batch_size", self.batch_size, 1, 256),
            ("rank", self.rank, 1, 4096),
            ("tensor_rank", self.tensor_rank, 1, 64),
            ("transform_rank", self.transform_rank, 1, 64),
            ("class_images", self.class_images, 1, 10_000),
            ("checkpoint_every", self.checkpoint_every, 1, 1_000_000),
            ("min_images", self.min_images, 1, 10_000),
        ]
        for name, value, low, high in checks:
            if not isinstance(value, int) or not low <= value <= high:
                raise TrainConfigError(f"{name} must be an integer in {low}..{high}, got {value!r}")
        lr = self.recipe_lr()
        if not 0 < lr < 1:
            raise TrainConfigError(f"learning_rate must be in (0, 1), got {lr}")
        if self.alpha is not None and self.alpha <= 0:
            raise TrainConfigError(f"alpha must be positive, got {self.alpha}")
        a1, a2 = self.kron_factors
        if a1 < 1 or a2 < 1:
            raise TrainConfigError(f"kron_factors must be positive, got {self.kron_factors}")
        if self.resolution is not None and (self.resolution < 8 or self.resolution % 8):
            raise TrainConfigError(f"resolution must be a multiple of 8, at least 8; got {self.resolution}")
        if self.prior_weight < 0:
            raise TrainConfigError(f"prior_weight must be >= 0, got {self.prior_weight}")
        if self.prior_weight > 0 and not self.class_prompt.strip():
            raise TrainConfigError(
                "prior preservation (prior_weight > 0) needs a class prompt, e.g. 'a photo of a dog'"
            )
        if self.text_encoder and not recipe(self.kind).text_encoder:
            raise TrainConfigError(
                f"adapter type {self.kind!r} adapts the denoiser only; train it without text_encoder"
            )
        if self.snr_gamma is not None and not 0 < self.snr_gamma <= 1000:
            raise TrainConfigError(f"snr_gamma must be in (0, 1000] (5 is usual), got {self.snr_gamma}")
        if self.targets not in TARGETS:
            raise TrainConfigError(f"targets {self.targets!r}: choose {', '.join(TARGETS)}")
        if self.targets == "full" and self.kind not in conv_kinds():
            raise TrainConfigError(
                f"targets 'full' adapts convolutions, which kinds {', '.join(conv_kinds())} do; "
                f"not {self.kind!r}"
            )
        if self.mixed_precision not in MIXED_PRECISION:
            raise TrainConfigError(
                f"mixed_precision {self.mixed_precision!r}: choose {', '.join(MIXED_PRECISION)}"
            )
        return self

    def to_json(self) -> dict:
        out = asdict(self)
        out["kron_factors"] = list(self.kron_factors)
        out["learning_rate"] = self.recipe_lr()
        return out

    @classmethod
    def from_json(cls, data: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise TrainConfigError(f"unknown training settings: {', '.join(unknown)}")
        values = dict(data)
        if "kron_factors" in values:
            values["kron_factors"] = tuple(values["kron_factors"])
        return cls(**values)
