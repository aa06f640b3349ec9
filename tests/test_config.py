from pathlib import Path

import pytest

from imagegen.backends.registry import BACKENDS
from imagegen.config import Settings, load_settings

DEFAULT_MODEL = BACKENDS["huggingface"].default_model


def huggingface(settings: Settings):
    return settings.backend_settings["huggingface"]
from imagegen.errors import ConfigurationError


def test_defaults(monkeypatch):
    monkeypatch.setattr("imagegen.backends.registry.local_model_installed", lambda: False)
    settings = load_settings({"K_SERVICE": "imagegen"})  # as deployed: Cloud Run sets K_SERVICE
    assert settings.backends == ()
    assert settings.trusted_proxy_hops == 1 and load_settings({}).trusted_proxy_hops == 0  # run anywhere else
    assert huggingface(settings).base_url == "https://router.huggingface.co"
    assert huggingface(settings).allowed_models == (DEFAULT_MODEL,)
    assert settings.image_dir == Path("/tmp/imagegen") and settings.image_dir_max_files == 200
    assert settings.timeout_seconds == 120 and settings.deadline_seconds == 150
    assert settings.cors_allowed_origins == ("*",)


def test_token_comes_from_the_seed_name_first_then_hf_token():
    assert huggingface(load_settings({"HF_TOKEN": "hf_b"})).api_key == "hf_b"
    assert huggingface(load_settings({"HUGGING_FACE_API_KEY": "hf_a", "HF_TOKEN": "hf_b"})).api_key == "hf_a"
    # Secret Manager values often end with a newline.
    assert huggingface(load_settings({"HUGGING_FACE_API_KEY": "hf_a\n"})).api_key == "hf_a"
    assert huggingface(load_settings({"HUGGING_FACE_API_KEY": ""})).api_key is None


def test_token_is_not_in_the_settings_repr():
    assert "hf_secret" not in repr(load_settings({"HUGGING_FACE_API_KEY": "hf_secret"}))


def test_no_backend_configured_names_every_variable_to_set(monkeypatch):
    monkeypatch.setattr("imagegen.backends.registry.local_model_installed", lambda: False)
    with pytest.raises(ConfigurationError) as caught:
        load_settings({}).require_backends()
    message = caught.value.message
    assert caught.value.code == "missing_api_key"
    for variable in ("HUGGING_FACE_API_KEY", "OPENAI_API_KEY", "GEMINI_API_KEY", "VERTEX_PROJECT", "STABILITY_API_KEY", "REPLICATE_API_TOKEN", "requirements-local.txt"):
        assert variable in message


def test_backends_default_to_those_with_credentials_in_registry_order():
    settings = load_settings({"REPLICATE_API_TOKEN": "r8_x", "OPENAI_API_KEY": "sk-x", "HF_TOKEN": "hf_x"})
    assert settings.backends == ("huggingface", "openai", "replicate")
    assert load_settings({"BACKENDS": "replicate, openai"}).backends == ("replicate", "openai")
    with pytest.raises(ConfigurationError) as caught:
        load_settings({"BACKENDS": "openai,dall-e"})
    assert "BACKENDS" in caught.value.message


def test_generic_timing_names_win_over_the_hf_ones():
    settings = load_settings({"HF_TIMEOUT_SECONDS": "5", "DEADLINE_SECONDS": "9", "HF_DEADLINE_SECONDS": "7", "MAX_RETRIES": "1"})
    assert (settings.timeout_seconds, settings.deadline_seconds, settings.max_retries) == (5, 9, 1)
    # The old names alone still work: the one test that sets them (every other uses the new ones).
    settings = load_settings({"HF_DEADLINE_SECONDS": "7", "HF_MAX_RETRIES": "2"})
    assert (settings.deadline_seconds, settings.max_retries) == (7, 2)


def test_allowed_models_always_include_the_default_model():
    settings = load_settings({"HF_MODEL": "a/b", "HF_ALLOWED_MODELS": "c/d, a/b ,e/f"})
    assert huggingface(settings).allowed_models == ("a/b", "c/d", "e/f")


def test_values_are_parsed():
    settings = load_settings(
        {
            "HF_ROUTER_URL": "http://127.0.0.1:9000/",
            "HF_TIMEOUT_SECONDS": "2.5",
            "IMAGE_DIR_MAX_FILES": "3",
            "IMAGE_BUCKET": "gs://my-bucket/",
            "IMAGE_PREFIX": "gen/",
            "CORS_ALLOWED_ORIGINS": "https://a.example, http://localhost:3000/",
        }
    )
    assert huggingface(settings).base_url == "http://127.0.0.1:9000"
    assert settings.timeout_seconds == 2.5
    assert settings.image_dir_max_files == 3
    assert settings.image_bucket == "my-bucket" and settings.image_prefix == "gen/"
    assert settings.cors_allowed_origins == ("https://a.example", "http://localhost:3000")


@pytest.mark.parametrize(
    "name, value",
    [
        ("HF_TIMEOUT_SECONDS", "soon"),
        ("HF_TIMEOUT_SECONDS", "0"),
        ("HF_TIMEOUT_SECONDS", "nan"),
        ("IMAGE_DIR_MAX_FILES", "1.5"),
        ("IMAGE_DIR_MAX_FILES", "0"),
        ("HF_ROUTER_URL", "router.huggingface.co"),
        ("HF_ROUTER_URL", "ftp://router.huggingface.co"),
        ("HF_MODEL", "no-slash"),
        ("HF_MODEL", "a/b/../../c"),
        ("HF_MODEL", "evil.com@x/y"),
        ("HF_ALLOWED_MODELS", "ok/model, not ok"),
        ("IMAGE_BUCKET", "Bad_Bucket!"),
        ("IMAGE_PREFIX", "/abs/"),
        ("IMAGE_PREFIX", "a/../../b/"),
        ("CORS_ALLOWED_ORIGINS", "example.com"),
        ("MAX_PROMPT_CHARS", "-1"),
    ],
)
def test_invalid_values_name_the_variable(name, value):
    with pytest.raises(ConfigurationError) as caught:
        load_settings({name: value})
    assert name in caught.value.message and caught.value.status == 500
