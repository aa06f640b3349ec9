"""Plain requests share one thread that watches for callers who went away (imagegen.doors.watch):
a thread started per request cost it 0.3 to 3 ms before its upstream call."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest

from imagegen import streaming
from imagegen.doors import json_api
from imagegen.doors.watch import DisconnectWatch
from imagegen.errors import Cancelled


class FakeService:
    def __init__(self) -> None:
        self.calls = 0

    def produce(self, admission, progress=None, cancelled=None):
        self.calls += 1
        if admission.wait_for_cancel:
            if not cancelled.wait(5):
                raise AssertionError("not cancelled within 5 s")
            raise Cancelled()
        return f"image {self.calls}"


def admission(wait_for_cancel: bool = False) -> SimpleNamespace:
    return SimpleNamespace(record=SimpleNamespace(fields={}), wait_for_cancel=wait_for_cancel)


def test_plain_requests_start_no_thread_each(monkeypatch):
    started = []
    original_start = threading.Thread.start

    def counting_start(thread):
        started.append(thread.name)
        original_start(thread)

    monkeypatch.setattr(threading.Thread, "start", counting_start)
    service = FakeService()
    for _ in range(5):
        assert json_api.produce_watching(service, admission(), lambda: False).startswith("image")
    assert len(started) <= 1, started  # the shared watcher, the first time it is needed


def test_a_caller_who_leaves_is_still_cancelled(monkeypatch):
    monkeypatch.setattr(streaming, "DISCONNECT_PROBE_SECONDS", 0.01)
    gone = threading.Event()
    waiting = admission(wait_for_cancel=True)
    gone.set()
    with pytest.raises(Cancelled):
        json_api.produce_watching(FakeService(), waiting, gone.is_set)
    assert waiting.record.fields["clientClosed"] is True


def test_only_the_caller_who_left_is_cancelled():
    watch = DisconnectWatch(interval_seconds=0.01)
    stayed, left = threading.Event(), threading.Event()
    probed = threading.Event()

    def stays() -> bool:
        probed.set()
        return False

    with watch.watching(stays, stayed.set), watch.watching(lambda: True, left.set):
        assert left.wait(5)
        assert probed.wait(5)
    assert not stayed.is_set()


def test_a_request_that_finished_is_not_cancelled_later():
    watch = DisconnectWatch(interval_seconds=0.01)
    gone, cancelled = threading.Event(), threading.Event()
    with watch.watching(gone.is_set, cancelled.set):
        pass
    gone.set()
    # Another watched caller proves the watcher made passes after the first one ended.
    other = threading.Event()
    with watch.watching(lambda: True, other.set):
        assert other.wait(5)
    assert not cancelled.is_set()


def test_a_failing_probe_does_not_stop_the_watcher():
    watch = DisconnectWatch(interval_seconds=0.01)

    def broken() -> bool:
        raise RuntimeError("probe failed")

    left = threading.Event()
    with watch.watching(broken, lambda: None), watch.watching(lambda: True, left.set):
        assert left.wait(5)
