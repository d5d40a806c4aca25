"""The embedded executor: `workers` threads in this process claim queued jobs from the database and run them.

Pipelines are not thread-safe, so each worker renders through its own Studio view (the catalog and sessions
shared, the pipeline cache its own): no pipeline is ever used by two threads, and the UI's pipelines are not
touched. Several server processes may share one database: claims are atomic and the heartbeat thread of each
puts back the jobs of a process that died.
"""

from __future__ import annotations

import logging
import threading
from datetime import timedelta

from app.catalog import JobInfo
from app.jobs.identity import died_here, process_name
from app.jobs.queue import JobQueue
from app.jobs.runner import Heartbeats, JobControl, run_job
from app.settings import Settings
from app.studio import Studio
from db.jobs import JobRepository
from db.session import unit_of_work

log = logging.getLogger(__name__)
IDLE_POLL_S = 1.0  # how often an idle worker looks for jobs queued by other processes


class LocalExecutor(JobQueue):
    """Worker threads over the render_jobs table."""

    def __init__(self, studio: Studio, settings: Settings | None = None) -> None:
        super().__init__(studio, settings)
        self.heartbeats = Heartbeats(
            studio.sessions, self.settings.job_heartbeat_s, stale_after=self.settings.job_stale_after_s
        )
        self._wake = threading.Condition()
        self._queued = 0  # wake-ups not yet taken, so that a notify between two claims is not lost
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self.studios: list[Studio] = []  # the workers' Studio views, one each
        # unique per executor, so that two in one process (or a restarted one) never share a worker name
        self.name = process_name()

    def start(self) -> None:
        """Put back jobs left running by a dead process (at once when it ran on this machine, else once its
        heartbeat is stale), then start the heartbeats and the workers."""
        if self._threads:
            return
        with unit_of_work(self.studio.sessions) as session:
            repo = JobRepository(session)
            recovered = repo.recover_dead(died_here)
            recovered += repo.recover_stale(timedelta(seconds=self.settings.job_stale_after_s))
        for job in recovered:
            log.warning("render job %d recovered on start: %s", job.id, job.status)
        self._stopping.clear()
        self.heartbeats.start()
        for i in range(self.settings.workers):
            view = self.studio.view()
            self.studios.append(view)
            thread = threading.Thread(
                target=self._work, args=(view, f"{self.name}:{i}"), name=f"render-worker-{i}", daemon=True
            )
            thread.start()
            self._threads.append(thread)
        self.listen()
        log.info("local executor: %d render worker(s)", self.settings.workers)

    def stop(self) -> None:
        """Stop the workers; a job being rendered goes back to the queue (no attempt used)."""
        self.unlisten()
        self._stopping.set()
        self.wake(all_workers=True)
        for thread in self._threads:
            thread.join()
        self._threads.clear()
        self.studios.clear()
        self.heartbeats.stop()

    def wake(self, all_workers: bool = False) -> None:
        with self._wake:
            self._queued += 1
            if all_workers:
                self._wake.notify_all()
            else:
                self._wake.notify()

    def cancelled(self, job: JobInfo) -> None:
        control = self.heartbeats.get(job.id)
        if control is not None and job.cancel_requested:
            control.cancel.set()  # no need to wait for the next heartbeat

    def _work(self, studio: Studio, worker: str) -> None:
        while not self._stopping.is_set():
            try:
                with unit_of_work(studio.sessions) as session:
                    job = JobRepository(session).claim(worker)
                    control = None if job is None else JobControl(job.id, worker, job.total)
            except Exception:  # the database is unreachable for now: wait and look again
                log.exception("claiming a render job failed")
                control = None
            if control is None:
                with self._wake:
                    if self._queued == 0:
                        self._wake.wait(IDLE_POLL_S)
                    self._queued = max(0, self._queued - 1)
                continue
            control.stopping = self._stopping
            self.heartbeats.add(control)
            try:
                run_job(studio, control)
            except Exception:  # the worker lives on; the job, no longer heartbeated, is recovered when stale
                log.exception("render worker %s: job %d", worker, control.job_id)
            finally:
                self.heartbeats.remove(control)


__all__ = ["LocalExecutor"]
