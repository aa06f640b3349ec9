"""Together AI through the router: POST {router}/together/v1/images/generations.

Payload {"prompt", "model": providerId, "response_format": "base64", "steps", "guidance", ...};
the answer is {"data": [{"b64_json": ...}]}.
"""

from __future__ import annotations

from imagegen.backends.huggingface.providers.base import Answer, ImageBytes, UpstreamCall, hf_style_parameters
from imagegen.backends.toolkit import first_b64_image, json_object
from imagegen.domain import GenerationRequest

# Together's names for Hugging Face's parameters.
RENAMED = {"num_inference_steps": "steps", "guidance_scale": "guidance"}


class Together:
    name = "together"

    def build(self, request: GenerationRequest, provider_model: str, router_url: str) -> UpstreamCall:
        parameters = {RENAMED.get(key, key): value for key, value in hf_style_parameters(request).items()}
        payload = {
            "prompt": request.prompt,
            "model": provider_model,
            "response_format": "base64",
            "output_format": "png",
            **parameters,
        }
        return UpstreamCall(url=f"{router_url}/together/v1/images/generations", json=payload)

    def read_answer(self, body: bytes, content_type: str) -> Answer:
        return ImageBytes(first_b64_image(json_object(body)))
