"""Error responses in the shapes Graph and the identity platform use."""

from __future__ import annotations

import datetime as dt
import json
import uuid
from typing import Any

from aiohttp import web


class GraphError(Exception):
    """Raised inside Graph handlers; turned into Graph's error JSON by the dispatcher."""

    def __init__(
        self, status: int, code: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


def graph_error_response(
    status: int,
    code: str,
    message: str,
    request_id: str | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    """`{"error": {"code", "message", "innerError": {date, request-id, client-request-id}}}`."""
    rid = request_id or str(uuid.uuid4())
    body = {
        "error": {
            "code": code,
            "message": message,
            "innerError": {
                "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S"),
                "request-id": rid,
                "client-request-id": rid,
            },
        }
    }
    hdrs = {"request-id": rid, "client-request-id": rid}
    hdrs.update(headers or {})
    return web.Response(
        status=status, text=json.dumps(body), content_type="application/json", headers=hdrs
    )


class AadError(Exception):
    """Raised inside identity handlers; turned into AAD's OAuth error JSON."""

    def __init__(self, status: int, error: str, aadsts: int, description: str) -> None:
        super().__init__(description)
        self.status = status
        self.error = error
        self.aadsts = aadsts
        self.description = description

    def body(self) -> dict[str, Any]:
        trace = str(uuid.uuid4())
        corr = str(uuid.uuid4())
        now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")
        return {
            "error": self.error,
            "error_description": (
                f"AADSTS{self.aadsts}: {self.description} Trace ID: {trace} "
                f"Correlation ID: {corr} Timestamp: {now}"
            ),
            "error_codes": [self.aadsts],
            "timestamp": now,
            "trace_id": trace,
            "correlation_id": corr,
            "error_uri": f"https://login.microsoftonline.com/error?code={self.aadsts}",
        }

    def response(self) -> web.Response:
        return web.json_response(self.body(), status=self.status)
