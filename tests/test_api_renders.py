"""The batch render API (/api/v1/renders) over a Studio on the tiny SDXL model with the local executor:
submit, poll, fetch PNGs equal to Studio.render's; idempotency; cancel; the bounded queue; keys; errors."""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from app.api import create_app
from app.api.render_schemas import LoraWeightIn, RenderRequestIn
from app.jobs import make_executor
from app.settings import Settings
from app.studio import Studio
from composer.formats import write_kohya
from composer.render import LoraWeight, RenderRequest
from db.repository import ApiKeyRepository
from db.session import unit_of_work
from tests.helpers import random_lora

API = "/api/v1"
SMALL = {"num_inference_steps": 4, "height": 32, "width": 32}
LONG = {"num_inference_steps": 400, "height": 32, "width": 32}


@pytest.fixture
def studio(tmp_path, tiny_sdxl_factory) -> Studio:
    settings = Settings(
        data_dir=tmp_path / "data",
        bundled=False,
        backbone="sdxl",
        model="tiny",
        job_heartbeat_s=0.1,
        max_queued_jobs=2,
    )
    studio = Studio.open(settings)
    backbone, make = tiny_sdxl_factory
    write_kohya(random_lora(make(), backbone, seed=5, rank=4, std=0.2), tmp_path / "inkwell.safetensors")
    studio.library.import_file(tmp_path / "inkwell.safetensors")
    return studio


def new_key(studio, name: str = "ci", rate: int = 10_000) -> str:
    with unit_of_work(studio.sessions) as session:
        return ApiKeyRepository(session).create(name, rate_limit_per_minute=rate)[1]


@pytest.fixture
def client(studio):
    with TestClient(create_app(studio, make_executor(studio))) as c:
        c.headers["Authorization"] = f"Bearer {new_key(studio)}"
        yield c


def error(response, status: int, type_: str) -> dict:
    assert response.status_code == status, response.text
    body = response.json()["error"]
    assert body["type"] == type_, body
    return body


def poll(client, url: str, until=("done", "failed", "cancelled"), timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(url).json()
        if job["status"] in until:
            return job
        time.sleep(0.05)
    raise AssertionError(f"{url} still {job['status']} after {timeout} s: {job}")


def png(response) -> Image.Image:
    assert response.status_code == 200 and response.headers["content-type"] == "image/png", response.text
    return Image.open(io.BytesIO(response.content))


def test_submit_poll_and_fetch_images_equal_to_studio_render(client, studio):
    batch = {
        "requests": [
            {"prompt": "a red circle", "seed": 3, "num_images": 2, **SMALL},
            {"prompt": "a green square", "seed": 4, "loras": [{"name": "inkwell", "weight": 0.7}], **SMALL},
        ]
    }
    r = client.post(f"{API}/renders", json=batch)
    assert r.status_code == 202, r.text
    job = r.json()
    assert r.headers["location"] == f"{API}/renders/{job['id']}"
    assert job["status"] in ("queued", "running") and job["total"] == 3 and job["requests"] == 2
    done = poll(client, r.headers["location"])
    assert (done["status"], done["progress"], done["completed"], done["error"]) == ("done", 1.0, 3, None)
    assert done["queue_position"] is None and done["finished_at"] is not None
    urls = [u for result in done["results"] for u in result["images"]]
    assert urls == [f"{API}/renders/{job['id']}/images/{n}" for n in range(3)]
    references = [
        studio.render(RenderRequest("a red circle", seed=3, num_images=2, **SMALL)),
        studio.render(RenderRequest("a green square", seed=4, loras=(LoraWeight("inkwell", 0.7),), **SMALL)),
    ]
    expected = [image for ref in references for image in ref.images]
    for url, reference in zip(urls, expected, strict=True):
        image = png(client.get(url))
        np.testing.assert_array_equal(np.asarray(image.convert("RGB")), np.asarray(reference.convert("RGB")))
    provenance = done["results"][1]["provenance"]
    assert provenance == references[1].provenance
    assert provenance["loras"][0] | {"weight": 0.7} == {
        "name": "inkwell",
        "sha256": studio.library.get("inkwell").sha256,
        "autov2": studio.library.get("inkwell").autov2,
        "weight": 0.7,
    }
    assert json.loads(png(client.get(urls[2])).text["lora_studio"]) == provenance
    assert "Seed: 4" in png(client.get(urls[2])).text["parameters"]
    error(client.get(f"{API}/renders/{job['id']}/images/3"), 404, "not_found")
    page = client.get(f"{API}/renders").json()
    assert page["total"] == 1 and page["items"][0]["id"] == job["id"]
    assert client.get(f"{API}/renders", params={"status": "queued"}).json()["total"] == 0


def test_regional_job_with_masks_equals_studio_render_and_bad_params_are_400(client, studio):
    left = np.zeros((32, 32), np.uint8)
    left[:, :16] = 255
    buffer = io.BytesIO()
    Image.fromarray(left).save(buffer, format="PNG")
    mask = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    request = {
        "prompt": "a red circle",
        "seed": 2,
        "loras": [{"name": "inkwell"}],
        "method": "regional",
        "method_params": {"regions": {"inkwell": mask}, "feather": 1},
        **SMALL,
    }
    r = client.post(f"{API}/renders", json={"requests": [request]})
    assert r.status_code == 202, r.text
    done = poll(client, r.headers["location"])
    assert done["status"] == "done", done
    provenance = done["results"][0]["provenance"]
    assert provenance["method"] == "regional" and provenance["method_params"]["feather"] == 1
    reference = studio.render(RenderRequest.from_json(request))
    image = png(client.get(done["results"][0]["images"][0]))
    np.testing.assert_array_equal(
        np.asarray(image.convert("RGB")), np.asarray(reference.images[0].convert("RGB"))
    )
    merged = studio.render(RenderRequest("a red circle", seed=2, loras=(LoraWeight("inkwell"),), **SMALL))
    assert np.abs(np.asarray(reference.images[0], float) - np.asarray(merged.images[0], float)).max() > 2
    for params, message in [
        ({"regions": {"pastel": mask}}, "masks for LoRAs not in the stack: pastel"),
        ({"regions": {"inkwell": "not base64!"}}, "the mask of 'inkwell' is not base64"),
        ({"feather": -1}, "feather must be an integer in 0..256"),
        ({"strength": 1}, "regional has no parameter strength"),
    ]:
        body = error(
            client.post(f"{API}/renders", json={"requests": [{**request, "method_params": params}]}),
            400,
            "bad_request",
        )
        assert body["message"].startswith("requests[0]:") and message in body["message"], body
    body = error(
        client.post(f"{API}/renders", json={"requests": [{**request, "method": "blend"}]}),
        400,
        "bad_request",
    )
    assert "unknown composition method 'blend'" in body["message"]


def test_a_method_that_reads_trigger_words_refuses_a_prompt_without_them_at_submit(client, studio):
    request = {"prompt": "a red circle", "loras": [{"name": "inkwell"}], "method": "clora", **SMALL}
    body = error(client.post(f"{API}/renders", json={"requests": [request]}), 400, "bad_request")
    assert body["message"] == (
        "requests[0]: clora finds each LoRA's concept by its trigger words; 'inkwell' has none in the catalog"
    )
    studio.library.update("inkwell", trigger_words=["inkw", "ink well"])
    body = error(client.post(f"{API}/renders", json={"requests": [request]}), 400, "bad_request")
    assert "the prompt does not contain 'inkwell''s trigger word ('inkw', 'ink well')" in body["message"]
    assert (
        "inkwell"
        in error(
            client.post(f"{API}/renders", json={"requests": [{**request, "prompt": "an inkwell"}]}),
            400,
            "bad_request",
        )["message"]
    )  # a whole word only
    both = [{**request, "prompt": prompt} for prompt in ("a red INKW on the left", "an ink well")]
    r = client.post(f"{API}/renders", json={"requests": both})
    assert r.status_code == 202, r.text
    # merge does not read trigger words
    r = client.post(f"{API}/renders", json={"requests": [{**request, "method": "merge"}]})
    assert r.status_code == 202, r.text


def test_idempotency_key_gives_one_job_and_refuses_another_body(client):
    body = {"requests": [{"prompt": "a cat", **SMALL}]}
    first = client.post(f"{API}/renders", json=body, headers={"Idempotency-Key": "abc"})
    again = client.post(f"{API}/renders", json=body, headers={"Idempotency-Key": "abc"})
    assert first.status_code == again.status_code == 202
    assert first.json()["id"] == again.json()["id"] and again.headers["idempotent-replayed"] == "true"
    other = client.post(
        f"{API}/renders", json={"requests": [{"prompt": "a dog"}]}, headers={"Idempotency-Key": "abc"}
    )
    assert "different request body" in error(other, 422, "idempotency_conflict")["message"]
    assert client.get(f"{API}/renders").json()["total"] == 1
    fresh = client.post(f"{API}/renders", json=body, headers={"Idempotency-Key": "abd"})
    assert fresh.json()["id"] != first.json()["id"]


def test_cancel_queued_and_running_jobs_and_409_once_finished(client):
    running = client.post(f"{API}/renders", json={"requests": [{"prompt": "long", **LONG}]}).json()
    queued = client.post(f"{API}/renders", json={"requests": [{"prompt": "next", **SMALL}]}).json()
    poll(client, f"{API}/renders/{running['id']}", until=("running",))
    assert client.get(f"{API}/renders/{queued['id']}").json()["queue_position"] == 1
    r = client.delete(f"{API}/renders/{queued['id']}")
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    r = client.delete(f"{API}/renders/{running['id']}")
    assert r.status_code == 202 and r.json()["cancel_requested"], r.text
    job = poll(client, f"{API}/renders/{running['id']}")
    assert (job["status"], job["completed"], job["results"]) == ("cancelled", 0, [])
    body = error(client.delete(f"{API}/renders/{running['id']}"), 409, "job_finished")
    assert "already cancelled" in body["message"]
    done = client.post(f"{API}/renders", json={"requests": [{"prompt": "quick", **SMALL}]}).json()
    poll(client, f"{API}/renders/{done['id']}")
    assert (
        "already done" in error(client.delete(f"{API}/renders/{done['id']}"), 409, "job_finished")["message"]
    )
    error(client.delete(f"{API}/renders/999"), 404, "not_found")


def test_a_full_queue_answers_429_with_retry_after(studio):
    app = create_app(studio, make_executor(studio))  # no `with`: the executor never starts, jobs stay queued
    c = TestClient(app, headers={"X-API-Key": new_key(studio)})
    one = {"requests": [{"prompt": "x", **SMALL}]}
    positions = [c.post(f"{API}/renders", json=one).json()["queue_position"] for _ in range(2)]
    assert positions == [1, 2]
    r = c.post(f"{API}/renders", json=one)
    body = error(r, 429, "queue_full")
    assert int(r.headers["retry-after"]) == body["retry_after"] >= 1
    assert "limit is 2 (max_queued_jobs)" in body["message"]
    assert c.get(f"{API}/renders").json()["total"] == 2


def tiny_studio(tmp_path, **settings) -> Studio:
    """A Studio on the tiny SDXL with no LoRAs and these settings."""
    return Studio.open(
        Settings(data_dir=tmp_path / "data", bundled=False, backbone="sdxl", model="tiny", **settings)
    )


def test_one_key_cannot_fill_the_queue_past_its_share(tmp_path):
    studio = tiny_studio(tmp_path, max_queued_jobs=10, max_queued_jobs_per_key=2)
    app = create_app(studio, make_executor(studio))  # not started: jobs stay queued
    greedy = TestClient(app, headers={"X-API-Key": new_key(studio, "greedy")})
    other = TestClient(app, headers={"X-API-Key": new_key(studio, "other")})
    one = {"requests": [{"prompt": "x", **SMALL}]}
    assert [greedy.post(f"{API}/renders", json=one).status_code for _ in range(2)] == [202, 202]
    r = greedy.post(f"{API}/renders", json=one)
    body = error(r, 429, "queue_full")
    assert "limit is 2 (max_queued_jobs_per_key)" in body["message"] and int(r.headers["retry-after"]) >= 1
    assert other.post(f"{API}/renders", json=one).status_code == 202  # the other key still gets in
    assert greedy.get(f"{API}/renders").json()["total"] == 2


def test_a_job_over_the_cost_budget_is_refused_naming_the_limit(tmp_path):
    studio = tiny_studio(tmp_path, max_job_megapixel_steps=1)
    c = TestClient(create_app(studio, make_executor(studio)), headers={"X-API-Key": new_key(studio)})
    # 64 x 64 px x 100 steps x 2 images = 0.82 megapixel-steps: within 1
    small = {"prompt": "x", "height": 64, "width": 64, "num_inference_steps": 100, "num_images": 2}
    assert c.post(f"{API}/renders", json={"requests": [small]}).status_code == 202
    body = error(c.post(f"{API}/renders", json={"requests": [small, small]}), 422, "over_budget")
    assert "costs 2 megapixel-steps" in body["message"]  # 1.64, rounded
    assert "limit of 1 (max_job_megapixel_steps)" in body["message"]
    # the example: 4096 x 4096 x 16 images x 500 steps x 64 requests
    huge = {"prompt": "x", "height": 4096, "width": 4096, "num_images": 16, "num_inference_steps": 500}
    body = error(c.post(f"{API}/renders", json={"requests": [huge] * 64}), 422, "over_budget")
    assert "8,589,935 megapixel-steps" in body["message"]
    assert c.get(f"{API}/renders").json()["total"] == 1


@pytest.mark.parametrize("weight", [1e6, -21.0, 20.5])
def test_lora_weights_out_of_range_are_refused(client, weight):
    batch = {"requests": [{"prompt": "x", "loras": [{"name": "inkwell", "weight": weight}], **SMALL}]}
    body = error(client.post(f"{API}/renders", json=batch), 400, "bad_request")
    assert (
        "requests[0]" in body["message"] and "'inkwell'" in body["message"] and "-20..20" in body["message"]
    )
    edge = {"requests": [{"prompt": "x", "loras": [{"name": "inkwell", "weight": -20.0}], **SMALL}]}
    assert client.post(f"{API}/renders", json=edge).status_code == 202


def test_a_backbone_without_real_weights_is_refused_unless_the_server_runs_it(tmp_path):
    toy = Studio.open(Settings(data_dir=tmp_path / "toy", bundled=False))  # the toy server: real toy weights
    c = TestClient(create_app(toy, make_executor(toy)), headers={"X-API-Key": new_key(toy)})
    for backbone in ("flux", "sdxl"):
        body = error(
            c.post(f"{API}/renders", json={"backbone": backbone, "requests": [{"prompt": "x"}]}),
            400,
            "bad_request",
        )
        assert (
            f"backbone {backbone!r} has no real weights" in body["message"]
            and "LORA_STUDIO_MODEL" in body["message"]
        )
    assert c.post(f"{API}/renders", json={"requests": [{"prompt": "x", **SMALL}]}).status_code == 202
    # a server started for the random-weight model (tests, demos) takes it
    flux = Studio.open(Settings(data_dir=tmp_path / "flux", bundled=False, backbone="flux"))
    c = TestClient(create_app(flux, make_executor(flux)), headers={"X-API-Key": new_key(flux)})
    assert (
        c.post(
            f"{API}/renders", json={"backbone": "flux", "requests": [{"prompt": "x", **SMALL}]}
        ).status_code
        == 202
    )


def test_keys_are_required_and_jobs_belong_to_their_key(client, studio):
    job = client.post(f"{API}/renders", json={"requests": [{"prompt": "mine", **SMALL}]}).json()
    anonymous = TestClient(client.app)  # the app (and its executor) is already running
    for headers in ({}, {"Authorization": "Bearer ls_wrong-key-of-some-length"}):
        for method, url in [
            ("post", f"{API}/renders"),
            ("get", f"{API}/renders"),
            ("get", f"{API}/renders/{job['id']}"),
            ("get", f"{API}/renders/{job['id']}/images/0"),
            ("delete", f"{API}/renders/{job['id']}"),
        ]:
            r = anonymous.request(method, url, headers=headers, json={"requests": [{"prompt": "x"}]})
            error(r, 401, "unauthorized")
    other = {"X-API-Key": new_key(studio, "other")}
    error(anonymous.get(f"{API}/renders/{job['id']}", headers=other), 404, "not_found")
    error(anonymous.delete(f"{API}/renders/{job['id']}", headers=other), 404, "not_found")
    assert anonymous.get(f"{API}/renders", headers=other).json()["total"] == 0


def test_one_token_per_request_on_the_render_routes(studio):
    secret = new_key(studio, "slow", rate=3)
    c = TestClient(create_app(studio, make_executor(studio)), headers={"X-API-Key": secret})
    job = c.post(f"{API}/renders", json={"requests": [{"prompt": "x", **SMALL}]})
    assert job.status_code == 202
    assert c.get(f"{API}/renders/{job.json()['id']}").status_code == 200
    assert c.get(f"{API}/renders").status_code == 200
    error(c.get(f"{API}/renders"), 429, "rate_limited")


def test_bad_requests_are_clear_4xx_errors_and_store_nothing(client):
    def post(body):
        return client.post(f"{API}/renders", json=body)

    body = error(post({"requests": [{"prompt": "x", "loras": [{"name": "inkwel"}]}]}), 404, "not_found")
    assert body["message"].startswith("requests[0]: no adapter named 'inkwel'")
    assert body["suggestions"] == ["inkwell"]
    body = error(post({"requests": [{"prompt": "x", "height": 30}]}), 422, "validation_error")
    assert (
        body["details"][0]["loc"] == ["body", "requests", 0, "height"] and "multiple of 8" in body["message"]
    )
    body = error(post({"requests": [{"prompt": "x", "width": 8192}]}), 422, "validation_error")
    assert "width" in body["message"]
    for bad in (
        {"requests": []},
        {"requests": [{"prompt": "   "}]},
        {"requests": [{"prompt": "x", "num_images": 0}]},
        {"requests": [{"prompt": "x", "steps": 4}]},  # not a field: the names are RenderRequest's
        {"requests": [{"prompt": "x", "seed": -1}]},
        {"requests": [{"prompt": "x", "loras": [{"name": "inkwell", "weight": "strong"}]}]},
        {"requests": [{"prompt": "x"}], "backbone": "sd3"},
        {"requests": {"prompt": "x"}},
        [{"prompt": "x"}],
    ):
        error(post(bad), 422, "validation_error")
    body = error(post({"requests": [{"prompt": "x"}], "model": "/etc/passwd"}), 400, "bad_request")
    assert "model '/etc/passwd' is not served here" in body["message"]
    r = client.post(f"{API}/renders", content=b'{"requests": [', headers={"Content-Type": "application/json"})
    assert error(r, 422, "malformed_json")["message"].startswith("malformed JSON body")
    error(client.get(f"{API}/renders/abc"), 422, "validation_error")
    error(client.get(f"{API}/renders", params={"status": "lost"}), 422, "validation_error")
    assert client.get(f"{API}/renders").json()["total"] == 0


def test_without_an_executor_the_render_routes_answer_503(studio):
    c = TestClient(create_app(studio), headers={"X-API-Key": new_key(studio)})
    body = error(c.post(f"{API}/renders", json={"requests": [{"prompt": "x"}]}), 503, "no_executor")
    assert "lora-studio serve" in body["message"]
    assert c.get(f"{API}/renders").json()["total"] == 0


def test_request_schema_follows_the_render_request_dataclass(studio):
    # plus auto_loras, which the API expands into the LoRAs it picks before the job is stored
    fields = [f.name for f in dataclasses.fields(RenderRequest) if f.init]
    assert list(RenderRequestIn.model_fields) == [*fields, "auto_loras"]
    assert list(LoraWeightIn.model_fields) == [f.name for f in dataclasses.fields(LoraWeight)]
    defaults = RenderRequestIn(prompt="x").model_dump(exclude={"auto_loras"})
    reference = RenderRequest("x")
    assert defaults == reference.to_json()
    assert RenderRequest.from_json(defaults) == reference
    spec = TestClient(create_app(studio)).get(f"{API}/openapi.json").json()
    assert set(spec["paths"][f"{API}/renders"]) == {"get", "post"}
    assert set(spec["paths"][f"{API}/renders/{{job_id}}"]) == {"get", "delete"}
    assert f"{API}/renders/{{job_id}}/images/{{n}}" in spec["paths"]
    assert {"RenderBatch", "RenderRequestIn", "JobRead", "JobPage"} <= set(spec["components"]["schemas"])


def test_prompt_tags_in_a_job_render_as_the_explicit_stack_and_unknown_tags_are_404(client, studio):
    tagged = {"prompt": "a green square <lora:inkwell:0.7>", "seed": 4, **SMALL}
    r = client.post(f"{API}/renders", json={"requests": [tagged]})
    assert r.status_code == 202, r.text
    done = poll(client, r.headers["location"])
    assert done["status"] == "done", done
    provenance = done["results"][0]["provenance"]
    assert provenance["prompt"] == "a green square"
    assert provenance["prompt_tags"] == [{"name": "inkwell", "weight": 0.7}]
    assert [(x["name"], x["weight"]) for x in provenance["loras"]] == [("inkwell", 0.7)]
    reference = studio.render(
        RenderRequest("a green square", seed=4, loras=(LoraWeight("inkwell", 0.7),), **SMALL)
    )
    image = png(client.get(done["results"][0]["images"][0]))
    np.testing.assert_array_equal(
        np.asarray(image.convert("RGB")), np.asarray(reference.images[0].convert("RGB"))
    )

    body = error(
        client.post(f"{API}/renders", json={"requests": [{"prompt": "x <lora:inkwel:0.5>"}]}),
        404,
        "not_found",
    )
    assert body["message"].startswith("requests[0]: prompt tag <lora:inkwel:0.5>: no adapter named 'inkwel'")
    assert body["suggestions"] == ["inkwell"]
    body = error(
        client.post(f"{API}/renders", json={"requests": [{"prompt": "x <lora:inkwell:0.5"}]}),
        400,
        "bad_request",
    )
    assert "requests[0]: prompt tag '<lora:inkwell:0.5' is not closed" in body["message"]
