"""WaveSpeed through the router: POST {router}/wavespeed/api/v3/{providerId}.

The answer is a task, {"data": {"id", "status", "urls": {"get": ...}}}: poll that path on the
router until "status" is "completed", then download data.outputs[0]; "failed" carries "error".
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote, urlsplit

from imagegen.backends.huggingface.providers.base import Answer, ImageUrl, PendingTask, TaskFailed, UpstreamCall, hf_style_parameters
from imagegen.backends.toolkit import Unusable, json_object
from imagegen.domain import GenerationRequest

RUNNING_STATUSES = ("created", "processing", "pending", "queued")


class WaveSpeed:
    name = "wavespeed"

    def build(self, request: GenerationRequest, provider_model: str, router_url: str) -> UpstreamCall:
        payload = {"prompt": request.prompt, **hf_style_parameters(request)}
        return UpstreamCall(url=f"{router_url}/wavespeed/api/v3/{quote(provider_model, safe='/')}", json=payload)

    def read_answer(self, body: bytes, content_type: str) -> Answer:
        return self.read_task(body) or self._pending(json_object(body))

    def read_task(self, body: bytes) -> Answer | None:
        data = _data(json_object(body))
        status = data.get("status")
        if status == "completed":
            outputs = data.get("outputs")
            if not isinstance(outputs, list) or not outputs or not isinstance(outputs[0], str):
                raise Unusable("a completed task without an output URL")
            return ImageUrl(outputs[0])
        if status == "failed":
            raise TaskFailed(str(data.get("error") or "the task failed"))
        if status in RUNNING_STATUSES:
            return None
        raise Unusable(f"a task with unknown status {str(status)[:200]!r}")

    def _pending(self, answer: dict[str, Any]) -> PendingTask:
        urls = _data(answer).get("urls")
        get_url = urls.get("get") if isinstance(urls, dict) else None
        if not isinstance(get_url, str) or not get_url:
            raise Unusable('a task without "urls"."get"')
        # Only the path is kept: polling goes to the router, wherever the URL pointed.
        return PendingTask(poll_path=urlsplit(get_url).path)


def _data(answer: dict[str, Any]) -> dict[str, Any]:
    data = answer.get("data")
    if not isinstance(data, dict):
        raise Unusable('JSON without a "data" object')
    return data
