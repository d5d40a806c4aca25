"""Render jobs: the only code that queries `render_jobs`. The caller owns the transaction, as with every
repository; every state change is a conditional UPDATE (`WHERE status = ... AND worker = ...`) checked by its
row count, so that two processes racing for the same job (two workers claiming, a worker finishing while a
recoverer requeues) never both win, on SQLite and on PostgreSQL alike.

Lifecycle: queued -> running (claimed by one worker, which heartbeats) -> done | failed | cancelled. A worker
that stops heartbeating (its process died) is found by `recover_stale`; its job goes back to the queue with
`attempts + 1`, or fails with the reason once `attempts` reaches `max_attempts`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from db.errors import (  # the job errors live with the others; importable from here as before
    CatalogError,
    IdempotencyConflictError,
    InvalidFieldError,
    JobFinishedError,
    JobLostError,
    JobNotFoundError,
    QueueFullError,
    SubmitRaceError,
)
from db.models import JOB_STATUSES, RenderJob, utcnow

RESULT_KEYS = frozenset({"index", "images"})  # what every recorded result holds, besides anything else


def request_hash(payload: Any) -> str:
    """SHA-256 of the canonical JSON of a request body (sorted keys, no spaces): equal bodies, equal hashes."""
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


class JobRepository:
    """Render jobs: submit, claim, heartbeat, record, finish, cancel, recover, list."""

    def __init__(self, session: Session) -> None:
        self.session = session

    # --- submitting ---------------------------------------------------------------------------------------
    def submit(
        self,
        *,
        requests: list[dict[str, Any]],
        total: int,
        backbone: str,
        model: str | None = None,
        api_key_id: int | None = None,
        idempotency_key: str | None = None,
        max_attempts: int = 2,
    ) -> tuple[RenderJob, bool]:
        """Queue a job, or return the job this key already made for the same body.

        Returns:
            (job, created): created is False when (api_key_id, idempotency_key) named an existing job.

        Raises:
            IdempotencyConflictError: the key was used before with a different body.
            SubmitRaceError: a concurrent submit with the same key committed first (retry the transaction).
            InvalidFieldError: no requests, or a malformed count.
        """
        if not requests:
            raise InvalidFieldError("a render job needs at least one request")
        if max_attempts < 1:
            raise InvalidFieldError(f"max_attempts {max_attempts!r}: expected at least 1")
        digest = request_hash({"backbone": backbone, "model": model, "requests": requests})
        if idempotency_key is not None:
            existing = self._by_idempotency_key(api_key_id, idempotency_key)
            if existing is not None:
                return self._same_body(existing, digest, idempotency_key), False
        job = RenderJob(
            status="queued",
            api_key_id=api_key_id,
            idempotency_key=idempotency_key,
            request_hash=digest,
            backbone=backbone,
            model=model,
            requests=requests,
            results=[],
            total=total,
            completed=0,
            progress=0.0,
            attempts=0,
            max_attempts=max_attempts,
            cancel_requested=False,
        )
        self.session.add(job)
        try:
            self.session.flush()
        except IntegrityError as exc:  # (no savepoint: pysqlite's SAVEPOINTs do not nest in a transaction)
            raise SubmitRaceError(
                f"a concurrent submit with Idempotency-Key {idempotency_key!r} won; submit again for its job"
            ) from exc
        return job, True

    def _by_idempotency_key(self, api_key_id: int | None, key: str | None) -> RenderJob | None:
        stmt = select(RenderJob).where(RenderJob.idempotency_key == key)
        stmt = stmt.where(
            RenderJob.api_key_id.is_(None) if api_key_id is None else RenderJob.api_key_id == api_key_id
        )
        return self.session.scalars(stmt).one_or_none()

    @staticmethod
    def _same_body(job: RenderJob, digest: str, key: str | None) -> RenderJob:
        if job.request_hash != digest:
            raise IdempotencyConflictError(
                f"Idempotency-Key {key!r} was used for job {job.id} with a different request body; "
                "use a new key for a new request"
            )
        return job

    # --- reading ------------------------------------------------------------------------------------------
    def get(self, job_id: int, api_key_id: int | None = None) -> RenderJob:
        """The job with this id (and of this API key, when one is given).

        Raises:
            JobNotFoundError: naming the id.
        """
        job = self.session.get(RenderJob, job_id, populate_existing=True)
        if job is None or (api_key_id is not None and job.api_key_id != api_key_id):
            raise JobNotFoundError(f"no render job with id {job_id}")
        return job

    def list(
        self,
        status: str | None = None,
        api_key_id: int | None = None,
        limit: int = 50,
        offset: int = 0,
        oldest_first: bool = False,
    ) -> Sequence[RenderJob]:
        """Jobs, newest first (oldest first: the queue's order), filtered by status and API key."""
        if status is not None and status not in JOB_STATUSES:
            raise InvalidFieldError(f"job status {status!r}: expected one of {', '.join(JOB_STATUSES)}")
        stmt = select(RenderJob)
        if status is not None:
            stmt = stmt.where(RenderJob.status == status)
        if api_key_id is not None:
            stmt = stmt.where(RenderJob.api_key_id == api_key_id)
        order = RenderJob.id.asc() if oldest_first else RenderJob.id.desc()
        return self.session.scalars(stmt.order_by(order).limit(limit).offset(offset)).all()

    def count(self, status: str | None = None, api_key_id: int | None = None) -> int:
        stmt = select(func.count(RenderJob.id))
        if status is not None:
            stmt = stmt.where(RenderJob.status == status)
        if api_key_id is not None:
            stmt = stmt.where(RenderJob.api_key_id == api_key_id)
        return int(self.session.scalar(stmt) or 0)

    def count_queued(self) -> int:
        return self.count("queued")

    def queue_position(self, job: RenderJob) -> int | None:
        """1 for the next job to run, 2 for the one after, ...; None once the job left the queue."""
        if job.status != "queued":
            return None
        ahead = select(func.count(RenderJob.id)).where(RenderJob.status == "queued", RenderJob.id < job.id)
        return int(self.session.scalar(ahead) or 0) + 1

    def mean_run_seconds(self, last: int = 20) -> float | None:
        """Mean wall time of the last finished jobs (started to finished), or None before the first."""
        rows = self.session.execute(
            select(RenderJob.started_at, RenderJob.finished_at)
            .where(RenderJob.status == "done", RenderJob.started_at.is_not(None))
            .order_by(RenderJob.id.desc())
            .limit(last)
        ).all()
        spans = [(f - s).total_seconds() for s, f in rows if f is not None]
        return sum(spans) / len(spans) if spans else None

    # --- running ------------------------------------------------------------------------------------------
    def claim(self, worker: str, job_id: int | None = None, now: datetime | None = None) -> RenderJob | None:
        """Take the oldest queued job (or job `job_id`, if still queued) for `worker`, atomically: of two
        workers claiming at once, exactly one gets it. None when there is nothing to take."""
        now = now or utcnow()
        head = select(RenderJob.id).where(RenderJob.status == "queued")
        if job_id is not None:
            head = head.where(RenderJob.id == job_id)
        head = head.order_by(RenderJob.id).limit(1)
        if self.session.get_bind().dialect.name == "postgresql":
            head = head.with_for_update(skip_locked=True)  # others skip the row instead of waiting on it
        stmt = (
            update(RenderJob)
            .where(RenderJob.id == head.scalar_subquery(), RenderJob.status == "queued")
            .values(status="running", worker=worker, started_at=now, heartbeat_at=now)
            .returning(RenderJob.id)
            .execution_options(synchronize_session=False)
        )
        claimed = self.session.execute(stmt).scalar_one_or_none()
        return None if claimed is None else self.get(claimed)

    def held(self, job_id: int, worker: str, *, lock: bool = False) -> RenderJob:
        """The job, checked to be running under `worker`.

        Raises:
            JobLostError: it is not (recovered, cancelled or finished elsewhere).
        """
        stmt = select(RenderJob).where(RenderJob.id == job_id).execution_options(populate_existing=True)
        if lock and self.session.get_bind().dialect.name == "postgresql":
            stmt = stmt.with_for_update()
        job = self.session.scalars(stmt).one_or_none()
        if job is None or job.status != "running" or job.worker != worker:
            state = "gone" if job is None else f"{job.status}, held by {job.worker or 'nobody'}"
            raise JobLostError(f"render job {job_id} is no longer held by {worker} ({state})")
        return job

    def heartbeat(
        self, job_id: int, worker: str, progress: float | None = None, now: datetime | None = None
    ) -> bool:
        """Mark the job alive (and its progress); True when a cancel was requested.

        Raises:
            JobLostError: the worker no longer holds the job.
        """
        values: dict[str, Any] = {"heartbeat_at": now or utcnow()}
        if progress is not None:
            values["progress"] = min(1.0, max(0.0, float(progress)))
        stmt = (
            update(RenderJob)
            .where(RenderJob.id == job_id, RenderJob.status == "running", RenderJob.worker == worker)
            .values(**values)
            .execution_options(synchronize_session=False)
        )
        if self.session.execute(stmt).rowcount != 1:
            self.held(job_id, worker)  # raises, naming the job's state
        return bool(self.session.scalar(select(RenderJob.cancel_requested).where(RenderJob.id == job_id)))

    def record_result(self, job_id: int, worker: str, result: dict[str, Any], images: int) -> RenderJob:
        """Add one finished request's result (`index`: the request's position, `images`: stored paths) and
        count its images. A request already recorded is refused, so a retried job never records twice.

        Raises:
            JobLostError: the worker no longer holds the job.
            InvalidFieldError: a malformed result, or a request recorded before.
        """
        missing = RESULT_KEYS - set(result)
        if missing:
            raise InvalidFieldError(f"job result is missing {', '.join(sorted(missing))}")
        job = self.held(job_id, worker, lock=True)
        if any(r["index"] == result["index"] for r in job.results):
            raise InvalidFieldError(f"render job {job_id}: request {result['index']} is already recorded")
        job.results.append(result)
        job.completed = job.completed + images
        job.progress = min(1.0, job.completed / job.total)
        self.session.flush()
        return job

    def finish(self, job_id: int, worker: str, status: str = "done", error: str | None = None) -> RenderJob:
        """End the job the worker holds: done, failed (with the error) or cancelled.

        Raises:
            JobLostError: the worker no longer holds the job.
        """
        if status not in ("done", "failed", "cancelled"):
            raise InvalidFieldError(f"a job finishes as done, failed or cancelled, not {status!r}")
        job = self.held(job_id, worker, lock=True)
        job.status, job.error, job.finished_at, job.worker = status, error, utcnow(), None
        if status == "done":
            job.progress = 1.0
        self.session.flush()
        return job

    def cancel(self, job_id: int, api_key_id: int | None = None) -> RenderJob:
        """Cancel a job: a queued one at once, a running one by asking its worker (it stops between steps).

        Raises:
            JobNotFoundError: no such job (of this key).
            JobFinishedError: the job is already done, failed or cancelled.
        """
        for _ in range(3):  # a worker may claim the job between our read and our write: read again
            job = self.get(job_id, api_key_id)
            if job.finished:
                raise JobFinishedError(f"render job {job_id} is already {job.status}; nothing to cancel")
            values: dict[str, Any] = {"cancel_requested": True}
            if job.status == "queued":
                values.update(status="cancelled", finished_at=utcnow())
            stmt = (
                update(RenderJob)
                .where(RenderJob.id == job_id, RenderJob.status == job.status)
                .values(**values)
                .execution_options(synchronize_session=False)
            )
            if self.session.execute(stmt).rowcount == 1:
                return self.get(job_id)
        raise CatalogError(f"render job {job_id} kept changing state; try again")

    def release(
        self,
        job_id: int,
        worker: str,
        reason: str,
        now: datetime | None = None,
        *,
        count_attempt: bool = True,
    ) -> RenderJob | None:
        """The job's worker died: back to the queue with attempts + 1, or failed with `reason` once attempts
        reach max_attempts (cancelled if a cancel was pending). `count_attempt=False`: a worker shutting down
        in good order hands the job back without using up an attempt. None when the worker no longer held it."""
        job = self.session.get(RenderJob, job_id, populate_existing=True)
        if job is None or job.status != "running" or job.worker != worker:
            return None
        attempts = job.attempts + (1 if count_attempt else 0)
        if job.cancel_requested:
            status, error = "cancelled", None
        elif attempts >= job.max_attempts:
            status, error = "failed", f"{reason}; gave up after {attempts} attempts"
        else:
            status, error = "queued", None
        finished = status != "queued"
        stmt = (
            update(RenderJob)
            .where(
                RenderJob.id == job_id,
                RenderJob.status == "running",
                RenderJob.worker == worker,
                RenderJob.attempts == job.attempts,
            )
            .values(
                status=status,
                attempts=attempts,
                error=error,
                worker=None,
                heartbeat_at=None,
                finished_at=(now or utcnow()) if finished else None,
                progress=job.completed / job.total,
            )
            .execution_options(synchronize_session=False)
        )
        if self.session.execute(stmt).rowcount != 1:
            return None  # another recoverer got there first
        return self.get(job_id)

    def recover_dead(self, is_dead: Callable[[str], bool], now: datetime | None = None) -> list[RenderJob]:
        """Release every running job whose worker `is_dead` says has died (whatever its last heartbeat)."""
        running = self.session.execute(
            select(RenderJob.id, RenderJob.worker).where(RenderJob.status == "running")
        ).all()
        out = []
        for job_id, worker in running:
            if worker and is_dead(worker):
                job = self.release(job_id, worker, f"worker {worker} died with its process", now)
                if job is not None:
                    out.append(job)
        return out

    def recover_stale(self, older_than: timedelta, now: datetime | None = None) -> list[RenderJob]:
        """Release every running job whose heartbeat is older than `older_than` (its worker is gone)."""
        now = now or utcnow()
        stale = self.session.execute(
            select(RenderJob.id, RenderJob.worker, RenderJob.heartbeat_at).where(
                RenderJob.status == "running", RenderJob.heartbeat_at < now - older_than
            )
        ).all()
        out = []
        for job_id, worker, beat in stale:
            silent = (now - beat).total_seconds()
            job = self.release(job_id, worker, f"worker {worker} stopped heartbeating ({silent:.0f} s)", now)
            if job is not None:
                out.append(job)
        return out


__all__ = [
    "IdempotencyConflictError",
    "JobFinishedError",
    "JobLostError",
    "JobNotFoundError",
    "JobRepository",
    "QueueFullError",
    "SubmitRaceError",
    "request_hash",
]
