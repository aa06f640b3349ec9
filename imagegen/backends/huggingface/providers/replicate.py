"""Replicate through the router, answering synchronously with `Prefer: wait`.

POST {router}/replicate/v1/models/{providerId}/predictions, or /v1/predictions with
"version" when the providerId pins one ("owner/name:version"). Payload {"input": {...}}; the
answer's "output" is a URL or a list of URLs; null means it did not finish in time.
"""

from __future__ import annotations

from urllib.parse import quote

from imagegen.backends.huggingface.providers.base import Answer, ImageUrl, NotFinished, TaskFailed, UpstreamCall, hf_style_parameters
from imagegen.backends.toolkit import Unusable, json_object
from imagegen.domain import GenerationRequest


class Replicate:
    name = "replicate"

    def build(self, request: GenerationRequest, provider_model: str, router_url: str) -> UpstreamCall:
        payload: dict = {"input": {"prompt": request.prompt, **hf_style_parameters(request), "output_format": "png"}}
        if ":" in provider_model:
            url = f"{router_url}/replicate/v1/predictions"
            payload["version"] = provider_model.split(":", 1)[1]
        else:
            url = f"{router_url}/replicate/v1/models/{quote(provider_model, safe='/')}/predictions"
        return UpstreamCall(url=url, json=payload, headers={"Prefer": "wait"})

    def read_answer(self, body: bytes, content_type: str) -> Answer:
        answer = json_object(body)
        if answer.get("status") == "failed" or answer.get("error"):
            raise TaskFailed(str(answer.get("error") or "the prediction failed"))
        if "output" not in answer:
            raise Unusable('JSON without "output"')
        output = answer["output"]
        if output is None:
            raise NotFinished("Replicate did not finish the prediction in time")
        if isinstance(output, list) and output:
            output = output[0]
        if not isinstance(output, str):
            raise Unusable('JSON whose "output" is not an image URL')
        return ImageUrl(output)
