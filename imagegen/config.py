"""Settings: read from the environment once, checked once, then passed around frozen.

Nothing else in the package reads `os.environ`. A bad value raises `ConfigurationError` naming
the variable, so a misconfigured deployment answers every request with a 500 that says what to
fix instead of failing somewhere deep in a request.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from imagegen.backends import registry
from imagegen.backends.registry import BACKENDS, SETTING_ALIASES, BackendSpec
from imagegen.env_values import invalid_setting, parse_boolean, parse_choice, parse_number
from imagegen.errors import ConfigurationError
from imagegen.state.base import RatePolicy
from imagegen.state.settings import StateSettings, load_state_settings
from imagegen.logs import LOG_FORMATS
from imagegen.route_health import FailoverPolicy

DEFAULT_TIMEOUT_SECONDS = 120.0
DEFAULT_DEADLINE_SECONDS = 150.0
DEFAULT_MAX_RETRIES = 3
AUTH_MODES = ("none", "api-key", "firebase", "google")
DEFAULT_RATE_LIMIT_PER_MINUTE = 10
DEFAULT_RATE_LIMIT_BURST = 10
# Cloud Run (and so Cloud Functions gen2) sets K_SERVICE, and its front end appends the address
# it saw to X-Forwarded-For: one hop to trust. Anywhere else (./scripts/run-local, a container
# of one's own) nothing may be in front, and trusting a hop would let any caller write the
# address the rate limit counts: none then, unless TRUSTED_PROXY_HOPS says otherwise.
DEFAULT_TRUSTED_PROXY_HOPS_ON_CLOUD_RUN = 1
DEFAULT_TRUSTED_PROXY_HOPS_ELSEWHERE = 0
MIN_API_KEY_CHARS = 16
# How long a client may take to send a request's head (line and headers) once it started.
DEFAULT_REQUEST_HEAD_TIMEOUT_SECONDS = 10.0
# How long a client may take to send a request's body once its head is in: 64 KiB (the cap)
# at 6.4 KiB/s, far below any real link.
DEFAULT_REQUEST_BODY_TIMEOUT_SECONDS = 10.0
# How long an answer's bytes may wait for the client to take them before the connection is cut.
DEFAULT_RESPONSE_WRITE_TIMEOUT_SECONDS = 30.0
DEFAULT_IMAGE_DIR = "/tmp/imagegen"
DEFAULT_IMAGE_DIR_MAX_FILES = 200
DEFAULT_IMAGE_PREFIX = "images/"
DEFAULT_MAX_PROMPT_CHARS = 2000

# Fixed by the API contract rather than configurable.
MAX_BODY_BYTES = 64 * 1024


@dataclass(frozen=True)
class BackendSettings:
    """One backend's section of the settings: `{PREFIX}_API_KEY`, `{PREFIX}_BASE_URL`,
    `{PREFIX}_MODEL`, `{PREFIX}_ALLOWED_MODELS`, and the backend's own variables in `options`
    (raw strings, e.g. {"LOCAL_DEVICE": "cpu"}), which the backend checks when it is built."""

    name: str
    api_key: str | None = field(default=None, repr=False)
    base_url: str | None = None
    model: str = ""
    allowed_models: tuple[str, ...] = ()
    options: Mapping[str, str] = field(default_factory=dict)


DEFAULT_IMAGE_URL_EXPIRY_SECONDS = 3600
# V4 signed URLs of Cloud Storage last at most seven days.
MAX_IMAGE_URL_EXPIRY_SECONDS = 7 * 24 * 3600
DEFAULT_SIGN_BLOB_URL = "https://iamcredentials.googleapis.com/v1"
MIN_SIGNING_KEY_CHARS = 32


@dataclass(frozen=True)
class ImageUrlSettings:
    """How the images a door answers as URLs are signed (imagegen.doors.image_files,
    imagegen.signing)."""

    # HMAC key of the URLs the function serves itself (no bucket); None: random per process.
    signing_key: str | None = field(default=None, repr=False)
    expiry_seconds: int = DEFAULT_IMAGE_URL_EXPIRY_SECONDS
    # The IAM Credentials API that signs a bucket's V4 URLs (signBlob), and the account that
    # signs: the runtime's own when unset.
    sign_blob_url: str = DEFAULT_SIGN_BLOB_URL
    service_account: str | None = None


def _image_url_settings(get: Callable[[str], str | None]) -> ImageUrlSettings:
    key = get("IMAGE_URL_SIGNING_KEY")
    if key is not None and len(key) < MIN_SIGNING_KEY_CHARS:
        raise ConfigurationError(
            f"IMAGE_URL_SIGNING_KEY must be at least {MIN_SIGNING_KEY_CHARS} characters long "
            "(for example: python3 -c 'import secrets; print(secrets.token_urlsafe(32))').",
            code="invalid_configuration",
        )
    return ImageUrlSettings(
        signing_key=key,
        expiry_seconds=int(
            parse_number(
                "IMAGE_URL_EXPIRY_SECONDS", get("IMAGE_URL_EXPIRY_SECONDS"), DEFAULT_IMAGE_URL_EXPIRY_SECONDS,
                1, MAX_IMAGE_URL_EXPIRY_SECONDS, integer=True,
            )
        ),  # fmt: skip
        sign_blob_url=check_http_url("IMAGE_URL_SIGN_BLOB_URL", get("IMAGE_URL_SIGN_BLOB_URL") or DEFAULT_SIGN_BLOB_URL).rstrip("/"),
        service_account=get("IMAGE_URL_SERVICE_ACCOUNT"),
    )


@dataclass(frozen=True)
class Settings:
    timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS
    deadline_seconds: float = DEFAULT_DEADLINE_SECONDS
    max_retries: int = DEFAULT_MAX_RETRIES
    image_dir: Path = Path(DEFAULT_IMAGE_DIR)
    image_dir_max_files: int = DEFAULT_IMAGE_DIR_MAX_FILES
    image_bucket: str | None = None
    image_prefix: str = DEFAULT_IMAGE_PREFIX
    cors_allowed_origins: tuple[str, ...] = ("*",)
    max_prompt_chars: int = DEFAULT_MAX_PROMPT_CHARS
    serve_page: bool = True
    auth_mode: str = "none"
    api_keys: tuple[str, ...] = field(default=(), repr=False)
    auth_audience: str | None = None
    auth_certs_url: str | None = None
    rate_limit_per_minute: float = DEFAULT_RATE_LIMIT_PER_MINUTE
    rate_limit_burst: int = DEFAULT_RATE_LIMIT_BURST
    trusted_proxy_hops: int = DEFAULT_TRUSTED_PROXY_HOPS_ON_CLOUD_RUN  # as deployed; see load_settings
    log_prompts: bool = False
    request_head_timeout_seconds: float = DEFAULT_REQUEST_HEAD_TIMEOUT_SECONDS
    request_body_timeout_seconds: float = DEFAULT_REQUEST_BODY_TIMEOUT_SECONDS
    response_write_timeout_seconds: float = DEFAULT_RESPONSE_WRITE_TIMEOUT_SECONDS
    log_format: str = "auto"  # json | text | auto (text on a terminal)
    gcp_project: str | None = None
    cache: bool = True
    # A prompt one vendor refused is sent to the next backend only when this is on.
    failover_on_refusal: bool = False
    # Decoding memory (MiB) for the whole instance and for one decode; None: derived from the
    # instance's memory (imagegen.images).
    decode_memory_mib: int | None = None
    max_decode_memory_mib: int | None = None
    # How fast a misbehaving route is left: retry waits, adaptive try limits, circuits.
    failover: FailoverPolicy = FailoverPolicy()
    # The enabled backends in failover order, and every backend's section (enabled or not).
    backends: tuple[str, ...] = ()
    backend_settings: Mapping[str, BackendSettings] = field(default_factory=dict, repr=False)
    # Rate limits, daily budgets and single-flight: this instance's, or shared through Redis.
    state: StateSettings = field(
        default_factory=lambda: StateSettings(RatePolicy(DEFAULT_RATE_LIMIT_PER_MINUTE, DEFAULT_RATE_LIMIT_BURST)),
        repr=False,
    )
    image_urls: ImageUrlSettings = field(default_factory=ImageUrlSettings)

    def require_backends(self) -> tuple[str, ...]:
        if not self.backends:
            choices = "; ".join(
                f"{name}: {spec.credential_hint()}" for name, spec in BACKENDS.items() if spec.credential_hint()
            )
            raise ConfigurationError(
                "This server has no image backend configured. Set the credential of the API you use "
                f"({choices}), or install requirements-local.txt to run the local model"
                " (BACKENDS=demo draws placeholders, to try the page).",
                code="missing_api_key",
            )
        return self.backends


def load_settings(environ: Mapping[str, str]) -> Settings:
    """Build `Settings` from environment variables; empty values count as unset."""

    def get(name: str) -> str | None:
        value = environ.get(name, "").strip()
        return value or None

    bucket = get("IMAGE_BUCKET")
    auth_mode = parse_choice("AUTH_MODE", get("AUTH_MODE"), AUTH_MODES, default="none")
    origins = _origins(get("CORS_ALLOWED_ORIGINS") or "*")
    if auth_mode != "none" and "*" in origins:
        raise ConfigurationError(
            f"With AUTH_MODE={auth_mode}, CORS_ALLOWED_ORIGINS must list the sites allowed to call "
            "(such as 'https://app.example.com'), not '*'.",
            code="invalid_configuration",
        )
    sections = _backend_sections(get)
    rate_limit_per_minute = parse_number(
        "RATE_LIMIT_PER_MINUTE", get("RATE_LIMIT_PER_MINUTE"), DEFAULT_RATE_LIMIT_PER_MINUTE, 0, 100_000
    )
    rate_limit_burst = int(
        parse_number("RATE_LIMIT_BURST", get("RATE_LIMIT_BURST"), DEFAULT_RATE_LIMIT_BURST, 1, 100_000, integer=True)
    )
    return Settings(
        state=load_state_settings(get, rate_limit_per_minute=rate_limit_per_minute, rate_limit_burst=rate_limit_burst),
        backends=_enabled_backends(get, sections),
        backend_settings=sections,
        timeout_seconds=parse_number(*_named(get, "TIMEOUT_SECONDS"), DEFAULT_TIMEOUT_SECONDS, 1, 3600),
        deadline_seconds=parse_number(*_named(get, "DEADLINE_SECONDS"), DEFAULT_DEADLINE_SECONDS, 1, 3600),
        max_retries=int(parse_number(*_named(get, "MAX_RETRIES"), DEFAULT_MAX_RETRIES, 0, 10, integer=True)),
        image_dir=Path(get("IMAGE_DIR") or DEFAULT_IMAGE_DIR),
        image_dir_max_files=int(
            parse_number(
                "IMAGE_DIR_MAX_FILES",
                get("IMAGE_DIR_MAX_FILES"),
                DEFAULT_IMAGE_DIR_MAX_FILES,
                1,
                1_000_000,
                integer=True,
            )
        ),
        image_bucket=_bucket_name(bucket) if bucket else None,
        image_prefix=_object_prefix(environ.get("IMAGE_PREFIX", DEFAULT_IMAGE_PREFIX).strip()),
        cors_allowed_origins=origins,
        auth_mode=auth_mode,
        api_keys=_api_keys(get("API_KEYS"), required=auth_mode == "api-key"),
        auth_audience=_audience(auth_mode, get("AUTH_AUDIENCE"), get("FIREBASE_PROJECT_ID")),
        auth_certs_url=check_http_url("AUTH_CERTS_URL", get("AUTH_CERTS_URL")) if get("AUTH_CERTS_URL") else None,
        rate_limit_per_minute=rate_limit_per_minute,
        rate_limit_burst=rate_limit_burst,
        trusted_proxy_hops=int(
            parse_number(
                "TRUSTED_PROXY_HOPS",
                get("TRUSTED_PROXY_HOPS"),
                DEFAULT_TRUSTED_PROXY_HOPS_ON_CLOUD_RUN if get("K_SERVICE") else DEFAULT_TRUSTED_PROXY_HOPS_ELSEWHERE,
                0,
                10,
                integer=True,
            )
        ),
        log_prompts=parse_boolean("LOG_PROMPTS", get("LOG_PROMPTS"), default=False),
        request_head_timeout_seconds=parse_number(
            "REQUEST_HEAD_TIMEOUT_SECONDS", get("REQUEST_HEAD_TIMEOUT_SECONDS"), DEFAULT_REQUEST_HEAD_TIMEOUT_SECONDS, 1, 300
        ),
        request_body_timeout_seconds=parse_number(
            "REQUEST_BODY_TIMEOUT_SECONDS", get("REQUEST_BODY_TIMEOUT_SECONDS"), DEFAULT_REQUEST_BODY_TIMEOUT_SECONDS, 1, 300
        ),
        response_write_timeout_seconds=parse_number(
            "RESPONSE_WRITE_TIMEOUT_SECONDS",
            get("RESPONSE_WRITE_TIMEOUT_SECONDS"),
            DEFAULT_RESPONSE_WRITE_TIMEOUT_SECONDS,
            1,
            600,
        ),
        log_format=parse_choice("LOG_FORMAT", get("LOG_FORMAT"), LOG_FORMATS, default="auto"),
        gcp_project=get("GOOGLE_CLOUD_PROJECT"),
        cache=parse_boolean("CACHE", get("CACHE"), default=True),
        failover_on_refusal=parse_boolean("FAILOVER_ON_REFUSAL", get("FAILOVER_ON_REFUSAL"), default=False),
        decode_memory_mib=_optional_mib("DECODE_MEMORY_MIB", get("DECODE_MEMORY_MIB")),
        max_decode_memory_mib=_optional_mib("MAX_DECODE_MEMORY_MIB", get("MAX_DECODE_MEMORY_MIB")),
        failover=_failover_policy(get),
        serve_page=parse_boolean("SERVE_PAGE", get("SERVE_PAGE"), default=True),
        image_urls=_image_url_settings(get),
        max_prompt_chars=int(
            parse_number(
                "MAX_PROMPT_CHARS",
                get("MAX_PROMPT_CHARS"),
                DEFAULT_MAX_PROMPT_CHARS,
                1,
                100_000,
                integer=True,
            )
        ),
    )


def _optional_mib(name: str, raw: str | None) -> int | None:
    return None if raw is None else int(parse_number(name, raw, 0, 16, 1_048_576, integer=True))


def _named(get: Callable[[str], str | None], name: str) -> tuple[str, str | None]:
    """(the variable that holds the setting, its value): `name`, or its older alias when only
    that is set, so that an error names what the owner actually wrote."""
    alias = SETTING_ALIASES.get(name)
    if get(name) is None and alias is not None and get(alias) is not None:
        return alias, get(alias)
    return name, get(name)


def _backend_sections(get: Callable[[str], str | None]) -> dict[str, BackendSettings]:
    sections: dict[str, BackendSettings] = {}
    for name, spec in BACKENDS.items():
        key = next((get(variable) for variable in spec.key_variables if get(variable)), None)
        model = _backend_model(spec, spec.model_variable, get(spec.model_variable) or spec.default_model)
        allowed = tuple(
            _backend_model(spec, spec.allowed_models_variable, item.strip())
            for item in (get(spec.allowed_models_variable) or "").split(",")
            if item.strip()
        )
        url = None
        if spec.url_variable:
            url = get(spec.url_variable) or spec.default_url
            url = check_http_url(spec.url_variable, url) if url else None
        sections[name] = BackendSettings(
            name=name,
            api_key=key,
            base_url=url,
            model=model,
            # The default model is always allowed: a request without "model" must work.
            allowed_models=tuple(dict.fromkeys((model, *allowed))),
            options={
                option: value
                for option in spec.options
                if (value := get(option) or spec.option_defaults.get(option)) is not None
            },
        )
    return sections


def _backend_model(spec: BackendSpec, variable: str, raw: str) -> str:
    if not spec.model_pattern.fullmatch(raw) or ".." in raw.split("/"):
        raise invalid_setting(variable, raw, f"a {spec.name} model name such as '{spec.model_example}'")
    return raw


def _enabled_backends(get: Callable[[str], str | None], sections: Mapping[str, BackendSettings]) -> tuple[str, ...]:
    """BACKENDS when set; otherwise every backend with credentials, in the registry's order,
    or the local model when none has and its libraries are installed."""
    raw = get("BACKENDS")
    if raw is not None:
        names = tuple(dict.fromkeys(item.strip().lower() for item in raw.split(",") if item.strip()))
        unknown = [name for name in names if name not in BACKENDS]
        if unknown or not names:
            raise invalid_setting("BACKENDS", raw, "a comma-separated list of " + ", ".join(BACKENDS))
        return names
    configured = tuple(
        name
        for name, spec in BACKENDS.items()
        if sections[name].api_key or (spec.enabled_by and get(spec.enabled_by))
    )
    if configured:
        return configured
    fallbacks = tuple(name for name, spec in BACKENDS.items() if spec.fallback)
    return fallbacks if registry.local_model_installed() else ()


def _api_keys(raw: str | None, required: bool) -> tuple[str, ...]:
    keys = tuple(key.strip() for key in (raw or "").split(",") if key.strip())
    if required and not keys:
        raise ConfigurationError(
            "AUTH_MODE=api-key needs API_KEYS: one or more comma-separated keys, fed from Secret "
            "Manager with --set-secrets.",
            code="invalid_configuration",
        )
    if any(len(key) < MIN_API_KEY_CHARS for key in keys):
        # Never echo a key, not even a short one.
        raise ConfigurationError(
            f"Every key in API_KEYS must be at least {MIN_API_KEY_CHARS} characters long "
            "(for example: python3 -c 'import secrets; print(secrets.token_urlsafe(32))').",
            code="invalid_configuration",
        )
    return keys


def _audience(mode: str, audience: str | None, project: str | None) -> str | None:
    if mode == "firebase":
        audience = audience or project
        if not audience:
            raise ConfigurationError(
                "AUTH_MODE=firebase needs the Firebase project id: set FIREBASE_PROJECT_ID.",
                code="invalid_configuration",
            )
    if mode == "google" and not audience:
        raise ConfigurationError(
            "AUTH_MODE=google needs AUTH_AUDIENCE: the audience your callers put in their ID "
            "tokens, usually this function's URL.",
            code="invalid_configuration",
        )
    return audience


def check_http_url(name: str, raw: str) -> str:
    """An http(s) URL setting without query or fragment, its trailing slash dropped."""
    parts = urlsplit(raw)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        raise invalid_setting(name, raw, "an http(s) URL such as https://api.example.com")
    return raw.rstrip("/")


def _bucket_name(raw: str) -> str:
    name = raw.removeprefix("gs://").rstrip("/")
    if not re.fullmatch(r"[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]", name):
        raise invalid_setting("IMAGE_BUCKET", raw, "a Cloud Storage bucket name such as 'my-images'")
    return name


def _object_prefix(raw: str) -> str:
    # The prefix is the owner's, but it must not start at the bucket root with '/' or climb out.
    if raw.startswith("/") or ".." in raw.split("/") or "\n" in raw:
        raise invalid_setting("IMAGE_PREFIX", raw, "a relative object prefix such as 'images/'")
    return raw


def _origins(raw: str) -> tuple[str, ...]:
    origins = tuple(item.strip().rstrip("/") for item in raw.split(",") if item.strip())
    for origin in origins:
        if origin == "*":
            continue
        parts = urlsplit(origin)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.path:
            raise invalid_setting(
                "CORS_ALLOWED_ORIGINS", raw, "'*' or origins such as 'https://app.example.com'"
            )
    return origins or ("*",)


def base_url_is_loopback(url: str) -> bool:
    """Whether a backend's URL is this machine: a stand-in (tests, demos), never a real API."""
    host = urlsplit(url).hostname or ""
    return host == "localhost" or host.startswith("127.") or host == "::1"


def setting_variables() -> frozenset[str]:
    """Every environment variable `load_settings` reads, found by reading an empty environment
    through a recorder: the tests clear exactly these, so nothing exported in a developer's
    shell (a vendor key, AUTH_MODE, BACKENDS, STATE_URL) changes what a test sees."""
    seen: set[str] = set()

    class Recorder(dict):
        def get(self, key, default=None):  # type: ignore[override]
            seen.add(key)
            return default

    try:
        load_settings(Recorder())
    except ConfigurationError:
        pass
    return frozenset(seen)


# --- failover: how fast a misbehaving route is left (imagegen/route_health.py) ----------------
# A retry wait up to this is sat out on the same route; a longer one fails over at once when the
# next route is ready and usually answers sooner.
DEFAULT_FAILOVER_WAIT_SECONDS = 0.5
# A try is cut at max(floor, factor × the route's recent p99); 0 turns this off.
DEFAULT_ADAPTIVE_TIMEOUT_FACTOR = 3.0
DEFAULT_ADAPTIVE_TIMEOUT_FLOOR_SECONDS = 2.0
# This many failures within a minute take a route out of rotation for CIRCUIT_OPEN_SECONDS.
DEFAULT_CIRCUIT_FAILURES = 5
DEFAULT_CIRCUIT_OPEN_SECONDS = 30.0


def _failover_policy(get: Callable[[str], str | None]) -> FailoverPolicy:
    return FailoverPolicy(
        wait_seconds=parse_number(
            "FAILOVER_WAIT_SECONDS", get("FAILOVER_WAIT_SECONDS"), DEFAULT_FAILOVER_WAIT_SECONDS, 0, 3600
        ),
        timeout_factor=parse_number(
            "ADAPTIVE_TIMEOUT_FACTOR", get("ADAPTIVE_TIMEOUT_FACTOR"), DEFAULT_ADAPTIVE_TIMEOUT_FACTOR, 0, 100
        ),
        timeout_floor_seconds=parse_number(
            "ADAPTIVE_TIMEOUT_FLOOR_SECONDS",
            get("ADAPTIVE_TIMEOUT_FLOOR_SECONDS"),
            DEFAULT_ADAPTIVE_TIMEOUT_FLOOR_SECONDS,
            0.1,
            3600,
        ),
        circuit_failures=int(
            parse_number("CIRCUIT_FAILURES", get("CIRCUIT_FAILURES"), DEFAULT_CIRCUIT_FAILURES, 0, 1000, integer=True)
        ),
        circuit_open_seconds=parse_number(
            "CIRCUIT_OPEN_SECONDS", get("CIRCUIT_OPEN_SECONDS"), DEFAULT_CIRCUIT_OPEN_SECONDS, 1, 3600
        ),
    )
