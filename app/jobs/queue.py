"""What every executor shares: a batch checked in full before it is stored (requests, LoRA names, families,
the model), the bounded queue, idempotent submission and cancellation. Executors add how jobs run."""

from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod
from typing import Any

from app.settings import Settings
from app.studio import Studio, resolve_backbone
from composer.backbones import TINY
from composer.errors import FamilyMismatchError, StudioError
from composer.render import RenderRequest
from db.errors import CatalogError
from db.jobs import JobRepository, QueueFullError, SubmitRaceError
from db.models import RenderJob
from db.session import unit_of_work

log = logging.getLogger(__name__)


class JobQueue(ABC):
    """Submission and cancellation over the render_jobs table; executors subclass it (one level) and say
    how queued jobs are run (`start`, `stop`, and `wake` when a job arrives)."""

    def __init__(self, studio: Studio, settings: Settings | None = None) -> None:
        self.studio = studio
        self.settings = settings or studio.settings

    # --- the JobExecutor protocol (app.api.service) --------------------------------------------------------
    def submit(
        self,
        requests: list[dict[str, Any]],
        *,
        backbone: str | None = None,
        model: str | None = None,
        api_key_id: int | None = None,
        idempotency_key: str | None = None,
    ) -> tuple[RenderJob, bool]:
        """Check every request, then queue the batch as one job (or find the job this key made before).

        Returns:
            (job, created): created is False for a repeated Idempotency-Key with the same body.

        Raises:
            AdapterNotFoundError: a LoRA name is unknown (close names suggested), naming the request.
            FamilyMismatchError, StudioError: a request is invalid (naming it), or the model is not served.
            IdempotencyConflictError: the key was used with another body.
            QueueFullError: max_queued_jobs are queued already.
        """
        backbone = backbone or self.settings.backbone
        model = model or self.settings.model
        total = self.validate(requests, backbone, model)
        for attempt in range(2):
            try:
                with unit_of_work(self.studio.sessions) as session:
                    repo = JobRepository(session)
                    job, created = repo.submit(
                        requests=requests,
                        total=total,
                        backbone=backbone,
                        model=model,
                        api_key_id=api_key_id,
                        idempotency_key=idempotency_key,
                        max_attempts=self.settings.job_max_attempts,
                    )
                    if created:  # counted with the new job; raising rolls it back (a repeat is never refused)
                        self._check_room(repo)
                break
            except SubmitRaceError:
                if attempt:
                    raise  # the second time round the winner's job is found: this cannot happen twice
        if created:
            log.info("render job %d queued: %d requests, %d images", job.id, len(requests), total)
            self.wake()
        return job, created

    def cancel(self, job_id: int, api_key_id: int | None = None) -> RenderJob:
        """Cancel a queued job at once, or ask a running job's worker to stop.

        Raises:
            JobNotFoundError, JobFinishedError.
        """
        with unit_of_work(self.studio.sessions) as session:
            return JobRepository(session).cancel(job_id, api_key_id)

    @abstractmethod
    def start(self) -> None:
        """Begin running queued jobs (recovering those a dead process left running)."""

    @abstractmethod
    def stop(self) -> None:
        """Stop taking jobs; a running job is handed back to the queue."""

    def wake(self) -> None:  # noqa: B027 - an optional hook: polling executors need not override it
        """A job was queued (executors that poll may look at once)."""

    # --- checks --------------------------------------------------------------------------------------------
    def validate(self, requests: list[dict[str, Any]], backbone: str, model: str | None) -> int:
        """Check a batch as Studio.render would, before anything is stored; the number of images it makes.

        Raises:
            StudioError, CatalogError: naming the request (`requests[i]`) and what is wrong.
        """
        if model not in (None, TINY, self.settings.model):
            raise StudioError(
                f"model {model!r} is not served here; leave it out for the server's model "
                f"({self.settings.model or 'the backbone default'}) or use {TINY!r}"
            )
        family = resolve_backbone(backbone, model)[0].family
        total = 0
        for i, data in enumerate(requests):
            try:
                request = RenderRequest.from_json(data)
                request.validate()
                for lw in request.loras:
                    info, _ = self.studio.resolve_lora(lw.name)
                    if info.family != family:
                        raise FamilyMismatchError(
                            f"LoRA {info.name!r} is for {info.family}; the backbone {backbone!r} is {family}"
                        )
            except (StudioError, CatalogError) as exc:
                exc.args = (f"requests[{i}]: {exc.args[0] if exc.args else exc}", *exc.args[1:])
                raise
            total += request.num_images
        return total

    def _check_room(self, repo: JobRepository) -> None:
        """Refuse when more than max_queued_jobs are queued; the wait is the mean job time per excess job."""
        queued, limit = repo.count_queued(), self.settings.max_queued_jobs
        if queued <= limit:
            return
        per_job = repo.mean_run_seconds() or 1.0
        wait = max(1, math.ceil(per_job * (queued - limit) / self.settings.workers))
        raise QueueFullError(
            f"{queued - 1} render jobs are queued, the limit is {limit} (max_queued_jobs); retry in {wait} s",
            wait,
        )


__all__ = ["JobQueue"]
