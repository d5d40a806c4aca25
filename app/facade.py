"""The Studio as every front end sees it: the REST API, the Gradio studio and the admin page are handed the one
`app.studio.Studio` typed as `StudioFacade`, and so never import torch nor open a database session (import-linter
contracts). Plain values in, plain dataclasses (`app.catalog`) out."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from app.catalog import AdapterInfo, ImportOutcome, JobInfo, JobPage, RenderInfo, RenderPage
from app.settings import Settings

if TYPE_CHECKING:  # torch-free, but it opens sessions: front ends reach it through the Studio only
    from app.accounts import Accounts

RenderProgress = Callable[[int, int], None]  # (steps done, total steps)
TrainProgress = Callable[[int, int, float], None]  # (steps done, total steps, loss)


@dataclass(frozen=True)
class SamplingDefaults:
    """The default backbone's denoising steps and guidance scale."""

    steps: int
    guidance: float


class Rendered(Protocol):
    """`app.rendering.RenderResult`: PIL images, provenance (LoRA names, hashes, weights, method, seed...) and
    the saved PNGs (provenance in their text chunks)."""

    images: list
    provenance: dict
    render_id: int
    paths: list[Path]


class Catalog(Protocol):
    """The catalog side of the Studio (`app.library.Library`)."""

    def list(
        self,
        query: str | None = None,
        family: str | None = None,
        tag: str | None = None,
        limit: int = 100,
        *,
        adapter_type: str | None = None,
        offset: int = 0,
    ) -> list[AdapterInfo]: ...

    def count(
        self,
        query: str | None = None,
        family: str | None = None,
        tag: str | None = None,
        *,
        adapter_type: str | None = None,
    ) -> int: ...

    def names(self) -> list[str]: ...

    def get(self, ref: str) -> AdapterInfo: ...

    def find(self, ref: str) -> AdapterInfo | None: ...

    def import_file(
        self,
        path: Path,
        name: str | None = None,
        tags: list[str] | None = None,
        *,
        exact_name: bool = False,
        description: str = "",
    ) -> AdapterInfo: ...

    def import_paths(self, paths: list[Path], tags: list[str] | None = None) -> list[ImportOutcome]: ...

    def update(self, ref: str, **changes: Any) -> AdapterInfo: ...

    def delete(self, ref: str) -> AdapterInfo: ...


@runtime_checkable
class StudioFacade(Protocol):
    """The one service object the front ends talk to (`app.studio.Studio`).

    Attributes:
        settings: the runtime settings.
        library: the catalog (`app.library.Library`).
        accounts: API keys and admin users (`app.accounts.Accounts`).
        renders_dir: where `render_image` writes its PNGs.
    """

    settings: Settings
    library: Catalog
    accounts: Accounts

    @property
    def renders_dir(self) -> Path: ...

    @property
    def thumbs_dir(self) -> Path: ...

    # --- rendering and training (each holds the Studio's pipeline lock) -------------------------------
    def render_image(
        self,
        *,
        prompt: str,
        negative_prompt: str = "",
        loras: Sequence[tuple[str, float]] = (),
        method: str = "merge",
        params: object = None,
        seed: int = 0,
        steps: int | None = None,
        guidance: float | None = None,
        height: int | None = None,
        width: int | None = None,
        num_images: int = 1,
        backbone: str | None = None,
        model: str | None = None,
        out: Path | None = None,
        progress: RenderProgress | None = None,
    ) -> Rendered:
        """One render with a LoRA stack (backbone and model default to the settings'), saved as PNG at `out`
        or under `renders_dir`."""
        ...

    def train_adapter(
        self,
        *,
        images: Path,
        name: str,
        kind: str,
        prompt: str,
        steps: int | None = None,
        trigger_words: list[str] | None = None,
        progress: TrainProgress | None = None,
    ) -> Any:  # app.training.TrainOutcome
        """Train an adapter on a folder of images and catalog it."""
        ...

    def regenerate_preview(self, ref: str) -> AdapterInfo:
        """Render the adapter's trigger words with it and keep the image as its preview."""
        ...

    # --- what the front ends show -------------------------------------------------------------------
    def composition_methods(self) -> Mapping[str, type]:
        """Composition method name -> its parameters dataclass."""
        ...

    def adapter_types(self) -> tuple[str, ...]:
        """The adapter types the trainer can train."""
        ...

    def default_sampling(self) -> SamplingDefaults: ...

    def file_hashes(self, path: Path) -> Any:
        """A file's sha256, AutoV2 and tensor hash (`composer.formats` FileHashes)."""
        ...

    def list_renders(self, limit: int = 12, offset: int = 0) -> RenderPage:
        """Finished renders, newest first (the studio's history), and how many there are."""
        ...

    def served_family(self) -> str:
        """The LoRA family the server's own backbone takes ("sdxl" for the toy model)."""
        ...

    def get_render(self, render_id: int) -> RenderInfo:
        """A finished render by id; StudioError when there is none."""
        ...

    # --- render jobs --------------------------------------------------------------------------------
    def submit_job(
        self,
        requests: list[dict[str, Any]],
        *,
        backbone: str | None = None,
        model: str | None = None,
        api_key_id: int | None = None,
        idempotency_key: str | None = None,
    ) -> tuple[JobInfo, bool]:
        """Check a batch in full and queue it as one job; (job, created)."""
        ...

    def expand_auto(
        self, requests: list[dict[str, Any]], backbone: str | None = None, model: str | None = None
    ) -> list[list[dict]]:
        """Auto mode: each request's `auto_loras` (K) replaced by the K LoRAs search picks for its prompt."""
        ...

    def search_loras(
        self, query: str, mode: str = "hybrid", limit: int = 20, *, tag=None, adapter_type=None
    ) -> list[Any]:
        """Hits (`app.finder.Hit`: info, score, text_score, weight_score) for a query, best first."""
        ...

    def near_duplicates(self) -> dict | None:
        """{"threshold", "groups": [{"names", "cosine"}]}: entries whose weights do nearly the same; None
        without a LoRA encoder for the served model."""
        ...

    def get_job(self, job_id: int, api_key_id: int | None = None) -> JobInfo: ...

    def list_jobs(
        self, status: str | None = None, api_key_id: int | None = None, limit: int = 50, offset: int = 0
    ) -> JobPage: ...

    def job_image(self, job_id: int, n: int, api_key_id: int | None = None) -> Path: ...

    def cancel_job(self, job_id: int, api_key_id: int | None = None) -> JobInfo: ...


__all__ = ["Catalog", "Rendered", "SamplingDefaults", "StudioFacade"]
