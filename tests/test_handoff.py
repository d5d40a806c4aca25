"""`lora-studio render` hands its render to a running `lora-studio serve` on the same data dir: same pixels as
in-process, bad input answered with the server's message, and back to in-process when no server (or a stale
record, a foreign one, a revoked hand-off key) is there. The server is the app exactly as `serve` builds it."""

from __future__ import annotations

import json
import os
import stat

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

import app.cli as cli_module
from app.cli import app as cli
from app.handoff import HANDOFF_KEY, RECORD, HandoffOffer, numbered, read_record, render_via_server
from tests.live_server import free_port, run_serve, serve

STEPS = ["--steps", "2"]


def render(data, out, *extra: str):
    return CliRunner().invoke(
        cli,
        [
            "render",
            "--prompt",
            "a red star on the left",
            "--out",
            str(out),
            "--data-dir",
            str(data),
            *STEPS,
            *extra,
        ],
    )


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def test_render_goes_to_the_running_server_and_equals_in_process(tmp_path, monkeypatch):
    port = free_port()
    result, served = run_serve(tmp_path, "--port", str(port))
    assert result.exit_code == 0, result.output
    data, record = tmp_path / "data", tmp_path / "data" / RECORD
    assert not record.exists()  # offered once the app runs, not when it is built
    with serve(served["app"], port=port):
        assert stat.S_IMODE(record.stat().st_mode) == 0o600 and read_record(data)["pid"] == os.getpid()
        with monkeypatch.context() as mp:  # the command must not open a Studio (no torch, no pipeline load)
            mp.setattr(cli_module, "_studio", lambda *a, **k: pytest.fail("rendered in-process"))
            handed = render(data, tmp_path / "served.png", "--num-images", "2")
            assert handed.exit_code == 0, handed.output
            assert f"rendered by the server at http://127.0.0.1:{port}" in handed.output
            refused = render(data, tmp_path / "bad.png", "--lora", "nosuch")
            assert refused.exit_code == 1 and "no adapter named 'nosuch'" in refused.output
        here = render(data, tmp_path / "here.png", "--num-images", "2", "--in-process")
        assert here.exit_code == 0 and "rendered by the server" not in here.output, here.output
        for i in range(2):
            served_png, here_png = (
                numbered(tmp_path / "served.png", i, 2),
                numbered(tmp_path / "here.png", i, 2),
            )
            assert np.abs(pixels(served_png) - pixels(here_png)).max() == 0
            assert "lora_studio" in Image.open(served_png).text  # the provenance came with it
        studio = served["app"].state.studio
        key = studio.accounts.get_api_key(HANDOFF_KEY)
        jobs = studio.list_jobs(None, key.id, 10, 0)  # the job is that key's, listed like any key's
        assert jobs.total == 1 and jobs.items[0].status == "done"
    assert not record.exists()  # the server took its record away when it stopped
    after = render(data, tmp_path / "after.png")
    assert after.exit_code == 0 and "rendered by the server" not in after.output, after.output


def test_stale_foreign_or_revoked_records_fall_back_to_in_process(tmp_path):
    port = free_port()
    result, served = run_serve(tmp_path, "--port", str(port))
    assert result.exit_code == 0, result.output
    data = tmp_path / "data"
    request = {"prompt": "a red star", "num_inference_steps": 1}
    (data / RECORD).write_text(
        json.dumps({"pid": 2**22 + 12345, "url": f"http://127.0.0.1:{port}", "secret": "s"})
    )
    assert render_via_server(data, request, tmp_path / "x.png") is None  # no such process
    (data / RECORD).write_text(
        json.dumps({"pid": os.getpid(), "url": f"http://127.0.0.1:{port}", "secret": "s"})
    )
    assert render_via_server(data, request, tmp_path / "x.png") is None  # nothing listening there
    (data / RECORD).write_text("{not json")
    assert render_via_server(data, request, tmp_path / "x.png") is None
    with serve(served["app"], port=port):
        live = read_record(data)
        (data / RECORD).write_text(json.dumps({**live, "secret": "another run's"}))
        assert render_via_server(data, request, tmp_path / "x.png") is None  # 401: not this run's secret
        (data / RECORD).write_text(json.dumps(live))
        paths, _ = render_via_server(data, request, tmp_path / "x.png")
        assert paths == [tmp_path / "x.png"] and (tmp_path / "x.png").is_file()
        studio = served["app"].state.studio
        studio.accounts.revoke_api_key(HANDOFF_KEY)
        assert render_via_server(data, request, tmp_path / "y.png") is None  # revoked: 401, render here
        again = HandoffOffer(studio, "http://127.0.0.1:1")
        (data / RECORD).unlink()
        again.start()  # a server started now does not offer hand-off with a revoked key
        assert not again.offered and not (data / RECORD).exists()


def test_the_command_line_imports_only_what_a_render_needs(tmp_path):
    """The CLI module and the hand-off client import no torch; an in-process render imports no web stack."""
    import subprocess
    import sys

    light = (
        "import sys; import app.cli, app.handoff; "
        "print(sorted(m for m in ('torch', 'diffusers', 'transformers', 'gradio', 'fastapi', 'uvicorn') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", light], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    render_here = (
        "import sys; from app.cli import main; "
        f"sys.argv = ['lora-studio', 'render', '--prompt', 'a red star', '--steps', '1', '--out', "
        f"{str(tmp_path / 'r.png')!r}, '--data-dir', {str(tmp_path / 'data')!r}]\n"
        "try:\n    main()\nexcept SystemExit as exc:\n    assert not exc.code, exc.code\n"
        "print(sorted(m for m in ('torch', 'gradio', 'fastapi', 'uvicorn', 'starlette') if m in sys.modules))"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "LORA_STUDIO_BUNDLED": "false"}
    done = subprocess.run([sys.executable, "-c", render_here], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "['torch']" and (tmp_path / "r.png").is_file()


def test_polling_backs_off_waits_out_a_429_and_ctrl_c_cancels_the_job(tmp_path, monkeypatch):
    import app.handoff as handoff

    slept: list[float] = []
    monkeypatch.setattr(handoff.time, "sleep", slept.append)
    running = {"id": 7, "status": "running", "progress": 0.5}
    answers = [(200, running)] * 8 + [(429, {"error": {"type": "rate_limited", "retry_after": 3}})]
    answers += [(200, {**running, "status": "done", "progress": 1.0})]
    calls: list[tuple[str, str]] = []

    class Fake:
        def call(self, method, path, body=None):
            calls.append((method, path))
            status, body = answers.pop(0)
            return status, json.dumps(body).encode()

    seen: list[float] = []
    assert handoff._follow(Fake(), running, seen.append)["status"] == "done"
    assert slept[:3] == pytest.approx([0.05, 0.075, 0.1125]) and max(slept[:9]) == handoff.MAX_POLL_S
    assert 3.0 in slept and seen and all(p == 0.5 for p in seen)
    assert calls == [("GET", "/api/v1/renders/7")] * 10

    def interrupted(*_a, **_k):
        raise KeyboardInterrupt

    monkeypatch.setattr(handoff, "_follow", interrupted)
    deleted: list[tuple[str, str]] = []

    class Server:
        def __init__(self, *a, **k):
            self.timeout = 2.0

        def call(self, method, path, body=None):
            deleted.append((method, path))
            return (202, json.dumps(running).encode()) if method == "POST" else (202, b"{}")

    monkeypatch.setattr(handoff, "_Client", Server)
    (tmp_path / RECORD).write_text(
        json.dumps({"pid": os.getpid(), "url": "http://127.0.0.1:1", "secret": "s"})
    )
    with pytest.raises(KeyboardInterrupt):
        render_via_server(tmp_path, {"prompt": "x"}, tmp_path / "x.png")
    assert deleted == [("POST", "/api/v1/renders"), ("DELETE", "/api/v1/renders/7")]
