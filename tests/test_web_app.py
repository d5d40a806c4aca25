"""The whole web application exactly as `lora-studio serve` builds it (REST API, admin page, static files and the
Gradio studio mounted at /): routing, the API's error shape on every path and method, the offline docs, and the
key and size checks that run before a request's body is read."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import gradio
import pytest
from fastapi.testclient import TestClient

from db.repository import ApiKeyRepository
from db.session import unit_of_work

API = "/api/v1"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The FastAPI app `serve` hands to uvicorn (tiny SDXL, no bundled adapters) and its Studio."""
    import uvicorn
    from typer.testing import CliRunner

    from app.cli import app as cli

    data = tmp_path_factory.mktemp("web") / "data"
    served: dict = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(uvicorn, "run", lambda app, **kw: served.update(app=app, **kw))
        mp.setenv("LORA_STUDIO_BUNDLED", "false")
        mp.setenv("LORA_STUDIO_BACKBONE", "sdxl")
        mp.setenv("LORA_STUDIO_MODEL", "tiny")
        mp.setenv("LORA_STUDIO_MAX_JSON_KB", "64")
        mp.setenv("LORA_STUDIO_MAX_QUEUED_JOBS_PER_KEY", "1")
        result = CliRunner().invoke(cli, ["serve", "--data-dir", str(data)])
    assert result.exit_code == 0, result.output
    return served["app"]


@pytest.fixture(scope="module")
def client(served):
    with TestClient(served, follow_redirects=False) as c:
        yield c


@pytest.fixture(scope="module")
def key(served) -> str:
    with unit_of_work(served.state.studio.sessions) as session:
        return ApiKeyRepository(session).create("web-test", rate_limit_per_minute=10_000)[1]


def api_error(response, status: int, type_: str) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and body["error"]["type"] == type_, body
    return body["error"]


def test_admin_without_a_slash_redirects_to_the_admin_page(client):
    response = client.get("/admin")
    assert response.status_code == 302 and response.headers["location"] == "/admin/"
    page = client.get("/admin/", follow_redirects=True)
    assert page.status_code == 200 and "<form" in page.text and "password" in page.text


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("DELETE", f"{API}/loras", "GET, POST"),
        ("PUT", f"{API}/renders", "GET, POST"),
        ("POST", f"{API}/search", "GET"),
        ("PATCH", f"{API}/renders/1/images/0", "GET"),
    ],
)
def test_a_method_an_api_path_does_not_take_is_405_with_allow_in_the_api_shape(
    client, key, method, path, allowed
):
    for headers in ({}, {"Authorization": f"Bearer {key}"}):  # the same answer with and without a key
        response = client.request(method, path, headers=headers)
        error = api_error(response, 405, "method_not_allowed")
        assert response.headers["allow"] == allowed and method in error["message"]


def test_an_unknown_api_path_is_a_json_404_not_the_studio(client, key):
    for method in ("GET", "POST", "DELETE"):
        response = client.request(method, f"{API}/no-such-thing", headers={"X-API-Key": key})
        assert "no API route" in api_error(response, 404, "not_found")["message"]


def test_gradio_keeps_its_own_static_files_and_ours_live_beside_them(client):
    frontend = Path(gradio.__file__).parent / "templates" / "frontend" / "static"
    font = next(p for p in sorted((frontend / "fonts").rglob("*.woff2")))
    response = client.get(f"/static/{font.relative_to(frontend).as_posix()}")
    assert response.status_code == 200 and response.content == font.read_bytes()
    ours = client.get("/studio-static/admin.css")
    assert ours.status_code == 200 and ours.content == (Path("static") / "admin.css").read_bytes()


def test_the_api_docs_are_served_without_a_cdn(client):
    page = client.get(f"{API}/docs")
    assert page.status_code == 200 and "swagger-ui" in page.text
    assert "cdn" not in page.text.lower() and "https://" not in page.text.split("<body>")[0]
    script = client.get(f"{API}/docs/assets/swagger-ui-bundle.js")
    assert script.status_code == 200 and len(script.content) > 500_000
    assert client.get(f"{API}/docs/assets/swagger-ui.css").status_code == 200
    assert f"{API}/loras" in client.get(f"{API}/openapi.json").json()["paths"]


def asgi_call(app, method: str, path: str, headers: dict[str, str], chunks: list[bytes]):
    """Call the ASGI app directly and record how many body chunks it read: (status, json body, chunks read)."""
    pending = [
        {"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)
    ]
    read, sent = [], []

    async def receive():
        if pending:
            read.append(1)
            return pending.pop(0)
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
        "client": ("127.0.0.1", 5000),
        "server": ("127.0.0.1", 8000),
    }
    asyncio.run(app(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], json.loads(body), len(read)


def test_a_keyless_request_is_401_before_a_byte_of_its_body_is_read(served):
    big = [b"{" + b" " * 65536] * 40  # 2.5 MiB announced; never read
    headers = {"content-type": "application/json", "content-length": str(sum(map(len, big)))}
    for path in (f"{API}/renders", f"{API}/loras"):
        status, body, read = asgi_call(served, "POST", path, headers, big)
        assert (status, body["error"]["type"], read) == (401, "unauthorized", 0)
    status, body, read = asgi_call(
        served, "POST", f"{API}/renders", {**headers, "x-api-key": "ls_wrong"}, big
    )
    assert (status, body["error"]["type"], read) == (401, "unauthorized", 0)


def test_an_oversize_json_body_is_413_before_or_while_it_is_read(served, key):
    auth = {"x-api-key": key, "content-type": "application/json"}
    chunk = b" " * 16384
    declared = {**auth, "content-length": str(65 * 1024)}  # LORA_STUDIO_MAX_JSON_KB=64 above
    status, body, read = asgi_call(served, "POST", f"{API}/renders", declared, [chunk] * 5)
    assert (status, body["error"]["type"], read) == (413, "payload_too_large", 0)
    assert "64 KiB limit (max_json_kb)" in body["error"]["message"]
    # no Content-Length (chunked): read until the limit is passed, then refused
    status, body, read = asgi_call(served, "POST", f"{API}/renders", auth, [chunk] * 40)
    assert (status, body["error"]["type"]) == (413, "payload_too_large") and read == 5
    # under the limit the body reaches the route (a validation error here, not a size error)
    status, body, _ = asgi_call(served, "POST", f"{API}/renders", auth, [b'{"requests": []}'])
    assert status == 422 and body["error"]["type"] == "validation_error"


def test_cost_budget_and_per_key_queue_share_on_the_served_app(served, client):
    with unit_of_work(served.state.studio.sessions) as session:
        repo = ApiKeyRepository(session)
        greedy = repo.create("greedy", rate_limit_per_minute=10_000)[1]
    headers = {"X-API-Key": greedy}
    huge = {"prompt": "x", "height": 4096, "width": 4096, "num_images": 16, "num_inference_steps": 500}
    r = client.post(f"{API}/renders", json={"requests": [huge] * 64}, headers=headers)
    assert "max_job_megapixel_steps" in api_error(r, 422, "over_budget")["message"]
    # LORA_STUDIO_MAX_QUEUED_JOBS_PER_KEY=1: of three long jobs, one at most runs on the one worker, so at
    # least one submit finds this key's share taken
    slow = {"requests": [{"prompt": "x", "height": 64, "width": 64, "num_inference_steps": 500}]}
    answers = [client.post(f"{API}/renders", json=slow, headers=headers) for _ in range(3)]
    refused = [r for r in answers if r.status_code == 429]
    assert refused and all(r.status_code in (202, 429) for r in answers)
    assert "max_queued_jobs_per_key" in api_error(refused[0], 429, "queue_full")["message"]
    for r in answers:
        if r.status_code == 202:
            client.delete(f"{API}/renders/{r.json()['id']}", headers=headers)
