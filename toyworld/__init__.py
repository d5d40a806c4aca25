"""Toy world: procedural scenes, the ground-truth evaluator, the bundled toy model."""

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
IMAGE_SIZE = 64  # the toy world's pictures and the shipped toy model, pixels a side


def model_dir() -> Path:
    """The shipped toy base model (a diffusers-layout StableDiffusionXLPipeline directory)."""
    return PACKAGE_DIR / "model"


def loras_dir() -> Path:
    """The bundled concept adapters (kohya safetensors) and their manifest.json."""
    return PACKAGE_DIR / "loras"
