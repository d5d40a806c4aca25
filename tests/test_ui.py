"""The Gradio studio at /, called through gradio_client against a live server: renders with a LoRA stack carry
their provenance, search finds LoRAs by name and trigger word, the picker puts trigger words into the prompt,
training shows its loss curve and lands in the catalog; bad input comes back as a one-line error. Also: the
method controls come from the method's dataclass, and the front ends never import torch."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Literal

import gradio as gr
import httpx
import numpy as np
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image

from app.facade import SamplingDefaults
from app.ui import create_ui
from app.ui.methods import build_method_controls, params_from
from app.ui.studio_tab import caption, insert_triggers, remove_triggers, stack_entries
from composer.errors import StudioError
from composer.masks import PALETTE
from composer.methods import METHODS
from tests.live_server import LORAS, live_studio

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(steps=4, guidance=5.0, width=64, height=64)


@pytest.fixture(scope="module")
def live(tmp_path_factory, tiny_sdxl_factory):
    with live_studio(tmp_path_factory.mktemp("ui"), tiny_sdxl_factory, max_upload_mb=1) as server:
        yield server


@pytest.fixture(scope="module")
def client(live):
    return Client(f"{live.url}/", verbose=False)


def stack(*rows):
    return {"headers": ["LoRA", "weight"], "data": [list(r) for r in rows]}


def render(client, prompt="a red circle on the left", rows=(), seed=0, method="merge", canvas=None, **kw):
    """The /render endpoint: the fixed inputs (auto LoRAs last), then every method's controls in the registry's
    order (switch: every; regional: canvas, feather, passes, region prompts, prompt mode; clora: threshold,
    temperature, step size, update until, refine, prompts, concepts; gated: gates)."""
    s = {**SMALL, **kw}
    return client.predict(
        prompt,
        "",
        stack(*rows),
        method,
        seed,
        s["steps"],
        s["guidance"],
        s["width"],
        s["height"],
        s.get("auto", 0),
        s.get("every", 5),
        canvas,
        s.get("feather", 0),
        s.get("passes", "per-region"),
        s.get("prompts", ""),
        s.get("prompt_mode", "attention"),
        *s.get("clora", (0.3, 0.5, 0.02, 0.5, 0, "shared", "")),
        s.get("gates", "stored"),
        api_name="/render",
    )


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0


def test_named_endpoints_are_published(client):
    named = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert {"/render", "/search_loras", "/pick_loras", "/train", "/catalog"} <= set(named)


def test_render_with_two_loras_changes_the_image_and_names_both(client, live):
    plain_gallery, plain = render(client)
    gallery, provenance = render(client, rows=[("inkwell", 1.0), ("pastel", 0.7)])
    assert plain["loras"] == [] and provenance["method"] == "merge" and provenance["seed"] == 0
    want = [
        {"name": n, "sha256": live.studio.library.get(n).sha256, "weight": w}
        for n, w in [("inkwell", 1.0), ("pastel", 0.7)]
    ]
    assert [{k: x[k] for k in ("name", "sha256", "weight")} for x in provenance["loras"]] == want
    assert (provenance["width"], provenance["height"], provenance["num_inference_steps"]) == (64, 64, 4)
    (item,) = gallery
    assert "inkwell" in item["caption"] and "pastel" in item["caption"] and "x0.7" in item["caption"]
    assert want[0]["sha256"][:10] in item["caption"]
    image, base = pixels(item["image"]), pixels(plain_gallery[0]["image"])
    assert image.shape == base.shape == (64, 64, 3)
    assert np.abs(image - base).mean() > 0.01  # the LoRAs change the picture
    # the served file is the studio's own PNG, with the provenance in its text chunk
    assert json.loads(Image.open(item["image"]).text["lora_studio"])["loras"][1]["name"] == "pastel"
    same_gallery, _ = render(client, rows=[("inkwell", 1.0), ("pastel", 0.7)])
    assert np.array_equal(pixels(same_gallery[0]["image"]), image)  # same seed, same stack: same image


def test_search_shows_a_card_per_lora_with_its_trigger_words(client):
    _, _, cards = client.predict("", [], api_name="/search_loras")
    assert sorted(c["caption"] for c in cards) == ["inkwell · inkwellstyle", "pastel · pastelstyle"]
    assert all(
        pixels(c["image"]["path"] if isinstance(c["image"], dict) else c["image"]).shape == (160, 160, 3)
        for c in cards
    )


def test_search_loras_by_name_and_by_trigger_word(client):
    _, matches, _ = client.predict("inkwell", [], api_name="/search_loras")
    assert [row[0] for row in matches["data"]] == ["inkwell"]
    assert matches["data"][0][3] == "inkwellstyle"
    _, matches, _ = client.predict("pastelstyle", [], api_name="/search_loras")
    assert [row[0] for row in matches["data"]] == ["pastel"]
    _, matches, _ = client.predict("", [], api_name="/search_loras")
    assert sorted(row[0] for row in matches["data"]) == sorted(LORAS)
    _, matches, _ = client.predict("nothing-like-this", [], api_name="/search_loras")
    assert not any(row and row[0] for row in matches["data"])


def test_picking_loras_inserts_their_trigger_words_and_keeps_weights(client):
    rows, prompt = client.predict(["inkwell"], stack(), "a red circle", api_name="/pick_loras")
    assert rows["data"] == [["inkwell", 1.0]] and prompt == "a red circle, inkwellstyle"
    rows, prompt = client.predict(
        ["inkwell", "pastel"], stack(("inkwell", 0.4)), prompt, api_name="/pick_loras"
    )
    assert rows["data"] == [["inkwell", 0.4], ["pastel", 1.0]]
    assert prompt == "a red circle, inkwellstyle, pastelstyle"  # inkwell's word is not added twice
    rows, prompt = client.predict(
        ["pastel"], stack(("inkwell", 0.4), ("pastel", 0.9)), prompt, api_name="/pick_loras"
    )
    assert rows["data"] == [["pastel", 0.9]]
    assert prompt == "a red circle, pastelstyle"  # inkwell left the stack: its trigger word left the prompt
    rows, prompt = client.predict(
        [], stack(("pastel", 0.9)), "pastelstyle, a red circle", api_name="/pick_loras"
    )
    assert rows["data"] == [] and prompt == "a red circle"
    typed = "a red circle typed after the last pick"  # nothing came or went: the prompt is not touched
    rows, prompt = client.predict(["pastel"], stack(("pastel", 0.9)), typed, api_name="/pick_loras")
    assert rows["data"] == [["pastel", 0.9]] and prompt == {
        "__type__": "update"
    }  # no-op: the browser keeps it


def test_history_pages_past_renders_and_reuse_puts_their_settings_back(client, live):
    render(client, prompt="an older render", rows=[("inkwell", 0.6)], seed=11)
    _, newest = render(client, prompt="the newest render", seed=12, steps=3)
    gallery, where = client.predict(0, api_name="/history")  # the page number and ids are session state
    page = live.studio.list_renders(12, 0)
    ids, total = [r.id for r in page.items], page.total
    assert where.startswith("page 1 of ") and f"({total} renders)" in where and len(gallery) == len(ids)
    assert ids == sorted(ids, reverse=True) and newest["seed"] == 12  # newest first
    assert (
        "no LoRA | merge | seed 12" in gallery[0]["caption"]
        and "x0.6 | merge | seed 11" in gallery[1]["caption"]
    )
    assert pixels(gallery[0]["image"]).shape == (64, 64, 3)
    prompt, negative, picker, rows, method, seed, steps, guidance, width, height = client.predict(
        ids[1], api_name="/reuse_render"
    )
    assert (prompt, negative, picker["value"], method, seed) == (
        "an older render",
        "",
        ["inkwell"],
        "merge",
        11,
    )
    assert rows["data"] == [["inkwell", 0.6]] and (steps, guidance, width, height) == (4, 5.0, 64, 64)
    with pytest.raises(AppError, match="no finished render with id 999999"):
        client.predict(999999, api_name="/reuse_render")
    gallery, where = client.predict(50, api_name="/history")  # past the end: the last page
    last = max(0, (total - 1) // 12)
    assert where.startswith(f"page {last + 1} of {last + 1} ") and gallery


def test_regional_render_from_a_painted_canvas_shows_its_masks(client, tmp_path):
    painting = Image.new("RGBA", (64, 64), (255, 255, 255, 255))
    painting.paste(PALETTE[0] + (255,), (0, 0, 32, 64))  # left half: the first LoRA of the stack
    path = tmp_path / "canvas.png"
    painting.save(path)
    canvas = {"background": None, "layers": [], "composite": handle_file(str(path))}
    rows = [("inkwell", 1.0), ("pastel", 1.0)]
    gallery, provenance = render(client, rows=rows, method="regional", canvas=canvas, feather=0)
    merged, _ = render(client, rows=rows)
    assert provenance["method"] == "regional"
    assert list(provenance["method_params"]["regions"]) == ["inkwell"]  # pastel unpainted: everywhere
    image, *masks = gallery
    assert [m["caption"] for m in masks] == ["region: inkwell (50%)", "region: no mask (50%)"]
    shown = np.asarray(Image.open(masks[0]["image"]).convert("L"))
    assert shown[:, :32].min() == 255 and shown[:, 32:].max() == 0
    assert np.abs(pixels(image["image"]) - pixels(merged[0]["image"])).mean() > 0.005
    # the painted region with a prompt of its own
    prompted, provenance = render(
        client, rows=rows, method="regional", canvas=canvas, prompts="inkwell: a blue square on the left"
    )
    assert provenance["method_params"]["prompts"] == "inkwell: a blue square on the left"
    assert provenance["method_params"]["prompt_mode"] == "attention"
    assert np.abs(pixels(prompted[0]["image"]) - pixels(image["image"])).mean() > 0.005
    # the same regions in a single pass: another picture, not the merge either
    single, provenance = render(client, rows=rows, method="regional", canvas=canvas, passes="single")
    assert provenance["method_params"]["passes"] == "single"
    assert np.abs(pixels(single[0]["image"]) - pixels(image["image"])).mean() > 0.001
    assert np.abs(pixels(single[0]["image"]) - pixels(merged[0]["image"])).mean() > 0.001
    # the other methods of the menu, from the same controls
    for method, params in (("switch", {"every": 1}), ("composite", {})):
        gallery, provenance = render(client, rows=rows, method=method, every=1)
        assert provenance["method"] == method and provenance["method_params"] == params
        assert np.abs(pixels(gallery[0]["image"]) - pixels(merged[0]["image"])).mean() > 0.005


def test_clora_render_shows_the_masks_it_found(client):
    rows = [("inkwell", 1.0), ("pastel", 1.0)]
    prompt = "a red circle inkwellstyle on the left, pastelstyle background"  # the LoRAs' trigger words
    knobs = (0.3, 0.5, 0.05, 0.5, 1, "per-lora", "inkwell: ink\npastel: pastel")  # the paper's streams
    gallery, provenance = render(client, prompt, rows=rows, method="clora", clora=knobs)
    assert provenance["method"] == "clora"
    assert provenance["method_params"] == {
        "threshold": 0.3,
        "temperature": 0.5,
        "step_size": 0.05,
        "update_until": 0.5,
        "refine": 1,
        "prompts": "per-lora",
        "concepts": "inkwell: ink\npastel: pastel",
    }
    image, *masks = gallery
    assert [m["caption"].split(" (")[0] for m in masks] == ["clora: base", "clora: inkwell", "clora: pastel"]
    shown = [np.asarray(Image.open(m["image"]).convert("L")) > 0 for m in masks]
    assert all(s.shape == (64, 64) for s in shown)
    assert np.array_equal(shown[0], ~(shown[1] | shown[2]))  # the base stream gets what no LoRA claims
    merged, _ = render(client, prompt, rows=rows)
    assert np.abs(pixels(image["image"]) - pixels(merged[0]["image"])).mean() > 0.005
    with pytest.raises(AppError, match="the prompt does not contain 'pastel''s trigger word"):
        render(client, "a red circle inkwellstyle", rows=rows, method="clora")


def test_a_prompt_tag_renders_as_the_stack_row_and_is_in_the_provenance(client):
    tagged_gallery, tagged = render(client, prompt="a red circle on the left <lora:pastel:0.7>")
    row_gallery, _ = render(client, rows=[("pastel", 0.7)])
    assert tagged["prompt"] == "a red circle on the left"
    assert tagged["prompt_tags"] == [{"name": "pastel", "weight": 0.7}]
    assert [(x["name"], x["weight"]) for x in tagged["loras"]] == [("pastel", 0.7)]
    assert "pastel" in tagged_gallery[0]["caption"]
    assert np.array_equal(pixels(tagged_gallery[0]["image"]), pixels(row_gallery[0]["image"]))


@pytest.mark.parametrize(
    "rows, kw, message",
    [
        ([("inkwel", 1.0)], {}, "no adapter named 'inkwel'; did you mean 'inkwell'"),
        ([("inkwell", "strong")], {}, "weight of LoRA 'inkwell' is not a number"),
        ([], {"width": 60}, "multiples of 8"),
        ([], {"prompt": "x <lora:inkwel:0.5>"}, "prompt tag <lora:inkwel:0.5>: no adapter named 'inkwel'"),
        ([], {"prompt": "x <lora:inkwell:big>"}, "weight 'big' is not a number"),
        ([], {"prompt": "qwzx", "auto": 1}, "auto mode found no LoRA for 'qwzx'"),
        ([], {"prompt": "pastel", "auto": 9}, "Value 9 is greater than maximum value 8"),
        (
            [],
            {"method": "blend"},
            "blend is not in the list of choices: \\['merge', 'switch', 'composite', 'cmlora', 'regional', 'clora', 'gated'\\]",
        ),
    ],
)
def test_bad_render_input_is_a_clear_error(client, rows, kw, message):
    with pytest.raises(AppError, match=message.replace("(", r"\(")):
        render(client, rows=rows, **kw)


def test_auto_loras_pick_from_the_catalog_and_are_reported(client, live):
    # tiny SDXL has no LoRA encoder: auto mode's search is the text side alone
    _, provenance = render(client, prompt="a pastel picture", auto=1)
    (pick,) = provenance["auto_loras"]
    assert pick["name"] == "pastel" and pick["text_score"] is not None and pick["weight_score"] is None
    assert [x["name"] for x in provenance["loras"]] == ["pastel"]
    assert "pastelstyle" in provenance["prompt"]  # the pick's trigger word joins the prompt
    _, explicit = render(client, prompt="a pastel picture", rows=[("inkwell", 1.0)], auto=1)
    assert [x["name"] for x in explicit["loras"]] == ["inkwell", "pastel"]


def test_catalog_endpoint_lists_adapters(client):
    table, previews = client.predict("", api_name="/catalog")
    assert sorted(row[0] for row in table["data"]) == sorted(LORAS)
    assert previews == []  # imported files bring no preview
    table, _ = client.predict("pastelstyle", api_name="/catalog")
    assert [row[0] for row in table["data"]] == ["pastel"]


def noise_images(folder, seed: int, n: int = 3) -> list:
    """`n` random 32 px PNGs in `folder` (training uploads)."""
    rng = np.random.default_rng(seed)
    files = []
    for i in range(n):
        files.append(folder / f"img{i}.png")
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(files[-1])
    return files


def test_train_shows_the_loss_curve_and_links_the_new_adapter(client, live, tmp_path):
    files = noise_images(tmp_path, seed=0)
    curve, status = client.predict(
        [handle_file(str(f)) for f in files], "lora", "trained", "a photo of sks", "sks", 3, api_name="/train"
    )
    assert curve["columns"] == ["step", "loss"] and [row[0] for row in curve["data"]] == [1, 2, 3]
    assert all(np.isfinite(row[1]) and row[1] > 0 for row in curve["data"])
    assert "Trained **trained** (lora, 3 steps" in status and "(/admin/loras/trained)" in status
    info = live.studio.library.get("trained")
    assert info.trigger_words == ["sks"] and info.training_config["steps_done"] == 3
    with pytest.raises(AppError, match="'trained' is taken"):
        client.predict(
            [handle_file(str(f)) for f in files], "lora", "trained", "a photo", "", 3, api_name="/train"
        )
    with pytest.raises(AppError, match="upload at least one training image"):
        client.predict([], "lora", "other", "a photo", "", 3, api_name="/train")


def test_stop_ends_a_training_run_and_catalogs_nothing(client, live, tmp_path):
    import time

    files = noise_images(tmp_path, seed=1)
    before, _ = render(client)
    job = client.submit(
        [handle_file(str(f)) for f in files], "lora", "stopped", "a photo of sks", "", 5000, api_name="/train"
    )
    deadline = time.monotonic() + 120
    while not job.outputs() and time.monotonic() < deadline:  # the first steps have run
        time.sleep(0.2)
    assert job.outputs(), "training did not start"
    assert "Stopping" in client.predict(api_name="/stop_training")
    curve, status = job.result(timeout=120)
    assert "Training stopped at step" in status and "nothing was added to the catalog" in status
    assert len(curve["data"]) < 5000
    assert "stopped" not in live.studio.library.names()
    after, _ = render(client)
    assert np.array_equal(pixels(after[0]["image"]), pixels(before[0]["image"]))  # the pipeline came back


def test_uploads_over_the_limit_are_refused(live):
    big = {"files": ("big.png", b"\0" * (2 * 2**20), "image/png")}
    r = httpx.post(f"{live.url}/gradio_api/upload", files=big, timeout=60)
    assert r.status_code == 413 and "maximum allowed size of 1048576 bytes" in r.text
    r = httpx.post(f"{live.url}/gradio_api/upload", files={"files": ("ok.png", b"\0" * 1000)}, timeout=60)
    assert r.status_code == 200


def test_remove_triggers_takes_out_whole_words_and_their_commas():
    assert remove_triggers("a cat, inkwellstyle", ["inkwellstyle"]) == "a cat"
    assert remove_triggers("InkwellStyle, a cat, dog", ["inkwellstyle"]) == "a cat, dog"
    assert remove_triggers("a cat, sks, dog", ["sks"]) == "a cat, dog"
    assert remove_triggers("a sksdog, sks", ["sks"]) == "a sksdog"  # only whole words
    assert remove_triggers("a cat", ["sks", ""]) == "a cat"


def test_insert_triggers():
    assert insert_triggers("", ["sks"]) == "sks"
    assert insert_triggers("a SKS dog", ["sks", "ink"]) == "a SKS dog, ink"
    assert insert_triggers("a sksdog", ["sks"]) == "a sksdog, sks"  # only whole words count as present


def test_stack_entries_and_caption():
    assert stack_entries({"data": [["a", "0.5"], ["", 1], ["b", None]]}) == [("a", 0.5), ("b", 1.0)]
    with pytest.raises(StudioError, match="weight of LoRA 'a'"):
        stack_entries([["a", "x"]])
    prov = {
        "loras": [{"name": "a", "sha256": "0123456789abcdef", "weight": 0.5}],
        "method": "merge",
        "seed": 3,
    }
    assert caption(prov) == "a [0123456789] x0.5 | merge | seed 3"


@dataclasses.dataclass(frozen=True)
class _Knobs:  # a parameters dataclass of the shape a future method would register
    mode: Literal["soft", "hard"] = "soft"
    strength: float = 0.5
    steps: int = 3
    invert: bool = False
    note: str = ""


def test_method_controls_are_built_from_the_dataclass_fields():
    methods = {**METHODS, "knobs": _Knobs}
    with gr.Blocks():
        groups = build_method_controls(methods, "merge")
    by_name = {g.method: g for g in groups}
    assert by_name["merge"].controls == [] and by_name["merge"].group.visible
    kinds = [(n, type(c).__name__) for n, c in by_name["knobs"].controls]
    assert kinds == [
        ("mode", "Dropdown"),
        ("strength", "Number"),
        ("steps", "Number"),
        ("invert", "Checkbox"),
        ("note", "Textbox"),
    ]
    assert not by_name["knobs"].group.visible
    regional_kinds = [type(c).__name__ for _, c in by_name["regional"].controls]
    assert regional_kinds == ["ImageEditor", "Number", "Dropdown", "Textbox", "Dropdown"]
    clora = [0.25, 0.5, 0.0, 0.5, 2, "shared", ""]
    regional_values = [3, None, 0, "per-region", "", "attention"]  # switch's every; regional's knobs
    # switch's, regional's, clora's, gated's, knobs'
    values = [*regional_values, *clora, "untrained", "hard", 0.9, 4.0, True, "x"]
    assert params_from(groups, "merge", values) == METHODS["merge"]()
    assert params_from(groups, "switch", values) == METHODS["switch"](3)
    assert params_from(groups, "clora", values) == METHODS["clora"](0.25, 0.5, 0.0, 0.5, refine=2)
    assert params_from(groups, "gated", values) == METHODS["gated"](gates="untrained")
    assert params_from(groups, "knobs", values) == _Knobs("hard", 0.9, 4, True, "x")
    with pytest.raises(StudioError, match="knobs: strength needs a value"):
        params_from(groups, "knobs", [*regional_values, *clora, "stored", "hard", None, 4, True, "x"])
    painting = Image.new("RGBA", (4, 4), (255, 255, 255, 255))
    painting.putpixel((0, 0), PALETTE[1] + (255,))  # the second LoRA's colour
    painted = [{"composite": painting}, 2, "single", "b: a blue square", "attention"]
    regional = params_from(groups, "regional", [3, *painted, *values[6:]], ["a", "b"])
    assert regional.regions.names() == ["b"] and regional.feather == 2
    assert regional.prompts == "b: a blue square" and regional.passes == "single"
    assert regional.regions.get("b").coverage() == pytest.approx(1 / 16)


def test_front_ends_never_import_torch():
    code = "import sys, app.ui, app.admin, app.web, app.facade; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


class _Catalog:
    """The catalog calls the studio tab makes while it is built and rendering (no database, no model)."""

    def names(self):
        return ["a"]

    def list(self, query=None, limit=100, **kw):
        return []

    def get(self, ref):
        return SimpleNamespace(name=ref, trigger_words=[])


def test_render_event_feeds_the_progress_bar_from_the_studio_callback(tmp_path):
    calls = []

    def fake_render(*, progress=None, loras=(), **request):
        for step in (1, 2, 3):
            progress(step, 3)
        calls.append((loras, request))
        path = tmp_path / "r.png"
        Image.new("RGB", (8, 8)).save(path)
        prov = {"loras": [], "method": "merge", "seed": request["seed"]}
        return SimpleNamespace(paths=[path], provenance=prov, images=[], render_id=1)

    studio = SimpleNamespace(
        library=_Catalog(),
        settings=None,
        render_image=fake_render,
        composition_methods=lambda: METHODS,
        adapter_types=lambda: ("lora",),
        default_sampling=lambda: SamplingDefaults(30, 5.0),
    )
    demo = create_ui(studio)
    render_fn = next(f.fn for f in demo.fns.values() if f.api_name == "render")
    seen = []

    class Recorder:
        def __call__(self, progress, desc=None, unit=None, **kw):
            seen.append((progress, desc, unit))

    gallery, provenance = render_fn(
        Recorder(), "p", "", stack(("a", 0.5)), "merge", 7, 0, 4.0, 0, 64, None
    )  # ... width 0, height 64, auto LoRAs None (off)
    assert seen == [
        ((1, 3), "denoising", "steps"),
        ((2, 3), "denoising", "steps"),
        ((3, 3), "denoising", "steps"),
    ]
    # 0 steps and width mean "the model's default"; guidance 4.0 and height 64 are kept
    assert calls == [
        (
            [("a", 0.5)],
            dict(
                prompt="p",
                negative_prompt="",
                method="merge",
                params=METHODS["merge"](),
                seed=7,
                steps=None,
                guidance=4.0,
                width=None,
                height=64,
                auto_loras=0,
            ),
        )
    ]
    assert gallery == [(str(tmp_path / "r.png"), "no LoRA | merge | seed 7")] and provenance["seed"] == 7


def test_serve_runs_the_whole_web_app(tmp_path, monkeypatch):
    import uvicorn
    from typer.testing import CliRunner

    from app.cli import app as cli

    served = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: served.update(app=app, **kw))
    result = CliRunner().invoke(cli, ["serve", "--port", "8123", "--data-dir", str(tmp_path / "data")])
    assert result.exit_code == 0, result.output
    mounts = {getattr(r, "path", None) for r in served["app"].routes}
    assert {"/admin", "/studio-static", ""} <= mounts and served["port"] == 8123  # "" is the studio at /
    assert "/api/v1/loras" in served["app"].openapi()["paths"]


def test_serve_hands_one_studio_to_the_api_the_admin_page_and_the_studio_ui(tmp_path, monkeypatch):
    """`serve` builds one Studio; the REST API, the admin page and every Gradio event get that same object,
    typed as the facade Protocol."""
    import inspect

    import uvicorn
    from starlette.routing import Mount
    from typer.testing import CliRunner

    from app.cli import app as cli
    from app.facade import StudioFacade
    from app.studio import Studio

    served = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: served.update(app=app, **kw))
    result = CliRunner().invoke(cli, ["serve", "--data-dir", str(tmp_path / "data")])
    assert result.exit_code == 0, result.output
    web = served["app"]
    api_studio = web.state.studio
    assert isinstance(api_studio, Studio) and isinstance(api_studio, StudioFacade)
    mounts = {r.path: r.app for r in web.routes if isinstance(r, Mount)}
    assert mounts["/admin"].state.studio is api_studio
    blocks = mounts[""].blocks
    events = {f.api_name: f.fn for f in blocks.fns.values() if f.api_name}
    for name in ("render", "train"):
        assert inspect.getclosurevars(events[name]).nonlocals["studio"] is api_studio, name
    for name in ("search_loras", "catalog"):
        free = inspect.getclosurevars(events[name]).nonlocals
        assert api_studio in (free.get("studio"), getattr(free.get("library"), "__self__", None)) or (
            free.get("library") is api_studio.library
        ), name
