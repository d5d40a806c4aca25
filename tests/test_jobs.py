"""Render jobs: the repository on SQLite and PostgreSQL (idempotent submit, atomic claims under contention,
heartbeats, results recorded once, cancel, recovery), and the local executor rendering through the Studio:
the same images as Studio.render, resumed jobs that skip finished requests, cancellation mid-render."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from datetime import timedelta

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from app.jobs import make_executor
from app.jobs.local import LocalExecutor
from app.jobs.runner import JobControl, run_job
from app.settings import Settings
from app.studio import Studio
from composer.formats import write_kohya
from composer.render import LoraWeight, RenderRequest
from db.jobs import (
    IdempotencyConflictError,
    JobFinishedError,
    JobLostError,
    JobNotFoundError,
    JobRepository,
    QueueFullError,
)
from db.models import Render, RenderJob, utcnow
from db.session import make_session_factory, unit_of_work
from tests.conftest_pg import BACKENDS, migrated_engine
from tests.helpers import random_lora

SMALL = {"num_inference_steps": 4, "height": 32, "width": 32}


@pytest.fixture(params=BACKENDS)
def sessions(request: pytest.FixtureRequest, tmp_path) -> Iterator[sessionmaker[Session]]:
    with migrated_engine(request.param, tmp_path) as engine:
        yield make_session_factory(engine)


def submit(sessions, prompt: str = "a cat", key: str | None = None, api_key_id=None, **kw):
    with unit_of_work(sessions) as session:
        job, created = JobRepository(session).submit(
            requests=[{"prompt": prompt}],
            total=1,
            backbone="sdxl",
            api_key_id=api_key_id,
            idempotency_key=key,
            **kw,
        )
        return job.id, created


def repo_call(sessions, method: str, *args, **kw):
    with unit_of_work(sessions) as session:
        return getattr(JobRepository(session), method)(*args, **kw)


# --- the repository -------------------------------------------------------------------------------------


def test_submit_is_idempotent_per_key_and_refuses_a_different_body(sessions):
    first, created = submit(sessions, key="k1")
    assert created
    assert submit(sessions, key="k1") == (first, False)
    with pytest.raises(IdempotencyConflictError, match="'k1' was used for job 1 with a different"):
        submit(sessions, "a dog", key="k1")
    assert submit(sessions, key="k2")[1] and submit(sessions)[1] and submit(sessions)[1]  # no key: always new
    assert repo_call(sessions, "count") == 4


def test_claims_are_atomic_under_contention(sessions):
    ids = [submit(sessions, f"p{i}")[0] for i in range(30)]
    claimed: dict[str, list[int]] = {f"w{i}": [] for i in range(6)}
    errors: list[BaseException] = []
    start = threading.Barrier(6)

    def worker(name: str) -> None:
        try:
            start.wait()
            while (job := repo_call(sessions, "claim", name)) is not None:
                claimed[name].append(job.id)
                assert job.status == "running" and job.worker == name and job.heartbeat_at is not None
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in claimed]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    everything = sorted(i for got in claimed.values() for i in got)
    assert everything == ids, "every job claimed exactly once"
    assert repo_call(sessions, "count_queued") == 0
    assert repo_call(sessions, "claim", "late") is None


def test_claim_by_id_heartbeat_cancel_and_lost_worker(sessions):
    a, b = submit(sessions)[0], submit(sessions)[0]
    assert repo_call(sessions, "claim", "w", job_id=b).id == b  # a specific job, out of order
    assert repo_call(sessions, "claim", "x", job_id=b) is None  # already taken
    assert repo_call(sessions, "heartbeat", b, "w", progress=0.25) is False
    assert repo_call(sessions, "get", b).progress == 0.25
    cancelled = repo_call(sessions, "cancel", b)
    assert cancelled.status == "running" and cancelled.cancel_requested  # the worker is asked to stop
    assert repo_call(sessions, "heartbeat", b, "w") is True
    with pytest.raises(JobLostError, match="no longer held by x"):
        repo_call(sessions, "heartbeat", b, "x")
    assert repo_call(sessions, "finish", b, "w", "cancelled").status == "cancelled"
    with pytest.raises(JobFinishedError, match="already cancelled"):
        repo_call(sessions, "cancel", b)
    queued = repo_call(sessions, "cancel", a)
    assert queued.status == "cancelled" and queued.finished_at is not None
    with pytest.raises(JobNotFoundError, match="id 99"):
        repo_call(sessions, "cancel", 99)


def test_results_are_recorded_once_and_only_by_the_holder(sessions):
    with unit_of_work(sessions) as session:
        job, _ = JobRepository(session).submit(
            requests=[{"prompt": "a"}, {"prompt": "b", "num_images": 2}], total=3, backbone="sdxl"
        )
    repo_call(sessions, "claim", "w")
    job = repo_call(sessions, "record_result", job.id, "w", {"index": 0, "images": ["x.png"]}, 1)
    assert (job.completed, job.progress) == (1, pytest.approx(1 / 3))
    with pytest.raises(Exception, match="request 0 is already recorded"):
        repo_call(sessions, "record_result", job.id, "w", {"index": 0, "images": ["x.png"]}, 1)
    with pytest.raises(JobLostError):
        repo_call(sessions, "record_result", job.id, "intruder", {"index": 1, "images": []}, 2)
    job = repo_call(sessions, "record_result", job.id, "w", {"index": 1, "images": ["y", "z"]}, 2)
    done = repo_call(sessions, "finish", job.id, "w")
    assert (done.status, done.completed, done.progress, done.worker) == ("done", 3, 1.0, None)
    assert [r["index"] for r in done.results] == [0, 1]


def test_queue_position_listing_and_counts(sessions):
    ids = [submit(sessions, api_key_id=None)[0] for _ in range(4)]
    positions = [repo_call(sessions, "queue_position", repo_call(sessions, "get", i)) for i in ids]
    assert positions == [1, 2, 3, 4]
    repo_call(sessions, "claim", "w")  # takes the oldest
    positions = [repo_call(sessions, "queue_position", repo_call(sessions, "get", i)) for i in ids]
    assert positions == [None, 1, 2, 3]
    assert [j.id for j in repo_call(sessions, "list", "queued", limit=2)] == [ids[3], ids[2]]
    assert [j.id for j in repo_call(sessions, "list", "queued", oldest_first=True, limit=2)] == ids[1:3]
    assert [j.id for j in repo_call(sessions, "list", limit=2, offset=3)] == [ids[0]]
    assert (repo_call(sessions, "count_queued"), repo_call(sessions, "count", "running")) == (3, 1)
    with pytest.raises(Exception, match="job status 'lost'"):
        repo_call(sessions, "list", "lost")


def test_stale_jobs_are_requeued_then_failed_after_max_attempts(sessions):
    job_id = submit(sessions, max_attempts=2)[0]
    t0 = utcnow()
    repo_call(sessions, "claim", "w1", now=t0)
    assert repo_call(sessions, "recover_stale", timedelta(seconds=30), now=t0 + timedelta(seconds=10)) == []
    (job,) = repo_call(sessions, "recover_stale", timedelta(seconds=30), now=t0 + timedelta(seconds=31))
    assert (job.id, job.status, job.attempts, job.worker, job.error) == (job_id, "queued", 1, None, None)
    with pytest.raises(JobLostError):  # the old worker, should it wake up, can record nothing
        repo_call(sessions, "record_result", job_id, "w1", {"index": 0, "images": []}, 1)
    t1 = utcnow()
    repo_call(sessions, "claim", "w2", now=t1)
    (job,) = repo_call(sessions, "recover_stale", timedelta(seconds=30), now=t1 + timedelta(seconds=60))
    assert (job.status, job.attempts) == ("failed", 2) and job.finished_at is not None
    assert job.error == "worker w2 stopped heartbeating (60 s); gave up after 2 attempts"
    # a cancel pending when the worker died: cancelled, not retried
    other = submit(sessions)[0]
    repo_call(sessions, "claim", "w3", now=t1)
    repo_call(sessions, "cancel", other)
    (job,) = repo_call(sessions, "recover_stale", timedelta(seconds=1), now=t1 + timedelta(seconds=5))
    assert (job.id, job.status) == (other, "cancelled")


def test_release_by_a_stopping_worker_uses_no_attempt(sessions):
    job_id = submit(sessions)[0]
    repo_call(sessions, "claim", "w")
    job = repo_call(sessions, "release", job_id, "w", "worker stopped", count_attempt=False)
    assert (job.status, job.attempts) == ("queued", 0)
    assert repo_call(sessions, "release", job_id, "w", "again") is None  # no longer held


# --- the local executor, rendering ----------------------------------------------------------------------


@pytest.fixture
def studio(tmp_path) -> Studio:
    settings = Settings(
        data_dir=tmp_path / "data",
        bundled=False,
        backbone="sdxl",
        model="tiny",
        job_heartbeat_s=0.1,
        max_queued_jobs=3,
    )
    return Studio.open(settings)


def wait_for(
    sessions, job_id: int, statuses=("done", "failed", "cancelled"), timeout: float = 120
) -> RenderJob:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = repo_call(sessions, "get", job_id)
        if job.status in statuses:
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} still {job.status} after {timeout} s ({job.completed}/{job.total})")


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def renders(studio) -> int:
    with studio.sessions() as session:
        return session.scalar(select(func.count(Render.id)))


def test_executor_renders_what_studio_render_renders(studio, tmp_path, tiny_sdxl_factory):
    backbone, make = tiny_sdxl_factory
    write_kohya(random_lora(make(), backbone, seed=3, rank=4, std=0.2), tmp_path / "ink.safetensors")
    studio.library.import_file(tmp_path / "ink.safetensors")
    requests = [
        {"prompt": "a red circle", "seed": 7, "num_images": 2, **SMALL},
        {"prompt": "a blue square", "seed": 1, "loras": [{"name": "ink", "weight": 0.8}], **SMALL},
    ]
    executor = make_executor(studio)
    assert isinstance(executor, LocalExecutor)
    executor.start()
    try:
        job, created = studio.submit_job(requests)
        job = wait_for(studio.sessions, job.id)
    finally:
        executor.stop()
    assert created and (job.status, job.completed, job.total, job.progress) == ("done", 3, 3, 1.0)
    results = sorted(job.results, key=lambda r: r["index"])
    assert [len(r["images"]) for r in results] == [2, 1]
    direct = [
        studio.render(RenderRequest("a red circle", seed=7, num_images=2, **SMALL)),
        studio.render(RenderRequest("a blue square", seed=1, loras=(LoraWeight("ink", 0.8),), **SMALL)),
    ]
    for result, reference in zip(results, direct, strict=True):
        for rel, image in zip(result["images"], reference.images, strict=True):
            path = studio.settings.root / rel
            assert path.parent == studio.settings.root / "renders" / f"job-{job.id}"
            np.testing.assert_array_equal(pixels(path), np.asarray(image.convert("RGB")))
            provenance = json.loads(Image.open(path).text["lora_studio"])
            assert provenance == result["provenance"] == reference.provenance
    assert results[1]["provenance"]["loras"][0]["sha256"] == studio.library.get("ink").sha256
    assert not np.array_equal(
        pixels(studio.settings.root / results[0]["images"][0]),
        pixels(studio.settings.root / results[1]["images"][0]),
    )
    assert renders(studio) == 2 + 2  # one record per request: the job's two, and the two direct renders


def test_submit_checks_every_request_first_and_bounds_the_queue(studio):
    # no executor: jobs stay queued
    with pytest.raises(Exception, match=r"requests\[1\]: no adapter named 'nope'"):
        studio.submit_job([{"prompt": "ok", **SMALL}, {"prompt": "x", "loras": [{"name": "nope"}]}])
    with pytest.raises(Exception, match=r"requests\[0\]: num_images must be 1..16"):
        studio.submit_job([{"prompt": "x", "num_images": 17}])
    with pytest.raises(Exception, match=r"requests\[0\]: unknown request fields size"):
        studio.submit_job([{"prompt": "x", "size": 64}])
    with pytest.raises(Exception, match="model '/etc' is not served here"):
        studio.submit_job([{"prompt": "x"}], model="/etc")
    with pytest.raises(Exception, match="unknown backbone 'sd3'"):
        studio.submit_job([{"prompt": "x"}], backbone="sd3")
    assert repo_call(studio.sessions, "count") == 0, "nothing stored"
    for i in range(3):
        studio.submit_job([{"prompt": f"p{i}"}], idempotency_key=f"k{i}")
    with pytest.raises(QueueFullError, match="3 render jobs are queued, the limit is 3") as caught:
        studio.submit_job([{"prompt": "one too many"}])
    assert caught.value.retry_after >= 1 and repo_call(studio.sessions, "count") == 3
    assert studio.submit_job([{"prompt": "p0"}], idempotency_key="k0")[1] is False  # a repeat is not refused


def test_a_resumed_job_skips_recorded_requests(studio):
    executor = make_executor(studio)
    slow = {"num_inference_steps": 60, "height": 32, "width": 32}
    job, _ = studio.submit_job([{"prompt": "first", **SMALL}, {"prompt": "second", **slow}])
    repo_call(studio.sessions, "claim", "w-old")
    control = JobControl(job.id, "w-old", stopping=threading.Event())
    outcome: list[str] = []
    thread = threading.Thread(target=lambda: outcome.append(run_job(studio, control)))
    thread.start()
    deadline = time.monotonic() + 120
    while repo_call(studio.sessions, "get", job.id).completed < 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    control.stopping.set()  # the worker shuts down mid-way through the second request
    thread.join()
    assert outcome == ["requeued"]
    halfway = repo_call(studio.sessions, "get", job.id)
    assert (halfway.status, halfway.completed, halfway.attempts) == ("queued", 1, 0)
    first_render = halfway.results[0]["render_id"]
    executor.start()
    try:
        job = wait_for(studio.sessions, job.id)
    finally:
        executor.stop()
    assert (job.status, job.completed) == ("done", 2)
    assert [r["index"] for r in job.results] == [0, 1] and job.results[0]["render_id"] == first_render
    assert renders(studio) == 2, "the first request was not rendered again"


def test_cancel_a_running_job_between_steps_and_a_queued_one(studio):
    executor = make_executor(studio)
    executor.start()
    try:
        long = [{"prompt": "long", "num_inference_steps": 400, "height": 32, "width": 32}]
        running, _ = studio.submit_job(long)
        queued, _ = studio.submit_job([{"prompt": "waiting", **SMALL}])
        wait_for(studio.sessions, running.id, ("running",))
        assert studio.cancel_job(queued.id).status == "cancelled"
        deadline = time.monotonic() + 60
        while repo_call(studio.sessions, "get", running.id).progress == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        started = time.monotonic()
        assert studio.cancel_job(running.id).cancel_requested
        job = wait_for(studio.sessions, running.id)
        assert time.monotonic() - started < 10, "stopped between steps, not after 400 of them"
    finally:
        executor.stop()
    assert (job.status, job.completed, job.results) == ("cancelled", 0, [])
    assert 0 < job.progress < 1
    assert repo_call(studio.sessions, "get", queued.id).started_at is None
    assert renders(studio) == 0
    with pytest.raises(JobFinishedError):
        studio.cancel_job(running.id)


def test_stop_hands_the_running_job_back_and_a_restart_finishes_it(studio):
    executor = make_executor(studio)
    executor.start()
    job, _ = studio.submit_job([{"prompt": "long", "num_inference_steps": 300, "height": 32, "width": 32}])
    wait_for(studio.sessions, job.id, ("running",))
    executor.stop()
    job = repo_call(studio.sessions, "get", job.id)
    assert (job.status, job.attempts, job.worker) == ("queued", 0, None)
    again = make_executor(studio)
    again.start()
    try:
        assert wait_for(studio.sessions, job.id).status == "done"
    finally:
        again.stop()


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_servers_on_one_catalog_run_each_job_exactly_once(backend, tmp_path):
    from tests.conftest_pg import catalog_url

    with catalog_url(backend, tmp_path) as url:
        studios = [
            Studio.open(
                Settings(
                    data_dir=tmp_path / "data",
                    database_url=url,
                    bundled=False,
                    backbone="sdxl",
                    model="tiny",
                    job_heartbeat_s=0.1,
                )
            )
            for _ in range(2)
        ]
        executors = [make_executor(s) for s in studios]
        assert executors[0].name != executors[1].name, "worker names never collide across executors"
        ids = [
            studios[i % 2].submit_job([{"prompt": f"job {i}", "seed": i, **SMALL}])[0].id for i in range(8)
        ]
        for executor in executors:
            executor.start()
        try:
            jobs = [wait_for(studios[0].sessions, i) for i in ids]
        finally:
            for executor in executors:
                executor.stop()
        assert [j.status for j in jobs] == ["done"] * 8 and all(len(j.results) == 1 for j in jobs)
        assert renders(studios[0]) == 8
        with studios[0].sessions() as session:
            prompts = set(session.scalars(select(Render.prompt)))
        assert prompts == {f"job {i}" for i in range(8)}
        for s in studios:
            s.sessions.kw["bind"].dispose()
