"""Render jobs: the REST API's batches, stored in the database and run by an executor.

An executor is one file here and one line in EXECUTORS; every executor runs the same job records the same
way (`runner.run_job`), so results do not depend on which one ran them.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

from app.jobs.queue import JobQueue
from app.settings import Settings

if TYPE_CHECKING:  # app.studio imports this package (its job board)
    from app.studio import Studio

EXECUTORS = {  # name -> "module:class", imported on use (Ray is heavy, and optional)
    "local": "app.jobs.local:LocalExecutor",
    "ray": "app.jobs.ray_executor:RayExecutor",
}


def make_executor(studio: Studio, settings: Settings | None = None) -> JobQueue:
    """The executor that `settings.executor` names, over `studio` (not started)."""
    settings = settings or studio.settings
    try:
        module, cls = EXECUTORS[settings.executor].split(":")
    except KeyError:
        raise ValueError(f"unknown executor {settings.executor!r}: {', '.join(EXECUTORS)}") from None
    return getattr(import_module(module), cls)(studio, settings)


__all__ = ["EXECUTORS", "JobQueue", "make_executor"]
