"""The README and env.yaml are the user's first contact: keep them true to the code."""

import re

from imagegen.backends.registry import BACKENDS
from imagegen.config import load_settings
from tests.servers import REPO_ROOT

README = (REPO_ROOT / "README.md").read_text()


def codes_in_source() -> set[str]:
    codes = set()
    for path in (REPO_ROOT / "imagegen").rglob("*.py"):
        codes |= set(re.findall(r'\bcode\s*[:=]\s*(?:str\s*=\s*)?"([a-z_]+)"', path.read_text()))
    return codes


def test_every_error_code_is_in_the_readme_table_and_no_other():
    documented = set(re.findall(r"^\| \d{3} \| `([a-z_]+)` \|", README, re.M))
    assert documented == codes_in_source()


def read_env_yaml() -> dict[str, str]:
    values = {}
    for line in (REPO_ROOT / "env.yaml").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition(":")
            values[key.strip()] = value.strip().strip('"')
    return values


# Secrets reach the function through Secret Manager (--set-secrets), never env.yaml.
# STATE_URL holds the Redis password when there is one.
SECRETS = {"API_KEYS", "STATE_URL"} | {variable for spec in BACKENDS.values() for variable in spec.key_variables}


def backend_variables() -> set[str]:
    variables = set()
    for spec in BACKENDS.values():
        variables |= {spec.model_variable, spec.allowed_models_variable, *spec.options}
        if spec.url_variable:
            variables.add(spec.url_variable)
    return variables


def test_env_yaml_holds_the_defaults_and_no_secret():
    values = read_env_yaml()
    assert not SECRETS & set(values)
    # env.yaml is for deploying, where Cloud Run sets K_SERVICE (and so the proxy hops default to 1).
    assert load_settings(values) == load_settings({"K_SERVICE": "imagegen"})


def test_every_setting_is_in_the_readme_and_env_yaml():
    # Settings are read in config.py and, for the shared state, in state/settings.py.
    config_source = "".join(
        (REPO_ROOT / "imagegen" / path).read_text() for path in ("config.py", "state/settings.py")
    )
    variables = set(re.findall(r'get\("([A-Z][A-Z_]+)"\)', config_source)) | {"IMAGE_PREFIX"} | backend_variables()
    variables |= {f"{name}_SECONDS" for name in ("TIMEOUT", "DEADLINE")} | {"MAX_RETRIES"}
    assert variables - SECRETS <= set(read_env_yaml())
    for name in variables | SECRETS | {"THREADS"}:
        assert f"| `{name}`" in README, name


def test_every_error_code_has_a_troubleshooting_row():
    table = README.split("## Troubleshooting", 1)[1]
    for code in codes_in_source():
        assert f"`{code}`" in table, code


def test_every_backend_has_a_row_in_the_choice_table_and_a_section():
    table = README.split("**Which backend should I use?**", 1)[1].split("\n\n", 2)[1]
    rows = set(re.findall(r"^\| `([a-z]+)` \|", table, re.M))
    assert rows == set(BACKENDS)
    for name in BACKENDS:
        assert re.search(rf"^### .*\(`{name}`\)", README, re.M), name
