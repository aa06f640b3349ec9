"""The `huggingface` backend: the inference router, its providers, and `auto` failover.

Routes come from the Hub's provider mapping (imagegen.backends.huggingface.mapping); each
provider module knows its path, payload and answer (imagegen.backends.huggingface.providers).
One call to `generate` is one try at one provider: the dispatcher retries and fails over.
"""

from __future__ import annotations

import requests

from imagegen.backends.base import Capabilities, GenerationContext
from imagegen.outbound import HttpExchange
from imagegen.backends.huggingface.mapping import ProviderMapping
from imagegen.backends.huggingface.providers import PROVIDERS
from imagegen.backends.huggingface.providers.base import (
    Answer,
    ImageUrl,
    NotFinished,
    PendingTask,
    PollingProvider,
    Provider,
    TaskFailed,
)
from imagegen.backends.toolkit import PollSchedule, Unusable, poll_until, reading_answer, require_key, to_png
from imagegen.backends.vendor import CallContext, Vendor
from imagegen.config import BackendSettings, Settings, base_url_is_loopback, check_http_url
from imagegen.env_values import invalid_setting, parse_number
from imagegen.domain import GeneratedImage, GenerationRequest, Route
from imagegen.errors import UpstreamError, UpstreamTimeout
from imagegen.identity import account_fingerprint

# What HF_PROVIDER and a request's "provider" may name; "auto" asks the Hub which providers
# serve the model and fails over between them.
KNOWN_PROVIDERS = ("auto", *PROVIDERS)
POLLING = PollSchedule(first=0.5)
PROVIDER_MODELS_URL = "https://huggingface.co/models?pipeline_tag=text-to-image&inference_provider={provider}"


def _model_advice(call: CallContext) -> str:
    provider = call.provider or "hf-inference"
    return (
        f"Set HF_PROVIDER=auto to use any provider that serves it, or set HF_MODEL to a model that "
        f"{provider} serves ({PROVIDER_MODELS_URL.format(provider=provider)})"
    )


def _classify(status: int, body: object) -> str | None:
    text = str(body).lower().replace(" ", "_") if body is not None else ""
    if status == 400 and "model_not_supported" in text:
        return "model_not_available"
    return None


VENDOR = Vendor(
    name="Hugging Face",
    status_label="HF status",
    key_advice=(
        "Check that HUGGING_FACE_API_KEY holds a valid token with the 'Make calls to Inference Providers' permission"
    ),
    credits_advice="Add Inference Providers credits or a PRO plan at https://huggingface.co/settings/billing",
    url_variable="HF_ROUTER_URL",
    model_advice=_model_advice,
    classify=_classify,
)


class HuggingFaceBackend:
    name = "huggingface"

    def __init__(self, settings: Settings, section: BackendSettings, session: requests.Session) -> None:
        options = section.options
        self._section = section
        self._token = section.api_key
        assert section.base_url is not None  # the registry gives HF_ROUTER_URL a default
        self._router_url = section.base_url
        self._session = session
        self._exchange = HttpExchange(session, settings.timeout_seconds, settings.deadline_seconds)
        self._mapping = ProviderMapping(
            check_http_url("HF_HUB_URL", options["HF_HUB_URL"]),
            parse_number("HF_MAPPING_TTL_SECONDS", options.get("HF_MAPPING_TTL_SECONDS"), 600, 0, 86_400),
            session,
        )
        self._loopback = base_url_is_loopback(self._router_url)
        self.default_model = section.model
        self.allowed_models = section.allowed_models
        # The default provider first; a request's "provider" may name any of these.
        self.default_provider = _provider("HF_PROVIDER", options["HF_PROVIDER"])
        allowed = (item.strip() for item in options.get("HF_ALLOWED_PROVIDERS", "").split(","))
        self.providers = tuple(
            dict.fromkeys((self.default_provider, *(_provider("HF_ALLOWED_PROVIDERS", item) for item in allowed if item)))
        )

    def identity(self) -> str:
        return f"huggingface {self._router_url} {account_fingerprint(self._token)}"

    def capabilities(self, model: str) -> Capabilities:
        return Capabilities()

    def routes(self, request: GenerationRequest, model: str, context: GenerationContext) -> list[Route]:
        provider = request.provider or self.default_provider
        return self._mapping.routes(model, provider, self._require_token(), context.timing.clock, context.time_left())

    def generate(self, route: Route, request: GenerationRequest, context: GenerationContext) -> GeneratedImage:
        token = self._require_token()
        assert route.provider is not None and route.provider_model is not None
        provider = PROVIDERS[route.provider]
        call = CallContext(VENDOR, self.name, route.model, token, provider=route.provider)
        upstream = provider.build(request, route.provider_model, self._router_url)
        answer = self._exchange.send(
            "POST", upstream.url, call, context, json=upstream.json, headers={**upstream.headers, **_auth(token)}
        )
        try:
            with reading_answer(call, advice="try another model or provider"):
                parsed = provider.read_answer(answer.body, answer.headers.get("Content-Type", "").lower())
                if isinstance(parsed, PendingTask):
                    parsed = self._poll(provider, parsed, call, context, token)
                if isinstance(parsed, ImageUrl):
                    data = self._exchange.download(parsed.url, call, context, allow_loopback=self._loopback)
                else:
                    data = parsed.data
                png = to_png(data, context)
        except TaskFailed as error:
            raise call.error(
                UpstreamError,
                f"The provider could not generate this image: {call.quote(str(error))}. Try another prompt or model",
                code="generation_failed",
            ) from None
        except NotFinished:
            raise call.error(
                UpstreamTimeout, "The provider did not finish the image in time. Try again in a minute", fail_over=True
            ) from None
        return GeneratedImage(png=png, route=route, seed=request.seed, request_id=call.request_id)

    def _poll(
        self, provider: Provider, task: PendingTask, call: CallContext, context: GenerationContext, token: str
    ) -> Answer:
        if not hasattr(provider, "read_task"):
            raise Unusable("a pending task from a provider that answers at once")
        polling: PollingProvider = provider  # type: ignore[assignment]
        url = f"{self._router_url}/{provider.name}{task.poll_path}"

        def poll() -> Answer | None:
            return polling.read_task(self._exchange.send("GET", url, call, context, headers=_auth(token)).body)

        done = poll_until(None, poll, lambda state: state is not None, context, POLLING, too_late=lambda: self._exchange.timeout(call))
        assert done is not None
        return done

    def _require_token(self) -> str:
        return require_key(
            self._section,
            variable="HUGGING_FACE_API_KEY (or HF_TOKEN)",
            what="Hugging Face token",
            how="a token with the 'Make calls to Inference Providers' permission",
        )


def _provider(variable: str, raw: str) -> str:
    if raw not in KNOWN_PROVIDERS:
        raise invalid_setting(variable, raw, "one of " + ", ".join(KNOWN_PROVIDERS))
    return raw


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def create(settings: Settings, section: BackendSettings, session: requests.Session) -> HuggingFaceBackend:
    return HuggingFaceBackend(settings, section, session)
