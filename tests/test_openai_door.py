"""OpenAI's Images API door, called by the official `openai` Python package against the real
function (functions-framework) and the Hugging Face router's stand-in on loopback."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator
from pathlib import Path

import flask
import openai
import pytest
import requests
from PIL import Image

from imagegen.catalog import Catalog, Offer
from imagegen.doors.openai_images import openai_error, parse_images_request
from imagegen.errors import ContentRejected, InvalidRequest, UrlSignatureInvalid
from tests.conftest import TEST_TOKEN
from tests.fake_router import FakeRouter, make_png
from tests.servers import Process, start_function

API_KEY = "openai-door-test-key-0123456789"
HF_MODEL = "black-forest-labs/FLUX.1-schnell"


@pytest.fixture(scope="module")
def router() -> Iterator[FakeRouter]:
    server = FakeRouter(TEST_TOKEN).start()
    yield server
    server.stop()


def function_for(router: FakeRouter, folder: Path, **env: str) -> Process:
    settings = {
        "HUGGING_FACE_API_KEY": TEST_TOKEN,
        "HF_ROUTER_URL": router.url,
        "IMAGE_DIR": str(folder / "images"),
        "AUTH_MODE": "api-key",
        "API_KEYS": API_KEY,
        "CORS_ALLOWED_ORIGINS": "https://app.example.com",
        "HF_ALLOWED_MODELS": HF_MODEL,
        "MAX_RETRIES": "0",
        "RATE_LIMIT_PER_MINUTE": "10000",
        "RATE_LIMIT_BURST": "1000",
        **env,
    }
    return start_function(settings, folder / "function.log")


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("openai-door")


@pytest.fixture(scope="module")
def function(router: FakeRouter, folder: Path) -> Iterator[Process]:
    process = function_for(router, folder)
    yield process
    process.stop()


def client_for(process: Process, key: str = API_KEY, prefix: str = "/v1") -> openai.OpenAI:
    # No retries: each test sees the first answer, as the status decides the exception.
    return openai.OpenAI(base_url=process.url + prefix, api_key=key, max_retries=0, timeout=60)


def decoded(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    image.load()
    return image


def test_sdk_generates_an_image_as_base64(function: Process, router: FakeRouter) -> None:
    result = client_for(function).images.generate(model=HF_MODEL, prompt="a red fox", size="512x512")
    assert len(result.data) == 1
    image = decoded(result.data[0].b64_json)
    assert (image.format, image.size) == ("PNG", (512, 512))
    assert (result.size, result.output_format) == ("512x512", "png")
    assert result.created > 0
    extension = result.model_extra["imagegen"]
    assert extension["failed"] == 0 and extension["images"][0]["backend"] == "huggingface"
    assert router.posts()[-1].path == f"/hf-inference/models/{HF_MODEL}"


@pytest.mark.parametrize("prefix", ["/v1", "", "/some/mount/v1"])
def test_the_door_answers_under_any_prefix(function: Process, prefix: str) -> None:
    result = client_for(function, prefix=prefix).images.generate(prompt="a red fox", size="256x256")
    assert decoded(result.data[0].b64_json).size == (256, 256)


def test_sdk_lists_the_models_offered(function: Process) -> None:
    ids = [model.id for model in client_for(function).models.list()]
    assert HF_MODEL in ids and f"huggingface/{HF_MODEL}" in ids


def test_n_images_with_a_seed_through_extra_body(function: Process, router: FakeRouter) -> None:
    before = len(router.posts())
    result = client_for(function).images.generate(prompt="three foxes", n=3, size="256x256", extra_body={"seed": 41})
    assert len(result.data) == 3
    assert [image["seed"] for image in result.model_extra["imagegen"]["images"]] == [41, 42, 43]
    sent = sorted(post.json()["parameters"]["seed"] for post in router.posts()[before:])
    assert sent == [41, 42, 43]


def test_unknown_and_unusable_fields_are_listed_not_dropped(function: Process) -> None:
    raw = client_for(function).images.with_raw_response.generate(
        prompt="a red fox", size="256x256", style="vivid", extra_body={"sharpness": 3}
    )
    result = raw.parse()
    listed = raw.headers["X-Imagegen-Ignored"].split(", ")
    assert {"sharpness", "style"} <= set(listed)
    assert result.model_extra["imagegen"]["ignored"] == listed


def test_a_bad_request_is_a_bad_request_error_naming_the_models(function: Process) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client_for(function).images.generate(model="dall-e-9", prompt="a red fox")
    error = caught.value.body
    assert caught.value.status_code == 400
    assert (error["code"], error["param"], error["type"]) == ("model_not_allowed", "model", "invalid_request_error")
    assert HF_MODEL in error["message"]


def test_a_wrong_key_is_an_authentication_error(function: Process) -> None:
    with pytest.raises(openai.AuthenticationError) as caught:
        client_for(function, key="not-the-key-0123456789").images.generate(prompt="a red fox")
    assert caught.value.body["code"] == "unauthorized"
    with pytest.raises(openai.AuthenticationError):
        client_for(function, key="not-the-key-0123456789").models.list()


def test_an_upstream_failure_is_an_internal_server_error(function: Process, router: FakeRouter) -> None:
    router.reply_error(500, "Internal Server Error")
    with pytest.raises(openai.InternalServerError) as caught:
        client_for(function).images.generate(prompt="a red fox", size="256x256")
    assert caught.value.status_code == 502
    assert caught.value.body["type"] == "server_error"


def test_some_of_n_failing_answers_with_those_made(function: Process, router: FakeRouter) -> None:
    router.reply_error(500, "Internal Server Error")
    raw = client_for(function).images.with_raw_response.generate(prompt="two foxes", n=2, size="256x256")
    result = raw.parse()
    assert len(result.data) == 1
    assert raw.headers["X-Imagegen-Failed"] == "1"
    assert result.model_extra["imagegen"]["failed"] == 1
    assert result.model_extra["imagegen"]["errors"][0]["code"] == "upstream_unavailable"


def test_rate_limited_is_a_rate_limit_error_with_retry_after(router: FakeRouter, tmp_path: Path) -> None:
    process = function_for(router, tmp_path, RATE_LIMIT_PER_MINUTE="1", RATE_LIMIT_BURST="2")
    try:
        with pytest.raises(openai.RateLimitError) as caught:
            client_for(process).images.generate(prompt="three foxes", n=3, size="256x256")
        assert int(caught.value.response.headers["Retry-After"]) >= 1
        assert caught.value.body["type"] == "rate_limit_error"
    finally:
        process.stop()


def test_an_image_refused_at_admission_gives_back_the_budget_of_the_others(router: FakeRouter, tmp_path: Path) -> None:
    process = function_for(router, tmp_path, DAILY_IMAGE_LIMIT="3")
    try:
        client = client_for(process)
        assert len(client.images.generate(prompt="two foxes", n=2, size="256x256").data) == 2
        with pytest.raises(openai.RateLimitError) as caught:
            client.images.generate(prompt="two more foxes", n=2, size="256x256")
        assert caught.value.body["code"] == "budget_exhausted"
        # The first of the refused pair was admitted, then given back: one unit is still left.
        assert len(client.images.generate(prompt="a last fox", size="256x256").data) == 1
    finally:
        process.stop()


@pytest.mark.parametrize("fmt, pillow", [("jpeg", "JPEG"), ("webp", "WEBP")])
def test_output_format_is_converted_and_stored_in_that_format(function: Process, folder: Path, fmt: str, pillow: str) -> None:
    result = client_for(function).images.generate(
        prompt=f"a {fmt} fox", size="256x256", output_format=fmt, output_compression=40
    )
    assert result.output_format == fmt
    assert decoded(result.data[0].b64_json).format == pillow
    path = Path(result.model_extra["imagegen"]["images"][0]["filePath"])
    assert path.suffix == ".png" and path.exists()  # the PNG as made, with its parameters
    converted = list(path.parent.glob(f"{path.stem}-{fmt}40.{fmt}"))
    assert len(converted) == 1 and Image.open(converted[0]).format == pillow


def test_a_seeded_repeat_serves_the_stored_conversion(function: Process, router: FakeRouter) -> None:
    client = client_for(function)
    ask = dict(prompt="a cached jpeg fox", size="256x256", output_format="jpeg", extra_body={"seed": 7})
    first = client.images.generate(**ask)
    before = len(router.posts())
    again = client.images.generate(**ask)
    assert len(router.posts()) == before  # nothing generated again
    assert again.model_extra["imagegen"]["images"][0]["cached"] is True
    assert again.data[0].b64_json == first.data[0].b64_json
    other = client.images.generate(**{**ask, "output_compression": 10})
    assert base64.b64decode(other.data[0].b64_json) != base64.b64decode(first.data[0].b64_json)


def test_response_format_url_is_a_signed_url_the_function_serves(function: Process) -> None:
    result = client_for(function).images.generate(prompt="a linked fox", size="256x256", response_format="url")
    url = result.data[0].url
    assert url.startswith(function.url + "/v1/images/files/") and result.data[0].b64_json is None
    fetched = requests.get(url, timeout=10)
    assert fetched.status_code == 200 and fetched.headers["Content-Type"] == "image/png"
    assert Image.open(io.BytesIO(fetched.content)).size == (256, 256)
    forged = requests.get(url[:-4] + ("0000" if not url.endswith("0000") else "1111"), timeout=10)
    assert (forged.status_code, forged.json()["code"]) == (403, "invalid_signature")


def test_a_url_expires(tmp_path: Path) -> None:
    from imagegen.doors.image_files import LocalFileUrls
    from imagegen.png_info import PngParts
    from imagegen.storage import ImageMetadata, LocalImageStore

    store = LocalImageStore(tmp_path, 10)
    store.save(PngParts.of(make_png(8, 8)), "seeded/a-fox-1234", ImageMetadata("m", "a fox", 1))
    now = [1_000_000.0]
    urls = LocalFileUrls(store, b"k" * 32, 60, clock=lambda: now[0])
    url = urls.url("http://h/v1", "seeded/a-fox-1234", "png")
    path, query = url.removeprefix("http://h").split("?")
    app = flask.Flask(__name__)
    with app.test_request_context(path + "?" + query):
        assert urls.serve(flask.request, None).status_code == 200
        now[0] += 61
        with pytest.raises(UrlSignatureInvalid) as caught:
            urls.serve(flask.request, None)
    assert caught.value.code == "url_expired"


# --- the request and the error shape, without a server ---------------------------------------

CATALOG = Catalog((Offer("huggingface", HF_MODEL, (HF_MODEL, "stabilityai/sd-turbo"), (), "HF_ALLOWED_MODELS", None),
                   Offer("openai", "gpt-image-2", ("gpt-image-2",), (), "OPENAI_ALLOWED_MODELS", None)))  # fmt: skip


def parse(**fields) -> object:
    return parse_images_request(json.dumps(fields).encode(), CATALOG, 2000)


def test_model_picks_the_backend() -> None:
    assert (parse(prompt="x", model="gpt-image-2").generation.model) == "gpt-image-2"
    named = parse(prompt="x", model="huggingface/stabilityai/sd-turbo").generation
    assert (named.backend, named.model) == ("huggingface", "stabilityai/sd-turbo")
    assert parse(prompt="x", model="openai").generation.backend == "openai"
    unnamed = parse(prompt="x").generation
    assert (unnamed.backend, unnamed.model) == (None, None)


@pytest.mark.parametrize(
    "size, expected",
    [("1024x1024", (1024, 1024)), ("1536x1024", (1536, 1024)), ("4096x2048", (2048, 1024)), ("100x100", (256, 256)),
     ("1000x333", (1000, 336)), ("auto", (None, None))],
)  # fmt: skip
def test_size_maps_into_what_the_backends_take(size: str, expected: tuple) -> None:
    generation = parse(prompt="x", size=size).generation
    assert (generation.width, generation.height) == expected


@pytest.mark.parametrize("fields, param", [({"n": 11}, "n"), ({"size": "big"}, "size"), ({"output_format": "gif"}, "output_format"),
                                           ({"output_compression": 101}, "output_compression"), ({"seed": -1}, "seed")])  # fmt: skip
def test_bad_fields_name_their_param(fields: dict, param: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse(prompt="x", **fields)
    assert caught.value.field == param


def test_a_refusal_is_a_content_policy_violation() -> None:
    error = openai_error(ContentRejected("The vendor's safety system refused the prompt."), "req")["error"]
    assert (error["code"], error["type"]) == ("content_policy_violation", "invalid_request_error")


def test_usage_is_what_the_vendor_reported_summed_over_the_images(tmp_path: Path) -> None:
    from tests.fake_openai import FakeOpenAI

    key = "sk-proj-OpenAIKeyThatMustNeverLeak0123456789"
    with FakeOpenAI(key) as vendor:
        process = start_function(
            {"BACKENDS": "openai", "OPENAI_API_KEY": key, "OPENAI_BASE_URL": vendor.base_url, "OPENAI_MODEL": "gpt-image-2",
             "IMAGE_DIR": str(tmp_path / "images"), "MAX_RETRIES": "0"},
            tmp_path / "function.log",
        )  # fmt: skip
        try:
            client = openai.OpenAI(base_url=process.url + "/v1", api_key="any", max_retries=0, timeout=60)
            result = client.images.generate(model="gpt-image-2", prompt="a red fox", n=2, size="1024x1024")
        finally:
            process.stop()
    assert len(result.data) == 2
    # The stand-in counts 12 input and 1056 output tokens per image (one image per call).
    assert (result.usage.input_tokens, result.usage.output_tokens, result.usage.total_tokens) == (24, 2112, 2136)
    assert decoded(result.data[0].b64_json).size == (1024, 1024)


def test_a_cached_image_is_answered_as_a_url_too(function: Process) -> None:
    client = client_for(function)
    ask = dict(prompt="a cached linked fox", size="256x256", response_format="url", output_format="webp", extra_body={"seed": 9})
    first, again = client.images.generate(**ask), client.images.generate(**ask)
    assert again.model_extra["imagegen"]["images"][0]["cached"] is True
    assert again.data[0].url is not None and again.data[0].url.split("?")[0] == first.data[0].url.split("?")[0]
    assert requests.get(again.data[0].url, timeout=10).headers["Content-Type"] == "image/webp"
