"""The page and the API in a real headless Chromium, against the real function process.

Chromium comes from Debian (`.ci/run` installs it); Playwright drives /usr/bin/chromium, since
browsers cannot be downloaded here. Without Chromium these tests skip, except in CI.
"""

from __future__ import annotations

import base64
import functools
import http.server
import json
import os
import shutil
import threading

import pytest

from tests.conftest import TEST_TOKEN
from tests.fake_router import Reply
from tests.servers import REPO_ROOT, wait_until

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
    return run_function(HUGGING_FACE_API_KEY=TEST_TOKEN, HF_ROUTER_URL=router.url, MAX_RETRIES="0", IMAGE_DIR=str(tmp_path / "images"))


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
    expect(page.locator("#cancel")).to_be_focused()  # not <body>, though Generate was disabled
    expect(page.locator("#phase")).to_have_text("Asking hf-inference (stabilityai/stable-diffusion-3-medium-diffusers)…")
    expect(page.locator("#elapsed")).to_have_text("1 s", timeout=5_000)  # it counts
    page.click("#cancel")
    expect(page.locator("#status")).to_have_text("Cancelled.")
    expect(page.locator("#generate")).to_be_enabled()
    expect(page.locator("#generate")).to_be_focused()
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


# --- streamed progress, focus, field errors, contrast, history ----------------------------------

# Records every text #phase shows and every value the bar takes, in order.
RECORD_PHASES = """() => {
  window.phases = []; window.bars = [];
  const phase = document.getElementById("phase"), bar = document.getElementById("bar");
  new MutationObserver(() => window.phases.push(phase.textContent)).observe(phase, {childList: true, characterData: true, subtree: true});
  new MutationObserver(() => { if (!bar.hidden) window.bars.push(bar.value); }).observe(bar, {attributes: true});
}"""


@pytest.fixture
def demo(run_function, tmp_path):
    def start(**env: str):
        return run_function(**{"BACKENDS": "demo", "DEMO_STEP_SECONDS": "0.3", "IMAGE_DIR": str(tmp_path / "images"), **env})

    return start


def in_viewport(page: Page, selector: str) -> bool:
    return page.eval_on_selector(
        selector,
        """async el => {
          if (el.decode) await el.decode();
          const r = el.getBoundingClientRect();
          return r.height > 0 && r.top >= -1 && r.bottom <= innerHeight + 1;  // sub-pixel scroll offsets
        }""",
    )


def test_progress_phases_in_order_then_the_result_has_focus(page, demo):
    function = demo()
    page.goto(function.url)
    expect(page.locator("#server")).to_have_text("This server uses demo (placeholder, placeholders only).")
    page.evaluate(RECORD_PHASES)
    generate(page, "A lighthouse, as a placeholder")
    expect(page.locator("#placeholder")).to_be_visible()
    expect(page.locator("#bar")).to_be_visible()
    expect(page.locator("#status")).to_contain_text("Done in")
    phases = [p for p in page.evaluate("window.phases") if p]
    assert phases == [
        "Sending the request…",
        "Accepted; starting…",
        "Asking demo (placeholder)…",
        "Waiting for the model: step 1 of 4",
        "Waiting for the model: step 2 of 4",
        "Waiting for the model: step 3 of 4",
        "Waiting for the model: step 4 of 4",
    ]
    assert page.evaluate("window.bars") == [0.25, 0.5, 0.75, 1]
    expect(page.locator("#result")).to_be_focused()
    assert in_viewport(page, "#image")
    expect(page.locator("#meta")).to_have_text("demo · placeholder")
    expect(page.locator("#warning")).to_contain_text("placeholder from the demo backend")
    expect(page.locator("#reuse-seed")).to_be_hidden()  # no seed reproduces a placeholder
    assert page.problems == []


def test_retry_and_failover_are_said_in_words(page, run_function, router, tmp_path):
    function = run_function(
        HUGGING_FACE_API_KEY=TEST_TOKEN,
        HF_ROUTER_URL=router.url,
        MAX_RETRIES="1",
        BACKENDS="huggingface,demo",
        DEMO_STEP_SECONDS="0.1",
        IMAGE_DIR=str(tmp_path),
        # Sit out the provider's 1 s wait (rather than fail over at once), to see the retry said.
        FAILOVER_WAIT_SECONDS="5",
    )
    router.reply_error(503, "Service Unavailable", {"Retry-After": "1"})
    router.reply_error(500, "boom")
    page.goto(function.url)
    page.evaluate(RECORD_PHASES)
    generate(page, "a fox")
    expect(page.locator("#meta")).to_have_text("demo · placeholder")
    phases = [p for p in page.evaluate("window.phases") if p]
    assert phases[2:6] == [
        "Asking hf-inference (stabilityai/stable-diffusion-3-medium-diffusers)…",
        "Provider busy, retrying in 1 s",
        "Asking hf-inference (stabilityai/stable-diffusion-3-medium-diffusers)…",
        "Trying demo instead",
    ]
    assert phases[6:] == ["Asking demo (placeholder)…", *(f"Waiting for the model: step {n} of 4" for n in range(1, 5))]


def test_cancel_in_the_page_stops_the_work_on_the_server(page, demo):
    function = demo(DEMO_STEP_SECONDS="3")
    page.goto(function.url)
    generate(page, "never mind")
    expect(page.locator("#phase")).to_have_text("Asking demo (placeholder)…")
    page.click("#cancel")
    expect(page.locator("#status")).to_have_text("Cancelled.")

    def post_lines():
        return [json.loads(line) for line in function.log().splitlines() if '"requestMethod": "POST"' in line]

    # The demo had 12 s of steps to go; its wait ends as soon as the page lets go.
    wait_until(post_lines, 5, "the cancelled request's log line")
    entry = post_lines()[0]
    assert entry["httpRequest"]["status"] == 499 and entry["imagegen"]["code"] == "cancelled"


def test_a_server_without_backends_says_so_before_generate(page, run_function, tmp_path):
    # No key, and (as on a deployment without requirements-local.txt) no local model either.
    function = run_function(source="tests/no_local_main.py", IMAGE_DIR=str(tmp_path))
    page.goto(function.url)
    expect(page.locator("#notice")).to_contain_text("This server has no API key or local model configured")
    expect(page.locator("#generate")).to_be_disabled()
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "page-not-configured.png"))


def test_field_errors_use_the_label_mark_the_field_and_take_focus(page, function, router):
    page.goto(function.url)
    page.click("#options summary")
    page.fill("#guidance", "31")
    generate(page, "a fox")
    expect(page.locator("#error")).to_have_text("Guidance must be a number from 0 to 30.")
    expect(page.locator("#guidance")).to_have_attribute("aria-invalid", "true")
    expect(page.locator("#guidance")).to_be_focused()
    assert router.posts() == []  # checked in the browser: nothing was sent
    page.fill("#guidance", "")
    page.fill("#seed", "1.5")
    page.click("#generate")
    expect(page.locator("#error")).to_have_text("Seed must be a whole number from 0 to 4294967295.")
    expect(page.locator("#seed")).to_be_focused()
    expect(page.locator("#guidance")).not_to_have_attribute("aria-invalid", "true")

    # A field the server refuses is named the same way.
    page.fill("#seed", "")
    page.evaluate("() => { const g = document.getElementById('guidance'); g.removeAttribute('max'); }")
    page.fill("#guidance", "31")
    page.click("#generate")
    expect(page.locator("#error")).to_have_text("Guidance must be a number from 0 to 30 (got 31).")
    expect(page.locator("#guidance")).to_be_focused()
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "page-field-error.png"))
    assert router.posts() == []


def test_a_cached_answer_says_from_cache_and_history_survives_a_reload(page, function, router):
    page.goto(function.url)
    page.click("#options summary")
    page.fill("#seed", "5")
    generate(page, "twice")
    expect(page.locator("#history li")).to_have_count(1)
    page.click("#generate")
    expect(page.locator("#history li")).to_have_count(2)
    expect(page.locator("#meta")).to_contain_text("from cache")
    expect(page.locator("#status")).to_contain_text(", from cache.")
    assert len(router.posts()) == 1
    generate(page, "third")
    expect(page.locator("#history li")).to_have_count(3)

    page.reload()
    expect(page.locator("#history li")).to_have_count(3)
    page.locator("#history button").nth(2).click()
    expect(page.locator("#image")).to_have_attribute("alt", "twice")
    expect(page.locator("#meta")).to_contain_text("Seed 5")
    assert page.get_attribute("#image", "src").startswith("data:image/png;base64,")


def test_history_in_session_storage_is_bounded(page, demo):
    function = demo(DEMO_STEP_SECONDS="0", RATE_LIMIT_PER_MINUTE="0")
    page.goto(function.url)
    for n in range(14):
        generate(page, f"image {n}")
        expect(page.locator("#status")).to_contain_text("Done in")
        page.evaluate("document.getElementById('status').textContent = ''")
    saved = page.evaluate("JSON.parse(sessionStorage.getItem('imagegen-history'))")
    assert [entry["prompt"] for entry in saved] == [f"image {n}" for n in range(13, 1, -1)]


def test_phone_shows_the_image_and_its_buttons_without_scrolling(browser, function, router):
    context = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
    page = context.new_page()
    page.goto(function.url)
    page.click("#options summary")
    page.select_option("#size", "1024x1024")
    generate(page, "a tall lighthouse on a phone")
    expect(page.locator("#status")).to_contain_text("Done in")
    expect(page.locator("#result")).to_be_focused()
    for selector in ("#image", "#download", "#reuse-seed"):
        assert in_viewport(page, selector), selector
    context.close()


# Contrast ratio (WCAG 2.x) of an element's text against what is behind it, both read from
# computed styles: the background is every ancestor's background colour composited.
CONTRAST = """el => {
  const parse = (c) => { const m = c.match(/[\\d.]+/g).map(Number); return [m[0], m[1], m[2], m.length > 3 ? m[3] : 1]; };
  const over = (top, bottom) => [0, 1, 2].map((i) => top[i] * top[3] + bottom[i] * (1 - top[3])).concat(1);
  const layers = [];
  for (let node = el; node; node = node.parentElement) layers.push(parse(getComputedStyle(node).backgroundColor));
  let background = [255, 255, 255, 1];
  for (const layer of layers.reverse()) background = over(layer, background);
  const text = over(parse(getComputedStyle(el).color), background);
  const lum = (c) => { const [r, g, b] = c.slice(0, 3).map((v) => { v /= 255; return v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4; }); return 0.2126 * r + 0.7152 * g + 0.0722 * b; };
  const [a, b] = [lum(text), lum(background)].sort((x, y) => y - x);
  return (a + 0.05) / (b + 0.05);
}"""


@pytest.mark.parametrize("scheme", ["light", "dark"])
def test_error_warning_and_help_text_meet_wcag_aa(browser, demo, scheme):
    function = demo(DEMO_STEP_SECONDS="0")
    context = browser.new_context(color_scheme=scheme)
    page = context.new_page()
    page.goto(function.url)
    generate(page, "contrast")
    expect(page.locator("#warning")).to_be_visible()
    page.evaluate("() => { const n = document.getElementById('notice'); n.textContent = 'A notice'; n.hidden = false; }")
    page.fill("#prompt", "")
    page.click("#generate")
    expect(page.locator("#error")).to_be_visible()
    for selector in ("#error", "#warning", "#notice", "#prompt-help", "#meta", ".lede", "#status"):
        ratio = page.eval_on_selector(selector, CONTRAST)
        assert ratio >= 4.5, f"{selector} in {scheme} mode: {ratio:.2f}:1"
    context.close()


@pytest.mark.parametrize("scheme", ["light", "dark"])
@pytest.mark.parametrize("viewport", [{"width": 1280, "height": 900}, {"width": 390, "height": 844}], ids=["desktop", "phone"])
def test_screenshots(browser, demo, scheme, viewport):
    """For a person to look at: test-artifacts/page-{desktop,phone}-{light,dark}-{progress,result}.png."""
    function = demo(DEMO_STEP_SECONDS="1")
    phone = viewport["width"] < 500
    context = browser.new_context(viewport=viewport, color_scheme=scheme, is_mobile=phone, has_touch=phone)
    page = context.new_page()
    page.goto(function.url)
    expect(page.locator("#server")).to_be_visible()
    name = f"page-{'phone' if phone else 'desktop'}-{scheme}"
    ARTIFACTS.mkdir(exist_ok=True)
    generate(page, "A lighthouse at dusk, oil painting")
    expect(page.locator("#phase")).to_have_text("Waiting for the model: step 1 of 4", timeout=10_000)
    page.screenshot(path=str(ARTIFACTS / f"{name}-progress.png"))
    expect(page.locator("#status")).to_contain_text("Done in", timeout=15_000)
    page.screenshot(path=str(ARTIFACTS / f"{name}-result.png"))
    context.close()


RECORD_PREVIEWS = """() => {
  window.previews = [];
  const image = document.getElementById("image");
  new MutationObserver(() => {
    if (image.classList.contains("partial") && image.src !== window.previews.at(-1)) window.previews.push(image.src);
  }).observe(image, {attributes: true, attributeFilter: ["src", "class"]});
}"""


def test_partial_images_show_while_the_image_is_made(page, demo):
    from imagegen.backends.demo import placeholder_png

    function = demo()
    page.goto(function.url)
    page.evaluate(RECORD_PREVIEWS)
    generate(page, "A lighthouse, step by step")
    expect(page.locator("#image.partial")).to_be_visible()
    expect(page.locator("#phase")).to_be_visible()  # the phase stays on top of the preview
    expect(page.locator("#status")).to_contain_text("Done in")
    previews = page.evaluate("window.previews")
    # The demo draws its placeholder labelled with the step: steps 1-3 of 4, then the image.
    assert len(previews) == 3 and all(p.startswith("data:image/png;base64,") for p in previews)
    from io import BytesIO

    from PIL import Image

    size = Image.open(BytesIO(base64.b64decode(previews[0].split(",", 1)[1]))).size
    expected = [placeholder_png(*size, f"step {step} of 4: A lighthouse, step by step") for step in (1, 2, 3)]
    assert [base64.b64decode(p.split(",", 1)[1]) for p in previews] == expected
    expect(page.locator("#image")).not_to_have_class("partial")
    assert page.eval_on_selector("#image", "el => el.src") not in previews
    expect(page.locator("#meta")).to_have_text("demo · placeholder")
    assert page.problems == []
