"""Render jobs against a real `lora-studio serve` process (uvicorn on 127.0.0.1, SQLite in tmp_path):
killed with SIGKILL mid-run and restarted, every job completes exactly once (result images, render rows);
a job whose worker keeps dying fails with the reason after max_attempts; 50 concurrent clients submitting
200 jobs lose none and duplicate none."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select

from app.settings import Settings
from app.studio import Studio
from db.models import Render
from db.repository import ApiKeyRepository
from db.session import unit_of_work

API = "/api/v1"
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`lora-studio serve` in a subprocess over one data dir; `kill()` is SIGKILL, `start()` starts it again."""

    def __init__(self, data_dir: Path, **settings: object) -> None:
        self.data_dir, self.port = data_dir, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "OMP_NUM_THREADS": "1",
            "LORA_STUDIO_BUNDLED": "false",
            "LORA_STUDIO_BACKBONE": "sdxl",
            "LORA_STUDIO_MODEL": "tiny",
            "LORA_STUDIO_JOB_HEARTBEAT_S": "0.2",
            "LORA_STUDIO_JOB_STALE_AFTER_S": "1.5",
            **{f"LORA_STUDIO_{k.upper()}": str(v) for k, v in settings.items()},
        }
        self.process: subprocess.Popen | None = None
        self.log = data_dir.parent / "server.log"

    def start(self, key: str, timeout: float = 120) -> None:
        command = [
            str(BIN / "lora-studio"),
            "serve",
            "--port",
            str(self.port),
            "--data-dir",
            str(self.data_dir),
        ]
        with self.log.open("a") as log:
            self.process = subprocess.Popen(command, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"server exited with {self.process.returncode}:\n{self.log.read_text()}")
            try:
                if httpx.get(f"{self.url}{API}/renders", headers={"X-API-Key": key}).status_code == 200:
                    return
            except httpx.TransportError:
                pass  # not listening yet
            time.sleep(0.2)
        raise AssertionError(f"server not up after {timeout} s:\n{self.log.read_text()}")

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()


@contextmanager
def server(tmp_path: Path, keys: int = 1, **settings: object) -> Iterator[tuple[Server, Studio, list[str]]]:
    """A server over a fresh data dir, the Studio on the same catalog (to inspect it), and API keys."""
    data = tmp_path / "data"
    studio = Studio.open(Settings(data_dir=data, bundled=False, backbone="sdxl", model="tiny"))
    with unit_of_work(studio.sessions) as session:
        repo = ApiKeyRepository(session)
        secrets = [repo.create(f"client-{i}", rate_limit_per_minute=100_000)[1] for i in range(keys)]
    srv = Server(data, **settings)
    srv.start(secrets[0])
    try:
        yield srv, studio, secrets
    finally:
        srv.stop()


def jobs(srv: Server, key: str) -> list[dict]:
    return httpx.get(f"{srv.url}{API}/renders", params={"limit": 200}, headers={"X-API-Key": key}).json()[
        "items"
    ]


def wait(srv: Server, key: str, until, timeout: float = 300, what: str = "") -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        current = jobs(srv, key)
        if until(current):
            return current
        time.sleep(0.1)
    raise AssertionError(f"{what} not reached in {timeout} s: {[(j['id'], j['status']) for j in current]}")


def stored(studio: Studio) -> tuple[list[int], list[Path]]:
    """Render record ids and PNG files under renders/."""
    with studio.sessions() as session:
        ids = list(session.scalars(select(Render.id)))
    return ids, sorted((studio.settings.root / "renders").rglob("*.png"))


def test_sigkill_mid_run_then_restart_completes_every_job_exactly_once(tmp_path):
    request = {"num_inference_steps": 30, "height": 32, "width": 32}
    with server(tmp_path) as (srv, studio, (key,)):
        headers = {"X-API-Key": key}
        for i in range(6):
            batch = {
                "requests": [
                    {"prompt": f"job {i} a", **request},
                    # other steps: not batched with "a" (max_batch), so the job records one, then renders one
                    {"prompt": f"job {i} b", "seed": i, **request, "num_inference_steps": 31},
                ]
            }
            r = httpx.post(f"{srv.url}{API}/renders", json=batch, headers=headers)
            assert r.status_code == 202, r.text

        def mid_run(current):  # a job running with one request recorded and the next one under way
            return any(j["status"] == "running" and j["completed"] == 1 for j in current)

        wait(srv, key, mid_run, what="a job half done")
        srv.kill()
        at_kill = {j["id"]: j for j in jobs_from_db(studio)}
        interrupted = [i for i, j in at_kill.items() if j["status"] == "running"]
        assert interrupted and any(j["status"] == "queued" for j in at_kill.values())
        srv.start(key)
        final = wait(srv, key, lambda cur: all(j["status"] == "done" for j in cur), what="all done")
    assert len(final) == 6
    for job in final:
        assert [r["index"] for r in job["results"]] == [0, 1] and job["completed"] == job["total"] == 2
        assert job["attempts"] == (1 if job["id"] in interrupted else 0), job
    render_ids, files = stored(studio)
    recorded = sorted(r["render_id"] for job in final for r in job["results"])
    assert sorted(render_ids) == recorded and len(recorded) == 12, "one render record per request, no orphans"
    assert len(files) == 12 and {f.parent.name for f in files} == {f"job-{j['id']}" for j in final}


def test_a_restarted_server_reclaims_its_own_dead_workers_jobs_at_once(tmp_path):
    """The stale timeout is 10 minutes here: the job comes back because its worker's name says it ran in a
    process of this machine that is gone, not because its heartbeat aged."""
    request = {"prompt": "slow", "num_inference_steps": 200, "height": 32, "width": 32}
    with server(tmp_path, job_stale_after_s=600) as (srv, studio, (key,)):
        headers = {"X-API-Key": key}
        job_id = httpx.post(f"{srv.url}{API}/renders", json={"requests": [request]}, headers=headers).json()[
            "id"
        ]
        wait(srv, key, lambda cur: cur[0]["status"] == "running" and cur[0]["progress"] > 0, what="running")
        srv.kill()
        assert jobs_from_db(studio)[0]["status"] == "running"
        started = time.monotonic()
        srv.start(key)
        (job,) = wait(srv, key, lambda cur: cur[0]["status"] == "done", timeout=300, what="done")
        assert job["id"] == job_id and job["attempts"] == 1
        assert time.monotonic() - started < 300  # far under the 600 s stale timeout


def jobs_from_db(studio: Studio) -> list[dict]:
    from db.jobs import JobRepository

    with studio.sessions() as session:
        return [
            {"id": j.id, "status": j.status, "completed": j.completed}
            for j in JobRepository(session).list(limit=1000)
        ]


@pytest.mark.slow
def test_a_job_that_keeps_killing_its_worker_fails_after_max_attempts(tmp_path):
    with server(tmp_path, job_max_attempts=2) as (srv, studio, (key,)):
        headers = {"X-API-Key": key}
        doomed = {"requests": [{"prompt": "forever", "num_inference_steps": 500, "height": 64, "width": 64}]}
        job_id = httpx.post(f"{srv.url}{API}/renders", json=doomed, headers=headers).json()["id"]
        for attempt in range(2):
            wait(
                srv,
                key,
                lambda cur, a=attempt: any(
                    j["status"] == "running" and j["attempts"] == a and j["progress"] > 0 for j in cur
                ),
                what=f"attempt {attempt + 1} running",
            )
            srv.kill()  # the worker dies with its process
            srv.start(key)
        (job,) = wait(srv, key, lambda cur: cur[0]["status"] == "failed", what="failed")
        assert job["id"] == job_id and job["attempts"] == 2
        assert "died with its process" in job["error"] and job["error"].endswith("gave up after 2 attempts")
        quick = {"requests": [{"prompt": "fine", "num_inference_steps": 2, "height": 32, "width": 32}]}
        ok = httpx.post(f"{srv.url}{API}/renders", json=quick, headers=headers).json()["id"]
        wait(srv, key, lambda cur: any(j["id"] == ok and j["status"] == "done" for j in cur), what="next job")


@pytest.mark.slow
def test_50_concurrent_clients_submit_200_jobs_none_lost_none_duplicated(tmp_path):
    clients, per_client = 50, 4
    with server(tmp_path, keys=clients, max_queued_jobs=1000, workers=2) as (srv, studio, keys):
        ids: dict[int, list[int]] = {i: [] for i in range(clients)}
        failures: list[str] = []
        start = threading.Barrier(clients)

        def client(i: int) -> None:
            with httpx.Client(base_url=srv.url, headers={"X-API-Key": keys[i]}, timeout=60) as c:
                start.wait()
                for n in range(per_client):
                    body = {
                        "requests": [
                            {
                                "prompt": f"client {i} job {n}",
                                "num_inference_steps": 2,
                                "height": 32,
                                "width": 32,
                            }
                        ]
                    }
                    headers = {"Idempotency-Key": f"c{i}-j{n}"}
                    r = c.post(f"{API}/renders", json=body, headers=headers)
                    if i % 2:  # every other client retries each submit, as after a lost response
                        again = c.post(f"{API}/renders", json=body, headers=headers)
                        if again.json().get("id") != r.json().get("id"):
                            failures.append(f"client {i} job {n}: a retry made a second job")
                    if r.status_code != 202:
                        failures.append(f"client {i} job {n}: {r.status_code} {r.text}")
                    else:
                        ids[i].append(r.json()["id"])

        threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not failures, failures[:5]
        every = [job_id for got in ids.values() for job_id in got]
        assert len(every) == len(set(every)) == clients * per_client
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            states = jobs_from_db(studio)
            if all(j["status"] == "done" for j in states):
                break
            time.sleep(0.5)
        assert sorted(j["id"] for j in states) == sorted(every), "none lost, none extra"
        assert all(j["status"] == "done" for j in states), {j["status"] for j in states}
        for i in (0, clients - 1):  # each client sees its own jobs, done
            mine = jobs(srv, keys[i])
            assert sorted(j["id"] for j in mine) == sorted(ids[i]) and {j["status"] for j in mine} == {"done"}
    render_ids, files = stored(studio)
    assert len(render_ids) == len(files) == clients * per_client


def test_serve_refuses_a_bad_executor_or_worker_count(tmp_path):
    from typer.testing import CliRunner

    from app.cli import app as cli

    data = ["--data-dir", str(tmp_path / "data")]
    result = CliRunner().invoke(
        cli, ["serve", "--executor", "slurm", *data], env={"LORA_STUDIO_BUNDLED": "false"}
    )
    assert result.exit_code == 1 and "--executor 'slurm': choose local or ray" in result.output
    result = CliRunner().invoke(cli, ["serve", "--workers", "0", *data], env={"LORA_STUDIO_BUNDLED": "false"})
    assert result.exit_code == 1 and "--workers 0: at least 1" in result.output
