"""Batch render API: images per second through a live server (uvicorn on loopback, the local executor), and
where a job's wall time goes, warm: the denoiser (UNet forward calls), the text encoders, the VAE decode,
and everything else (HTTP, queue, database, PNG files, scheduler).

python -m bench.api [--jobs 24] [--requests 4] [--steps 8] [--size 64] [--clients 4] [--workers 1] [--rounds 3]

Under load: `--clients 50 --jobs 200 --requests 1` (each client its own API key, so the per-key queue share
applies; a 429 is retried after its Retry-After, as a client should). Reports the submit latency and each job's
completion time (submit to the poll that saw it done) as min/median/p95/max, the 429s, and checks that no job was
lost or doubled: every job done once, one render record and one PNG per request.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import uvicorn

from app.api import create_app
from app.jobs.local import LocalExecutor
from app.settings import Settings
from app.studio import Studio
from bench.common import emit, free_port, spread
from db.repository import ApiKeyRepository
from db.session import unit_of_work

API = "/api/v1"
POLL_S = 0.5  # a client polling its job twice a second


@contextmanager
def live_server(app) -> Iterator[str]:
    """`app` served by uvicorn in a thread on a free loopback port; its URL."""
    port = free_port()
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_level="warning", timeout_graceful_shutdown=2
    )
    server = uvicorn.Server(config)  # graceful shutdown bounded: Gradio clients keep streams open
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


@dataclass
class Load:
    """What the clients saw: submit latencies (s), completion times (s), 429s, job ids."""

    submit_s: list[float] = field(default_factory=list)
    complete_s: list[float] = field(default_factory=list)
    refused: int = 0
    ids: list[int] = field(default_factory=list)


def run_batch(
    url: str,
    keys: list[str],
    jobs: int,
    clients: int,
    request: dict,
    requests: int,
    load: Load | None = None,
    tag: str = "job",
) -> tuple[float, Load]:
    """Submit `jobs` jobs from `clients` threads (client n uses keys[n % len(keys)]), wait for all; wall seconds
    from the first POST and what the clients saw (added to `load`). `tag` keeps the idempotency keys of one
    batch apart from another's."""
    load = load or Load()
    before = len(load.ids)
    lock = threading.Lock()

    def client(n: int) -> None:
        with httpx.Client(base_url=url, headers={"X-API-Key": keys[n % len(keys)]}, timeout=300) as c:
            mine: list[tuple[int, float]] = []
            for j in range(n, jobs, clients):
                body = {
                    "requests": [
                        {**request, "prompt": f"job {j} request {i}", "seed": i} for i in range(requests)
                    ]
                }
                while True:
                    t = time.perf_counter()
                    r = c.post(f"{API}/renders", json=body, headers={"Idempotency-Key": f"{tag}-{j}"})
                    took = time.perf_counter() - t
                    if r.status_code != 429:
                        break
                    with lock:
                        load.refused += 1
                    time.sleep(float(r.headers.get("retry-after", "1")))
                r.raise_for_status()
                mine.append((r.json()["id"], time.perf_counter()))
                with lock:
                    load.submit_s.append(took)
            for job_id, submitted in mine:
                while (state := c.get(f"{API}/renders/{job_id}").json())["status"] in ("queued", "running"):
                    time.sleep(POLL_S)
                if state["status"] != "done":
                    raise RuntimeError(f"job {job_id} {state['status']}: {state['error']}")
                with lock:
                    load.complete_s.append(time.perf_counter() - submitted)
                    load.ids.append(job_id)

    t = time.perf_counter()
    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t
    finished = load.ids[before:]
    if len(finished) != jobs or len(set(finished)) != jobs:
        raise RuntimeError(f"{jobs} jobs submitted, {len(set(finished))} distinct jobs finished")
    return wall, load


def check_exactly_once(studio: Studio, load: Load, requests: int) -> dict[str, int]:
    """Every finished job once in the catalog, done, with one render record and one PNG per request."""
    from sqlalchemy import func, select

    from db.models import Render, RenderJob

    with studio.sessions() as session:
        jobs = session.scalars(select(RenderJob).where(RenderJob.id.in_(load.ids))).all()
        renders = session.scalar(select(func.count(Render.id))) or 0
    pngs = len(list((studio.settings.root / "renders").rglob("job-*/*.png")))
    done = sum(j.status == "done" and len(j.results) == requests for j in jobs)
    expected = len(load.ids) * requests
    if done != len(load.ids) or pngs < expected:
        raise RuntimeError(f"lost work: {done} of {len(load.ids)} jobs done whole, {pngs} PNGs of {expected}")
    return {"jobs_done_once": done, "render_records": renders, "pngs": pngs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=24)
    parser.add_argument("--requests", type=int, default=4, help="requests per job, one image each")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3, help="batches timed one after another (spread)")
    parser.add_argument(
        "--max-queued", type=int, default=100, help="the server's max_queued_jobs (default 100)"
    )
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
            max_queued_jobs=args.max_queued,
        )
        studio = Studio.open(settings)
        with unit_of_work(studio.sessions) as session:
            repo = ApiKeyRepository(session)
            keys = [
                repo.create(f"bench-{n}", rate_limit_per_minute=1_000_000)[1] for n in range(args.clients)
            ]
        executor = LocalExecutor(studio)
        with live_server(create_app(studio, executor)) as url:
            run_batch(url, keys[:1], args.workers, 1, request, 1, tag="warm")  # pipelines built and run once
            with ExitStack() as stack:
                parts = [
                    stack.enter_context(timed_parts(s.pipeline(args.backbone, args.model).pipe))
                    for s in executor.studios
                ]
                load, walls = Load(), []
                for r in range(args.rounds):
                    wall, _ = run_batch(
                        url, keys, args.jobs, args.clients, request, args.requests, load, tag=f"round{r}"
                    )
                    walls.append(wall)
            spent = {name: sum(p[name].seconds for p in parts) for name in parts[0]}
            checked = check_exactly_once(studio, load, args.requests)
    images = args.jobs * args.requests  # per round
    busy = sum(walls) * args.workers  # worker-seconds available in the timed rounds
    figures = {
        "images_per_s": round(images * len(walls) / sum(walls), 2),
        "images_per_s_per_round": spread([images / w for w in walls], digits=2),
        "denoiser_share": round(spent["denoiser"] / busy, 3),
        "outside_denoiser_share": round(1 - spent["denoiser"] / busy, 3),
        "text_encoder_share": round(spent["text_encoders"] / busy, 3),
        "vae_decode_share": round(spent["vae_decode"] / busy, 3),
        "other_share": round(1 - sum(spent.values()) / busy, 3),
        "submit_ms": spread(load.submit_s, 1000, 1, p95=True),
        "completion_s": spread(load.complete_s, 1, 2, p95=True),
        "refused_429": load.refused,
        **checked,
    }
    goals = {"outside_denoiser_share": "<= 0.1"}  # for real checkpoints; a tiny UNet is cheap by design
    emit(
        "api",
        figures,
        goals,
        {
            "images_per_round": images,
            "rounds": len(walls),
            "jobs": args.jobs,
            "clients": args.clients,
            "wall_s": [round(w, 2) for w in walls],
            **request,
        },
    )


if __name__ == "__main__":
    main()
