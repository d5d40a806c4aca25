"""The whole web app (REST API, admin, Gradio studio) on a live uvicorn server on 127.0.0.1, over a Studio on
a tmp data dir with the tiny SDXL and two random LoRAs imported; shared by the UI, admin and browser tests."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import uvicorn

from app.settings import Settings
from app.studio import Studio
from app.web import create_web_app
from composer.formats import write_kohya
from tests.helpers import random_lora

LORAS = {"inkwell": "inkwellstyle", "pastel": "pastelstyle"}  # name -> trigger word


@dataclass
class Live:
    url: str
    studio: Studio


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve(app, timeout: float = 60.0) -> Iterator[str]:
    """Run `app` on a free port in a thread; yields its base URL; stops it afterwards."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout)


def studio_with_loras(root: Path, backbone_and_factory, **settings) -> Studio:
    """A Studio on `root` (tiny SDXL, no bundled adapters) with the two LORAS imported."""
    studio = Studio.open(
        Settings(data_dir=root / "data", backbone="sdxl", model="tiny", bundled=False, **settings)
    )
    backbone, make = backbone_and_factory
    pipe = make()
    for i, (name, trigger) in enumerate(LORAS.items()):
        path = root / "in" / f"{name}.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_kohya(
            random_lora(pipe, backbone, seed=i, rank=4, alpha=4.0, std=0.3), path, trigger_words=[trigger]
        )
        studio.library.import_file(path)
    return studio


@contextmanager
def live_studio(root: Path, backbone_and_factory, **settings) -> Iterator[Live]:
    studio = studio_with_loras(root, backbone_and_factory, **settings)
    with serve(create_web_app(studio)) as url:
        yield Live(url, studio)
