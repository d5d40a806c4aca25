"""Schemathesis fuzzes every operation of the REST API's OpenAPI spec (/api/v1/openapi.json) over a Studio on
the tiny SDXL model: with a valid key no answer is a 5xx, and every answer conforms to the spec (documented
status code, content type, headers and body schema); without a key every operation answers 401.

The render executor is not started (fuzzed batches stay queued: the spec is what is tested, not rendering),
but one finished job with a PNG is made beforehand, so that reads of jobs and images find something. What the
fuzzer found is pinned by the plain tests at the end."""

from __future__ import annotations

import os
import time
from urllib.parse import unquote, urlsplit

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings

from app.api import API_PREFIX, create_app
from app.jobs import make_executor
from composer.methods import METHODS
from db.repository import ApiKeyRepository
from db.session import unit_of_work
from tests.live_server import studio_with_loras

# examples per operation and pass; LORA_STUDIO_FUZZ_EXAMPLES=500 for a deeper run
MAX_EXAMPLES = int(os.environ.get("LORA_STUDIO_FUZZ_EXAMPLES", "25"))
FUZZ = settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
)


class Deferred:
    """The ASGI app under test, set by the `auth_headers` fixture: `@schema.parametrize()` reads the spec at
    import, before any fixture (`schemathesis.pytest.from_fixture` would wait, but 4.32 fails on pytest 9:
    `Function._nodeid`). Lifespan events are answered here and not passed on: the executor never starts."""

    def __init__(self, app) -> None:
        self.app = app
        self.done_job = 0  # a finished render job with one image, once the fixture made it

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "lifespan":
            return await self.app(scope, receive, send)
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})


class SpecOnly:
    """All the spec needs of a Studio: its composition methods (the render request's variants)."""

    def composition_methods(self) -> dict[str, type]:
        return dict(METHODS)


SPEC_ONLY = create_app(SpecOnly())  # type: ignore[arg-type]
APP = Deferred(SPEC_ONLY)
schema = schemathesis.openapi.from_asgi(f"{API_PREFIX}/openapi.json", APP)


@pytest.fixture(scope="module")
def auth_headers(tmp_path_factory, tiny_sdxl_factory):
    """Points APP at an API over a Studio with two LoRAs and one finished render job of the key it returns
    (as headers)."""
    tmp = tmp_path_factory.mktemp("fuzz")
    studio = studio_with_loras(
        tmp, tiny_sdxl_factory, max_upload_mb=1, max_queued_jobs=10_000, job_heartbeat_s=0.1
    )
    with unit_of_work(studio.sessions) as session:
        key = ApiKeyRepository(session).create("fuzz", rate_limit_per_minute=1_000_000)[1]
    headers = {"Authorization": f"Bearer {key}"}

    executor = make_executor(studio)
    with TestClient(create_app(studio, executor), headers=headers) as client:  # a real render, one step
        batch = {
            "requests": [{"prompt": "a red circle", "num_inference_steps": 1, "height": 32, "width": 32}]
        }
        url = client.post(f"{API_PREFIX}/renders", json=batch).headers["location"]
        deadline = time.monotonic() + 120
        while (job := client.get(url).json())["status"] != "done":
            assert job["status"] in ("queued", "running") and time.monotonic() < deadline, job
            time.sleep(0.05)
    APP.app = create_app(studio, executor)  # the same executor, never started again: fuzzed jobs stay queued
    APP.done_job = job["id"]
    yield headers
    APP.app = SPEC_ONLY


# Schema-valid is not always acceptable here: an upload must be a LoRA file, a name must be made of letters,
# digits and `-_. `, a render must name catalogued LoRAs. The spec cannot say so, and answers 400/404/422.
NOT_CHECKED = [schemathesis.checks.positive_data_acceptance]


@schema.parametrize()
@FUZZ
def test_every_operation_conforms_to_the_spec_and_never_answers_5xx(case, auth_headers):
    excluded = NOT_CHECKED
    if any(isinstance(v, list) for v in (case.query or {}).values()):
        # `?tag=a&tag=b` for a single-valued parameter: FastAPI reads the last one, as most servers do
        excluded = [*excluded, schemathesis.checks.negative_data_rejection]
    case.call_and_validate(headers=auth_headers, excluded_checks=excluded)


@schema.parametrize()
@FUZZ
def test_every_operation_without_a_key_is_401(case, auth_headers):
    for name in ("Authorization", "X-API-Key"):
        if case.headers:
            case.headers.pop(name, None)
    response = case.call()
    if case.method.upper() != case.operation.method.upper():  # the coverage phase tries other methods too
        assert response.status_code == 405, (case.method, case.path, response.status_code, response.text)
        return
    sent = unquote(urlsplit(response.request.url or "").path)
    if "\n" in sent and response.status_code == 404:
        return  # `{name:path}` is `.*`: no route matches a name with a line break, a 404 to anyone
    assert response.status_code == 401, (case.method, case.path, response.status_code, response.text)
    assert response.json()["error"]["type"] == "unauthorized"
    assert response.headers["www-authenticate"] == ["Bearer"]


# --- what the fuzzer found, pinned ---------------------------------------------------------------------------


@pytest.fixture
def client(auth_headers):
    return TestClient(APP.app)  # not entered: no lifespan, so the executor stays stopped


def test_a_finished_jobs_png_conforms_to_the_spec(auth_headers):
    operation = schema[f"{API_PREFIX}/renders/{{job_id}}/images/{{n}}"]["GET"]
    case = operation.Case(path_parameters={"job_id": APP.done_job, "n": 0})
    response = case.call_and_validate(headers=auth_headers, excluded_checks=NOT_CHECKED)
    assert response.status_code == 200 and response.content.startswith(b"\x89PNG")


def test_405_lists_every_method_of_the_path_in_allow(client, auth_headers):
    """Starlette named only the first route's methods (`Allow: GET` on /loras, which takes POST too)."""
    for method, path, allow in [
        ("OPTIONS", "/loras", "GET, POST"),
        ("PUT", "/loras", "GET, POST"),
        ("PUT", "/loras/inkwell", "GET, PATCH, DELETE"),
        ("POST", "/renders/1", "GET, DELETE"),
        ("DELETE", "/renders/1/images/0", "GET"),
        ("POST", "/search", "GET"),
    ]:
        r = client.request(method, API_PREFIX + path, headers=auth_headers)
        assert r.status_code == 405 and r.json()["error"]["type"] == "method_not_allowed", (method, path)
        assert r.headers["allow"] == allow, (method, path)


def test_ids_and_offsets_beyond_the_databases_integers_are_422_not_500(client, auth_headers):
    """`/renders/9223372036854775808` and `?offset=9223372036854775808` overflowed SQLite's INTEGER (500)."""
    huge = 2**63
    for path in [
        f"/renders/{huge}",
        f"/renders/{huge}/images/0",
        f"/renders/{2**31}",
        "/renders/0",
        "/renders/1/images/-1",
        f"/loras?offset={huge}",
        f"/renders?offset={huge}",
    ]:
        r = client.get(API_PREFIX + path, headers=auth_headers)
        assert r.status_code == 422 and r.json()["error"]["type"] == "validation_error", (path, r.text)
    assert client.delete(f"{API_PREFIX}/renders/{huge}", headers=auth_headers).status_code == 422
    assert client.get(f"{API_PREFIX}/loras?offset={2**31 - 1}", headers=auth_headers).json()["items"] == []


def test_a_body_refused_before_the_key_is_checked_is_still_401(client, auth_headers):
    """FastAPI reads the body before the route's dependencies: malformed JSON was 422 (and an undecodable
    body 400) to a client with no key, or a revoked one."""
    url = f"{API_PREFIX}/loras/inkwell"
    bodies = [b"{not json", b"\x00\xff\xfe"]
    for body in bodies:
        for headers in ({}, {"Authorization": "Bearer ls_not-a-key"}, {"X-API-Key": "nope"}):
            r = client.patch(url, content=body, headers={"Content-Type": "application/json", **headers})
            assert r.status_code == 401 and r.json()["error"]["type"] == "unauthorized", (
                body,
                headers,
                r.text,
            )
            assert r.headers["www-authenticate"] == "Bearer"
        r = client.post(f"{API_PREFIX}/renders", content=body, headers={"Content-Type": "application/json"})
        assert r.status_code == 401, r.text
    # with the key, the body's own error as before
    r = client.patch(url, content=bodies[0], headers={"Content-Type": "application/json", **auth_headers})
    assert r.status_code == 422 and r.json()["error"]["type"] == "malformed_json", r.text
    r = client.patch(url, content=bodies[1], headers={"Content-Type": "application/json", **auth_headers})
    assert r.status_code in (400, 422), r.text


def test_400s_of_upload_and_render_are_documented(client, auth_headers):
    """A multipart body over its field limit (upload) and a model the server does not serve (render) are
    400s, which the spec did not list."""
    spec = client.get(f"{API_PREFIX}/openapi.json").json()["paths"]
    assert "400" in spec[f"{API_PREFIX}/loras"]["post"]["responses"]
    assert "400" in spec[f"{API_PREFIX}/renders"]["post"]["responses"]
    fields = {f"f{i}": "x" for i in range(9)}
    r = client.post(
        f"{API_PREFIX}/loras", files={"file": ("a.safetensors", b"x")}, data=fields, headers=auth_headers
    )
    assert r.status_code == 400 and r.json()["error"]["type"] == "bad_request", r.text
    batch = {"requests": [{"prompt": "a red circle"}], "model": "not-served"}
    r = client.post(f"{API_PREFIX}/renders", json=batch, headers=auth_headers)
    assert r.status_code == 400 and "not served" in r.json()["error"]["message"], r.text
