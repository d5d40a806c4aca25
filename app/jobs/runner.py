"""Running one claimed job, the same way under every executor: the requests not yet recorded go through
`Studio.render_batch`, consecutive ones that can share a pipeline call (same LoRAs, settings and size, one
image each; `composer.render.batch_key`) in groups of up to `max_batch`; their images land under
<data>/renders/job-<id>/, and each request's result is recorded in the same transaction as its render record,
so a job retried after its worker died skips what is done and records nothing twice. A heartbeat thread keeps
the job alive in the database, writes its progress and reads cancellation, which the progress callback then
honours between denoising steps."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from app.rendering import RenderResult
from app.studio import Studio
from composer.errors import StudioError
from composer.render import RenderRequest, batch_key
from db.errors import CatalogError
from db.jobs import JobLostError, JobRepository
from db.session import unit_of_work

log = logging.getLogger(__name__)


class JobInterrupted(Exception):
    """Raised from the progress callback to stop a render: the job was cancelled, lost, or the worker stops."""


@dataclass
class JobControl:
    """What a worker running a job shares with the heartbeat thread."""

    job_id: int
    worker: str
    total: int = 1  # images of the whole job (run_job reads it from the job)
    done: int = 0  # images recorded
    fraction: float = 0.0  # of the request being rendered now
    images_now: int = 0  # images the current request makes
    cancel: threading.Event = field(default_factory=threading.Event)
    lost: threading.Event = field(default_factory=threading.Event)
    stopping: threading.Event | None = None  # the worker's own stop signal (shutdown)

    def progress(self) -> float:
        return min(1.0, (self.done + self.fraction * self.images_now) / self.total)

    def interrupted(self) -> str | None:
        if self.cancel.is_set():
            return "cancelled"
        if self.lost.is_set():
            return "lost"
        if self.stopping is not None and self.stopping.is_set():
            return "stopping"
        return None


class Heartbeats:
    """One thread that heartbeats every job this process runs, and (when `stale_after` is given) puts back
    jobs whose workers in any process went silent."""

    def __init__(self, sessions, interval: float, stale_after: float | None = None) -> None:
        self.sessions, self.interval, self.stale_after = sessions, interval, stale_after
        self._controls: dict[int, JobControl] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def add(self, control: JobControl) -> None:
        with self._lock:
            self._controls[control.job_id] = control

    def remove(self, control: JobControl) -> None:
        with self._lock:
            self._controls.pop(control.job_id, None)

    def get(self, job_id: int) -> JobControl | None:
        with self._lock:
            return self._controls.get(job_id)

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="job-heartbeats", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def beat(self) -> None:
        """Heartbeat every held job once; recover stale jobs (if asked)."""
        with self._lock:
            controls = list(self._controls.values())
        for control in controls:
            try:
                with unit_of_work(self.sessions) as session:
                    if JobRepository(session).heartbeat(control.job_id, control.worker, control.progress()):
                        control.cancel.set()
            except JobLostError as exc:
                log.warning("%s", exc)
                control.lost.set()
        if self.stale_after is not None:
            with unit_of_work(self.sessions) as session:
                for job in JobRepository(session).recover_stale(timedelta(seconds=self.stale_after)):
                    log.warning(
                        "render job %d: worker lost; now %s (attempt %d)", job.id, job.status, job.attempts
                    )

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.beat()
            except Exception:  # a database hiccup must not end the heartbeats: log it, beat again next time
                log.exception("heartbeat failed")


def job_dir(root: Path, job_id: int) -> Path:
    return root / "renders" / f"job-{job_id}"


def run_job(studio: Studio, control: JobControl) -> str:
    """Render every request of the claimed job that is not recorded yet, then finish the job.

    Returns:
        What became of it: "done", "failed", "cancelled", "requeued" (the worker is stopping) or "lost"
        (another process holds it now).
    """
    job_id, worker = control.job_id, control.worker
    with unit_of_work(studio.sessions) as session:
        job = JobRepository(session).held(job_id, worker)
        requests, backbone, model = list(job.requests), job.backbone, job.model
        recorded = {r["index"] for r in job.results}
        control.done, control.total = job.completed, job.total
    out = job_dir(studio.settings.root, job_id)
    root = studio.settings.root

    def progress(step: int, steps: int) -> None:
        control.fraction = step / steps
        reason = control.interrupted()
        if reason is not None:
            raise JobInterrupted(reason)

    try:
        studio.pipeline(backbone, model)  # cached after the first job
        pending = [(i, RenderRequest.from_json(data)) for i, data in enumerate(requests) if i not in recorded]
        for group in batches(pending, studio.settings.max_batch):
            reason = control.interrupted()
            if reason is not None:
                raise JobInterrupted(reason)
            indices = [index for index, _ in group]
            images = sum(request.num_images for _, request in group)
            control.fraction, control.images_now = 0.0, images

            def record(session, position: int, result: RenderResult, indices=indices) -> None:
                entry = {
                    "index": indices[position],
                    "render_id": result.render_id,
                    "images": [str(p.relative_to(root)) for p in result.paths],
                    "provenance": result.provenance,
                }
                JobRepository(session).record_result(job_id, worker, entry, len(result.paths))

            studio.render_batch(
                [request for _, request in group],
                backbone,
                model,
                outs=[out / f"{index}.png" for index in indices],
                progress=progress,
                on_record=record,
            )
            control.done += images
            control.fraction, control.images_now = 0.0, 0
        return _finish(studio, control, "done")
    except JobInterrupted as exc:
        reason = str(exc)
        if reason == "cancelled":
            return _finish(studio, control, "cancelled")
        if reason == "stopping":
            with unit_of_work(studio.sessions) as session:
                JobRepository(session).release(job_id, worker, "worker stopped", count_attempt=False)
            return "requeued"
        return "lost"
    except JobLostError as exc:
        log.warning("%s", exc)
        return "lost"
    except (StudioError, CatalogError) as exc:
        return _finish(studio, control, "failed", str(exc))
    except Exception as exc:
        log.exception("render job %d failed", job_id)
        return _finish(studio, control, "failed", f"{type(exc).__name__}: {exc}")


def batches(
    pending: list[tuple[int, RenderRequest]], max_batch: int
) -> list[list[tuple[int, RenderRequest]]]:
    """(index, request) pairs in order, in groups of consecutive requests that share a `batch_key` (a request
    without one, of several images, alone), of at most `max_batch` each."""
    groups: list[list[tuple[int, RenderRequest]]] = []
    for index, request in pending:
        key = batch_key(request)
        last = groups[-1] if groups else None
        if last is not None and key is not None and len(last) < max_batch and batch_key(last[0][1]) == key:
            last.append((index, request))
        else:
            groups.append([(index, request)])
    return groups


def _finish(studio: Studio, control: JobControl, status: str, error: str | None = None) -> str:
    try:
        with unit_of_work(studio.sessions) as session:
            JobRepository(session).finish(control.job_id, control.worker, status, error)
    except JobLostError as exc:
        log.warning("%s", exc)
        return "lost"
    log.info("render job %d %s%s", control.job_id, status, f": {error}" if error else "")
    return status


__all__ = ["Heartbeats", "JobControl", "JobInterrupted", "batches", "job_dir", "run_job"]
