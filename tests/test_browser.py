"""The page and the API in a real headless Chromium, against the real function process.

Chromium comes from Debian (`.ci/run` installs it); Playwright drives /usr/bin/chromium, since
browsers cannot be downloaded here. Without Chromium these tests skip, except in CI.
"""

from __future__ import annotations

import base64
import functools
import http.server
import os
import shutil
import threading

import pytest

from tests.conftest import TEST_TOKEN
from tests.fake_router import Reply
from tests.servers import REPO_ROOT

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = REPO_ROOT / "test-artifacts"

if not shutil.which(CHROMIUM) and os.environ.get("CI") != "true":
    pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)", allow_module_level=True)

from playwright.sync_api import Page, expect, sync_playwright  # noqa: E402


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(accept_downloads=True)
    page = context.new_page()
    page.set_default_timeout(15_000)
    problems: list[str] = []
    page.on("console", lambda message: message.type == "error" and problems.append(message.text))
    page.on("pageerror", lambda error: problems.append(str(error)))
    page.problems = problems
    yield page
    context.close()


@pytest.fixture
def function(run_function, router, tmp_path):
    return run_function(HUGGING_FACE_API_KEY=TEST_TOKEN, HF_ROUTER_URL=router.url, HF_MAX_RETRIES="0", IMAGE_DIR=str(tmp_path / "images"))


def generate(page: Page, prompt: str) -> None:
    page.fill("#prompt", prompt)
    page.click("#generate")


def test_happy_path_image_download_history_and_screenshot(page, function, router, tmp_path):
    page.goto(function.url)
    expect(page).to_have_title("imagegen")
    page.click("#options summary")
    page.select_option("#size", "512x512")
    page.fill("#negative-prompt", "fog")
    generate(page, "A lighthouse at dusk")
    expect(page.locator("#result")).to_be_visible()
    expect(page.locator("#status")).to_contain_text("Done in")
    size = page.eval_on_selector("#image", "img => img.decode().then(() => [img.naturalWidth, img.naturalHeight])")
    assert size == [512, 512]
    assert router.posts()[0].json()["parameters"]["negative_prompt"] == "fog"
    seed = router.posts()[0].json()["parameters"]["seed"]
    expect(page.locator("#meta")).to_contain_text(f"Seed {seed}")

    with page.expect_download() as download_info:
        page.click("#download")
    download = download_info.value
    assert download.suggested_filename == f"imagegen-a-lighthouse-at-dusk-{seed}.png"
    saved = tmp_path / "download.png"
    download.save_as(saved)
    image_url = page.get_attribute("#image", "src")
    assert saved.read_bytes() == base64.b64decode(image_url.split(",", 1)[1])

    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "page-with-image.png"), full_page=True)

    # Reuse the seed, then a second image: two thumbnails, the newest first.
    page.click("#reuse-seed")
    expect(page.locator("#seed")).to_have_value(str(seed))
    generate(page, "A second lighthouse")
    expect(page.locator("#history li")).to_have_count(2)
    assert router.posts()[1].json()["parameters"]["seed"] == seed
    page.locator("#history button").nth(1).click()
    expect(page.locator("#image")).to_have_attribute("alt", "A lighthouse at dusk")
    assert page.problems == []  # no CSP violation, no script error


def test_busy_state_and_cancel(page, function, router):
    held = threading.Event()
    router.reply(Reply(release=held))
    page.goto(function.url)
    generate(page, "slow one")
    expect(page.locator("#generate")).to_be_disabled()
    expect(page.locator("#cancel")).to_be_visible()
    expect(page.locator("#elapsed")).to_have_text("1 s", timeout=5_000)  # it counts
    page.click("#cancel")
    expect(page.locator("#status")).to_have_text("Cancelled.")
    expect(page.locator("#generate")).to_be_enabled()
    expect(page.locator("#result")).to_be_hidden()
    held.set()


def test_upstream_error_is_shown_as_the_functions_message(page, function, router):
    router.reply_error(402, "You have exceeded your monthly included credits for Inference Providers.")
    page.goto(function.url)
    generate(page, "a fox")
    error = page.locator("#error")
    expect(error).to_be_visible()
    expect(error).to_contain_text("has used up its credit")
    expect(page.locator("#result")).to_be_hidden()


def test_keyboard_enter_and_ctrl_enter(page, function, router):
    page.goto(function.url)
    page.fill("#prompt", "by keyboard")
    page.press("#prompt", "Enter")
    expect(page.locator("#result")).to_be_visible()
    page.click("#options summary")
    page.fill("#seed", "77")
    page.press("#seed", "Control+Enter")
    expect(page.locator("#history li")).to_have_count(2)
    assert [r.json()["inputs"] for r in router.posts()] == ["by keyboard", "by keyboard"]
    assert router.posts()[1].json()["parameters"]["seed"] == 77


def test_labels_and_phone_layout(browser, function):
    context = browser.new_context(viewport={"width": 360, "height": 720}, is_mobile=True, has_touch=True)
    page = context.new_page()
    page.goto(function.url)
    for control in ("#prompt", "#negative-prompt", "#size", "#steps", "#guidance", "#seed"):
        assert page.eval_on_selector(control, "el => el.labels.length") == 1, control
    assert page.evaluate("document.documentElement.scrollWidth") <= 360  # no sideways scrolling
    context.close()


# --- another origin ------------------------------------------------------------------------------

CROSS_ORIGIN_PAGE = """<!doctype html><title>other app</title><p id="out">waiting</p>
<script>
fetch(new URLSearchParams(location.search).get("api") + "/api/generate-image", {
  method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify({prompt: "from afar"})
}).then(r => r.json()).then(d => { out.textContent = d.success ? "image " + d.imageUrl.length : "error " + d.error; })
  .catch(e => { out.textContent = "blocked: " + e.name; });
</script>"""


@pytest.fixture
def other_origin(tmp_path):
    """A frontend on its own loopback port, as a developer's app would be."""
    root = tmp_path / "site"
    root.mkdir()
    (root / "index.html").write_text(CROSS_ORIGIN_PAGE)
    servers = []

    def start() -> str:
        handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
        handler.log_message = lambda *args: None
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_cross_origin_allowed_and_blocked(page, run_function, router, tmp_path, other_origin):
    allowed, refused = other_origin(), other_origin()
    function = run_function(
        HUGGING_FACE_API_KEY=TEST_TOKEN, HF_ROUTER_URL=router.url, IMAGE_DIR=str(tmp_path), CORS_ALLOWED_ORIGINS=allowed
    )
    page.goto(f"{allowed}/index.html?api={function.url}")
    expect(page.locator("#out")).to_contain_text("image ")
    assert len(router.posts()) == 1

    page.goto(f"{refused}/index.html?api={function.url}")
    expect(page.locator("#out")).to_have_text("blocked: TypeError")
    assert len(router.posts()) == 1  # the browser's preflight was refused: nothing reached upstream


def test_page_with_api_key_mode(page, run_function, router, tmp_path):
    key = "k_browser_0123456789abcdef"
    function = run_function(
        HUGGING_FACE_API_KEY=TEST_TOKEN,
        HF_ROUTER_URL=router.url,
        IMAGE_DIR=str(tmp_path),
        AUTH_MODE="api-key",
        API_KEYS=key,
        CORS_ALLOWED_ORIGINS="https://app.example",
    )
    page.goto(function.url)
    expect(page.locator("#credential-label")).to_have_text("API key")
    generate(page, "locked")
    expect(page.locator("#error")).to_contain_text("Missing or invalid credentials")
    assert router.posts() == []
    page.fill("#credential", key)
    page.click("#generate")
    expect(page.locator("#result")).to_be_visible()
    assert key not in function.log()
