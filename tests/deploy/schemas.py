"""Validators for the deployment files, from the JSON schemas the repository ships under deploy/schemas/."""

from __future__ import annotations

import json
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.protocols import Validator
from referencing import Registry, Resource

from tests.deploy.support import REPO

SCHEMAS = REPO / "deploy" / "schemas"
KUBERNETES = SCHEMAS / "kubernetes" / "v1.37.0-strict"


def _load(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((SCHEMAS / name).read_text(encoding="utf-8"))
    return loaded


def compose_validator() -> Validator:
    """The Compose specification's schema (compose-spec.json, as check-jsonschema vendors it)."""
    schema = _load("compose-spec.json")
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


def kubernetes_validator(api_version: str, kind: str) -> Validator:
    """The strict schema of one Kubernetes kind (unknown fields refused), its references resolved locally."""
    group, _, version = api_version.rpartition("/")
    name = "-".join(part for part in (kind.lower(), group.split(".")[0], version) if part)
    definitions = json.loads((KUBERNETES / "_definitions.json").read_text(encoding="utf-8"))
    schema = json.loads((KUBERNETES / f"{name}.json").read_text(encoding="utf-8"))
    registry: Registry[Any] = Registry().with_resource(definitions["$id"], Resource.from_contents(definitions))
    return Draft202012Validator(schema, registry=registry)


def problems(validator: Validator, document: Any) -> list[str]:
    """Every violation, as `path: message`, in a stable order."""
    found = sorted(validator.iter_errors(document), key=lambda e: list(map(str, e.absolute_path)))
    return [f"{'/'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}" for e in found]
