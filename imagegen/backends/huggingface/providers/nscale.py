"""Nscale through the router: POST {router}/nscale/v1/images/generations.

Payload {"prompt", "model": providerId, "response_format": "b64_json", "size": "WxH", ...};
Nscale takes no step count. The answer is {"data": [{"b64_json": ...}]}.
"""

from __future__ import annotations

from imagegen.backends.huggingface.providers.base import Answer, ImageBytes, UpstreamCall, hf_style_parameters
from imagegen.backends.toolkit import first_b64_image, json_object
from imagegen.domain import GenerationRequest


class Nscale:
    name = "nscale"

    def build(self, request: GenerationRequest, provider_model: str, router_url: str) -> UpstreamCall:
        parameters = hf_style_parameters(request)
        parameters.pop("num_inference_steps", None)
        if "width" in parameters and "height" in parameters:
            parameters["size"] = f"{parameters.pop('width')}x{parameters.pop('height')}"
        payload = {"response_format": "b64_json", "prompt": request.prompt, "model": provider_model, **parameters}
        return UpstreamCall(url=f"{router_url}/nscale/v1/images/generations", json=payload)

    def read_answer(self, body: bytes, content_type: str) -> Answer:
        return ImageBytes(first_b64_image(json_object(body)))
