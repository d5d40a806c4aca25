"""Who may use a served studio: beyond loopback the studio asks for a login and `serve` refuses to start without
a user (unless --no-login, which it warns about); a login protects Gradio's routes; a training run can be
stopped only by the user who started it; the start-up summary says where the data is and what to do next."""

from __future__ import annotations

import time

import pytest
from fastapi.testclient import TestClient

from app.serving import ServeRefused, decide_access, is_loopback
from app.settings import Settings
from app.studio import Studio
from app.web import create_web_app
from tests.live_server import run_serve, serve

PASSWORD = "correct horse battery"


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.8.0.1", True),
        ("::1", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("192.168.1.20", False),
        ("studio.example.org", False),
    ],
)
def test_loopback_hosts(host, loopback):
    assert is_loopback(host) is loopback


def test_access_decisions():
    assert decide_access("127.0.0.1", "auto", 0).login is False
    assert decide_access("0.0.0.0", "auto", 1).login is True
    assert decide_access("127.0.0.1", "always", 1).login is True
    with pytest.raises(ServeRefused, match="no user yet"):
        decide_access("0.0.0.0", "auto", 0)
    with pytest.raises(ServeRefused, match="studio_login is 'always'"):
        decide_access("127.0.0.1", "always", 0)
    open_ = decide_access("0.0.0.0", "never", 0)
    assert (open_.login, open_.open_to_network) == (False, True)


def test_serve_beyond_loopback_without_a_user_refuses_to_start(tmp_path):
    result, served = run_serve(tmp_path, "--host", "0.0.0.0")
    assert result.exit_code == 1 and not served
    assert "no user yet" in result.output and "lora-studio admin create --username" in result.output


def test_serve_no_login_beyond_loopback_starts_with_a_warning(tmp_path):
    result, served = run_serve(tmp_path, "--host", "0.0.0.0", "--no-login")
    assert result.exit_code == 0 and served["host"] == "0.0.0.0", result.output
    assert "WARNING: the studio listens on 0.0.0.0 with no login" in result.output
    with TestClient(served["app"]) as client:
        assert client.get("/config").status_code == 200  # open, as asked


def test_with_a_user_serve_beyond_loopback_makes_the_studio_ask_for_a_login(tmp_path):
    studio = Studio.open(Settings(data_dir=tmp_path / "data", bundled=False))
    studio.accounts.create_user("ann", PASSWORD, is_admin=False)  # studio users need not be admins
    result, served = run_serve(tmp_path, "--host", "0.0.0.0")
    assert result.exit_code == 0 and "studio: login required" in result.output, result.output
    with TestClient(served["app"]) as client:
        assert client.get("/config").status_code == 401
        assert (
            client.post("/login", data={"username": "ann", "password": "wrong password"}).status_code == 400
        )
        assert client.get("/config").status_code == 401
        assert client.post("/login", data={"username": "ann", "password": PASSWORD}).status_code == 200
        assert client.get("/config").status_code == 200
        client.get("/logout")
        assert client.get("/config").status_code == 401


def test_start_up_summary_says_where_the_data_is_and_what_was_imported(tmp_path):
    result, _ = run_serve(tmp_path, bundled=True)
    assert result.exit_code == 0, result.output
    out = result.output
    assert "LoRA Studio on http://127.0.0.1:8000/" in out and f"data dir: {tmp_path / 'data'}" in out
    assert "imported on this start: " in out and "heart" in out
    assert "admin page: no admin user yet; create one with `lora-studio admin create --username NAME`" in out
    assert "studio: no login (this machine only)" in out
    again, _ = run_serve(tmp_path, bundled=True)  # a second start imports nothing new
    assert again.exit_code == 0 and "imported on this start" not in again.output


def test_only_the_user_who_started_a_training_run_can_stop_it(tmp_path, tiny_sdxl_factory):
    from gradio_client import Client, handle_file
    from PIL import Image

    studio = Studio.open(Settings(data_dir=tmp_path / "data", backbone="sdxl", model="tiny", bundled=False))
    for user in ("alice", "bob"):
        studio.accounts.create_user(user, PASSWORD, is_admin=False)
    files = []
    for i, color in enumerate(("red", "blue", "green")):
        files.append(tmp_path / f"{i}.png")
        Image.new("RGB", (32, 32), color).save(files[-1])
    with serve(create_web_app(studio, login=True)) as url:
        alice = Client(url, auth=("alice", PASSWORD), verbose=False)
        bob = Client(url, auth=("bob", PASSWORD), verbose=False)
        job = alice.submit(
            [handle_file(str(f)) for f in files], "lora", "alices", "a photo", "", 5000, api_name="/train"
        )
        deadline = time.monotonic() + 120
        while not job.outputs() and time.monotonic() < deadline:  # the first steps have run
            time.sleep(0.2)
        assert job.outputs(), f"training did not start: {job.exception()}"
        assert "started by alice" in bob.predict(api_name="/stop_training")
        time.sleep(1.0)
        assert not job.done()  # bob's stop did nothing
        assert "Stopping" in alice.predict(api_name="/stop_training")
        status = job.result(timeout=120)[1]
        assert "stopped at step" in status
    assert "alices" not in studio.library.names()
