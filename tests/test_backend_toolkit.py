"""imagegen.backends.toolkit: what every backend shares. The key check, reading an answer as
untrusted input, the readers, polling within the deadline (cancel wakes it), progress; and the
backend options read once, when the backend is built."""

from __future__ import annotations

import base64
import threading
import time

import pytest

from imagegen.backends import openai as openai_backend
from imagegen.backends.base import GenerationContext
from imagegen.backends.toolkit import (
    PollSchedule,
    Progress,
    Unusable,
    b64_image,
    first_b64_image,
    json_object,
    poll_until,
    read_json,
    reading_answer,
    report_progress,
    require_key,
)
from imagegen.backends.vendor import CallContext
from imagegen.config import BackendSettings
from imagegen.errors import BadAnswer, Cancelled, ConfigurationError, ContentRejected, UpstreamError, UpstreamTimeout
from imagegen.retry import Timing
from tests.clients import BackendsClient
from tests.fakes import FakeClock

SECRET = "sk-ToolkitSecretThatMustNeverLeak0123"


def call() -> CallContext:
    return CallContext(openai_backend.VENDOR, "openai", "gpt-image-2", SECRET)


def fake_context(clock: FakeClock, seconds: float = 10.0) -> tuple[GenerationContext, list[tuple[str, dict]]]:
    events: list[tuple[str, dict]] = []
    context = GenerationContext(
        deadline=clock.now + seconds, timing=clock.timing(), progress=lambda event, **fields: events.append((event, fields))
    )
    return context, events


# --- require_key ------------------------------------------------------------------------------


def test_require_key_returns_the_key_or_names_the_variable():
    assert require_key(BackendSettings("x", api_key="k1"), variable="X_API_KEY", what="X key", how="a key") == "k1"
    with pytest.raises(ConfigurationError) as caught:
        require_key(BackendSettings("x"), variable="X_API_KEY", what="X key", how="a key from https://x.example")
    assert caught.value.code == "missing_api_key" and caught.value.status == 500
    assert caught.value.message == "The server has no X key: set X_API_KEY to a key from https://x.example."


# --- reading an answer ------------------------------------------------------------------------


@pytest.mark.parametrize("raise_", [
    lambda: {}["data"],
    lambda: [][0],
    lambda: None + 1,
    lambda: (1).get("x"),
    lambda: int("x"),
    lambda: json_object(b"[" * 100_000 + b"]" * 100_000),
    lambda: (_ for _ in ()).throw(RecursionError()),
    lambda: (_ for _ in ()).throw(Unusable("JSON without images")),
])
def test_every_shape_error_while_reading_is_a_bad_answer_that_fails_over(raise_):
    with pytest.raises(BadAnswer) as caught:
        with reading_answer(call()):
            raise_()
    error = caught.value
    assert isinstance(error, UpstreamError)
    assert (error.status, error.code, error.fail_over, error.retryable) == (502, "upstream_bad_response", True, False)
    assert error.message.startswith("OpenAI answered without a usable image (got ")
    assert "(backend openai, model gpt-image-2)" in error.message


def test_a_bad_answer_says_what_came_without_upstream_text_and_without_the_key():
    with pytest.raises(BadAnswer) as caught:
        with reading_answer(call(), advice="try another provider"):
            {"x": 1}[f"secret {SECRET}"]  # a KeyError carrying upstream text
    assert "unexpected shape (KeyError)" in caught.value.message and SECRET not in caught.value.message
    assert "try another provider" in caught.value.message
    with pytest.raises(BadAnswer) as caught:
        with reading_answer(call()):
            raise Unusable(f"a status {SECRET!r}")
    assert SECRET not in caught.value.message and "[redacted]" in caught.value.message


@pytest.mark.parametrize("error", [ContentRejected("refused"), Cancelled(), UpstreamTimeout("late")])
def test_project_errors_pass_through_unchanged(error):
    with pytest.raises(type(error)) as caught:
        with reading_answer(call()):
            raise error
    assert caught.value is error


def test_other_exceptions_are_not_hidden():
    with pytest.raises(OSError):
        with reading_answer(call()):
            raise OSError("disk")


def test_readers_say_what_came():
    png = b"\x89PNG\r\n\x1a\n"
    assert first_b64_image({"data": [{"b64_json": base64.b64encode(png).decode()}]}) == png
    assert read_json(b'{"a": [1]}') == {"a": [1]}
    for body, said in [
        (b"<!DOCTYPE html><html>", "an HTML page"),
        (b"", "an empty body"),
        (b"{nope", "JSON that cannot be read"),
        (b"[" * 100_000, "JSON nested too deeply"),
        (b"\xff\xfe", "2 bytes that are not an image"),
    ]:
        with pytest.raises(Unusable, match=said):
            read_json(body)
    with pytest.raises(Unusable, match="JSON that is not an object"):
        json_object(b"[1]")
    for answer in ({}, {"data": {}}, {"data": []}, {"data": [1]}, {"data": [{"b64_json": 5}]}, [1], None):
        with pytest.raises(Unusable, match=r"JSON without data\[0\].b64_json"):
            first_b64_image(answer)
    with pytest.raises(Unusable, match="image that is not base64"):
        b64_image("@@@", "image")


# --- progress and polling ---------------------------------------------------------------------


def test_progress_is_the_documented_shape_or_nothing():
    clock = FakeClock()
    context, events = fake_context(clock)
    report_progress(context, Progress(3, 4))
    report_progress(context, Progress(7, 4))  # clamped
    report_progress(context, None)
    report_progress(context, Progress(1, 0))
    assert events == [("progress", {"step": 3, "steps": 4, "fraction": 0.75}), ("progress", {"step": 4, "steps": 4, "fraction": 1.0})]


def test_poll_until_reports_waits_with_the_schedule_and_returns_the_finished_state():
    clock = FakeClock()
    context, events = fake_context(clock)
    states = iter([1, 2, 3])
    result = poll_until(
        0, lambda: next(states), lambda state: state == 3, context, PollSchedule(first=0.5, longest=1.0, growth=1.5),
        too_late=lambda: AssertionError("not late"), progress_of=lambda state: Progress(state, 3),
    )
    assert result == 3
    assert clock.sleeps == [0.5, 0.75, 1.0]
    assert [fields["step"] for _, fields in events] == [0, 1, 2]


def test_poll_until_stops_before_the_deadline_instead_of_waiting_for_nothing():
    clock = FakeClock()
    context, _ = fake_context(clock, seconds=2.0)
    polls = []
    with pytest.raises(UpstreamTimeout):
        poll_until(
            None, lambda: polls.append(1), lambda state: False, context, PollSchedule(first=0.5),
            too_late=lambda: UpstreamTimeout("late"),
        )
    assert sum(clock.sleeps) <= 2.0 and len(polls) == 4


def test_poll_until_wakes_at_once_when_the_caller_leaves():
    context = GenerationContext(deadline=time.monotonic() + 60, timing=Timing())
    threading.Timer(0.05, context.cancelled.set).start()
    started = time.monotonic()
    with pytest.raises(Cancelled):
        poll_until(
            None, lambda: None, lambda state: False, context, PollSchedule(first=30.0),
            too_late=lambda: AssertionError("not late"),
        )
    assert time.monotonic() - started < 5  # not the 30 s interval


# --- options read once, when the backend is built -----------------------------------------------


@pytest.mark.parametrize("env,variable", [
    ({"BACKENDS": "openai", "OPENAI_API_KEY": "sk-abcdefgh12345678", "OPENAI_QUALITY": "very-high"}, "OPENAI_QUALITY"),
    ({"BACKENDS": "demo", "DEMO_STEP_SECONDS": "soon"}, "DEMO_STEP_SECONDS"),
    ({"BACKENDS": "demo", "DEMO_STEP_SECONDS": "31"}, "DEMO_STEP_SECONDS"),
    ({"BACKENDS": "demo", "DEMO_STEP_SECONDS": "nan"}, "DEMO_STEP_SECONDS"),
])
def test_a_bad_option_is_refused_when_the_backend_is_built(make_settings, env, variable):
    settings = make_settings(**env)
    with pytest.raises(ConfigurationError) as caught:
        BackendsClient(settings)
    assert caught.value.code == "invalid_configuration" and variable in caught.value.message


def test_good_options_are_read_once(make_settings):
    client = BackendsClient(make_settings(BACKENDS="openai", OPENAI_API_KEY="sk-abcdefgh12345678", OPENAI_QUALITY=" High "))
    assert client.backends["openai"].identity().endswith("quality=high")
