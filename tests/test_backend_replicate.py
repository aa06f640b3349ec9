"""The `replicate` backend against the Replicate stand-in (tests/fake_replicate.py), through a
Dispatcher: wire format, sizes, polling and progress, cancel, every error class, retries with
Replicate's hint (fake clock), failover with Hugging Face both ways, and the real function."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator

import pytest
import requests
from PIL import Image

from imagegen.backends.replicate import build_input
from imagegen.domain import GenerationRequest
from imagegen.errors import Cancelled, ConfigurationError, UpstreamError
from tests import fake_replicate
from tests.clients import BackendsClient
from tests.conftest import TEST_TOKEN
from tests.fake_replicate import FakeReplicate
from tests.fake_router import Reply as RouterReply
from tests.standin import Reply

TOKEN = "r8_ReplicateTokenThatMustNeverLeak42"
SCHNELL = "black-forest-labs/flux-schnell"
VERSION = "5599ed30703defd1d160a25a63321b4dec97101d98b4674bcc56e41f62f35637"
FLUX_LOGS = "Using seed: 7\n  0%|          | 0/4 [00:00<?, ?it/s]\n 25%|██▌       | 1/4\n 75%|███████▌  | 3/4\n"


@pytest.fixture
def replicate() -> Iterator[FakeReplicate]:
    with FakeReplicate(TOKEN) as server:
        yield server


@pytest.fixture
def client_for(make_settings, replicate, clock):
    def make(**env: str) -> BackendsClient:
        base = {
            "BACKENDS": "replicate",
            "REPLICATE_API_TOKEN": TOKEN,
            "REPLICATE_BASE_URL": replicate.base_url,
            "MAX_RETRIES": "0",
        }
        return BackendsClient(make_settings(**{**base, **env}), timing=clock.timing())

    return make


def image_size(png: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(png)) as image:
        assert image.format == "PNG"
        return image.size


def created(server: FakeReplicate) -> dict:
    (call,) = server.calls()
    return call.json()


def failure(client: BackendsClient, request: GenerationRequest | None = None) -> UpstreamError:
    with pytest.raises(UpstreamError) as caught:
        client.generate(request or GenerationRequest(prompt="a fox"))
    assert TOKEN not in caught.value.message and TOKEN not in str(caught.value)
    return caught.value


# --- the wire format ------------------------------------------------------------------------


def test_flux_schnell_wire_format_and_answer(client_for, replicate):
    request = GenerationRequest(
        prompt="a red fox", width=1024, height=576, steps=4, seed=7, negative_prompt="blur", guidance_scale=3.5
    )
    image = client_for().generate(request)

    (call,) = replicate.calls()
    assert call.path == f"/v1/models/{SCHNELL}/predictions"
    assert call.header("Authorization") == f"Bearer {TOKEN}"
    assert call.header("Prefer") == "wait=60"  # TIMEOUT_SECONDS 120 leaves room for the whole wait
    assert call.header("Cancel-After") == "150s"  # the request's deadline, as Replicate's backstop
    assert call.json() == {
        "input": {
            "prompt": "a red fox",
            "aspect_ratio": "16:9",
            "megapixels": "1",
            "num_inference_steps": 4,
            "seed": 7,
            "go_fast": False,  # seeds reproduce only on the bf16 path
            "num_outputs": 1,
            "output_format": "png",
        }
    }
    (download,) = [r for r in replicate.requests if r.path.startswith("/cdn/")]
    assert download.header("Authorization") is None and download.path.endswith(".png")
    assert image_size(image.png) == (64, 36)  # the stand-in's 16:9
    assert (image.route.backend, image.route.model, image.seed) == ("replicate", SCHNELL, 7)
    assert image.ignored == ("negativePrompt", "guidanceScale")


def test_without_a_seed_go_fast_is_left_to_the_model(client_for, replicate):
    client_for().generate(GenerationRequest(prompt="a fox"))
    assert created(replicate)["input"] == {"prompt": "a fox", "num_outputs": 1, "output_format": "png"}


@pytest.mark.parametrize(
    ("width", "height", "ratio", "megapixels"),
    [
        (1024, 1024, "1:1", "1"),
        (512, 512, "1:1", "0.25"),
        (768, 1024, "3:4", "1"),
        (1344, 768, "16:9", "1"),
        (1536, 640, "21:9", "1"),
        (2048, 256, "21:9", "1"),
        (256, 2048, "9:21", "1"),
        (512, 640, "4:5", "0.25"),
    ],
)
def test_sizes_map_to_the_nearest_flux_ratio_and_megapixels(width, height, ratio, megapixels):
    given, dropped = build_input(GenerationRequest(prompt="x", width=width, height=height), SCHNELL)
    assert (given["aspect_ratio"], given["megapixels"], dropped) == (ratio, megapixels, ())


def test_one_side_alone_means_a_square():
    given, _ = build_input(GenerationRequest(prompt="x", width=768), SCHNELL)
    assert given["aspect_ratio"] == "1:1"


def test_steps_outside_the_models_range_are_not_sent_and_reported(client_for, replicate):
    image = client_for().generate(GenerationRequest(prompt="a fox", steps=28, seed=1))
    assert "num_inference_steps" not in created(replicate)["input"]
    assert image.ignored == ("steps",)


def test_flux_dev_takes_steps_and_guidance_within_its_range():
    given, dropped = build_input(GenerationRequest(prompt="x", steps=28, guidance_scale=3.5, seed=2), "black-forest-labs/flux-dev")
    assert (given["num_inference_steps"], given["guidance"], given["go_fast"], dropped) == (28, 3.5, False, ())
    given, dropped = build_input(GenerationRequest(prompt="x", guidance_scale=12), "black-forest-labs/flux-dev")
    assert "guidance" not in given and dropped == ("guidanceScale",)


def test_flux_pro_gets_a_custom_size_in_multiples_of_32():
    given, _ = build_input(GenerationRequest(prompt="x", width=2048, height=1152, seed=3), "black-forest-labs/flux-1.1-pro")
    assert given == {"prompt": "x", "aspect_ratio": "custom", "width": 1440, "height": 800, "seed": 3, "output_format": "png"}
    given, _ = build_input(GenerationRequest(prompt="x", width=2048, height=256), "black-forest-labs/flux-1.1-pro")
    assert (given["width"], given["height"]) == (1440, 256)


def test_a_pinned_version_goes_to_the_predictions_endpoint_with_sdxl_names(client_for, replicate):
    model = f"stability-ai/sdxl:{VERSION}"
    client = client_for(REPLICATE_MODEL=model)
    request = GenerationRequest(prompt="a fox", negative_prompt="blur", width=768, height=512, steps=30, guidance_scale=7.5, seed=9)
    image = client.generate(request)
    (call,) = replicate.calls()
    assert call.path == "/v1/predictions"
    assert call.json() == {
        "version": VERSION,
        "input": {
            "prompt": "a fox", "negative_prompt": "blur", "width": 768, "height": 512,
            "num_inference_steps": 30, "guidance_scale": 7.5, "seed": 9, "num_outputs": 1,
        },
    }
    assert (image.seed, image.ignored) == (9, ())
    assert VERSION in client.dispatcher.backends["replicate"].identity()


def test_an_unknown_model_gets_the_common_fields_and_no_seed_promise(client_for, replicate):
    client = client_for(REPLICATE_MODEL="someone/new-model")
    image = client.generate(GenerationRequest(prompt="a fox", width=512, height=768, seed=4, steps=20))
    assert replicate.calls()[0].path == "/v1/models/someone/new-model/predictions"
    assert created(replicate)["input"] == {"prompt": "a fox", "width": 512, "height": 768, "seed": 4}
    assert image.seed is None and image.ignored == ("steps",)  # the service adds "seed" to the warning


def test_identity_is_per_endpoint_and_account_never_the_token(make_settings, replicate):
    def identity(**env: str) -> str:
        settings = make_settings(BACKENDS="replicate", REPLICATE_BASE_URL=replicate.base_url, **env)
        return BackendsClient(settings).dispatcher.backends["replicate"].identity()

    first = identity(REPLICATE_API_TOKEN=TOKEN)
    assert first.startswith(f"replicate {replicate.base_url} ") and TOKEN not in first
    assert first != identity(REPLICATE_API_TOKEN=TOKEN + "x")
    assert first == identity(REPLICATE_API_TOKEN=TOKEN)


# --- polling, progress, cancel --------------------------------------------------------------


def test_a_slow_prediction_is_polled_with_progress(client_for, replicate, clock):
    replicate.reply(fake_replicate.finish_later(polls=2, logs=FLUX_LOGS))
    client = client_for()
    image = client.generate(GenerationRequest(prompt="a fox", seed=1))
    polls = [r for r in replicate.requests if r.method == "GET" and r.path.startswith("/v1/predictions/")]
    assert len(polls) == 3 and all(r.header("Authorization") == f"Bearer {TOKEN}" for r in polls)
    progress = [fields for event, fields in client.events if event == "progress"]
    assert progress == [{"step": 3, "steps": 4, "fraction": 0.75}] * 3  # the documented shape, from "3/4"
    assert clock.sleeps == [0.5, 0.75, 1.125]  # 0.5 s, slowing towards 2 s
    assert image_size(image.png) == (64, 64)


def test_a_running_prediction_with_a_foreign_poll_url_is_not_followed(client_for, replicate):
    with FakeReplicate(TOKEN) as elsewhere:
        replicate.reply(Reply(201, {
            "id": "abc123", "status": "processing", "output": None, "error": None, "logs": "",
            "urls": {"get": f"{elsewhere.url}/v1/predictions/abc123", "cancel": f"{elsewhere.url}/v1/predictions/abc123/cancel"},
        }))
        error = failure(client_for())
        assert elsewhere.requests == []  # the token never goes to another host
    assert error.code == "upstream_bad_response" and "urls.get" in error.message


def test_the_caller_going_away_cancels_the_prediction(client_for, replicate):
    replicate.reply(fake_replicate.never_finish(logs=" 50%|█████     | 2/4\n"))
    client = client_for()
    client.progress = lambda event, **fields: client.cancelled.set() if event == "progress" else None
    with pytest.raises(Cancelled):
        client.generate(GenerationRequest(prompt="a fox"))
    (prediction_id,) = replicate.predictions
    assert replicate.canceled == [prediction_id]
    assert replicate.predictions[prediction_id].status == "canceled"


def test_the_deadline_passing_while_polling_cancels_and_times_out(client_for, replicate, clock):
    replicate.reply(fake_replicate.never_finish(logs=" 50%|█████     | 2/4\n"))
    client = client_for(DEADLINE_SECONDS="6")
    error = failure(client)
    assert (error.status, error.code) == (504, "upstream_timeout")
    assert "DEADLINE_SECONDS=6" in error.message and "canceled" in error.message
    assert replicate.canceled == list(replicate.predictions)
    assert sum(clock.sleeps) <= 6
    assert {"step": 2, "steps": 4, "fraction": 0.5} in [f for e, f in client.events if e == "progress"]


def test_the_wait_is_bounded_by_the_time_left(client_for, replicate):
    client_for(TIMEOUT_SECONDS="20", DEADLINE_SECONDS="30").generate(GenerationRequest(prompt="a fox"))
    (call,) = replicate.calls()
    assert (call.header("Prefer"), call.header("Cancel-After")) == ("wait=18", "30s")


def test_a_short_timeout_still_waits_at_least_a_second(client_for, replicate):
    client_for(TIMEOUT_SECONDS="2").generate(GenerationRequest(prompt="a fox"))
    assert replicate.calls()[0].header("Prefer") == "wait=1"


# --- refusals and failures ------------------------------------------------------------------


@pytest.mark.parametrize("within_wait", [True, False])
def test_an_nsfw_failure_is_content_rejected_and_never_downloaded(client_for, replicate, within_wait):
    replicate.reply(fake_replicate.fail_nsfw(within_wait=within_wait))
    error = failure(client_for())
    assert (error.status, error.code) == (422, "content_rejected")
    assert "NSFW content detected" in error.message and "backend replicate" in error.message
    assert not [r for r in replicate.requests if r.path.startswith("/cdn/")]


def test_a_sensitive_flag_is_content_rejected_too(client_for, replicate):
    replicate.reply(fake_replicate.fail("The input or output was flagged as sensitive. Please try again with different inputs. (E005)"))
    assert failure(client_for()).code == "content_rejected"


def test_a_failed_prediction_is_generation_failed_and_not_retried(client_for, replicate, clock):
    replicate.reply(fake_replicate.fail(f"CUDA out of memory (token {TOKEN})"))
    error = failure(client_for(MAX_RETRIES="3"))
    assert (error.status, error.code) == (502, "generation_failed")
    assert "CUDA out of memory" in error.message and len(replicate.calls()) == 1 and clock.sleeps == []


def test_canceled_and_aborted_predictions_say_so(client_for, replicate):
    replicate.reply(fake_replicate.end_as("canceled"), fake_replicate.end_as("aborted"))
    client = client_for()
    canceled = failure(client)
    assert canceled.code == "generation_failed" and "canceled on Replicate" in canceled.message
    aborted = failure(client)
    assert (aborted.code, aborted.retryable, aborted.fail_over) == ("upstream_unavailable", True, True)
    assert "aborted" in aborted.message


def test_a_succeeded_prediction_without_an_image_url(client_for, replicate):
    replicate.reply(Reply(plan=fake_replicate.Outcome(output=[42])))
    assert failure(client_for()).code == "upstream_bad_response"


# --- HTTP errors ----------------------------------------------------------------------------


def test_a_wrong_token_is_unauthorized_naming_the_variable(make_settings, replicate):
    settings = make_settings(BACKENDS="replicate", REPLICATE_API_TOKEN="r8_WrongToken123456789", REPLICATE_BASE_URL=replicate.base_url)
    with pytest.raises(UpstreamError) as caught:
        BackendsClient(settings).generate(GenerationRequest(prompt="a fox"))
    error = caught.value
    assert (error.status, error.code) == (502, "upstream_unauthorized")
    assert "REPLICATE_API_TOKEN" in error.message and "Replicate status 401" in error.message
    assert "r8_WrongToken" not in error.message


def test_no_token_is_missing_api_key(make_settings, replicate):
    settings = make_settings(BACKENDS="replicate", REPLICATE_BASE_URL=replicate.base_url)
    with pytest.raises(ConfigurationError) as caught:
        BackendsClient(settings).generate(GenerationRequest(prompt="a fox"))
    assert caught.value.code == "missing_api_key" and "REPLICATE_API_TOKEN" in caught.value.message
    assert replicate.requests == []


def test_insufficient_credit(client_for, replicate):
    replicate.reply(fake_replicate.insufficient_credit())
    error = failure(client_for())
    assert (error.code, error.fail_over) == ("upstream_credits_exhausted", False)
    assert "https://replicate.com/account/billing" in error.message and "insufficient credit" in error.message


def test_an_unknown_model_is_not_available_naming_the_variable(client_for, replicate):
    replicate.reply(fake_replicate.not_found())
    error = failure(client_for(REPLICATE_MODEL="nobody/nothing"))
    assert (error.code, error.fail_over) == ("model_not_available", True)
    assert "REPLICATE_MODEL" in error.message and "model nobody/nothing" in error.message


def test_an_unknown_version_is_not_available(client_for, replicate):
    replicate.reply(fake_replicate.invalid_version())
    assert failure(client_for(REPLICATE_MODEL=f"owner/model:{VERSION}")).code == "model_not_available"


def test_invalid_input_is_upstream_rejected_with_the_field(client_for, replicate):
    replicate.reply(fake_replicate.invalid_input("input.num_outputs", "Must be less than or equal to 4"))
    error = failure(client_for())
    assert (error.status, error.code) == (502, "upstream_rejected")
    assert "Input validation failed: input.num_outputs: Must be less than or equal to 4" in error.message


def test_a_rate_limit_is_retried_after_the_bodys_retry_after(client_for, replicate, clock):
    replicate.reply(fake_replicate.problem(429, "Request was throttled.", "Your rate limit resets in ~3s.",
                                           {"Retry-After": "9"}, retry_after=3))
    image = client_for(MAX_RETRIES="2").generate(GenerationRequest(prompt="a fox"))
    assert clock.sleeps == [3] and len(replicate.calls()) == 2 and image.png


def test_a_rate_limit_past_the_deadline_answers_429_with_retry_after(client_for, replicate, clock):
    replicate.reply(fake_replicate.throttled(retry_after=300))
    error = failure(client_for(MAX_RETRIES="2"))
    assert (error.status, error.code, error.headers["Retry-After"]) == (429, "upstream_rate_limited", "300")
    assert clock.sleeps == [] and "300 seconds" in error.message


def test_server_errors_are_retried_then_fail_over(client_for, replicate, clock):
    replicate.reply(fake_replicate.server_error(), fake_replicate.server_error())
    error = failure(client_for(MAX_RETRIES="1"))
    assert (error.code, error.retryable, error.fail_over) == ("upstream_unavailable", True, True)
    assert len(replicate.calls()) == 2 and clock.sleeps == [0.75]


# --- failover with Hugging Face -------------------------------------------------------------


@pytest.fixture
def both_for(make_settings, replicate, router, clock):
    def make(order: str) -> BackendsClient:
        settings = make_settings(
            BACKENDS=order,
            REPLICATE_API_TOKEN=TOKEN,
            REPLICATE_BASE_URL=replicate.base_url,
            HF_ROUTER_URL=router.url,
            MAX_RETRIES="0",
        )
        return BackendsClient(settings, timing=clock.timing())

    return make


def test_replicate_fails_over_to_hugging_face(both_for, replicate, router):
    replicate.reply(fake_replicate.server_error())
    client = both_for("replicate,huggingface")
    image = client.generate(GenerationRequest(prompt="a fox", width=512, height=256, seed=3))
    assert (image.route.backend, image_size(image.png)) == ("huggingface", (512, 256))
    failovers = [fields for name, fields in client.events if name == "failover"]
    assert [(f["from"], f["to"].split("/")[0]) for f in failovers] == [("replicate", "huggingface")]
    assert router.posts()[0].headers["Authorization"] == f"Bearer {TEST_TOKEN}"  # each backend its own key


def test_hugging_face_fails_over_to_replicate(both_for, replicate, router):
    router.reply_error(503, "Service Unavailable")
    image = both_for("huggingface,replicate").generate(GenerationRequest(prompt="a fox", seed=3))
    assert (image.route.backend, image.route.model, image.seed) == ("replicate", SCHNELL, 3)
    assert len(router.posts()) == 1 and len(replicate.calls()) == 1


def test_no_failover_when_credit_runs_out(both_for, replicate, router):
    replicate.reply(fake_replicate.insufficient_credit())
    with pytest.raises(UpstreamError) as caught:
        both_for("replicate,huggingface").generate(GenerationRequest(prompt="a fox"))
    assert caught.value.code == "upstream_credits_exhausted" and router.posts() == []


# --- the real function ----------------------------------------------------------------------


def test_the_function_answers_with_replicate_and_never_shows_the_token(run_function, replicate, tmp_path):
    function = run_function(
        BACKENDS="replicate",
        REPLICATE_API_TOKEN=TOKEN,
        REPLICATE_BASE_URL=replicate.base_url,
        IMAGE_DIR=str(tmp_path / "out"),
    )
    body = {"prompt": "a red fox", "width": 1024, "height": 576, "seed": 5, "negativePrompt": "blur", "steps": 4}
    answer = requests.post(f"{function.url}/api/generate-image", json=body, timeout=30)
    assert answer.status_code == 200, answer.text
    data = answer.json()
    assert (data["backend"], data["model"], data["provider"], data["seed"]) == ("replicate", SCHNELL, None, 5)
    assert (data["width"], data["height"], data["ignored"]) == (64, 36, ["negativePrompt"])
    assert "negativePrompt" in data["warning"]
    png = base64.b64decode(data["imageUrl"].removeprefix("data:image/png;base64,"), validate=True)
    assert image_size(png) == (64, 36)
    assert json.loads(replicate.calls()[0].body)["input"]["go_fast"] is False

    replicate.reply(fake_replicate.fail_nsfw())
    refused = requests.post(f"{function.url}/api/generate-image", json={"prompt": "something else"}, timeout=30)
    assert refused.status_code == 422 and refused.json()["code"] == "content_rejected"
    for text in (answer.text, refused.text, function.log()):
        assert TOKEN not in text
