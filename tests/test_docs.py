"""The README, docs/ and env.yaml are the user's first contact: keep them true to the code, and
every link in them leading somewhere."""

import re
import shlex
import unicodedata
from pathlib import Path

import pytest

from imagegen.backends.registry import BACKENDS, SETTING_ALIASES
from imagegen.config import load_settings, setting_variables
from imagegen.storage import LOAD_BUDGET_SECONDS, SAVE_BUDGET_SECONDS
from tests.servers import REPO_ROOT

README = (REPO_ROOT / "README.md").read_text()
DOCS = REPO_ROOT / "docs"
API = (DOCS / "api.md").read_text()
CONFIGURATION = (DOCS / "configuration.md").read_text()
GPU = REPO_ROOT / "deploy" / "cloud-run-gpu"


def codes_in_source() -> set[str]:
    codes = set()
    for path in (REPO_ROOT / "imagegen").rglob("*.py"):
        codes |= set(re.findall(r'\bcode\s*[:=]\s*(?:str\s*=\s*)?"([a-z_]+)"', path.read_text()))
    return codes


def test_every_error_code_is_in_the_api_table_and_no_other():
    documented = set(re.findall(r"^\| \d{3} \| `([a-z_]+)` \|", API, re.M))
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
SECRETS = {"API_KEYS", "STATE_URL", "IMAGE_URL_SIGNING_KEY"} | {variable for spec in BACKENDS.values() for variable in spec.key_variables}


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


def test_every_setting_is_documented_and_in_env_yaml():
    # Every variable the settings read (Cloud Run's own K_SERVICE and the old HF_ names aside).
    variables = setting_variables() - {"K_SERVICE"} - set(SETTING_ALIASES.values())
    # A backend's own variables are documented on its own page (and may be in the shared ones
    # too): adding a backend changes no shared document.
    own = {
        name: {spec.model_variable, spec.allowed_models_variable, *spec.options, *spec.key_variables}
        | ({spec.url_variable} if spec.url_variable else set())
        | ({spec.enabled_by} if spec.enabled_by else set())
        for name, spec in BACKENDS.items()
    }
    shared = variables - set().union(*own.values())
    assert shared - SECRETS <= set(read_env_yaml())
    for name in shared | {"THREADS"}:
        assert f"| `{name}`" in CONFIGURATION, name
    for backend, names in own.items():
        page = (DOCS / "backends" / f"{backend}.md").read_text()
        for name in names & variables:
            assert f"`{name}`" in page, (backend, name)


def test_every_error_code_has_a_troubleshooting_row():
    table = README.split("## Troubleshooting", 1)[1]
    for code in codes_in_source():
        assert f"`{code}`" in table, code


def test_every_backend_has_a_page_and_every_choice_row_a_backend():
    table = README.split("**Which backend should I use?**", 1)[1].split("\n\n", 2)[1]
    rows = set(re.findall(r"^\| \[`([a-z]+)`\]\(docs/backends/[a-z]+\.md\) \|", table, re.M))
    # The table is the newcomer's choice: every row a real backend, each linking its page.
    assert rows <= set(BACKENDS) and rows
    for name in rows:
        assert f"(docs/backends/{name}.md)" in table, name
    for name in BACKENDS:
        # One page per backend: a new backend adds its page, nothing else.
        page = DOCS / "backends" / f"{name}.md"
        assert re.match(rf"# .*\(`{name}`\)\n", page.read_text()), name


# --- Links: every relative link and #anchor in the README and docs/ leads somewhere. ---

FENCE = re.compile(r"^(```|~~~)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
# [text](target) and ![alt](target); a target may be <wrapped> and may carry a "title".
LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
HTML_ANCHOR = re.compile(r"<a\s+(?:name|id)=\"([^\"]+)\"")


def prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks, with inline code blanked out (a `[x](y)` or a
    `# comment` in code is not a link or a heading)."""
    lines, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line.lstrip()):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(re.sub(r"`[^`]*`", lambda m: m.group(0) if HEADING.match(line) else "``", line))
    return lines


def github_slug(heading: str) -> str:
    """GitHub's anchor for a heading: the rendered text (no markup, a link's text only),
    lowercased, punctuation other than - and _ dropped, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = re.sub(r"<[^>]+>", "", text).replace("`", "").replace("*", "")
    text = "".join(
        ch for ch in text.lower() if ch in " -_" or unicodedata.category(ch)[0] in "LMN" or ch == "_"
    )
    return text.replace(" ", "-")


def anchors(text: str) -> set[str]:
    found: set[str] = set()
    counts: dict[str, int] = {}
    for line in prose_lines(text):
        found |= set(HTML_ANCHOR.findall(line))
        match = HEADING.match(line)
        if match:
            slug = github_slug(match.group(2))
            n = counts.get(slug, 0)
            counts[slug] = n + 1
            found.add(slug if n == 0 else f"{slug}-{n}")
    return found


def broken_links(page: Path, root: Path) -> list[str]:
    """Every relative link in `page` whose file, or whose #anchor in that file, is missing."""
    problems = []
    name = page.relative_to(root).as_posix()
    for line in prose_lines(page.read_text()):
        for target in LINK.findall(line):
            if not target or re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):
                continue  # external (https:, mailto:): not checked here
            path_part, _, fragment = target.partition("#")
            resolved = (page.parent / path_part).resolve() if path_part else page
            if root.resolve() not in (resolved, *resolved.parents):
                problems.append(f"{name}: {target} leaves the repository")
                continue
            if not resolved.exists():
                problems.append(f"{name}: {target}: no such file")
                continue
            if resolved.is_dir():
                resolved = resolved / "README.md"
            if fragment and resolved.suffix == ".md" and fragment not in anchors(resolved.read_text()):
                problems.append(f"{name}: {target}: no such heading")
    return problems


def documentation_pages() -> list[Path]:
    return [REPO_ROOT / name for name in ("README.md", "SECURITY.md", "BENCHMARKS.md")] + sorted(DOCS.rglob("*.md"))


@pytest.mark.parametrize("page", documentation_pages(), ids=lambda page: str(page.relative_to(REPO_ROOT)))
def test_every_relative_link_and_anchor_leads_somewhere(page):
    assert broken_links(page, REPO_ROOT) == []


def test_the_link_check_finds_broken_files_and_anchors(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "api.md").write_text("# API\n\n## Errors: the `code` table\n\n## Errors: the `code` table\n")
    (tmp_path / "README.md").write_text(
        "# Title\n\n## Two commands\n\n"
        "[ok](#two-commands) [ok](docs/api.md#errors-the-code-table) [ok](docs/api.md#errors-the-code-table-1) "
        "[ok](docs/) [external](https://example.com/#nowhere)\n"
        "[gone](docs/missing.md) [no heading](docs/api.md#errors) [no heading here](#two-command)\n"
        "```sh\n# not a heading [nor a link](nowhere.md)\n```\n"
    )
    (tmp_path / "docs" / "README.md").write_text("# Docs\n")
    assert broken_links(tmp_path / "README.md", tmp_path) == [
        "README.md: docs/missing.md: no such file",
        "README.md: docs/api.md#errors: no such heading",
        "README.md: #two-command: no such heading",
    ]


def test_github_slugs():
    assert github_slug("Hugging Face (`huggingface`)") == "hugging-face-huggingface"
    assert github_slug("Watching progress: the event stream") == "watching-progress-the-event-stream"
    assert github_slug("Limits across instances: shared state in Redis") == "limits-across-instances-shared-state-in-redis"
    assert github_slug("Deploy with [Memorystore](https://x.example)") == "deploy-with-memorystore"
    assert github_slug("1024×1024 & more") == "10241024--more"


# --- The Cloud Run GPU deployment: what can be checked without a container daemon. ---


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    instructions, pending = [], ""
    for line in text.splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        keyword, _, arguments = pending.strip().partition(" ")
        instructions.append((keyword, arguments.strip()))
        pending = ""
    assert not pending, "a continuation line ends the file"
    return instructions


KNOWN_INSTRUCTIONS = {"FROM", "ENV", "WORKDIR", "ARG", "RUN", "COPY", "CMD", "EXPOSE", "LABEL", "USER", "ENTRYPOINT"}


def test_the_gpu_dockerfile_parses_and_copies_what_exists():
    instructions = dockerfile_instructions((GPU / "Dockerfile").read_text())
    assert instructions[0][0] == "FROM"
    assert {keyword for keyword, _ in instructions} <= KNOWN_INSTRUCTIONS
    copied = [arguments.split()[:-1] for keyword, arguments in instructions if keyword == "COPY"]
    for sources in copied:
        for source in sources:
            assert (REPO_ROOT / source).exists(), source
    # What the function needs to run: its entry point, the package and the requirements.
    assert {"main.py", "imagegen/", "requirements.txt", "requirements-local.txt"} <= {s for group in copied for s in group}
    # The CUDA build of the torch that requirements-local.txt pins, installed before that file.
    pinned = re.search(r"^torch==(\S+)", (REPO_ROOT / "requirements-local.txt").read_text(), re.M).group(1)
    runs = [arguments for keyword, arguments in instructions if keyword == "RUN"]
    assert f"torch=={pinned}" in runs[0] and "--index-url" in runs[0]
    assert "requirements-local.txt" in runs[1]
    command = [arguments for keyword, arguments in instructions if keyword == "CMD"][-1]
    assert "--target=generate_image" in command
    assert "def generate_image(" in (REPO_ROOT / "main.py").read_text()


def test_the_build_config_builds_that_dockerfile():
    build = (GPU / "cloudbuild.yaml").read_text()
    assert '"-f", "deploy/cloud-run-gpu/Dockerfile"' in build
    # `gcloud builds submit` uploads what .gcloudignore lets through: the Dockerfile and all it copies.
    lines = (REPO_ROOT / ".gcloudignore").read_text().splitlines()
    ignored = {line.strip() for line in lines if line.strip() and not line.startswith("#")}
    for path in ("deploy/", "main.py", "imagegen/", "requirements.txt", "requirements-local.txt"):
        assert path not in ignored


def read_yaml_map(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition(":")
            values[key.strip()] = value.strip().strip('"')
    return values


def test_the_gpu_env_file_is_valid_and_documented():
    values = read_yaml_map(GPU / "env.yaml")
    settings = load_settings({**values, "K_SERVICE": "imagegen-gpu"})
    assert settings.backends == ("local",)
    for name in values:
        assert f"| `{name}`" in CONFIGURATION, name


def command_flags(page: Path, program: str) -> list[dict[str, str]]:
    """The flags of every `program ...` command in the page's sh code blocks."""
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", page.read_text(), re.S):
        joined = re.sub(r"\\\n", " ", block)
        for line in joined.splitlines():
            if line.strip().startswith(program):
                words = shlex.split(line, comments=True)
                flags = {}
                for word, following in zip(words, [*words[1:], ""]):
                    if word.startswith("--"):
                        name, equals, value = word.partition("=")
                        # `--flag=value`, or `--flag value` as gcloud also takes it.
                        flags[name] = value if equals or following.startswith("--") else following
                commands.append(flags)
    return commands


def seconds(value: str) -> float:
    return float(value.removesuffix("s"))


def test_the_gpu_deploy_command_is_the_one_the_files_need():
    (deploy,) = command_flags(DOCS / "cloud-run-gpu.md", "gcloud run deploy")
    assert {"--image", "--gpu", "--gpu-type", "--no-cpu-throttling", "--max-instances", "--add-volume",
            "--add-volume-mount", "--env-vars-file", "--concurrency", "--timeout", "--cpu", "--memory"} <= set(deploy)
    assert deploy["--gpu-type"] == "nvidia-l4" and deploy["--gpu"] == "1"
    # An L4 needs at least 4 CPUs and 16 GiB.
    assert float(deploy["--cpu"]) >= 4 and deploy["--memory"] in ("16Gi", "24Gi", "32Gi")
    assert deploy["--env-vars-file"] == "deploy/cloud-run-gpu/env.yaml"
    values = read_yaml_map(GPU / "env.yaml")
    mount = dict(part.split("=", 1) for part in deploy["--add-volume-mount"].split(","))
    assert values["LOCAL_MODEL"].startswith(mount["mount-path"].rstrip("/") + "/")
    volume = dict(part.split("=", 1) for part in deploy["--add-volume"].split(","))
    assert volume["name"] == mount["volume"] and volume["type"] == "cloud-storage"
    # Cloud Run never sends an instance more than it will queue; the threads hold them all.
    assert int(deploy["--concurrency"]) == int(values["LOCAL_QUEUE_MAX"]) + 1 <= int(values["THREADS"])


def platform_timeouts() -> list[tuple[str, float, float]]:
    """(page, --timeout, deadline) for every deploy command in the docs."""
    found = []
    for page in documentation_pages():
        for program, env_file in (("gcloud functions deploy", REPO_ROOT / "env.yaml"), ("gcloud run deploy", None)):
            for flags in command_flags(page, program):
                if "--timeout" not in flags:
                    continue
                env = read_yaml_map(REPO_ROOT / flags.get("--env-vars-file", str(env_file or REPO_ROOT / "env.yaml")))
                deadline = load_settings({**env, "K_SERVICE": "x"}).deadline_seconds
                found.append((page.name, seconds(flags["--timeout"]), deadline))
    return found


def test_every_deploy_command_lets_the_function_answer_before_the_platform_cuts_it():
    timeouts = platform_timeouts()
    assert len(timeouts) >= 3
    for page, timeout, deadline in timeouts:
        # A request ends within DEADLINE_SECONDS plus the storage calls' own bounds.
        assert timeout > deadline + LOAD_BUDGET_SECONDS + SAVE_BUDGET_SECONDS, page


def test_every_functions_deploy_command_has_the_main_ones_flags():
    needed = {"--gen2", "--runtime", "--region", "--source", "--entry-point", "--trigger-http",
              "--env-vars-file", "--memory", "--cpu", "--concurrency", "--timeout", "--max-instances"}
    for page in documentation_pages():
        for flags in command_flags(page, "gcloud functions deploy"):
            assert needed <= set(flags), (page.name, needed - set(flags))
