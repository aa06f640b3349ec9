"""The shape of the code: the import graph has no cycle, no module imports one in a layer above
its own, and no vendor's name appears outside its backend's modules, the registry and the docs.
Adding a backend must not need an edit anywhere else (see docs/project-layout.md)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from imagegen.backends.registry import BACKENDS
from tests.servers import REPO_ROOT

PACKAGE = REPO_ROOT / "imagegen"

# Lowest first. A module may import its own layer or any below, never one above. Prefixes
# match a module and everything under it; the longest prefix wins.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("imagegen.errors", "imagegen.domain", "imagegen.env_values", "imagegen.events", "imagegen.identity", "imagegen.malloc",
     "imagegen.record", "imagegen.retry", "imagegen.slots", "imagegen.logs", "imagegen.cors", "imagegen.imaging",
     "imagegen.images", "imagegen.embedded", "imagegen.png_info", "imagegen.route_health"),
    ("imagegen.backends.registry", "imagegen.state.base", "imagegen.state.settings", "imagegen.state.ratelimit",
     "imagegen.state.single_flight"),
    ("imagegen.config",),
    ("imagegen.backends", "imagegen.state", "imagegen.storage", "imagegen.cache", "imagegen.auth", "imagegen.outbound",
     "imagegen.signing"),
    ("imagegen.catalog", "imagegen.dispatch", "imagegen.capabilities", "imagegen.page", "imagegen.validation"),
    ("imagegen.service",),
    ("imagegen.streaming", "imagegen.http", "imagegen.serving", "imagegen.connections"),
    ("imagegen.doors",),
    ("imagegen.app",),
)


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every imagegen module this file imports, at the top or inside functions; not what it
    names only for type checking."""
    tree = ast.parse(path.read_text())
    type_checking = {
        id(node)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
        for node in ast.walk(block)
    }
    found = set()
    for node in ast.walk(tree):
        if id(node) in type_checking:
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("imagegen")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("imagegen"):
            # `from imagegen import validation` imports the module imagegen.validation.
            found |= {node.module, *(f"{node.module}.{alias.name}" for alias in node.names)}
    return found


def graph() -> dict[str, set[str]]:
    modules = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    edges = {}
    for name, path in modules.items():
        # `from imagegen import x` names a module x; a package's import of itself is no edge.
        imported = {target for target in imports_of(path) if target in modules and target != name}
        # A package named only because a module of it was imported is no edge of its own.
        edges[name] = {target for target in imported if not any(other.startswith(target + ".") for other in imported)}
    return edges


def layer_of(module: str) -> int:
    best, rank = "", None
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > len(best):
                best, rank = prefix, index
    assert rank is not None, f"{module} is in no layer: add it to LAYERS"
    return rank


def test_every_module_has_a_layer():
    for module in graph():
        if module != "imagegen":
            layer_of(module)


def test_no_module_imports_one_above_it():
    upward = [
        f"{module} -> {target}"
        for module, targets in graph().items()
        if module != "imagegen"
        for target in targets
        if layer_of(target) > layer_of(module)
    ]
    assert upward == []


def test_the_import_graph_has_no_cycle():
    edges = graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(edges[module]):
            if state.get(target) == 1:
                cycles.append(" -> ".join([*path[path.index(target):], target]))
            elif target not in state:
                visit(target, [*path, target])
        state[module] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    assert cycles == []


def test_the_checks_catch_a_cycle_and_an_upward_import(tmp_path):
    assert layer_of("imagegen.app") > layer_of("imagegen.service") > layer_of("imagegen.config")
    source = tmp_path / "x.py"
    source.write_text("import imagegen.app\nif TYPE_CHECKING:\n    import imagegen.service\ndef f():\n    from imagegen.http import Handler\n")
    assert imports_of(source) == {"imagegen.app", "imagegen.http", "imagegen.http.Handler"}


# Words that name a vendor (or its key's variable prefix), per backend that has one.
VENDOR_WORDS = {
    "huggingface": r"hugging ?face|\bHF_|router\.huggingface",
    "openai": r"openai|\bOPENAI_",
    "gemini": r"gemini\b|\bGEMINI_",
    "vertex": r"vertex\b|\bVERTEX_",
    "stability": r"stability\b|\bSTABILITY_",
    "replicate": r"replicate\b|\bREPLICATE_",
}


# The backends' shared modules, which every backend uses: no vendor in them either. The rest
# of imagegen/backends/ is the backends' own modules (and the registry).
SHARED_BACKEND_MODULES = ("base.py", "sizes.py", "toolkit.py")
# A door that speaks a vendor's API shape to its clients (OpenAI's Images API, issue #20) names
# it: that is the dialect it serves, not a backend's vendor code. Elsewhere only its name may.
DIALECT_DOORS = ("doors/openai_images.py", "doors/openai_stream.py")
DIALECT_DOOR_NAME = re.compile(r"openai_?(images|stream)", re.I)


def vendor_mentions() -> list[str]:
    found = []
    for path in PACKAGE.rglob("*"):
        if path.suffix not in (".py", ".js", ".html", ".css"):
            continue
        inside_backends = path.is_relative_to(PACKAGE / "backends")
        if inside_backends and path.relative_to(PACKAGE / "backends").as_posix() not in SHARED_BACKEND_MODULES:
            continue
        if path.relative_to(PACKAGE).as_posix() in DIALECT_DOORS:
            continue
        text = path.read_text()
        for words in VENDOR_WORDS.values():
            for match in re.finditer(words, text, re.I):
                if DIALECT_DOOR_NAME.match(text, match.start()):
                    continue
                line = text.count("\n", 0, match.start()) + 1
                found.append(f"{path.relative_to(REPO_ROOT)}:{line}: {match.group(0)}")
    return found


def test_every_backend_in_the_registry_has_vendor_words_or_none():
    assert set(VENDOR_WORDS) <= set(BACKENDS)


def test_no_vendor_is_named_outside_its_backend_the_registry_and_the_docs():
    assert vendor_mentions() == []
