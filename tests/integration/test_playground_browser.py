"""The playground in a real browser: Playwright driving Debian's chromium against `imagegate serve`
(a subprocess on a free port, sandbox provider; `sandbox-edit` has two sandbox routes here so a
compare of routes has two columns).

Skipped only when /usr/bin/chromium is absent (`apt-get install chromium`; `.ci/run` installs it).
With IMAGEGATE_PLAYGROUND_SCREENSHOTS=<dir> the tests also save the screenshots shown in the README.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from PIL import Image

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
ROOT = Path(__file__).resolve().parents[2]
SHOTS = os.environ.get("IMAGEGATE_PLAYGROUND_SCREENSHOTS")

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(), reason="the browser tests need Debian's chromium: apt-get install chromium"
)
sync_api = pytest.importorskip("playwright.sync_api", reason="pip install -e '.[test]' installs playwright")


KEY = "sk-playground-test-key"


@contextlib.contextmanager
def serve(tmp: Path, **settings: Any) -> Iterator[str]:
    """`imagegate serve` on 127.0.0.1 and a port the OS picks; yields its base URL. `sandbox-edit`
    has two priced sandbox routes."""
    config = yaml.safe_load((ROOT / "configs" / "imagegate.yaml").read_text())
    config.update(port=0, log_level="info", **settings)
    config["storage"]["path"] = str(tmp / "images")
    route = {"provider": "sandbox", "model": "sandbox-edit", "price": {"per_image": 0.01}}
    config["models"]["sandbox-edit"]["routes"] = [route, route]
    (tmp / "imagegate.yaml").write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FAL_", "REPLICATE_", "OPENAI_", "IMAGEGATE_"))}
    log = (tmp / "serve.log").open("w+b")
    server = subprocess.Popen(
        [sys.executable, "-m", "imagegate.cli", "serve", "--config", str(tmp / "imagegate.yaml")],
        stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp,
    )
    try:
        deadline = time.monotonic() + 30
        while (match := re.search(rb"running on (http://127\.0\.0\.1:\d+)", (tmp / "serve.log").read_bytes())) is None:
            assert server.poll() is None and time.monotonic() < deadline, (tmp / "serve.log").read_text()
            time.sleep(0.05)
        yield match.group(1).decode()
    finally:
        server.terminate()
        server.wait(timeout=15)
        log.close()


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with serve(tmp_path_factory.mktemp("playground")) as url:
        yield url


@pytest.fixture(scope="module")
def keyed_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The same gateway with one client key, allowed sandbox-edit only."""
    auth = {"keys": [{"name": "playground", "key": KEY, "models": ["sandbox-edit"]}]}
    with serve(tmp_path_factory.mktemp("keyed"), auth=auth) as url:
        yield url


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser: Any, gateway: str) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1280, "height": 860})
    page = context.new_page()
    page.set_default_timeout(15_000)
    page.goto(f"{gateway}/")
    page.wait_for_selector("#model option[value='sandbox-edit']", state="attached")
    yield page
    context.close()


@pytest.fixture
def photo(tmp_path: Path) -> Path:
    """A colourful 96x64 PNG: left half red, right half blue, a green bar."""
    image = Image.new("RGB", (96, 64), (220, 30, 30))
    image.paste((30, 60, 220), (48, 0, 96, 64))
    image.paste((20, 200, 40), (0, 40, 96, 52))
    path = tmp_path / "photo.png"
    image.save(path)
    return path


def shot(page: Any, name: str, *, top: bool = True) -> None:
    """Save a screenshot for the README (only when IMAGEGATE_PLAYGROUND_SCREENSHOTS is set), as a
    palette PNG to keep it small."""
    if not SHOTS:
        return
    if top:
        page.evaluate("window.scrollTo(0, 0)")
    raw = Image.open(io.BytesIO(page.screenshot(full_page=False))).convert("RGB")
    raw.quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(Path(SHOTS) / name, optimize=True)


def fill_edit(page: Any, photo: Path, prompt: str = "grayscale") -> None:
    page.select_option("#model", "sandbox-edit")
    page.set_input_files("#images", str(photo))
    page.wait_for_selector("#previews li")
    page.fill("#prompt", prompt)


def result_image(page: Any, selector: str = "#gallery img.result-image") -> Image.Image:
    """The first result image, as the page holds it (its blob), decoded by Pillow."""
    page.wait_for_selector(selector)
    b64 = page.eval_on_selector(
        selector,
        """async (img) => {
            const bytes = new Uint8Array(await (await fetch(img.src)).arrayBuffer());
            let raw = ""; for (const b of bytes) raw += String.fromCharCode(b);
            return btoa(raw);
        }""",
    )
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    image.load()
    return image


def is_gray(image: Image.Image) -> bool:
    rgb = image.convert("RGB")
    r, g, b = rgb.split()
    return r.tobytes() == g.tobytes() == b.tobytes() and len(set(r.tobytes())) > 1


def test_edit_shows_a_gray_result_its_parameters_and_a_curl_that_reproduces_it(page: Any, photo: Path) -> None:
    fill_edit(page, photo)
    page.click("#run")
    image = result_image(page)
    assert image.format == "PNG" and image.size == (1024, 1024) and is_gray(image)
    img = page.locator("#gallery img.result-image").first
    assert (img.get_attribute("data-width"), img.get_attribute("data-height")) == ("1024", "1024")
    assert "1024\u00d71024 · png" in page.inner_text("#gallery figcaption")
    size_row = page.locator("#params-table tr[data-param='size']")
    assert size_row.count() == 1 and "converted" in size_row.inner_text()
    assert "provider sandbox" in page.inner_text("#route-info")
    assert page.locator("#history li").count() == 1
    shot(page, "playground-result.png")

    page.click("#tab-curl")
    snippet = page.inner_text("#snippet")
    assert snippet.startswith("curl -s") and "image[]=@photo.png" in snippet
    done = subprocess.run(["sh", "-c", snippet], cwd=photo.parent, capture_output=True, timeout=60, check=True)
    body = json.loads(done.stdout)
    curl_image = Image.open(io.BytesIO(base64.b64decode(body["data"][0]["b64_json"])))
    assert curl_image.size == image.size and is_gray(curl_image)
    assert shlex.split(snippet.replace("\\\n", " "))[0] == "curl"

    page.click("#tab-python")
    python = page.inner_text("#snippet")
    assert "client.images.edit(" in python and 'open("photo.png", "rb")' in python
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENAI_")}
    ran = subprocess.run([sys.executable, "-c", python], cwd=photo.parent, capture_output=True, timeout=60, env=env)
    assert ran.returncode == 0, ran.stderr.decode()
    assert ran.stdout.decode().strip() == "imagegate-1.png"
    with Image.open(photo.parent / "imagegate-1.png") as sdk_image:
        assert sdk_image.size == image.size and is_gray(sdk_image)
    page.click("#tab-node")
    assert "client.images.edit({" in page.inner_text("#snippet")


def test_show_payload_is_a_dry_run_without_a_provider_call(page: Any, photo: Path) -> None:
    fill_edit(page, photo)
    page.fill("#seed", "42")
    with page.expect_response(re.compile(r"/v1/images/edits$")) as caught:
        page.click("#show-payload")
    response = caught.value
    assert response.request.headers.get("x-imagegate-dry-run") == "1"
    assert response.json()["object"] == "imagegate.dry_run"
    # The upstream request id is set only from a provider's answer: none means no provider call.
    assert "x-imagegate-upstream-request-id" not in response.headers
    page.wait_for_selector("#payload-box:not([hidden])")
    payload = json.loads(page.inner_text("#payload"))
    assert payload[0]["prompt"] == "grayscale" and payload[0]["seed"] == 42
    assert payload[0]["images"][0].startswith("data:image/png;base64,")
    assert "nothing was sent to sandbox" in page.inner_text("#payload-note")
    assert page.locator("#gallery img").count() == 0
    assert page.locator("#params-table tr[data-param='seed']").count() == 1
    shot(page, "playground-payload.png")


def test_an_error_is_shown_on_the_field_its_param_names(page: Any, photo: Path) -> None:
    fill_edit(page, photo)
    page.fill("#size", "0x0")
    page.click("#run")
    page.wait_for_selector("#size[aria-invalid='true']")
    assert page.is_visible("#size-error") and "size" in page.inner_text("#size-error")
    assert "400 invalid_request_error" in page.inner_text("#error")
    assert page.evaluate("document.activeElement.id") == "size"
    assert page.locator("[aria-invalid='true']").count() == 1
    shot(page, "playground-error.png")
    page.fill("#size", "512x512")
    page.fill("#extra", "{not json")  # caught by the page itself, on its field
    page.click("#run")
    sync_api.expect(page.locator("#extra")).to_have_attribute("aria-invalid", "true")
    assert "not valid JSON" in page.inner_text("#extra-error")
    page.fill("#extra", '{"style": "vivid"}')  # an extra field the sandbox ignores, with its reason in the report
    page.click("#run")
    page.wait_for_selector("#gallery img.result-image")
    assert page.locator("[aria-invalid='true']").count() == 0 and page.is_hidden("#error")
    assert "ignored" in page.locator("#params-table tr[data-param='style']").inner_text()


def test_compare_runs_each_route_side_by_side(page: Any, photo: Path) -> None:
    fill_edit(page, photo, prompt="invert")
    page.fill("#size", "512x512")
    page.check("#compare-routes")
    page.click("#compare")
    sync_api.expect(page.locator("#compare-grid .compare-column img")).to_have_count(2)
    columns = page.locator("#compare-grid .compare-column")
    assert columns.count() == 2
    headings = [columns.nth(i).locator("h3").inner_text() for i in range(2)]
    assert headings == [f"sandbox-edit · route {i}: sandbox:sandbox-edit" for i in range(2)]
    for i in range(2):
        assert columns.nth(i).get_attribute("data-status") == "200"
        assert re.search(r"\d+\.\d\d s · sandbox · cost \$0\.01", columns.nth(i).locator("p").first.inner_text())
        image = result_image(page, f"#compare-grid .compare-column:nth-child({i + 1}) img")
        assert image.size == (512, 512)
    shot(page, "playground-compare.png")


def test_compare_two_models_shows_each_outcome(page: Any, photo: Path) -> None:
    fill_edit(page, photo, prompt="mirror")
    page.fill("#size", "256x256")
    page.check("#compare-models input[value='sandbox-edit']")
    page.check("#compare-models input[value='sandbox-image']")
    page.click("#compare")
    columns = page.locator("#compare-grid .compare-column")
    sync_api.expect(columns.locator("img")).to_have_count(1)
    sync_api.expect(columns.nth(1)).to_have_attribute("data-status", "400")
    assert [columns.nth(i).locator("h3").inner_text() for i in range(2)] == ["sandbox-edit", "sandbox-image"]
    assert "does not support image edits" in columns.nth(1).inner_text()
    page.check("#compare-routes")  # each model's routes: sandbox-image has none for edits, and says so
    page.click("#compare")
    sync_api.expect(columns).to_have_count(3)
    sync_api.expect(columns.locator("img")).to_have_count(2)
    assert columns.nth(2).get_attribute("data-status") == "400"
    assert page.locator("[aria-invalid='true']").count() == 0


def test_a_painted_mask_limits_the_edit(page: Any, tmp_path: Path) -> None:
    red = tmp_path / "red.png"
    Image.new("RGB", (96, 64), (200, 20, 20)).save(red)
    fill_edit(page, red, prompt="invert")
    page.fill("#size", "96x64")
    page.click("#mask-box summary")
    page.click("#mask-paint")
    canvas = page.locator("#mask-canvas")
    sync_api.expect(canvas).to_be_visible()
    box = canvas.bounding_box()
    page.mouse.move(box["x"] + box["width"] * 0.1, box["y"] + box["height"] * 0.5)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.3, box["y"] + box["height"] * 0.5, steps=5)
    page.mouse.up()
    sync_api.expect(page.locator("#mask-status")).to_contain_text("Mask painted")
    page.click("#tab-curl")
    assert "mask=@mask.png" in page.inner_text("#snippet")
    page.click("#run")
    image = result_image(page).convert("RGB")
    assert image.size == (96, 64)
    assert image.getpixel((19, 32)) == (55, 235, 235)  # painted: inverted
    assert image.getpixel((85, 32)) == (200, 20, 20) and image.getpixel((19, 5)) == (200, 20, 20)


def test_keyboard_only_and_every_control_has_a_label(page: Any, photo: Path) -> None:
    unlabeled = page.evaluate(
        """() => [...document.querySelectorAll("input, select, textarea")]
            .filter((c) => !c.labels.length && !c.getAttribute("aria-label")).map((c) => c.id || c.name)"""
    )
    assert unlabeled == []
    page.set_input_files("#images", str(photo))
    page.focus("#prompt")
    page.keyboard.type("sepia")
    page.keyboard.press("Control+Enter")
    assert result_image(page).size == (1024, 1024)
    page.focus("#tab-curl")
    page.keyboard.press("ArrowRight")
    assert page.evaluate("document.activeElement.id") == "tab-python"
    assert "client.images.edit(" in page.inner_text("#snippet")


def test_history_reruns_a_generation(page: Any) -> None:
    page.select_option("#model", "sandbox-image")
    page.fill("#prompt", "a lighthouse at dusk")
    page.select_option("#aspect_ratio", "16:9")  # a size still at its default gives way to the ratio
    assert page.input_value("#size") == ""
    page.select_option("#aspect_ratio", "")
    page.fill("#size", "320x200")
    page.fill("#seed", "7")
    page.select_option("#response_format", "url")
    page.click("#run")
    first = result_image(page)
    assert first.size == (320, 200)
    caption = page.inner_text("#gallery figcaption")  # the bytes were fetched from the rehosted URL
    assert re.search("320\u00d7200 · png · \\d+(\\.\\d+)? k?B", caption), caption
    page.reload()
    page.wait_for_selector("#history li button:text('Re-run')")
    page.fill("#size", "")
    page.click("#history li:first-child button:text('Re-run')")
    sync_api.expect(page.locator("#history li")).to_have_count(2)
    again = result_image(page)
    assert again.tobytes() == first.tobytes()  # same prompt, seed and size: the same pixels
    assert page.input_value("#size") == "320x200"


def test_a_401_shows_the_key_field_and_the_key_is_sent_as_bearer(browser: Any, keyed_gateway: str, photo: Path) -> None:
    context = browser.new_context()
    try:
        page = context.new_page()
        sent: list[str | None] = []
        page.on("request", lambda r: sent.append(r.headers.get("authorization")) if "/v1/" in r.url else None)
        page.goto(f"{keyed_gateway}/playground")
        sync_api.expect(page.locator("#key-row")).to_be_visible()
        assert page.evaluate("document.activeElement.id") == "api-key"
        assert page.locator("#model option").count() == 0
        page.fill("#api-key", KEY)
        page.press("#api-key", "Enter")
        sync_api.expect(page.locator("#model option")).to_have_count(1)  # the key's models only
        fill_edit(page, photo)
        page.click("#run")
        assert result_image(page).size == (1024, 1024)
        assert sent[0] is None and sent[-1] == f"Bearer {KEY}"
        assert page.evaluate("sessionStorage.getItem('imagegate.apiKey')") == KEY
        assert KEY not in page.evaluate("JSON.stringify(localStorage)")
        page.click("#tab-curl")
        snippet = page.inner_text("#snippet")
        assert '-H "Authorization: Bearer $IMAGEGATE_API_KEY"' in snippet and KEY not in snippet
    finally:
        context.close()


def test_phone_width_has_no_horizontal_scroll(browser: Any, gateway: str, photo: Path) -> None:
    context = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
    try:
        page = context.new_page()
        page.goto(f"{gateway}/playground")
        page.wait_for_selector("#model option[value='sandbox-edit']", state="attached")
        fill_edit(page, photo)
        page.click("#run")
        page.wait_for_selector("#gallery img.result-image")
        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
        # the results are below the form on a phone: the page brings them into view
        sync_api.expect(page.locator("#gallery img.result-image")).to_be_in_viewport()
        shot(page, "playground-phone.png", top=False)
    finally:
        context.close()


def test_the_page_is_served_with_its_assets(gateway: str) -> None:
    for path in ("/", "/playground"):
        response = httpx.get(gateway + path)
        assert response.status_code == 200 and "playground/app.js" in response.text
        assert "script-src 'self'" in response.headers["content-security-policy"]
