"""What every executor shares: it runs the jobs queued on its Studio's job board (`app.jobs.board`), and
listens there while it runs, to be woken when a job arrives and told when one is cancelled. Executors add how
jobs run."""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

from app.catalog import JobInfo
from app.settings import Settings

if TYPE_CHECKING:
    from app.studio import Studio

log = logging.getLogger(__name__)


class JobQueue(ABC):
    """An executor over the render_jobs table; executors subclass it (one level) and say how queued jobs are
    run (`start`, `stop`, and `wake` when a job arrives). `start` calls `listen`, `stop` calls `unlisten`."""

    def __init__(self, studio: Studio, settings: Settings | None = None) -> None:
        self.studio = studio
        self.settings = settings or studio.settings

    def listen(self) -> None:
        """Hear the Studio's job board (queued and cancelled jobs) from now on."""
        self.studio.jobs.listen(self)

    def unlisten(self) -> None:
        self.studio.jobs.unlisten(self)

    @abstractmethod
    def start(self) -> None:
        """Begin running queued jobs (recovering those a dead process left running)."""

    @abstractmethod
    def stop(self) -> None:
        """Stop taking jobs; a running job is handed back to the queue."""

    def wake(self) -> None:  # noqa: B027 - an optional hook: polling executors need not override it
        """A job was queued (executors that poll may look at once)."""

    def cancelled(self, job: JobInfo) -> None:  # noqa: B027 - an optional hook
        """A job was cancelled; a running one's worker may be told at once rather than at its next heartbeat."""


__all__ = ["JobQueue"]
