"""The contract documents themselves: valid JSON Schema 2020-12 and OpenAPI references,
examples that pass, and docs/contract.md §3's own examples accepted."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from contract import (
    OPENAPI_PATH,
    ROUTING_SCHEMAS,
    SCHEMA_DIR,
    load_schema,
    openapi_document,
    validator_for,
)
from handlers.outbound import validate_message
from handlers.records import CONTRACT_EVENT_FIELDS, KEPT_FIELDS
from processor.api import event_for_api

NAMES = sorted(p.name.removesuffix(".schema.json") for p in SCHEMA_DIR.glob("*.schema.json"))
DOCS = Path(__file__).resolve().parents[2] / "docs"


def test_docs_point_at_the_files_the_service_reads() -> None:
    """docs/schemas and docs/openapi.yaml are the very files the service validates with."""
    assert (DOCS / "schemas").resolve() == SCHEMA_DIR.resolve()
    assert (DOCS / "openapi.yaml").resolve() == OPENAPI_PATH.resolve()
    assert set(ROUTING_SCHEMAS.values()) | {"onerelation.event.v1"} == set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_each_schema_is_valid_and_its_examples_pass(name: str) -> None:
    """Every schema is Draft 2020-12, has examples, and each example validates."""
    schema = load_schema(name)
    Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["examples"]
    for example in schema["examples"]:
        assert list(validator_for(name).iter_errors(example)) == []


def test_the_inbound_examples_are_accepted_by_the_intake() -> None:
    """The onerelation.event.v1 examples pass the whole intake check, not just the schema."""
    for example in load_schema("onerelation.event.v1")["examples"]:
        assert validate_message(example).relation_event_id == "rel-evt-9001"


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [ref for value in node.values() for ref in _refs(value)]
    if isinstance(node, list):
        return [ref for item in node for ref in _refs(item)]
    return []


def test_every_openapi_reference_resolves_inside_the_served_document() -> None:
    """The served document is self-contained: each $ref points at something in it."""
    document = openapi_document()
    assert document["openapi"].startswith("3.1.")
    json.dumps(document)  # it is JSON as served
    for ref in _refs(document):
        assert ref.startswith("#/"), ref
        target: Any = document
        for part in ref.removeprefix("#/").split("/"):
            target = target[part]


def test_the_api_returns_exactly_the_documented_event_fields() -> None:
    """An event of ``GET /api/v1/accounts/{id}/events`` has exactly the properties of
    docs/openapi.yaml's ``Event``, every one of them a field the service keeps."""
    documented = openapi_document()["components"]["schemas"]["Event"]["properties"]
    content = {name: f"value of {name}" for name in KEPT_FIELDS}
    content |= {"start": None, "end": None, "isAllDay": False, "type": "occurrence"}
    event = event_for_api("k_1", content, "rel-1")
    assert set(event) == set(documented)
    assert set(CONTRACT_EVENT_FIELDS) | {"event_key", "relation_event_id"} == set(documented)
    assert set(CONTRACT_EVENT_FIELDS) <= set(KEPT_FIELDS)
    assert {name: event[name] for name in ("subject", "webLink", "type")} == {
        "subject": "value of subject",
        "webLink": "value of webLink",
        "type": "occurrence",
    }
    assert "changeKey" not in event
