"""openapi.yaml as data, and a validator for answers against it."""

from __future__ import annotations

import functools
import json
from typing import Any

import jsonschema
import yaml
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from tests.servers import REPO_ROOT


@functools.cache
def spec() -> dict[str, Any]:
    return yaml.safe_load((REPO_ROOT / "openapi.yaml").read_text())


def schema(name: str) -> dict[str, Any]:
    return spec()["components"]["schemas"][name]


def validate_body(body: bytes | str, schema_name: str) -> None:
    """Raise if `body` is not valid JSON matching components.schemas[schema_name]."""
    registry = Registry().with_resource("urn:openapi", Resource.from_contents(spec(), default_specification=DRAFT202012))
    validator = jsonschema.Draft202012Validator({"$ref": f"urn:openapi#/components/schemas/{schema_name}"}, registry=registry)
    validator.validate(json.loads(body))
