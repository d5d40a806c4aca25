"""What the browser front ends (the Gradio studio at /, the admin page at /admin) call besides the catalog:
render, train, hash a file, and the registered composition methods. `app.web.frontend_for(studio)` builds one
from a Studio; the front ends get it handed in and so never import torch (an import-linter contract)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from app.api.service import StudioService

RenderProgress = Callable[[int, int], None]  # (steps done, total steps)
TrainProgress = Callable[[int, int, float], None]  # (steps done, total steps, loss)


class Rendered(Protocol):
    """`app.studio.RenderResult`: PIL images, provenance (LoRA names, hashes, weights, method, seed...) and
    the saved PNGs (provenance in their text chunks)."""

    images: list
    provenance: dict
    render_id: int
    paths: list[Path]


class Render(Protocol):
    def __call__(
        self,
        *,
        prompt: str,
        negative_prompt: str = "",
        loras: list[tuple[str, float]] = ...,
        method: str = "merge",
        params: object = None,
        seed: int = 0,
        steps: int | None = None,
        guidance: float | None = None,
        height: int | None = None,
        width: int | None = None,
        progress: RenderProgress | None = None,
    ) -> Rendered: ...


class Train(Protocol):
    def __call__(
        self,
        *,
        images: Path,
        name: str,
        kind: str,
        prompt: str,
        steps: int | None = None,
        trigger_words: list[str] | None = None,
        progress: TrainProgress | None = None,
    ) -> Any: ...  # app.training.TrainOutcome


@dataclass(frozen=True)
class Frontend:
    """The Studio as the browser front ends see it.

    Attributes:
        studio: catalog (`studio.library`), settings and sessions, as the REST API sees them.
        render: one render with a LoRA stack, saved as PNG under `<data dir>/renders`.
        train: train an adapter on a folder of images and catalog it.
        file_hashes: a file's sha256, AutoV2 and tensor hash (`composer.formats` FileHashes).
        methods: composition method name -> its parameters dataclass.
        adapter_types: the adapter types the trainer can train.
        defaults: the default backbone's sampling defaults, "steps" and "guidance".
    """

    studio: StudioService
    render: Render
    train: Train
    file_hashes: Callable[[Path], Any]
    methods: Mapping[str, type]
    adapter_types: tuple[str, ...]
    defaults: Mapping[str, float]

    @property
    def renders_dir(self) -> Path:
        return self.studio.settings.root / "renders"
