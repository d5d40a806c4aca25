"""Render jobs on a Ray cluster (`lora-studio serve --executor ray --ray-address ADDR`).

The same job records as the local executor, run by the same `run_job`: each Ray actor holds a Studio (its
backbone stays resident between jobs) and heartbeats the job it runs. A driver thread in the server assigns
queued jobs to idle actors, preferring the job whose LoRAs an actor already holds (LoRA affinity: every
actor reports the SHA-256s it has resident after each job). An actor that dies (RayActorError) hands its
job back at once: queued again with attempts + 1, or failed with the reason after max_attempts; a fresh
actor takes its place.

Actors open the catalog by the server's settings: on a multi-machine cluster give them a database URL they
can reach (PostgreSQL) and a data dir on shared storage; a local Ray (no address) needs neither.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
from contextlib import suppress
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import ray
from ray.exceptions import RayActorError, RayError

from app.jobs.queue import JobQueue
from app.jobs.runner import Heartbeats, JobControl, run_job
from app.settings import Settings
from app.studio import Studio
from composer.errors import StudioError
from composer.render import RenderRequest
from db.errors import CatalogError
from db.jobs import JobRepository
from db.session import unit_of_work

log = logging.getLogger(__name__)
WINDOW = 16  # queued jobs (oldest first) an idle actor chooses among by affinity
POLL_S = 0.2
ACTOR_ENV = {"HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "TOKENIZERS_PARALLELISM": "false"}


class RenderActor:
    """One Ray actor: a Studio with its pipelines resident, running one job at a time."""

    def __init__(self, settings: dict[str, Any], worker: str) -> None:
        self.studio = Studio.open(Settings(**{**settings, "bundled": False}))
        self.worker = worker
        self.heartbeats = Heartbeats(self.studio.sessions, self.studio.settings.job_heartbeat_s)
        self.heartbeats.start()

    def run(self, job_id: int) -> dict[str, Any]:
        """Run a job the driver claimed for this actor; what became of it, and the LoRAs now resident."""
        control = JobControl(job_id, self.worker)
        self.heartbeats.add(control)
        try:
            status = run_job(self.studio, control)
        finally:
            self.heartbeats.remove(control)
        return {"status": status, "resident": sorted(self.studio.resident_loras())}

    def pid(self) -> int:
        return os.getpid()


@dataclass
class _Slot:
    """An actor as the driver sees it."""

    worker: str
    handle: Any
    resident: set[str] = field(default_factory=set)
    job_id: int | None = None
    ref: Any = None


class RayExecutor(JobQueue):
    """Jobs from the database onto Ray actors, with LoRA affinity and retry on actor death."""

    def __init__(self, studio: Studio, settings: Settings | None = None) -> None:
        super().__init__(studio, settings)
        # no worker of our own: the heartbeat thread only puts back jobs whose workers went silent
        self.heartbeats = Heartbeats(
            studio.sessions, self.settings.job_heartbeat_s, stale_after=self.settings.job_stale_after_s
        )
        self.slots: dict[str, _Slot] = {}
        self._generation = 0
        self._token = secrets.token_hex(3)
        self._owns_ray = False
        self._stopping = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._loras: dict[int, frozenset[str]] = {}  # job id -> SHA-256s of its LoRAs

    # --- lifecycle ----------------------------------------------------------------------------------------
    def start(self) -> None:
        """Connect to (or start) Ray, put back jobs left by a dead server, start the actors and the driver."""
        if self._thread is not None:
            return
        if not ray.is_initialized():
            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
            kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
            if self.settings.ray_address:
                ray.init(address=self.settings.ray_address, **kwargs)
            else:
                ray.init(num_cpus=self.settings.workers, **kwargs)
            self._owns_ray = True
        with unit_of_work(self.studio.sessions) as session:
            JobRepository(session).recover_stale(timedelta(seconds=self.settings.job_stale_after_s))
        for _ in range(self.settings.workers):
            self._add_actor()
        self._stopping.clear()
        self.heartbeats.start()
        self._thread = threading.Thread(target=self._drive, name="ray-driver", daemon=True)
        self._thread.start()
        self.listen()
        log.info("ray executor: %d actor(s)", self.settings.workers)

    def stop(self) -> None:
        """Stop the driver and the actors; jobs they were running go back to the queue (no attempt used)."""
        self.unlisten()
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        for slot in list(self.slots.values()):
            ray.kill(slot.handle)
            if slot.job_id is not None:
                self._release(slot, "server stopped", count_attempt=False)
        self.slots.clear()
        self.heartbeats.stop()
        if self._owns_ray:
            ray.shutdown()
            self._owns_ray = False

    def wake(self) -> None:
        self._wake.set()

    def actor(self, worker: str) -> Any:
        """The actor handle of a worker name (what a running job's `worker` says)."""
        return self.slots[worker].handle

    # --- the driver ---------------------------------------------------------------------------------------
    def _add_actor(self) -> None:
        self._generation += 1
        worker = f"ray:{self._token}:render-{self._generation}"  # unique across servers sharing a catalog
        remote = ray.remote(num_cpus=1, max_restarts=0)(RenderActor)
        handle = remote.options(runtime_env={"env_vars": ACTOR_ENV}).remote(
            self.studio.settings.model_dump(mode="json"), worker
        )
        self.slots[worker] = _Slot(worker, handle)

    def _drive(self) -> None:
        while not self._stopping.is_set():
            try:
                self._assign()
                busy = {slot.ref: slot for slot in self.slots.values() if slot.ref is not None}
                if not busy:
                    self._wake.wait(POLL_S)
                    self._wake.clear()
                    continue
                ready, _ = ray.wait(list(busy), num_returns=1, timeout=POLL_S)
                for ref in ready:
                    self._collect(busy[ref], ref)
            except Exception:  # the database or the cluster hiccupped: log it and carry on
                log.exception("ray driver step failed")
                self._stopping.wait(POLL_S)

    def _assign(self) -> None:
        idle = [slot for slot in self.slots.values() if slot.job_id is None]
        if not idle:
            return
        with unit_of_work(self.studio.sessions) as session:
            heads = JobRepository(session).list("queued", limit=WINDOW, oldest_first=True)
            queued = [(job.id, self._job_loras(job.id, job.requests)) for job in heads]
        for slot in idle:
            # the job sharing most LoRAs with what the actor holds; the oldest among equals
            for job_id, _ in sorted(queued, key=lambda q: (-len(q[1] & slot.resident), q[0])):
                with unit_of_work(self.studio.sessions) as session:
                    claimed = JobRepository(session).claim(slot.worker, job_id=job_id)
                queued = [q for q in queued if q[0] != job_id]
                if claimed is not None:
                    slot.job_id, slot.ref = job_id, slot.handle.run.remote(job_id)
                    break

    def _collect(self, slot: _Slot, ref: Any) -> None:
        job_id = slot.job_id
        slot.job_id, slot.ref = None, None
        try:
            outcome = ray.get(ref)
        except RayActorError as exc:
            slot.job_id = job_id
            self._release(slot, f"Ray actor {slot.worker} died: {str(exc).splitlines()[0]}")
            del self.slots[slot.worker]
            self._add_actor()
            return
        except RayError as exc:  # the actor lives but its call failed outside run_job's own handling
            slot.job_id = job_id
            self._release(slot, f"Ray call on {slot.worker} failed: {str(exc).splitlines()[0]}")
            return
        slot.resident = set(outcome["resident"])
        self._loras.pop(job_id, None)
        log.info("render job %s on %s: %s", job_id, slot.worker, outcome["status"])

    def _release(self, slot: _Slot, reason: str, count_attempt: bool = True) -> None:
        with unit_of_work(self.studio.sessions) as session:
            job = JobRepository(session).release(
                slot.job_id, slot.worker, reason, count_attempt=count_attempt
            )
        if job is not None:
            log.warning("render job %d: %s; now %s (attempt %d)", job.id, reason, job.status, job.attempts)
        slot.job_id, slot.ref = None, None

    def _job_loras(self, job_id: int, requests: list[dict[str, Any]]) -> frozenset[str]:
        if job_id not in self._loras:
            found = set()
            for data in requests:
                for lw in RenderRequest.from_json(data).loras:
                    # a LoRA gone since submission adds nothing: its job fails on the actor, naming it
                    with suppress(StudioError, CatalogError):
                        found.add(self.studio.resolve_lora(lw.name)[0].sha256)
            self._loras[job_id] = frozenset(found)
        return self._loras[job_id]


__all__ = ["RayExecutor", "RenderActor"]
