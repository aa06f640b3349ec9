"""fal.ai through the router: POST {router}/fal-ai/{providerId}.

Payload {"prompt", ...HF-style parameters}, with width and height as "image_size"; the answer
is {"images": [{"url": ...}]}, an image to download.
"""

from __future__ import annotations

from urllib.parse import quote

from imagegen.backends.huggingface.providers.base import Answer, ImageUrl, UpstreamCall, hf_style_parameters
from imagegen.backends.toolkit import Unusable, json_object
from imagegen.domain import GenerationRequest


class FalAI:
    name = "fal-ai"

    def build(self, request: GenerationRequest, provider_model: str, router_url: str) -> UpstreamCall:
        parameters = hf_style_parameters(request)
        if "width" in parameters and "height" in parameters:
            parameters["image_size"] = {"width": parameters.pop("width"), "height": parameters.pop("height")}
        payload = {"prompt": request.prompt, **parameters, "output_format": "png"}
        return UpstreamCall(url=f"{router_url}/fal-ai/{quote(provider_model, safe='/')}", json=payload)

    def read_answer(self, body: bytes, content_type: str) -> Answer:
        images = json_object(body).get("images")
        first = images[0] if isinstance(images, list) and images else None
        url = first.get("url") if isinstance(first, dict) else None
        if not isinstance(url, str):
            raise Unusable('JSON without "images"[0]["url"]')
        return ImageUrl(url)
