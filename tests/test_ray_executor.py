"""The Ray executor on a local Ray (loopback, no dashboard): a batch through the API renders the same images
as Studio.render; an idle actor takes the queued job whose LoRAs it holds before an older one; an actor
killed mid-job hands the job back and it completes; a job whose actor keeps dying fails after max_attempts."""

from __future__ import annotations

import io
import re
import time

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from app.api import create_app
from app.jobs import make_executor
from app.jobs.ray_executor import RayExecutor
from app.settings import Settings
from app.studio import Studio
from composer.formats import write_kohya
from composer.render import LoraWeight, RenderRequest
from db.jobs import JobRepository
from db.repository import ApiKeyRepository
from db.session import unit_of_work
from tests.helpers import random_lora

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow

API = "/api/v1"
SMALL = {"num_inference_steps": 4, "height": 32, "width": 32}
LONG = {"num_inference_steps": 150, "height": 32, "width": 32}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, tiny_sdxl_factory):
    """One local Ray with one actor, behind the API; (client, studio, executor)."""
    root = tmp_path_factory.mktemp("ray")
    settings = Settings(
        data_dir=root / "data",
        bundled=False,
        backbone="sdxl",
        model="tiny",
        executor="ray",
        workers=1,
        job_heartbeat_s=0.2,
        job_max_attempts=2,
    )
    studio = Studio.open(settings)
    backbone, make = tiny_sdxl_factory
    pipe = make()
    for seed, name in enumerate(["inkwell", "pastel"]):
        write_kohya(random_lora(pipe, backbone, seed=seed, rank=4, std=0.2), root / f"{name}.safetensors")
        studio.library.import_file(root / f"{name}.safetensors")
    with unit_of_work(studio.sessions) as session:
        secret = ApiKeyRepository(session).create("ray", rate_limit_per_minute=100_000)[1]
    executor = make_executor(studio)
    assert isinstance(executor, RayExecutor)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the actor renders on the other core; two threads here would fight it
    try:
        with TestClient(create_app(studio, executor), headers={"X-API-Key": secret}) as client:
            yield client, studio, executor
    finally:
        torch.set_num_threads(threads)
    assert not ray.is_initialized(), "the executor shuts down the Ray it started"


def job_row(studio, job_id: int):
    with unit_of_work(studio.sessions) as session:
        return JobRepository(session).get(job_id)


def wait_row(studio, job_id: int, until, timeout: float = 240, what: str = ""):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = job_row(studio, job_id)
        if until(job):
            return job
        time.sleep(0.05)
    raise AssertionError(
        f"job {job_id} {what}: still {job.status} after {timeout} s (attempts {job.attempts})"
    )


def finished(job) -> bool:
    return job.finished


def submit(client, *requests) -> int:
    r = client.post(f"{API}/renders", json={"requests": list(requests)})
    assert r.status_code == 202, r.text
    return r.json()["id"]


def test_a_batch_through_the_api_runs_on_ray_actors(cluster):
    client, studio, executor = cluster
    job_id = submit(
        client,
        {"prompt": "a red circle", "seed": 2, **SMALL},
        {"prompt": "a blue star", "seed": 9, "num_images": 2, "loras": [{"name": "inkwell"}], **SMALL},
    )
    job = client.get(f"{API}/renders/{job_id}").json()
    deadline = time.monotonic() + 240
    while job["status"] not in ("done", "failed") and time.monotonic() < deadline:
        time.sleep(0.1)
        job = client.get(f"{API}/renders/{job_id}").json()
    assert job["status"] == "done", job
    urls = [u for r in job["results"] for u in r["images"]]
    references = [
        studio.render(RenderRequest("a red circle", seed=2, **SMALL)),
        studio.render(
            RenderRequest("a blue star", seed=9, num_images=2, loras=(LoraWeight("inkwell"),), **SMALL)
        ),
    ]
    expected = [image for ref in references for image in ref.images]
    assert len(urls) == len(expected) == 3
    for url, reference in zip(urls, expected, strict=True):
        r = client.get(url)
        assert r.status_code == 200
        got = np.asarray(Image.open(io.BytesIO(r.content)).convert("RGB"))
        np.testing.assert_array_equal(got, np.asarray(reference.convert("RGB")))
    assert job["results"][1]["provenance"] == references[1].provenance
    (slot,) = executor.slots.values()
    assert slot.resident == {studio.library.get("inkwell").sha256}, "the actor reports what it holds"


def test_an_idle_actor_prefers_the_job_whose_loras_it_holds(cluster):
    client, studio, executor = cluster
    ink = [{"name": "inkwell"}]
    busy = submit(client, {"prompt": "keeps the actor busy", "loras": ink, **LONG})
    wait_row(studio, busy, lambda j: j.status == "running", what="running")
    older = submit(client, {"prompt": "other LoRA", "loras": [{"name": "pastel"}], **SMALL})
    newer = submit(client, {"prompt": "same LoRA", "loras": ink, **SMALL})
    jobs = [wait_row(studio, i, finished, what="finished") for i in (busy, older, newer)]
    assert [j.status for j in jobs] == ["done"] * 3
    assert jobs[2].started_at < jobs[1].started_at, "the job sharing the resident LoRA went first"
    (slot,) = executor.slots.values()
    assert {studio.library.get(n).sha256 for n in ("inkwell", "pastel")} <= slot.resident


def test_an_actor_killed_mid_job_hands_it_back_and_it_completes(cluster):
    client, studio, executor = cluster
    job_id = submit(client, {"prompt": "survives", "seed": 5, **LONG})
    job = wait_row(studio, job_id, lambda j: j.status == "running" and j.progress > 0, what="under way")
    ray.kill(executor.actor(job.worker), no_restart=True)
    job = wait_row(studio, job_id, finished, what="finished after the kill")
    assert (job.status, job.attempts, job.completed) == ("done", 1, 1)
    reference = studio.render(RenderRequest("survives", seed=5, **LONG))
    path = studio.settings.root / job.results[0]["images"][0]
    np.testing.assert_array_equal(
        np.asarray(Image.open(path).convert("RGB")), np.asarray(reference.images[0].convert("RGB"))
    )
    assert len(executor.slots) == 1, "a fresh actor replaced the dead one"


def test_a_job_whose_actor_keeps_dying_fails_after_max_attempts(cluster):
    client, studio, executor = cluster
    job_id = submit(client, {"prompt": "doomed", **LONG})
    for attempt in range(2):
        job = wait_row(
            studio,
            job_id,
            lambda j, a=attempt: j.status == "running" and j.attempts == a and j.progress > 0,
            what=f"attempt {attempt + 1} under way",
        )
        ray.kill(executor.actor(job.worker), no_restart=True)
    job = wait_row(studio, job_id, finished, what="failed")
    assert (job.status, job.attempts) == ("failed", 2)
    assert re.match(r"Ray actor ray:[0-9a-f]{6}:render-\d+ died: ", job.error), job.error
    assert job.error.endswith("gave up after 2 attempts")
    body = client.get(f"{API}/renders/{job_id}").json()
    assert body["status"] == "failed" and body["error"] == job.error
    ok = submit(client, {"prompt": "after", **SMALL})
    assert wait_row(studio, ok, finished, what="done").status == "done"
