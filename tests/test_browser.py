"""The studio and the admin page in a real browser: Debian's headless Chromium driven by Playwright (no browser
download; `executable_path` is the system binary). Screenshots go to test-artifacts/browser/."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from db.session import unit_of_work
from db.users import UserRepository
from tests.live_server import live_studio

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts" / "browser"
CHROMIUM = (
    os.environ.get("LORA_STUDIO_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
)
USER, PASSWORD = "root", "correct horse battery"
WAIT_MS = 120_000  # a shared 2-core machine: the first render builds the pipeline


@pytest.fixture(scope="module")
def chromium():  # not `browser`/`page`: those names belong to pytest-playwright's fixtures
    if not CHROMIUM:
        pytest.skip("no Chromium: install Debian's (apt-get install chromium) or set LORA_STUDIO_CHROMIUM")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def live(tmp_path_factory, tiny_sdxl_factory):
    with live_studio(tmp_path_factory.mktemp("browser"), tiny_sdxl_factory) as server:
        with unit_of_work(server.studio.sessions) as db:
            UserRepository(db).create(USER, PASSWORD)
        yield server


@pytest.fixture
def tab(chromium, request):
    context = chromium.new_context(viewport={"width": 1400, "height": 1200})
    page = context.new_page()
    page.set_default_timeout(WAIT_MS)
    yield page
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=ARTIFACTS / f"{request.node.name}.png", full_page=True)
    context.close()


def pick(page, name: str) -> None:
    """Choose a LoRA in the picker (a Gradio multiselect dropdown)."""
    page.locator("#lora-picker input").click()
    page.get_by_role("option", name=name, exact=True).click()
    page.wait_for_function(
        f"() => document.querySelector('#lora-stack').innerText.includes('{name}')", timeout=WAIT_MS
    )


def open_with_two_loras(page, live) -> None:
    """The studio page with a prompt and inkwell + pastel picked."""
    page.goto(f"{live.url}/")
    page.locator("#prompt textarea").fill("a red circle on the left")
    pick(page, "inkwell")
    pick(page, "pastel")


def set_number(page, elem_id: str, value: str) -> None:
    page.locator(f"#{elem_id} input").fill(value)


def test_render_with_two_loras_from_the_studio_page(live, tab):
    page = tab
    open_with_two_loras(page, live)
    prompt = page.locator("#prompt textarea")
    page.wait_for_function(
        "() => document.querySelector('#prompt textarea').value.includes('pastelstyle')", timeout=WAIT_MS
    )
    assert prompt.input_value() == "a red circle on the left, inkwellstyle, pastelstyle"
    stack = page.locator("#lora-stack")
    assert "inkwell" in stack.inner_text() and "pastel" in stack.inner_text()
    for elem_id, value in [
        ("steps", "4"),
        ("width", "64"),
        ("height", "64"),
        ("seed", "1"),
        ("guidance", "5"),
    ]:
        set_number(page, elem_id, value)
    page.locator("#render").click()
    image = page.locator("#gallery img").first
    image.wait_for(state="visible")
    provenance = page.locator("#provenance")
    page.wait_for_function(
        "() => document.querySelector('#provenance').innerText.includes('pastel')", timeout=WAIT_MS
    )
    text = provenance.inner_text()
    sha = live.studio.library.get("inkwell").sha256
    assert "inkwell" in text and sha in text and "merge" in text
    assert image.evaluate("img => img.naturalWidth") == 64
    assert "inkwell" in page.locator("#gallery").inner_text()  # the caption under the image


def test_admin_edits_trigger_words_that_the_studio_picker_then_uses(live, tab):
    page = tab
    page.goto(f"{live.url}/admin/")
    assert "/admin/login" in page.url
    page.fill("input[name=username]", USER)
    page.fill("input[name=password]", "not the password")
    page.click("button[type=submit]")
    assert "wrong username or password" in page.inner_text("main")
    page.fill("input[name=username]", USER)
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(f"{live.url}/admin/")
    page.click("text=inkwell")
    page.fill("input[name=trigger_words]", "inkwellstyle, midnightink")
    page.click("text=Save")
    page.wait_for_selector("text=Saved.")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=ARTIFACTS / "admin-edit.png", full_page=True)
    assert live.studio.library.get("inkwell").trigger_words == ["inkwellstyle", "midnightink"]

    page.goto(f"{live.url}/")
    page.locator("#lora-query input, #lora-query textarea").first.fill("midnightink")
    page.locator("#lora-query input, #lora-query textarea").first.press("Enter")
    matches = page.locator("#lora-cards")
    found_only_inkwell = """() => {
        const cards = document.querySelector('#lora-cards');  // null until the page has rendered it
        const text = cards ? cards.textContent : '';
        return text.includes('midnightink') && !text.includes('pastel');
    }"""  # the page load lists every LoRA first; the search narrows it to the one with the new word
    page.wait_for_function(found_only_inkwell, timeout=WAIT_MS)
    assert "inkwell" in matches.text_content()
    pick(page, "inkwell")
    page.wait_for_function(
        "() => document.querySelector('#prompt textarea').value.includes('midnightink')", timeout=WAIT_MS
    )
    assert page.locator("#prompt textarea").input_value() == "inkwellstyle, midnightink"


def test_regional_masks_painted_on_the_canvas_show_in_the_gallery(live, tab):
    page = tab
    open_with_two_loras(page, live)
    page.locator("#method input").click()
    page.get_by_role("option", name="regional", exact=True).click()
    legend = page.locator("#region-legend")
    legend.wait_for(state="visible")
    assert "inkwell" in legend.inner_text() and "red" in legend.inner_text()
    page.locator(".region-canvas button[aria-label=Brush]").click()  # the brush starts red: inkwell's colour
    canvas = page.locator(".region-canvas canvas").first
    canvas.wait_for(state="visible")
    box = canvas.bounding_box()
    x0, y0, w, h = box["x"], box["y"], box["width"], box["height"]
    # the white drawing area sits centred in the editor: a thick red stroke down its middle is inkwell's region
    page.mouse.move(x0 + w * 0.45, y0 + h * 0.2)
    page.mouse.down()
    for i in range(1, 11):
        page.mouse.move(x0 + w * 0.45, y0 + h * (0.2 + 0.06 * i), steps=3)
    page.mouse.up()
    for elem_id, value in [("steps", "4"), ("width", "64"), ("height", "64")]:
        set_number(page, elem_id, value)
    page.locator("#render").click()
    page.wait_for_function(
        "() => document.querySelector('#gallery').innerText.includes('region: inkwell')", timeout=WAIT_MS
    )
    assert page.locator("#gallery img").count() >= 2  # the render and its masks
    assert "regional" in page.locator("#provenance").inner_text()


def test_clora_shows_the_masks_it_found_in_the_gallery(live, tab):
    page = tab
    open_with_two_loras(page, live)  # picking them writes their trigger words into the prompt, as clora needs
    page.wait_for_function(
        "() => document.querySelector('#prompt textarea').value.includes('pastelstyle')", timeout=WAIT_MS
    )
    page.locator("#method input").click()
    page.get_by_role("option", name="clora", exact=True).click()
    for elem_id, value in [("steps", "4"), ("width", "64"), ("height", "64")]:
        set_number(page, elem_id, value)
    page.locator("#render").click()
    page.wait_for_function(
        "() => document.querySelector('#gallery').innerText.includes('clora: pastel')", timeout=WAIT_MS
    )
    gallery = page.locator("#gallery").inner_text()
    assert "clora: base" in gallery and "clora: inkwell" in gallery
    assert page.locator("#gallery img").count() >= 4  # the render, then the base's and each LoRA's mask
    assert "clora" in page.locator("#provenance").inner_text()


def test_the_api_docs_render_with_no_request_leaving_the_server(live, tab):
    outside: list[str] = []

    def only_local(route):
        if route.request.url.startswith(live.url):
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    tab.route("**/*", only_local)
    tab.goto(f"{live.url}/api/v1/docs")
    title = tab.locator(".swagger-ui .info .title")
    title.wait_for()
    assert "LoRA Studio" in title.inner_text()
    tab.locator(".opblock-summary-path", has_text="/api/v1/loras").first.wait_for()
    assert outside == []


def test_text_typed_right_after_the_page_loads_is_kept(live, tab):
    """The page-load search used to fire the picker's change event with the prompt as it was, wiping what had
    been typed meanwhile (about one load in three)."""
    for i in range(10):
        tab.goto(f"{live.url}/")
        box = tab.locator("#prompt textarea")
        box.wait_for()
        text = f"a prompt typed key by key right after the page loads {i}"
        box.press_sequentially(text, delay=25)  # spans the page-load search and anything it fires
        tab.wait_for_function(  # the load search has answered: the picker knows the catalog's LoRAs
            "() => document.querySelector('#lora-cards') && "
            "document.querySelector('#lora-cards').textContent.includes('inkwell')"
        )
        tab.wait_for_timeout(500)  # and any event it fired has come back
        assert box.input_value() == text, f"load {i}: {box.input_value()!r}"


def test_removing_a_lora_takes_its_trigger_word_out_of_the_prompt(live, tab):
    open_with_two_loras(tab, live)
    box = tab.locator("#prompt textarea")
    tab.wait_for_function("() => document.querySelector('#prompt textarea').value.includes('pastelstyle')")
    inkwell = ", ".join(live.studio.library.get("inkwell").trigger_words)  # another test may have added one
    assert box.input_value() == f"a red circle on the left, {inkwell}, pastelstyle"
    token = tab.locator("#lora-picker .token", has_text="inkwell")
    token.locator(".token-remove").click()  # the token's x
    tab.wait_for_function("() => !document.querySelector('#prompt textarea').value.includes('inkwellstyle')")
    words = live.studio.library.get("inkwell").trigger_words  # another test may have added one
    assert box.input_value() == "a red circle on the left, pastelstyle" and not any(
        w in box.input_value() for w in words
    )


def test_history_shows_a_past_render_and_reuse_puts_its_settings_back(live, tab):
    render = live.studio.render_image(
        prompt="a render from the past", loras=[("pastel", 0.8)], seed=5, steps=3, width=64, height=64
    )
    tab.goto(f"{live.url}/")
    tab.get_by_role("tab", name="History").click()
    tab.locator("#history-refresh").click()
    tab.wait_for_function("() => document.querySelector('#history-page').innerText.includes('page 1 of')")
    first = tab.locator("#history-gallery img").first
    first.wait_for(state="visible")
    first.click()
    tab.wait_for_function(
        "() => document.querySelector('#history-provenance').innerText.includes('a render from the past')"
    )
    assert render.render_id == int(tab.locator("#history-chosen input").input_value())
    tab.locator("#history-reuse").click()
    box = tab.locator("#prompt textarea")
    box.wait_for(state="visible")  # the Studio tab is shown again
    tab.wait_for_function(
        "() => document.querySelector('#prompt textarea').value === 'a render from the past'"
    )
    assert (
        "pastel" in tab.locator("#lora-stack").inner_text()
        and "0.8" in tab.locator("#lora-stack").inner_text()
    )
    assert (
        tab.locator("#seed input").input_value() == "5" and tab.locator("#steps input").input_value() == "3"
    )


def test_clicking_a_lora_card_adds_it_to_the_stack_with_its_trigger_word(live, tab):
    tab.goto(f"{live.url}/")
    tab.locator("#prompt textarea").fill("a red circle")
    card = tab.locator("#lora-cards button", has_text="pastel").first
    card.wait_for(state="visible")
    card.click()
    tab.wait_for_function("() => document.querySelector('#lora-stack').innerText.includes('pastel')")
    tab.wait_for_function("() => document.querySelector('#prompt textarea').value.includes('pastelstyle')")
    assert tab.locator("#prompt textarea").input_value() == "a red circle, pastelstyle"


def test_a_weight_slider_per_lora_writes_the_stack(live, tab):
    open_with_two_loras(tab, live)
    sliders = tab.locator("#lora-sliders .lora-weight")
    tab.wait_for_function("() => document.querySelectorAll('#lora-sliders .lora-weight').length === 2")
    pastel = sliders.filter(has_text="pastel weight")
    number = pastel.locator("input[type=number]")
    number.fill("0.35")
    number.press("Enter")
    number.blur()
    tab.wait_for_function("() => document.querySelector('#lora-stack').innerText.includes('0.35')")
    rows = tab.locator("#lora-stack").inner_text()
    assert "0.35" in rows and "inkwell" in rows
