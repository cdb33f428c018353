"""From a JSON Schema failure to words a sender can act on.

The published schemas carry ``x-reason`` / ``x-reasons`` annotations (docs/schemas); the
reason for the first problem a reader of the message would meet is built from them, so
the document and the service's answers cannot disagree.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from jsonschema import ValidationError

__all__ = ["first_reason", "show"]


def first_reason(
    errors: Iterable[ValidationError], document: Mapping[str, Any], *, nested: str
) -> str:
    """The reason for the error met first in the document's field order.

    ``nested`` names the root property whose own fields (``$defs/<nested>``) are ordered
    too, as a reader checks them.
    """
    root_order = list(document["properties"])
    nested_order = list(document["$defs"][nested]["properties"])

    def rank(error: ValidationError) -> tuple[int, int, int]:
        path = list(error.absolute_path)
        top = path[0] if path else _missing(error)
        root = root_order.index(top) if top in root_order else -1
        field = -3
        if path == [nested]:
            field = {"type": -2, "additionalProperties": -1}.get(str(error.validator), 99)
        elif len(path) >= 2 and path[0] == nested and path[1] in nested_order:
            field = nested_order.index(path[1])
        return root, field, len(path)

    return _reason(min(errors, key=rank), document)


def show(value: Any) -> str:
    """A short, safe rendering of an offending value for a reason text."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _missing(error: ValidationError) -> str | None:
    """The property a ``required`` failure is about (the first one absent)."""
    names = error.validator_value
    if error.validator != "required" or not isinstance(error.instance, dict):
        return None
    if not isinstance(names, list):
        return None
    return next((str(name) for name in names if name not in error.instance), None)


def _resolve(schema: Mapping[str, Any], document: Mapping[str, Any]) -> Mapping[str, Any]:
    ref = schema.get("$ref")
    if "x-reason" not in schema and isinstance(ref, str) and ref.startswith("#/$defs/"):
        resolved: Mapping[str, Any] = document["$defs"][ref.removeprefix("#/$defs/")]
        return resolved
    return schema


def _reason(error: ValidationError, document: Mapping[str, Any]) -> str:
    schema: Mapping[str, Any] = error.schema if isinstance(error.schema, Mapping) else {}
    path = _path(error.absolute_path)
    value: Any = error.instance
    reasons = schema.get("x-reasons", {})
    template = reasons.get(str(error.validator))
    if template is None and error.validator == "type" and value is None:
        template = reasons.get("null")
    missing = _missing(error)
    if template is None and missing is not None:
        sub = _resolve(schema.get("properties", {}).get(missing, {}), document)
        if "x-reason" in sub:
            template, value = sub["x-reason"], None
            path = f"{path}.{missing}" if path else missing
    if template is None:
        template = schema.get("x-reason", "{path} is not valid here")
    fields = ""
    if error.validator == "additionalProperties" and isinstance(error.instance, dict):
        # Names are the sender's input too: shown escaped and cut short, like any value.
        unknown = sorted(set(error.instance) - set(schema.get("properties", {})))
        more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        fields = ", ".join(show(name) for name in unknown[:5]) + more
    return (
        str(template)
        .replace("{path}", path or "the message")
        .replace("{value}", show(value))
        .replace("{fields}", fields)
    )


def _path(parts: Any) -> str:
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text
