"""The REST API (/api/v1) over a Studio on a tmp data dir: LoRA list/search/get/upload/edit/delete, API keys
and rate limits, and clear 4xx errors (pickle, oversize, malformed JSON, traversal names) that write nothing."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from app.api import create_app
from app.api.auth import TokenBucket
from app.api.schemas import SERVER_ONLY, LoraRead, LoraUpdate
from app.catalog import EDITABLE_FIELDS, AdapterInfo
from app.cli import app as cli
from app.facade import StudioFacade
from app.settings import Settings
from app.studio import Studio
from composer.errors import StudioError
from composer.formats import write_kohya
from db.repository import AdapterRepository, ApiKeyRepository
from db.session import unit_of_work
from tests.helpers import random_lora

ROOT = Path(__file__).resolve().parents[1]
API = "/api/v1"


@pytest.fixture(scope="module")
def lora_bytes(tiny_sdxl_factory, tmp_path_factory) -> dict[str, bytes]:
    """Three small SDXL kohya files (about 0.2 MiB each) with trigger words."""
    backbone, make = tiny_sdxl_factory
    pipe = make()
    folder = tmp_path_factory.mktemp("loras")
    out = {}
    for i, name in enumerate(["inkwell", "pastel", "neon"]):
        path = folder / f"{name}.safetensors"
        write_kohya(
            random_lora(pipe, backbone, seed=i, rank=4, alpha=4.0, std=0.2),
            path,
            trigger_words=[f"{name}style"],
        )
        out[name] = path.read_bytes()
    return out


@pytest.fixture
def studio(tmp_path) -> Studio:
    return Studio.open(Settings(data_dir=tmp_path / "data", bundled=False, backbone="sdxl", max_upload_mb=1))


def new_key(studio, name: str = "ci", rate: int = 1000) -> str:
    with unit_of_work(studio.sessions) as session:
        return ApiKeyRepository(session).create(name, rate_limit_per_minute=rate)[1]


@pytest.fixture
def client(studio):
    with TestClient(create_app(studio)) as c:
        c.headers["Authorization"] = f"Bearer {new_key(studio)}"
        yield c


def upload(client, filename: str, content: bytes, **form):
    return client.post(f"{API}/loras", files={"file": (filename, content)}, data=form)


def error(response, status: int, type_: str) -> dict:
    assert response.status_code == status, response.text
    body = response.json()["error"]
    assert body["type"] == type_, body
    return body


def stored_state(studio) -> tuple[list[str], list[str]]:
    """Catalog names, and every file or folder under the data dir apart from the catalog database."""
    root = studio.settings.root
    files = sorted(
        str(p.relative_to(root)) for p in root.rglob("*") if not p.name.startswith("catalog.sqlite")
    )
    return [a.name for a in studio.library.list()], files


# --- the catalog through the API -------------------------------------------------------------------------


def test_upload_list_search_get_patch_delete_round_trip(client, studio, lora_bytes):
    r = upload(
        client, "inkwell.safetensors", lora_bytes["inkwell"], tags="ink, test", description="black ink"
    )
    assert r.status_code == 201, r.text
    ink = r.json()
    assert r.headers["location"] == f"{API}/loras/inkwell"
    assert (ink["name"], ink["family"], ink["source_format"], ink["rank"]) == ("inkwell", "sdxl", "kohya", 4)
    assert ink["trigger_words"] == ["inkwellstyle"] and ink["tags"] == ["ink", "test"]
    assert ink["description"] == "black ink" and len(ink["sha256"]) == 64
    assert not set(SERVER_ONLY) & set(ink), "server paths are never sent"
    assert upload(client, "pastel.safetensors", lora_bytes["pastel"], name="Pastel Dreams").status_code == 201

    page = client.get(f"{API}/loras").json()
    assert [i["name"] for i in page["items"]] == ["Pastel Dreams", "inkwell"] and page["total"] == 2
    page = client.get(f"{API}/loras", params={"limit": 1, "offset": 1}).json()
    assert [i["name"] for i in page["items"]] == ["inkwell"] and (page["total"], page["offset"]) == (2, 1)
    for params, expected in [
        ({"q": "pastelstyle"}, ["Pastel Dreams"]),
        ({"tag": "INK"}, ["inkwell"]),
        ({"family": "sdxl", "type": "lora"}, ["Pastel Dreams", "inkwell"]),
        ({"family": "flux"}, []),
    ]:
        assert [i["name"] for i in client.get(f"{API}/loras", params=params).json()["items"]] == expected

    hits = client.get(f"{API}/search", params={"q": "ink"}).json()
    assert hits["query"] == "ink" and [h["lora"]["name"] for h in hits["results"]] == ["inkwell"]
    assert hits["results"][0]["score"] > 0  # ranked by full-text search
    assert client.get(f"{API}/search", params={"q": "past dream"}).json()["results"][0]["lora"]["name"] == (
        "Pastel Dreams"  # word prefixes, every word
    )
    assert client.get(f"{API}/search", params={"q": '"*('}).json()["results"] == []  # no words: nothing

    assert client.get(f"{API}/loras/inkwell").json() == ink
    assert client.get(f"{API}/loras/{ink['autov2']}").json()["name"] == "inkwell"  # hashes work too
    assert client.get(f"{API}/loras/Pastel Dreams").json()["name"] == "Pastel Dreams"

    r = client.patch(
        f"{API}/loras/inkwell",
        json={"name": "ink-v2", "trigger_words": ["inky", "inky"], "tags": ["ink"], "description": "v2"},
    )
    assert r.status_code == 200, r.text
    edited = r.json()
    assert (edited["name"], edited["trigger_words"], edited["tags"], edited["description"]) == (
        "ink-v2",
        ["inky"],
        ["ink"],
        "v2",
    )
    assert edited["sha256"] == ink["sha256"]
    assert client.patch(f"{API}/loras/ink-v2", json={}).json() == edited  # nothing to change: unchanged
    assert client.patch(f"{API}/loras/ink-v2", json={"tags": []}).json()["tags"] == []
    error(client.get(f"{API}/loras/inkwell"), 404, "not_found")

    stored = Path(studio.library.get("ink-v2").file_path)
    assert stored.is_file()
    r = client.delete(f"{API}/loras/ink-v2")
    assert r.status_code == 204 and r.content == b""
    assert not stored.exists()
    assert [i["name"] for i in client.get(f"{API}/loras").json()["items"]] == ["Pastel Dreams"]
    error(client.delete(f"{API}/loras/ink-v2"), 404, "not_found")


def test_unknown_names_are_404_with_suggestions(client, lora_bytes):
    upload(client, "inkwell.safetensors", lora_bytes["inkwell"])
    body = error(client.get(f"{API}/loras/inkwel"), 404, "not_found")
    assert body["suggestions"] == ["inkwell"] and "inkwel" in body["message"]
    error(client.patch(f"{API}/loras/nothing", json={"tags": ["x"]}), 404, "not_found")


def test_duplicates_and_taken_names_are_409(client, studio, lora_bytes):
    upload(client, "inkwell.safetensors", lora_bytes["inkwell"])
    before = stored_state(studio)
    body = error(upload(client, "copy.safetensors", lora_bytes["inkwell"]), 409, "duplicate")
    assert body["existing_name"] == "inkwell" and "copy.safetensors" in body["message"]
    body = error(upload(client, "p.safetensors", lora_bytes["pastel"], name="inkwell"), 409, "name_taken")
    assert "inkwell" in body["message"]
    assert stored_state(studio) == before
    # a file name that is taken (no explicit name) gets a suffix, as on the command line
    assert upload(client, "inkwell.safetensors", lora_bytes["pastel"]).json()["name"] == "inkwell-2"
    upload(client, "neon.safetensors", lora_bytes["neon"])
    error(client.patch(f"{API}/loras/neon", json={"name": "inkwell"}), 409, "name_taken")


# --- bad uploads write nothing ---------------------------------------------------------------------------


def test_pickle_upload_is_refused_by_content_and_by_name(client, studio):
    before = stored_state(studio)
    pickle_bytes = b"\x80\x04\x95\x05\x00\x00\x00\x00\x00\x00\x00K\x01."
    for name in ("evil.ckpt", "evil.safetensors", "evil.pt"):
        body = error(upload(client, name, pickle_bytes), 415, "pickle_refused")
        assert "pickle" in body["message"] and name in body["message"]
        assert ".upload-" not in body["message"], "the temporary copy's path is not shown"
    assert stored_state(studio) == before


def test_corrupt_or_foreign_files_are_refused(client, studio, lora_bytes):
    before = stored_state(studio)
    truncated = lora_bytes["inkwell"][: len(lora_bytes["inkwell"]) // 2]
    body = error(upload(client, "half.safetensors", truncated), 422, "invalid_lora_file")
    assert "half.safetensors" in body["message"]
    error(upload(client, "junk.safetensors", b"not a safetensors file at all"), 422, "invalid_lora_file")
    assert stored_state(studio) == before


def test_oversize_uploads_are_413_before_or_while_reading(client, studio):
    before = stored_state(studio)
    body = error(upload(client, "big.safetensors", b"\0" * (2 * 2**20)), 413, "payload_too_large")
    assert "1 MiB limit" in body["message"] and "max_upload_mb" in body["message"]
    # within the Content-Length slack for form fields, but the file itself is over the limit
    error(upload(client, "big.safetensors", b"\0" * (2**20 + 100)), 413, "payload_too_large")
    assert stored_state(studio) == before


def test_uploads_need_a_length_and_a_file_field(client, studio):
    def chunks():
        yield b"--x\r\n"

    r = client.post(
        f"{API}/loras", content=chunks(), headers={"Content-Type": "multipart/form-data; boundary=x"}
    )
    error(r, 411, "length_required")
    body = error(client.post(f"{API}/loras", data={"name": "x"}), 422, "validation_error")
    assert "'file'" in body["message"]
    body = error(client.post(f"{API}/loras", json={"file": "x"}), 422, "validation_error")


def test_traversal_names_are_refused(client, studio, lora_bytes):
    upload(client, "inkwell.safetensors", lora_bytes["inkwell"])
    before = stored_state(studio)
    # (a literal "../" is resolved by the client itself; encoded ones reach the server)
    for path in ("..%2Fx", "%2E%2E%2F%2E%2E%2Fetc%2Fpasswd", "a%2Fb", "%2E%2E", "a%5Cb", "inkwell%00"):
        for method in ("get", "delete"):
            body = error(getattr(client, method)(f"{API}/loras/{path}"), 400, "invalid_name")
            assert "not allowed" in body["message"] or "looks like a path" in body["message"]
    body = error(client.patch(f"{API}/loras/inkwell", json={"name": "../inkwell"}), 422, "invalid_field")
    assert "'../inkwell'" in body["message"]
    body = error(upload(client, "p.safetensors", lora_bytes["pastel"], name="../../p"), 422, "invalid_field")
    assert "'../../p'" in body["message"]
    assert stored_state(studio) == before
    # a client file name with directories: only its last part is used, and the file lands in the LoRA folder
    r = upload(client, "../../evil/pastel.safetensors", lora_bytes["pastel"])
    assert r.status_code == 201 and r.json()["name"] == "pastel"
    assert Path(studio.library.get("pastel").file_path).parent == studio.settings.lora_dir


def test_malformed_json_and_bad_fields_are_422(client, lora_bytes):
    upload(client, "inkwell.safetensors", lora_bytes["inkwell"])
    r = client.patch(
        f"{API}/loras/inkwell", content=b'{"tags": ["a",', headers={"Content-Type": "application/json"}
    )
    body = error(r, 422, "malformed_json")
    assert body["message"].startswith("malformed JSON body")
    body = error(client.patch(f"{API}/loras/inkwell", json={"tags": "a"}), 422, "validation_error")
    assert "tags" in body["message"] and body["details"][0]["loc"] == ["body", "tags"]
    error(client.patch(f"{API}/loras/inkwell", json={"sha256": "0" * 64}), 422, "validation_error")
    error(client.patch(f"{API}/loras/inkwell", json={"description": None}), 422, "validation_error")
    error(client.patch(f"{API}/loras/inkwell", json={"tags": ["ok", " "]}), 422, "invalid_field")
    error(client.get(f"{API}/loras", params={"limit": 0}), 422, "validation_error")
    error(client.get(f"{API}/loras", params={"family": "sd3"}), 422, "validation_error")
    error(client.get(f"{API}/search"), 422, "validation_error")
    assert client.get(f"{API}/loras/inkwell").json()["tags"] == []


# --- API keys and rate limits ----------------------------------------------------------------------------


def test_requests_without_a_valid_key_are_401(studio):
    secret = new_key(studio, "web")
    with TestClient(create_app(studio)) as c:
        for headers in ({}, {"Authorization": "Bearer ls_wrong-key-of-some-length"}, {"X-API-Key": "nope"}):
            r = c.get(f"{API}/loras", headers=headers)
            body = error(r, 401, "unauthorized")
            assert r.headers["www-authenticate"] == "Bearer"
        assert "API key is required" in error(c.get(f"{API}/search?q=x"), 401, "unauthorized")["message"]
        error(c.post(f"{API}/loras", files={"file": ("a.safetensors", b"x")}), 401, "unauthorized")
        assert c.get(f"{API}/loras", headers={"Authorization": f"Bearer {secret}"}).status_code == 200
        assert c.get(f"{API}/loras", headers={"X-API-Key": secret}).status_code == 200
        with unit_of_work(studio.sessions) as session:
            ApiKeyRepository(session).revoke("web")
        body = error(c.get(f"{API}/loras", headers={"X-API-Key": secret}), 401, "unauthorized")
        assert "'web' was revoked" in body["message"] and secret not in body["message"]
        # the docs stay public
        assert c.get(f"{API}/docs").status_code == 200
        assert c.get(f"{API}/openapi.json").status_code == 200


def test_rate_limit_per_key_answers_429_with_retry_after(studio):
    now = [0.0]
    app = create_app(studio)
    app.state.rate_limiter = TokenBucket(clock=lambda: now[0])
    slow, fast = new_key(studio, "slow", rate=3), new_key(studio, "fast", rate=600)
    with TestClient(app) as c:
        for _ in range(3):
            assert c.get(f"{API}/loras", headers={"X-API-Key": slow}).status_code == 200
        r = c.get(f"{API}/loras", headers={"X-API-Key": slow})
        body = error(r, 429, "rate_limited")
        assert (
            r.headers["retry-after"] == "20"
            and body["retry_after"] == 20
            and "3 requests per minute" in body["message"]
        )
        assert c.get(f"{API}/loras", headers={"X-API-Key": fast}).status_code == 200  # buckets are per key
        now[0] = 19.0
        error(c.get(f"{API}/loras", headers={"X-API-Key": slow}), 429, "rate_limited")
        now[0] = 25.0  # 25 s after the bucket emptied at t=0: one token back (20 s per token at 3/min)
        assert c.get(f"{API}/loras", headers={"X-API-Key": slow}).status_code == 200
        error(c.get(f"{API}/loras", headers={"X-API-Key": slow}), 429, "rate_limited")


def test_token_bucket_refills_up_to_its_capacity():
    now = [0.0]
    bucket = TokenBucket(clock=lambda: now[0])
    assert [bucket.take(1, 2) for _ in range(3)] == [0.0, 0.0, pytest.approx(30.0)]
    now[0] = 3600.0  # an hour idle refills only up to the limit
    assert [bucket.take(1, 2) == 0.0 for _ in range(3)] == [True, True, False]


def test_cli_apikey_create_list_revoke_with_the_api(tmp_path):
    runner, data = CliRunner(), ["--data-dir", str(tmp_path / "data")]
    result = runner.invoke(cli, ["apikey", "create", "ci-bot", "--rate-limit", "5", *data])
    assert result.exit_code == 0, result.output
    secret = result.stdout.strip().splitlines()[-1]
    assert secret.startswith("ls_") and "shown only now" in result.stderr
    result = runner.invoke(cli, ["apikey", "list", *data])
    assert "ci-bot" in result.output and secret[:8] in result.output and secret not in result.output
    assert "5/min" in result.output and "active" in result.output
    studio = Studio.open(Settings(data_dir=tmp_path / "data", bundled=False, backbone="sdxl"))
    with TestClient(create_app(studio)) as c:
        assert c.get(f"{API}/loras", headers={"X-API-Key": secret}).status_code == 200
        result = runner.invoke(cli, ["apikey", "revoke", "ci-bot", *data])
        assert result.exit_code == 0 and "revoked 'ci-bot'" in result.output
        error(c.get(f"{API}/loras", headers={"X-API-Key": secret}), 401, "unauthorized")
    assert "revoked" in runner.invoke(cli, ["apikey", "list", *data]).output
    result = runner.invoke(cli, ["apikey", "create", "ci-bot", *data])
    assert result.exit_code == 1 and "'ci-bot' is taken" in result.output
    result = runner.invoke(cli, ["apikey", "revoke", "nobody", *data])
    assert result.exit_code == 1 and "no API key named 'nobody'" in result.output


# --- schemas, docs and the layer's shape -----------------------------------------------------------------


def test_schemas_follow_the_library_dataclass():
    dataclass_fields = [f.name for f in fields(AdapterInfo)]
    assert list(LoraRead.model_fields) == [f for f in dataclass_fields if f not in SERVER_ONLY]
    assert list(LoraUpdate.model_fields) == list(EDITABLE_FIELDS)
    assert LoraRead.model_fields["rank"].annotation == int | None


def test_openapi_documents_routes_schemas_and_key_schemes(studio):
    spec = TestClient(create_app(studio)).get(f"{API}/openapi.json").json()
    assert {f"{API}/loras", f"{API}/loras/{{name}}", f"{API}/search"} <= set(spec["paths"])
    assert set(spec["paths"][f"{API}/loras"]) == {"get", "post"}
    assert set(spec["paths"][f"{API}/loras/{{name}}"]) == {"get", "patch", "delete"}
    assert {"LoraRead", "LoraUpdate", "LoraPage", "ErrorResponse"} <= set(spec["components"]["schemas"])
    assert {"HTTPBearer", "APIKeyHeader"} <= set(spec["components"]["securitySchemes"])
    body = spec["paths"][f"{API}/loras"]["post"]["requestBody"]["content"]["multipart/form-data"]
    assert body["schema"]["required"] == ["file"]
    json.dumps(spec)


def test_studio_satisfies_the_service_protocol(studio):
    assert isinstance(studio, StudioFacade)


def test_api_package_does_not_import_torch():
    code = "import sys, app.api\nbad = sorted(m for m in ('torch', 'app.studio', 'app.library') if m in sys.modules)\nassert not bad, bad\n"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr


# --- the library methods the API added -------------------------------------------------------------------


def test_library_update_refuses_fields_that_are_not_metadata(studio, tmp_path, lora_bytes):
    path = tmp_path / "inkwell.safetensors"
    path.write_bytes(lora_bytes["inkwell"])
    studio.library.import_file(path)
    with pytest.raises(StudioError, match="cannot edit family, sha256"):
        studio.library.update("inkwell", family="flux", sha256="0" * 64, tags=["x"])
    assert studio.library.get("inkwell").tags == []
    info = studio.library.update(studio.library.get("inkwell").autov2, tags=["x"])  # by hash as well
    assert info.tags == ["x"] and studio.library.count(tag="x") == 1


def test_library_delete_removes_row_file_and_preview_but_nothing_outside_its_folder(
    studio, tmp_path, lora_bytes
):
    path = tmp_path / "inkwell.safetensors"
    path.write_bytes(lora_bytes["inkwell"])
    preview = tmp_path / "p.png"
    preview.write_bytes(b"png")
    info = studio.library.import_file(path, preview=preview)
    assert Path(info.file_path).is_file() and Path(info.preview_path).is_file()
    studio.library.delete("inkwell")
    assert not Path(info.file_path).exists() and not Path(info.preview_path).exists()
    assert studio.library.count() == 0 and path.is_file() and preview.is_file()
    # an entry whose file lives outside the LoRA folder: the row goes, the file stays
    info = studio.library.import_file(path)
    outside = tmp_path / "elsewhere.safetensors"
    outside.write_bytes(lora_bytes["inkwell"])
    with unit_of_work(studio.sessions) as session:
        AdapterRepository(session).update("inkwell", file_path=str(outside))
    studio.library.delete("inkwell")
    assert outside.is_file() and studio.library.count() == 0
