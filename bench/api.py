"""Batch render API: images per second through a live server (uvicorn on loopback, the local executor), and
where a job's wall time goes, warm: the denoiser (UNet forward calls), the text encoders, the VAE decode,
and everything else (HTTP, queue, database, PNG files, scheduler).

python -m bench.api [--jobs 24] [--requests 4] [--steps 8] [--size 64] [--clients 4] [--workers 1]
"""

from __future__ import annotations

import argparse
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx
import uvicorn

from app.api import create_app
from app.jobs.local import LocalExecutor
from app.settings import Settings
from app.studio import Studio
from bench.common import emit
from db.repository import ApiKeyRepository
from db.session import unit_of_work

API = "/api/v1"
POLL_S = 0.5  # a client polling its job twice a second


@contextmanager
def live_server(studio: Studio, executor: LocalExecutor) -> Iterator[str]:
    """uvicorn in a thread on a free loopback port; its URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(create_app(studio, executor), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join()


class Clock:
    """Seconds spent in timed calls, summed (one worker: calls never overlap)."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def wrap(self, fn: Callable) -> Callable:
        def timed(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t

        return timed


@contextmanager
def timed_parts(pipe) -> Iterator[dict[str, Clock]]:
    """Time the pipeline's UNet, text encoders and VAE decode; every wrapper is removed on exit."""
    clocks = {"denoiser": Clock(), "text_encoders": Clock(), "vae_decode": Clock()}
    with ExitStack() as undo:
        for part, names in (("denoiser", ["unet"]), ("text_encoders", ["text_encoder", "text_encoder_2"])):
            for name in names:
                module = getattr(pipe, name, None)
                if module is None:
                    continue
                module.forward = clocks[part].wrap(module.forward)
                undo.callback(module.__dict__.pop, "forward")
        pipe.vae.decode = clocks["vae_decode"].wrap(pipe.vae.decode)
        undo.callback(pipe.vae.__dict__.pop, "decode")
        yield clocks


def run_batch(url: str, key: str, jobs: int, clients: int, request: dict, requests: int) -> float:
    """Submit `jobs` jobs from `clients` threads, wait for all; wall seconds from the first POST."""
    ids: list[int] = []
    lock = threading.Lock()

    def client(n: int) -> None:
        with httpx.Client(base_url=url, headers={"X-API-Key": key}, timeout=120) as c:
            mine = []
            for j in range(n, jobs, clients):
                body = {
                    "requests": [
                        {**request, "prompt": f"job {j} request {i}", "seed": i} for i in range(requests)
                    ]
                }
                r = c.post(f"{API}/renders", json=body)
                r.raise_for_status()
                mine.append(r.json()["id"])
            for job_id in mine:
                while (state := c.get(f"{API}/renders/{job_id}").json())["status"] in ("queued", "running"):
                    time.sleep(POLL_S)
                if state["status"] != "done":
                    raise RuntimeError(f"job {job_id} {state['status']}: {state['error']}")
            with lock:
                ids.extend(mine)

    t = time.perf_counter()
    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t
    if len(ids) != jobs:
        raise RuntimeError(f"{jobs - len(ids)} jobs did not finish")
    return wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=24)
    parser.add_argument("--requests", type=int, default=4, help="requests per job, one image each")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--backbone", default="sdxl", help="sdxl, flux or toy (the bundled toy model)")
    parser.add_argument("--model", default=None, help="default: the backbone's own (sdxl/flux: tiny)")
    args = parser.parse_args()
    request = {"num_inference_steps": args.steps, "height": args.size, "width": args.size}
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(
            data_dir=Path(tmp),
            bundled=False,
            backbone=args.backbone,
            model=args.model,
            workers=args.workers,
            max_queued_jobs=max(100, args.jobs),
        )
        studio = Studio.open(settings)
        with unit_of_work(studio.sessions) as session:
            key = ApiKeyRepository(session).create("bench", rate_limit_per_minute=1_000_000)[1]
        executor = LocalExecutor(studio)
        with live_server(studio, executor) as url:
            run_batch(url, key, args.workers, 1, request, 1)  # warm: pipelines built and run once
            with ExitStack() as stack:
                parts = [
                    stack.enter_context(timed_parts(s.pipeline(args.backbone, args.model).pipe))
                    for s in executor.studios
                ]
                wall = run_batch(url, key, args.jobs, args.clients, request, args.requests)
            spent = {name: sum(p[name].seconds for p in parts) for name in parts[0]}
    images = args.jobs * args.requests
    busy = wall * args.workers  # worker-seconds available in the run
    figures = {
        "images_per_s": round(images / wall, 2),
        "denoiser_share": round(spent["denoiser"] / busy, 3),
        "outside_denoiser_share": round(1 - spent["denoiser"] / busy, 3),
        "text_encoder_share": round(spent["text_encoders"] / busy, 3),
        "vae_decode_share": round(spent["vae_decode"] / busy, 3),
        "other_share": round(1 - sum(spent.values()) / busy, 3),
    }
    goals = {"outside_denoiser_share": "<= 0.1"}  # for real checkpoints; a tiny UNet is cheap by design
    emit("api", figures, goals, {"images": images, "wall_s": round(wall, 2), **request})


if __name__ == "__main__":
    main()
