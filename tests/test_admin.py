"""The admin page at /admin on a live server: login (Argon2, signed session cookie), CSRF on every form, the
catalog table, metadata edits seen by the Library and the studio's search, delete behind a confirmation,
imports (upload and server folder) with per-file reports and clear refusals, duplicates, previews, API keys
that work on /api/v1, the job monitor; and `lora-studio admin create`."""

from __future__ import annotations

import html
import re
import stat
from pathlib import Path

import httpx
import pytest
from gradio_client import Client
from PIL import Image
from typer.testing import CliRunner

from app.admin import create_admin_app
from app.cli import app as cli
from composer.formats import write_kohya
from db.models import RenderJob
from db.session import unit_of_work
from db.users import UserRepository
from tests.helpers import random_lora
from tests.live_server import live_studio

USER, PASSWORD = "root", "correct horse battery"
PAGES = [
    "/admin/",
    "/admin/loras/inkwell",
    "/admin/import",
    "/admin/duplicates",
    "/admin/keys",
    "/admin/jobs",
]


@pytest.fixture(scope="module")
def live(tmp_path_factory, tiny_sdxl_factory):
    root = tmp_path_factory.mktemp("admin")
    with live_studio(root, tiny_sdxl_factory, max_upload_mb=1, import_dir=root / "import") as server:
        with unit_of_work(server.studio.sessions) as db:
            UserRepository(db).create(USER, PASSWORD)
        yield server


@pytest.fixture(scope="module")
def pipe_and_backbone(tiny_sdxl_factory):
    backbone, make = tiny_sdxl_factory
    return make(), backbone


def lora_file(pipe_and_backbone, path: Path, seed: int, trigger: str = "") -> Path:
    pipe, backbone = pipe_and_backbone
    path.parent.mkdir(parents=True, exist_ok=True)
    write_kohya(
        random_lora(pipe, backbone, seed=seed, rank=2, std=0.2),
        path,
        trigger_words=[trigger] if trigger else [],
    )
    return path


def body(response: httpx.Response) -> str:
    """The page's text with HTML entities decoded (messages quote names with ')."""
    return html.unescape(response.text)


def csrf_of(response: httpx.Response) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', response.text)
    assert found, response.text[:500]
    return found.group(1)


def anonymous(live) -> httpx.Client:
    return httpx.Client(base_url=live.url, follow_redirects=False, timeout=120)


@pytest.fixture
def admin(live):
    """A signed-in client; `admin.csrf` is the session's form token."""
    client = anonymous(live)
    token = csrf_of(client.get("/admin/login"))
    r = client.post("/admin/login", data={"username": USER, "password": PASSWORD, "csrf": token})
    assert r.status_code == 303 and r.headers["location"] == "/admin/", r.text
    client.csrf = csrf_of(client.get("/admin/"))
    assert client.csrf != token  # a new session (and token) after login
    yield client
    client.close()


def test_every_page_requires_login(live):
    with anonymous(live) as client:
        for path in PAGES:
            r = client.get(path)
            assert r.status_code == 303 and r.headers["location"] == f"/admin/login?next={path}", path
        r = client.post("/admin/loras/inkwell", data={"trigger_words": "x"})
        assert r.status_code == 303 and r.headers["location"].startswith("/admin/login")
    assert live.studio.library.get("inkwell").trigger_words == ["inkwellstyle"]


def test_login_is_refused_with_a_wrong_password_or_user(live):
    with anonymous(live) as client:
        token = csrf_of(client.get("/admin/login"))
        for user, password in [(USER, "wrong password"), ("nobody", PASSWORD), (USER, "")]:
            r = client.post("/admin/login", data={"username": user, "password": password, "csrf": token})
            assert r.status_code == 401 and "wrong username or password" in body(r)
        assert client.get("/admin/").status_code == 303


def test_repeated_failed_logins_must_wait_and_others_can_still_log_in(live):
    with anonymous(live) as client:
        token = csrf_of(client.get("/admin/login"))
        for _ in range(5):  # admin_login_attempts
            r = client.post("/admin/login", data={"username": "mallory", "password": "guess", "csrf": token})
            assert r.status_code == 401
        r = client.post("/admin/login", data={"username": "mallory", "password": "guess", "csrf": token})
        assert r.status_code == 429 and "too many failed logins" in body(r)
        assert 850 <= int(r.headers["retry-after"]) <= 901
    with anonymous(live) as client:  # the same address, another username: not locked out
        token = csrf_of(client.get("/admin/login"))
        r = client.post("/admin/login", data={"username": USER, "password": PASSWORD, "csrf": token})
        assert r.status_code == 303


def test_login_throttle_counts_in_a_sliding_window():
    from app.admin.throttle import LoginThrottle

    now = [0.0]
    throttle = LoginThrottle(per_user=2, per_address=3, window_s=100, clock=lambda: now[0])
    throttle.failed("1.2.3.4", "a")
    assert throttle.retry_after("1.2.3.4", "a") == 0
    now[0] = 10.0
    throttle.failed("1.2.3.4", "a")
    assert throttle.retry_after("1.2.3.4", "a") == 91  # until the first failure leaves the window
    assert throttle.retry_after("1.2.3.4", "b") == 0 and throttle.retry_after("5.6.7.8", "a") == 0
    throttle.failed("1.2.3.4", "b")  # the address's third failure: every username waits
    assert throttle.retry_after("1.2.3.4", "c") > 0
    now[0] = 101.0
    assert throttle.retry_after("1.2.3.4", "a") == 0  # the failure at 0 has left the window
    now[0] = 200.0
    assert throttle.retry_after("1.2.3.4", "a") == 0 and throttle.retry_after("1.2.3.4", "c") == 0
    throttle.failed("1.2.3.4", "a")
    throttle.failed("1.2.3.4", "a")
    throttle.succeeded("1.2.3.4", "a")  # a success clears the username's count
    assert throttle.retry_after("1.2.3.4", "a") == 0


def test_login_goes_back_where_it_was_sent_from_and_nowhere_else(live):
    with anonymous(live) as client:
        token = csrf_of(client.get("/admin/login"))
        for target, expected in [
            ("/admin/keys", "/admin/keys"),
            ("//evil.example/x", "/admin/"),
            ("https://evil.example/", "/admin/"),
        ]:
            form = {"username": USER, "password": PASSWORD, "csrf": token, "next": target}
            r = client.post("/admin/login", data=form)
            assert r.status_code == 303 and r.headers["location"] == expected
            token = csrf_of(client.get("/admin/login"))


def test_forms_without_the_csrf_token_are_refused(live, admin):
    for token in [None, "forged", admin.csrf[:-2]]:
        data = {"trigger_words": "hijacked"} | ({"csrf": token} if token else {})
        r = admin.post("/admin/loras/inkwell", data=data)
        assert r.status_code == 403 and "CSRF" in body(r)
    assert live.studio.library.get("inkwell").trigger_words == ["inkwellstyle"]
    with anonymous(live) as client:  # the login form too
        r = client.post("/admin/login", data={"username": USER, "password": PASSWORD})
        assert r.status_code == 403 and client.get("/admin/").status_code == 303


def test_catalog_page_lists_and_searches(admin):
    r = admin.get("/admin/")
    assert r.status_code == 200 and "inkwell" in body(r) and "pastel" in body(r) and "2 adapters" in body(r)
    r = admin.get("/admin/", params={"q": "pastelstyle"})
    assert "pastel" in body(r) and "/admin/loras/inkwell" not in body(r)


def test_edited_trigger_words_reach_the_library_and_the_studio_search(live, admin):
    form = {
        "csrf": admin.csrf,
        "name": "pastel",
        "trigger_words": "pastelstyle, chalky",
        "tags": "soft, paper",
    }
    r = admin.post("/admin/loras/pastel", data=form | {"description": "soft colours"})
    assert r.status_code == 303 and r.headers["location"] == "/admin/loras/pastel?saved=1"
    info = live.studio.library.get("pastel")
    assert info.trigger_words == ["pastelstyle", "chalky"] and info.tags == ["soft", "paper"]
    assert info.description == "soft colours"
    _, matches, _ = Client(f"{live.url}/", verbose=False).predict("chalky", [], api_name="/search_loras")
    assert [row[0] for row in matches["data"]] == ["pastel"] and "chalky" in matches["data"][0][3]
    assert "Saved." in admin.get(r.headers["location"]).text


@pytest.mark.parametrize(
    "name, status, message",
    [
        ("../etc", 422, "characters '/' not allowed"),
        ("inkwell", 409, "'inkwell' is taken"),
        ("", 422, "1-128"),
    ],
)
def test_bad_edits_are_refused_and_change_nothing(live, admin, name, status, message):
    before = live.studio.library.get("pastel")
    r = admin.post("/admin/loras/pastel", data={"csrf": admin.csrf, "name": name, "trigger_words": "zzz"})
    assert r.status_code == status and message in body(r)
    assert live.studio.library.get("pastel") == before


def test_names_that_look_like_paths_are_refused_in_urls(admin):
    for path in ["/admin/loras/%2e%2e", "/admin/loras/a%5Cb", "/admin/loras/%2e%2e/delete"]:
        r = admin.get(path)
        assert r.status_code == 400 and ("not allowed" in body(r) or "looks like a path" in body(r)), path
    r = admin.get("/admin/loras/a%2Fb")  # no such page: a slash never reaches a name
    assert r.status_code == 404 and "Not Found" in body(r) and "<html" in r.text


def test_delete_needs_the_name_typed_again(live, admin, pipe_and_backbone, tmp_path):
    info = live.studio.library.import_file(
        lora_file(pipe_and_backbone, tmp_path / "doomed.safetensors", seed=7)
    )
    assert "Type the name to confirm" in admin.get("/admin/loras/doomed/delete").text
    for confirm in [None, "doome", "inkwell"]:
        data = {"csrf": admin.csrf} | ({"confirm": confirm} if confirm else {})
        r = admin.post("/admin/loras/doomed/delete", data=data)
        assert r.status_code == 400 and "nothing was deleted" in body(r)
        assert live.studio.library.get("doomed").sha256 == info.sha256
    r = admin.post("/admin/loras/doomed/delete", data={"csrf": admin.csrf, "confirm": "doomed"})
    assert r.status_code == 303 and "doomed" not in live.studio.library.names()
    assert not Path(info.file_path).exists()


def test_api_key_created_in_admin_works_on_the_rest_api_until_revoked(live, admin):
    r = admin.post("/admin/keys", data={"csrf": admin.csrf, "name": "robot", "rate_limit": "100"})
    assert r.status_code == 201
    secret = re.search(r'<code id="new-secret">([^<]+)</code>', r.text).group(1)
    assert secret.startswith("ls_") and secret not in admin.get("/admin/keys").text  # shown once
    api = httpx.Client(base_url=f"{live.url}/api/v1", headers={"Authorization": f"Bearer {secret}"})
    r = api.get("/loras")
    assert r.status_code == 200 and {i["name"] for i in r.json()["items"]} >= {"inkwell", "pastel"}
    r = admin.post("/admin/keys", data={"csrf": admin.csrf, "name": "robot"})
    assert r.status_code == 409 and "taken" in body(r)
    r = admin.post("/admin/keys", data={"csrf": admin.csrf, "name": "x", "rate_limit": "fast"})
    assert r.status_code == 422 and "rate limit 'fast'" in body(r)
    assert admin.post("/admin/keys/robot/revoke", data={"csrf": admin.csrf}).status_code == 303
    assert api.get("/loras").status_code == 401
    assert "revoked" in admin.get("/admin/keys").text


def upload(admin, filename: str, content: bytes):
    return admin.post("/admin/import/upload", data={"csrf": admin.csrf}, files={"file": (filename, content)})


def test_upload_imports_a_safetensors_file_under_its_base_name(live, admin, pipe_and_backbone, tmp_path):
    content = lora_file(pipe_and_backbone, tmp_path / "x.safetensors", seed=11).read_bytes()
    r = upload(admin, "../../uploaded.safetensors", content)
    assert r.status_code == 201 and "imported" in body(r) and "uploaded" in body(r)
    info = live.studio.library.get("uploaded")
    assert Path(info.file_path).parent == live.studio.settings.lora_dir
    r = upload(admin, "again.safetensors", content)
    assert r.status_code == 409 and "already in the catalog as 'uploaded'" in body(r)


@pytest.mark.parametrize(
    "filename, content, status, message",
    [
        ("model.ckpt", b"PK\x03\x04 pickle", 415, "model.ckpt: pickle checkpoint"),
        ("weights.pt", b"\x80\x04\x95 pickle", 415, "weights.pt: pickle checkpoint"),
        ("notes.txt", b"hello", 415, "only .safetensors files are imported"),
        ("sneaky.safetensors", b"\x80\x04\x95" + b"\0" * 64, 415, "pickle"),
        ("big.safetensors", b"\0" * (2 * 2**20), 413, "over the 1 MiB (max_upload_mb) limit"),
        ("broken.safetensors", b"\x10\0\0\0\0\0\0\0{not json", 422, "broken.safetensors"),
    ],
)
def test_bad_uploads_are_refused_and_nothing_is_kept(live, admin, filename, content, status, message):
    before = (live.studio.library.names(), sorted(live.studio.settings.lora_dir.iterdir()))
    r = upload(admin, filename, content)
    assert r.status_code == status and message in body(r), r.text[-600:]
    assert (live.studio.library.names(), sorted(live.studio.settings.lora_dir.iterdir())) == before
    assert not list(live.studio.settings.root.glob(".upload-*"))


def test_folder_import_reports_every_file(live, admin, pipe_and_backbone):
    root = live.studio.settings.import_root
    lora_file(pipe_and_backbone, root / "batch" / "fresh.safetensors", seed=21, trigger="freshword")
    (root / "batch" / "copy.safetensors").write_bytes(
        Path(live.studio.library.get("inkwell").file_path).read_bytes()
    )
    (root / "batch" / "bad.safetensors").write_bytes(b"\x08\0\0\0\0\0\0\0garbage!")
    (root / "batch" / "old.ckpt").write_bytes(b"PK pickle")
    r = admin.post("/admin/import/folder", data={"csrf": admin.csrf, "folder": "batch", "tags": "batch"})
    assert r.status_code == 200
    lines = {f: s for s, f in re.findall(r'<tr class="(\w+)"><td>([^<]+)</td>', r.text)}
    assert lines == {
        "bad.safetensors": "failed",
        "copy.safetensors": "duplicate",
        "fresh.safetensors": "imported",
        "old.ckpt": "failed",
    }
    assert "pickle checkpoint" in body(r) and "inkwell" in body(r)
    assert live.studio.library.get("fresh").tags == ["batch"]


@pytest.mark.parametrize(
    "folder, status, message",
    [
        ("../", 400, "'..' is not allowed"),
        ("batch/../../", 400, "is not allowed"),
        ("/etc", 403, "outside the import folder"),
        ("escape", 403, "outside the import folder"),
        ("missing", 404, "no such folder"),
        ("", 400, "name a folder"),
    ],
)
def test_folder_paths_outside_the_import_folder_are_refused(live, admin, folder, status, message):
    root = live.studio.settings.import_root
    root.mkdir(parents=True, exist_ok=True)
    if not (root / "escape").exists():
        (root / "escape").symlink_to(live.studio.settings.root)  # a link out of the import folder
    before = live.studio.library.names()
    r = admin.post("/admin/import/folder", data={"csrf": admin.csrf, "folder": folder})
    assert r.status_code == status and message in body(r), r.text[-400:]
    assert live.studio.library.names() == before


def test_duplicates_are_grouped_by_tensor_hash(live, admin, pipe_and_backbone):
    folder = live.studio.settings.import_root / "dupes"
    one = lora_file(pipe_and_backbone, folder / "one.safetensors", seed=31, trigger="a")
    lora_file(pipe_and_backbone, folder / "one-renamed.safetensors", seed=31, trigger="other metadata")
    (folder / "ink.safetensors").write_bytes(Path(live.studio.library.get("inkwell").file_path).read_bytes())
    lora_file(pipe_and_backbone, folder / "unique.safetensors", seed=32)
    assert one.read_bytes() != (folder / "one-renamed.safetensors").read_bytes()
    r = admin.get("/admin/duplicates", params={"folder": "dupes"})
    assert r.status_code == 200
    groups = re.findall(r"<tr><td><code>\w+</code></td>\s*<td>(.*?)</td>\s*<td>(.*?)</td></tr>", r.text, re.S)
    found = sorted((">inkwell<" in where, files) for where, files in groups)
    assert found == [(False, "one-renamed.safetensors, one.safetensors"), (True, "ink.safetensors")]
    assert admin.get("/admin/duplicates", params={"folder": "../"}).status_code == 400


def test_regenerated_preview_is_stored_and_shown(live, admin):
    r = admin.post("/admin/loras/inkwell/preview", data={"csrf": admin.csrf})
    assert r.status_code == 303, r.text[-400:]
    info = live.studio.library.get("inkwell")
    assert Path(info.preview_path).parent == live.studio.settings.lora_dir
    r = admin.get("/admin/loras/inkwell/preview.png")
    assert r.status_code == 200 and r.content.startswith(b"\x89PNG")
    _, previews = Client(f"{live.url}/", verbose=False).predict("inkwell", api_name="/catalog")
    assert [p["caption"] for p in previews] == ["inkwell"]
    assert Image.open(previews[0]["image"]).size == Image.open(info.preview_path).size
    assert admin.get("/admin/loras/pastel/preview.png").status_code == 404


def test_job_monitor_lists_render_jobs(live, admin):
    with unit_of_work(live.studio.sessions) as db:
        for status in ("queued", "failed"):
            db.add(
                RenderJob(
                    status=status,
                    request_hash="ab" * 32,
                    backbone="sdxl",
                    total=2,
                    requests=[{"prompt": "x"}],
                    error="boom: no such LoRA" if status == "failed" else None,
                )
            )
    r = admin.get("/admin/jobs")
    assert r.status_code == 200 and "boom: no such LoRA" in body(r) and "<td>queued</td>" in body(r)
    r = admin.get("/admin/jobs", params={"status": "queued"})
    assert "boom" not in body(r) and "<td>queued</td>" in body(r)
    assert admin.get("/admin/jobs", params={"status": "lost"}).status_code == 400


def test_logout_ends_the_session_on_the_server_so_the_old_cookie_is_worthless(live, admin):
    cookie = dict(admin.cookies)  # what an attacker who copied it would hold
    assert admin.get("/admin/").status_code == 200
    assert admin.post("/admin/logout", data={"csrf": admin.csrf}).status_code == 303
    assert admin.get("/admin/").status_code == 303
    with httpx.Client(base_url=live.url, cookies=cookie) as stolen:
        r = stolen.get("/admin/")
        assert r.status_code == 303 and "/admin/login" in r.headers["location"]


def test_a_password_change_ends_every_session_of_the_user(live, admin):
    assert admin.get("/admin/").status_code == 200
    live.studio.accounts.set_password(USER, "another long password")
    assert admin.get("/admin/").status_code == 303
    live.studio.accounts.set_password(USER, PASSWORD)


def test_session_key_is_private_and_kept(live):
    path = live.studio.settings.session_secret_path
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    key = path.read_bytes()
    create_admin_app(live.studio)  # a second start reuses it: sessions survive restarts
    assert path.read_bytes() == key


def test_cli_admin_create(tmp_path):
    runner = CliRunner()
    data = ["--data-dir", str(tmp_path / "data")]
    r = runner.invoke(
        cli, ["admin", "create", "--username", "ann", "--password-stdin", *data], input="s3cret-enough\n"
    )
    assert r.exit_code == 0 and "created admin user 'ann'" in r.output
    r = runner.invoke(
        cli, ["admin", "create", "--username", "ann", "--password-stdin", *data], input="another-pass\n"
    )
    assert r.exit_code == 1 and "'ann' is taken" in r.output
    r = runner.invoke(
        cli, ["admin", "create", "--username", "bob", "--password-stdin", *data], input="short\n"
    )
    assert r.exit_code == 1 and "8 to 1024 characters" in r.output
    r = runner.invoke(
        cli, ["admin", "create", "--username", "../x", "--password-stdin", *data], input="long-enough\n"
    )
    assert r.exit_code == 1 and "username '../x'" in r.output
    r = runner.invoke(cli, ["admin", "create", "--username", "cy", *data], input="pass-word-1\npass-word-2\n")
    assert r.exit_code != 0 and "do not match" in r.output.lower()
    from app.settings import Settings
    from app.studio import Studio

    with Studio.open(Settings(data_dir=tmp_path / "data")).sessions() as db:
        users = UserRepository(db)
        assert [u.username for u in users.list()] == ["ann"]
        assert users.verify("ann", "s3cret-enough").username == "ann"
        assert users.verify("ann", "another-pass") is None
        assert users.list()[0].password_hash.startswith("$argon2id$")


def test_user_repository_hashes_verifies_and_upgrades(tmp_path):
    from argon2 import PasswordHasher

    from app.settings import Settings
    from app.studio import Studio
    from db.errors import InvalidFieldError

    studio = Studio.open(Settings(data_dir=tmp_path / "data"))
    with unit_of_work(studio.sessions) as db:
        users = UserRepository(db)
        ann = users.create("ann", "first-password")
        assert ann.password_hash.startswith("$argon2id$") and "first-password" not in ann.password_hash
        assert users.verify("ann", "first-password") is ann
        for name, password in [("ann", "First-password"), ("bob", "first-password"), ("ann", "x" * 5000)]:
            assert users.verify(name, password) is None
        with pytest.raises(InvalidFieldError, match="8 to 1024"):
            users.set_password("ann", "short")
        users.set_password("ann", "second-password")
        assert users.verify("ann", "first-password") is None and users.verify("ann", "second-password") is ann
        ann.password_hash = PasswordHasher(time_cost=1, memory_cost=8192).hash(
            "second-password"
        )  # older params
        weak = ann.password_hash
        assert (
            users.verify("ann", "second-password") is ann and ann.password_hash != weak
        )  # upgraded on login
        assert not PasswordHasher().check_needs_rehash(ann.password_hash)
        assert ann.last_login_at is None
        users.touch_login(ann)
        assert ann.last_login_at is not None
