"""The contract with 1Relation as documents: JSON Schemas of the messages and the OpenAPI
description of the HTTP routes (docs/contract.md §2, §3).

The service validates with these same files, so what it accepts and what the documents
say cannot drift. ``docs/schemas`` and ``docs/openapi.yaml`` point here.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from functools import cache
from pathlib import Path
from typing import Any, Final

from jsonschema import Draft202012Validator, ValidationError, validators
from referencing import Registry, Resource

__all__ = [
    "OPENAPI_PATH",
    "ROUTING_SCHEMAS",
    "SCHEMA_DIR",
    "load_schema",
    "openapi_document",
    "validator_for",
]

SCHEMA_DIR: Final = Path(__file__).parent / "schemas"
OPENAPI_PATH: Final = Path(__file__).parent / "openapi.yaml"
#: The schema of each message the service publishes on ``onerelation.inbound``, by routing key.
ROUTING_SCHEMAS: Final[Mapping[str, str]] = {
    "event.upserted": "event-change.v1",
    "event.deleted": "event-change.v1",
    "event.conflict": "event-conflict.v1",
    "event.rejected": "event-rejected.v1",
    "account.status": "account-status.v1",
}


@cache
def load_schema(name: str) -> dict[str, Any]:
    """The schema ``docs/schemas/<name>.schema.json`` as a dict (do not modify it)."""
    with (SCHEMA_DIR / f"{name}.schema.json").open(encoding="utf-8") as file:
        schema: dict[str, Any] = json.load(file)
    return schema


@cache
def _registry() -> Registry[Any]:
    """Every schema, by file name (for relative ``$ref``) and by ``$id``."""
    resources = []
    for path in sorted(SCHEMA_DIR.glob("*.schema.json")):
        resource = Resource.from_contents(load_schema(path.name.removesuffix(".schema.json")))
        resources.append((path.name, resource))
        resources.append((str(resource.id()), resource))
    return Registry().with_resources(resources)


@cache
def _ecma(pattern: str) -> re.Pattern[str]:
    # JSON Schema patterns are ECMA-262: without the multiline flag ``$`` matches only at
    # the very end, whereas Python's ``$`` also matches before a final newline ("acc-42\n").
    if pattern.endswith("$") and not pattern.endswith("\\$"):
        pattern = pattern[:-1] + r"\Z"
    return re.compile(pattern)


def _pattern(
    validator: Any, pattern: str, instance: Any, schema: Mapping[str, Any]
) -> Iterator[ValidationError]:
    if isinstance(instance, str) and _ecma(pattern).search(instance) is None:
        yield ValidationError(f"{instance!r} does not match {pattern!r}")


def _is_integer(checker: Any, instance: Any) -> bool:
    # A JSON number written 7.0 is not a revision: only whole numbers written as such.
    return isinstance(instance, int) and not isinstance(instance, bool)


_Validator = validators.extend(  # type: ignore[no-untyped-call]
    Draft202012Validator,
    validators={"pattern": _pattern},
    type_checker=Draft202012Validator.TYPE_CHECKER.redefine("integer", _is_integer),
)


@cache
def validator_for(name: str) -> Any:
    """A Draft 2020-12 validator of schema ``name`` (ECMA ``$``, integers written as such)."""
    schema = load_schema(name)
    _Validator.check_schema(schema)
    return _Validator(schema, registry=_registry())


@cache
def openapi_document() -> dict[str, Any]:
    """``docs/openapi.yaml`` as one self-contained dict (served as ``/api/v1/openapi.json``).

    A component that is ``$ref: schemas/<name>.schema.json`` gets that message schema's
    content inline, so the served document needs no other file.
    """
    import yaml  # noqa: PLC0415  only the receiver needs it, once

    with OPENAPI_PATH.open(encoding="utf-8") as file:
        document: dict[str, Any] = yaml.safe_load(file)
    components = document.get("components", {}).get("schemas", {})
    for name, component in components.items():
        ref = component.get("$ref", "") if isinstance(component, dict) else ""
        if ref.startswith("schemas/") and ref.endswith(".schema.json"):
            schema = load_schema(ref.removeprefix("schemas/").removesuffix(".schema.json"))
            inline = {k: v for k, v in schema.items() if k not in ("$schema", "$id")}
            components[name] = _rebase(inline, f"#/components/schemas/{name}/")
    return document


def _rebase(node: Any, base: str) -> Any:
    """``node`` with its document-local ``#/...`` references moved under ``base``."""
    if isinstance(node, dict):
        return {
            key: (
                base + value.removeprefix("#/")
                if key == "$ref" and isinstance(value, str) and value.startswith("#/")
                else _rebase(value, base)
            )
            for key, value in node.items()
        }
    if isinstance(node, list):
        return [_rebase(item, base) for item in node]
    return node
