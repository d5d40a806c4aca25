"""The whole web app (REST API, admin, Gradio studio) on a live uvicorn server on 127.0.0.1, over a Studio on
a tmp data dir with the tiny SDXL and two random LoRAs imported; shared by the UI, admin and browser tests."""

from __future__ import annotations

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
from bench.common import free_port
from composer.formats import write_kohya
from tests.helpers import random_lora

LORAS = {"inkwell": "inkwellstyle", "pastel": "pastelstyle"}  # name -> trigger word


@dataclass
class Live:
    url: str
    studio: Studio


def run_serve(tmp_path: Path, *args: str, bundled: bool = False) -> tuple:
    """`lora-studio serve --data-dir tmp_path/data ARGS` up to the point where it would run uvicorn: the CLI's
    result and uvicorn.run's arguments (`app`, `host`, `port`, ...), the app exactly as `serve` builds it."""
    import pytest
    from typer.testing import CliRunner

    from app.cli import app as cli

    served: dict = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(uvicorn, "run", lambda app, **kw: served.update(app=app, **kw))
        mp.setenv("LORA_STUDIO_BUNDLED", str(bundled).lower())
        result = CliRunner().invoke(cli, ["serve", "--data-dir", str(tmp_path / "data"), *args])
    return result, served


@contextmanager
def serve(app, timeout: float = 60.0, port: int | None = None) -> Iterator[str]:
    """Run `app` on `port` (default: a free one) in a thread; yields its base URL; stops it afterwards."""
    port = port or free_port()
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
