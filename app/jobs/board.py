"""Render jobs as the Studio serves them: submit (every request checked before anything is stored, the queue
bounded, Idempotency-Key honoured), get, list, image files and cancel. The Studio delegates its job methods
here; executors (`app.jobs.queue.JobQueue`) run what is queued and listen while they run, to be woken when a
job arrives and told when one is cancelled."""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from sqlalchemy.orm import Session, sessionmaker

from app.catalog import JobInfo, JobPage
from app.settings import Settings
from db.errors import JobNotFoundError, QueueFullError, SubmitRaceError
from db.jobs import JobRepository
from db.session import unit_of_work

# (requests, backbone, model) -> images the batch makes; raises naming a bad request (`Studio.check_requests`)
RequestCheck = Callable[[list[dict[str, Any]], str, str | None], int]

log = logging.getLogger(__name__)


class JobListener(Protocol):
    """What an executor hears while it runs."""

    def wake(self) -> None:
        """A job was queued (executors that poll may look at once)."""

    def cancelled(self, job: JobInfo) -> None:
        """A job was cancelled, or its running worker asked to stop."""


class JobBoard:
    """The render_jobs table behind the Studio's job methods."""

    def __init__(
        self, settings: Settings, sessions: sessionmaker[Session], check_requests: RequestCheck
    ) -> None:
        self.settings = settings
        self.sessions = sessions
        self.check_requests = check_requests
        self._listeners: list[JobListener] = []
        self._lock = threading.Lock()

    def listen(self, listener: JobListener) -> None:
        with self._lock:
            self._listeners.append(listener)

    def unlisten(self, listener: JobListener) -> None:
        with self._lock:
            self._listeners = [x for x in self._listeners if x is not listener]

    def _listening(self) -> list[JobListener]:
        with self._lock:
            return list(self._listeners)

    def submit(
        self,
        requests: list[dict[str, Any]],
        *,
        backbone: str | None = None,
        model: str | None = None,
        api_key_id: int | None = None,
        idempotency_key: str | None = None,
    ) -> tuple[JobInfo, bool]:
        """Check every request, then queue the batch as one job (or find the job this key made before).

        Returns:
            (job, created): created is False for a repeated Idempotency-Key with the same body.

        Raises:
            AdapterNotFoundError: a LoRA name is unknown (close names suggested), naming the request.
            FamilyMismatchError, StudioError: a request is invalid (naming it), or the model is not served.
            IdempotencyConflictError: the key was used with another body.
            QueueFullError: max_queued_jobs are queued already.
        """
        settings = self.settings
        backbone = backbone or settings.backbone
        model = model or settings.model
        total = self.check_requests(requests, backbone, model)
        for attempt in range(2):
            try:
                with unit_of_work(self.sessions) as session:
                    repo = JobRepository(session)
                    job, created = repo.submit(
                        requests=requests,
                        total=total,
                        backbone=backbone,
                        model=model,
                        api_key_id=api_key_id,
                        idempotency_key=idempotency_key,
                        max_attempts=settings.job_max_attempts,
                    )
                    if created:  # counted with the new job; raising rolls it back (a repeat is never refused)
                        self._check_room(repo, api_key_id)
                    info = JobInfo.of(job, repo.queue_position(job))
                break
            except SubmitRaceError:
                if attempt:
                    raise  # the second time round the winner's job is found: this cannot happen twice
        if created:
            log.info("render job %d queued: %d requests, %d images", info.id, len(requests), total)
            for listener in self._listening():
                listener.wake()
        return info, created

    def get(self, job_id: int, api_key_id: int | None = None) -> JobInfo:
        """The job with this id (and of this API key, when one is given).

        Raises:
            JobNotFoundError: naming the id.
        """
        with self.sessions() as session:
            repo = JobRepository(session)
            job = repo.get(job_id, api_key_id)
            return JobInfo.of(job, repo.queue_position(job))

    def list(
        self, status: str | None = None, api_key_id: int | None = None, limit: int = 50, offset: int = 0
    ) -> JobPage:
        """Jobs newest first, filtered by status and API key, and how many match in all."""
        with self.sessions() as session:
            repo = JobRepository(session)
            jobs = repo.list(status, api_key_id, limit, offset)
            items = [JobInfo.of(job, repo.queue_position(job)) for job in jobs]
            return JobPage(items, repo.count(status, api_key_id))

    def image(self, job_id: int, n: int, api_key_id: int | None = None) -> Path:
        """The PNG file of image `n` of a job (numbered across the batch, in request order).

        Raises:
            JobNotFoundError: no such job, no image `n` yet, or the file is no longer stored.
        """
        job = self.get(job_id, api_key_id)
        paths = [p for r in sorted(job.results, key=lambda r: r["index"]) for p in r["images"]]
        if not 0 <= n < len(paths):
            raise JobNotFoundError(f"render job {job_id} has {len(paths)} image(s) so far; no image {n}")
        root = self.settings.root
        path = (root / paths[n]).resolve()
        if not path.is_relative_to(root / "renders") or not path.is_file():
            raise JobNotFoundError(f"image {n} of render job {job_id} is no longer stored")
        return path

    def cancel(self, job_id: int, api_key_id: int | None = None) -> JobInfo:
        """Cancel a queued job at once, or ask a running job's worker to stop.

        Raises:
            JobNotFoundError, JobFinishedError.
        """
        with unit_of_work(self.sessions) as session:
            repo = JobRepository(session)
            job = repo.cancel(job_id, api_key_id)
            info = JobInfo.of(job, repo.queue_position(job))
        for listener in self._listening():
            listener.cancelled(info)
        return info

    def _check_room(self, repo: JobRepository, api_key_id: int | None) -> None:
        """Refuse when more than max_queued_jobs are queued, or more than max_queued_jobs_per_key of this
        key's (so that one key cannot fill the queue); the wait is the mean job time per excess job."""
        settings = self.settings
        limits = [
            (repo.count_queued(), settings.max_queued_jobs, "render jobs are queued", "max_queued_jobs")
        ]
        if api_key_id is not None:
            mine = repo.count("queued", api_key_id)
            limits.append(
                (
                    mine,
                    settings.max_queued_jobs_per_key,
                    "of this key's jobs are queued",
                    "max_queued_jobs_per_key",
                )
            )
        for queued, limit, what, setting in limits:
            if queued <= limit:
                continue
            per_job = repo.mean_run_seconds() or 1.0
            wait = max(1, math.ceil(per_job * (queued - limit) / settings.workers))
            raise QueueFullError(
                f"{queued - 1} {what}, the limit is {limit} ({setting}); retry in {wait} s", wait
            )


__all__ = ["JobBoard", "JobListener"]
