"""`lora-studio train-gates`: train gated fusion's gates for a set of catalog LoRAs and keep them with the set."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from app.cli_common import DataDir, _fail, _guard, _studio, loss_progress


@_guard
def train_gates(
    loras: Annotated[
        str, typer.Option("--loras", help="the set: two or more catalog names, comma-separated (a,b,c)")
    ],
    images: Annotated[
        Path,
        typer.Option(
            "--images",
            help="folder of images showing the set's concepts together (IMG.txt captions, with trigger words)",
        ),
    ],
    steps: Annotated[int, typer.Option(help="gate training steps")] = 300,
    lr: Annotated[float, typer.Option("--lr", help="learning rate of the gates (AdamW)")] = 5e-3,
    seed: int = 0,
    prompt: Annotated[
        str | None,
        typer.Option(help="caption of images without an IMG.txt (default: the LoRAs' trigger words)"),
    ] = None,
    backbone: Annotated[str | None, typer.Option(help="toy, sdxl or flux")] = None,
    model: Annotated[
        str | None, typer.Option(help="'tiny', a diffusers directory, a .safetensors checkpoint or a hub id")
    ] = None,
    data_dir: DataDir = None,
):
    """Train the gates that fuse a set of LoRAs (`--method gated`) on images of their concepts together, with
    the base model and the LoRAs frozen, and store them in the catalog with the set for this base model."""
    if steps < 1:
        _fail(f"--steps {steps}: at least 1")
    if not lr > 0:
        _fail(f"--lr {lr}: must be positive")
    names = [n.strip() for n in loras.split(",")]
    if any(not n for n in names):
        _fail(f"--loras {loras!r}: write catalog names separated by commas, e.g. --loras star,heart")
    studio = _studio(data_dir)
    with loss_progress("training gates", steps) as progress:
        info = studio.train_gates(
            names,
            images,
            steps=steps,
            lr=lr,
            seed=seed,
            prompt=prompt,
            backbone=backbone,
            model=model,
            progress=progress,
        )
    r = info.record
    typer.echo(
        f"gates for {', '.join(a['name'] for a in info.adapters)}: {r['parameters']:,} parameters, "
        f"{r['steps']} steps in {r['seconds']:.0f} s on {r['images']} images; loss on them "
        f"{r['loss_untrained']:.4f} untrained -> {r['loss_trained']:.4f} trained"
    )
    typer.echo(f"stored for {info.backbone} {info.model}; render with --method gated")
