"""What every `lora-studio` command module shares: the Studio for a data dir, the --data-dir option, and the
one-red-line error handling."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import wraps
from pathlib import Path
from typing import Annotated

import typer

DataDir = Annotated[
    Path | None, typer.Option("--data-dir", envvar="LORA_STUDIO_DATA_DIR", help="catalog and stored files")
]


def _studio(data_dir: Path | None, **overrides):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # read when huggingface_hub is imported: set it first
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for lib in (diffusers_logging, transformers_logging):  # our own progress bar is the only one shown
        lib.disable_progress_bar()
        lib.set_verbosity_error()
    from app.studio import Studio

    return Studio.open(_settings(data_dir, **overrides))


def _settings(data_dir: Path | None, **overrides):
    """The settings for a data dir (environment and settings file as usual; None overrides nothing)."""
    from app.settings import Settings

    return Settings(**{k: v for k, v in {"data_dir": data_dir, **overrides}.items() if v is not None})


class OneLineErrors(logging.Filter):
    """Drops log records that carry a trace from the terminal: the command reports that error itself, as one
    red line (LORA_STUDIO_LOG=DEBUG shows the traces; `serve` keeps them in its log)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.exc_info is None


def configure_logging(level: str) -> None:
    handler = logging.StreamHandler()
    if level.upper() != "DEBUG":
        handler.addFilter(OneLineErrors())
    logging.basicConfig(level=level, handlers=[handler])


def full_traces() -> None:
    """A server logs every trace: remove the CLI's one-line filter from the root handlers."""
    for handler in logging.getLogger().handlers:
        for f in [f for f in handler.filters if isinstance(f, OneLineErrors)]:
            handler.removeFilter(f)


COMPILE_HELP = (
    "compile the denoiser with torch.compile (the 'compile' setting's mode, else 'default'): the first render "
    "at a size compiles, later ones run faster, switching LoRAs never recompiles"
)


def compile_mode(flag: bool) -> str | None:
    """The compile setting --compile asks for (None: leave the setting as it is)."""
    if not flag:
        return None
    from app.settings import Settings

    configured = Settings().compile
    return configured if configured != "off" else "default"


@contextmanager
def loss_progress(description: str, total: int) -> Iterator[Callable[[int, int, float], None]]:
    """A training progress bar (steps done, the latest loss, time) on stderr; yields the `progress(done, total,
    loss)` callback the Studio's training calls take."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}"),
        TimeElapsedColumn(),
        transient=not sys.stderr.isatty(),
    ) as bar:
        task = bar.add_task(description, total=total, loss=float("nan"))
        yield lambda done, total, loss: bar.update(task, completed=done, total=total, loss=loss)


def _fail(message: str, code: int = 1):
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _guard(fn):
    """Project errors become one red line and exit status 1, never a traceback."""

    @wraps(fn)
    def wrapper(*args, **kwargs):
        from composer.errors import StudioError
        from db.errors import CatalogError

        try:
            return fn(*args, **kwargs)
        except (StudioError, CatalogError) as exc:
            _fail(str(exc))

    return wrapper
