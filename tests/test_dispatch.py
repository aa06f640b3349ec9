"""The dispatcher's choices between backends, with backends made here (no HTTP): what fails
over and what does not."""

from __future__ import annotations

import pytest

from imagegen.backends.base import GenerationContext
from imagegen.dispatch import Dispatcher
from imagegen.domain import GeneratedImage, GenerationRequest
from imagegen.errors import ContentRejected, UpstreamError
from tests.scripted import ScriptedBackend


def dispatch(dispatcher: Dispatcher, request: GenerationRequest) -> GeneratedImage:
    context = GenerationContext(deadline=float("inf"))
    return dispatcher.generate(request, dispatcher.candidates(request), context)


def refusal() -> ContentRejected:
    return ContentRejected("The prompt was refused by the vendor's safety system.")


def test_a_refusal_is_not_sent_to_another_vendor_by_default():
    first, second = ScriptedBackend("first", [refusal()]), ScriptedBackend("second", [b"png"])
    with pytest.raises(ContentRejected):
        dispatch(Dispatcher({"first": first, "second": second}, max_retries=0), GenerationRequest(prompt="p"))
    assert second.tries == 0


def test_a_refusal_fails_over_when_the_owner_allows_it():
    first, second = ScriptedBackend("first", [refusal()]), ScriptedBackend("second", [b"png"])
    dispatcher = Dispatcher({"first": first, "second": second}, max_retries=0, failover_on_refusal=True)
    assert dispatch(dispatcher, GenerationRequest(prompt="p")).route.backend == "second"


def test_an_error_that_says_fail_over_does_so_whatever_the_refusal_setting():
    broken = UpstreamError("bad answer", code="upstream_bad_response", fail_over=True)
    first, second = ScriptedBackend("first", [broken]), ScriptedBackend("second", [b"png"])
    assert dispatch(Dispatcher({"first": first, "second": second}, max_retries=0), GenerationRequest(prompt="p")).png == b"png"


def test_the_setting_is_read_from_failover_on_refusal():
    from imagegen.config import load_settings

    assert load_settings({}).failover_on_refusal is False
    assert load_settings({"FAILOVER_ON_REFUSAL": "true"}).failover_on_refusal is True
