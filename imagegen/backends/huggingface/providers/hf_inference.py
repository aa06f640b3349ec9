"""Hugging Face's own `hf-inference` provider.

POST {router}/hf-inference/models/{model} with {"inputs": prompt, "parameters": {...}};
the answer is raw image bytes, or JSON {"data": [{"b64_json": ...}]} from some endpoints.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from imagegen.backends.huggingface.providers.base import Answer, ImageBytes, UpstreamCall, hf_style_parameters
from imagegen.backends.toolkit import first_b64_image, json_object
from imagegen.domain import GenerationRequest


class HFInference:
    name = "hf-inference"

    def build(self, request: GenerationRequest, provider_model: str, router_url: str) -> UpstreamCall:
        payload: dict[str, Any] = {"inputs": request.prompt}
        parameters = hf_style_parameters(request)
        if parameters:
            payload["parameters"] = parameters
        # quote() keeps the '/' between owner and name; the model id pattern in config has
        # already ruled out anything that could leave this path.
        url = f"{router_url}/hf-inference/models/{quote(provider_model, safe='/')}"
        return UpstreamCall(url=url, json=payload, headers={"Accept": "image/png"})

    def read_answer(self, body: bytes, content_type: str) -> Answer:
        if content_type.startswith("application/json"):
            return ImageBytes(first_b64_image(json_object(body)))
        return ImageBytes(body)
