"""Error answers of the HTTP routes (docs/contract.md §2): RFC 9457 problem details that
keep the contract's ``{"error": {"code", "message"}}`` shape too."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

from aiohttp import web

#: RFC 9457 media type, and the prefix of every error's ``type`` (a URN: stable, not fetched).
PROBLEM_CONTENT_TYPE: Final = "application/problem+json"
PROBLEM_TYPE_PREFIX: Final = "urn:m365sync:problem:"
#: Marks a response as problem details, for the middleware that sets the media type.
IS_PROBLEM: Final = web.ResponseKey("m365sync.problem", bool)


def problem_type(code: str) -> str:
    """The stable RFC 9457 ``type`` URI of an error ``code``."""
    return PROBLEM_TYPE_PREFIX + code


def json_error(
    status: int, code: str, message: str, *, headers: Mapping[str, str] | None = None
) -> web.Response:
    """An error answer: RFC 9457 problem details that also keep the contract's
    ``{"error": {"code", "message"}}`` and ``code``, so clients of either shape read it.

    It is sent as ``application/json`` unless the client accepts
    ``application/problem+json`` (:func:`problem_middleware`): clients that check the
    content type before parsing JSON keep working.
    """
    response = web.json_response(
        {
            "type": problem_type(code),
            "title": code.replace("_", " ").capitalize(),
            "status": status,
            "detail": message,
            "code": code,
            "error": {"code": code, "message": message},
        },
        status=status,
        headers=headers,
    )
    response[IS_PROBLEM] = True
    return response
