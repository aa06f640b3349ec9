"""Hugging Face's own `hf-inference` provider.

POST {router}/hf-inference/models/{model} with {"inputs": prompt, "parameters": {...}};
the answer is raw image bytes, or JSON {"data": [{"b64_json": ...}]} from some endpoints.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any
from urllib.parse import quote

from imagegen.images import NotAnImage, describe_non_image
from imagegen.providers.base import UpstreamCall
from imagegen.validation import GenerationRequest


class HFInference:
    name = "hf-inference"

    def build(self, request: GenerationRequest, router_url: str) -> UpstreamCall:
        parameters: dict[str, Any] = {
            "negative_prompt": request.negative_prompt,
            "width": request.width,
            "height": request.height,
            "num_inference_steps": request.steps,
            "guidance_scale": request.guidance_scale,
            "seed": request.seed,
        }
        payload: dict[str, Any] = {"inputs": request.prompt}
        present = {key: value for key, value in parameters.items() if value is not None}
        if present:
            payload["parameters"] = present
        # quote() keeps the '/' between owner and name; the model id pattern in config has
        # already ruled out anything that could leave this path.
        url = f"{router_url}/hf-inference/models/{quote(request.model, safe='/')}"
        return UpstreamCall(url=url, json=payload, headers={"Accept": "image/png"})

    def image_bytes(self, body: bytes, content_type: str) -> bytes:
        if not content_type.startswith("application/json"):
            return body
        try:
            answer = json.loads(body)
            return base64.b64decode(answer["data"][0]["b64_json"], validate=True)
        except (ValueError, KeyError, IndexError, TypeError, binascii.Error):
            raise NotAnImage(describe_non_image(body)) from None
