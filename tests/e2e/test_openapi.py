"""docs/openapi.yaml against the running receiver: every route it serves is documented, and
every documented route answers with a documented status and a body of the documented shape."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from contract import openapi_document
from processor.web import SETTINGS_KEY
from tests.e2e.harness import Stack, mint_link, running_stack

pytestmark = pytest.mark.e2e

DOC_URI = "urn:m365sync:openapi"
WINDOW = "start=2026-12-01T00:00:00Z&end=2026-12-02T00:00:00Z"
#: Not a route of its own: any other path under /api/v1 answers 401, then 404 (the API's
#: description says so) rather than a documented path.
CATCH_ALL = "/api/v1/{tail}"
PROBLEM = "application/problem+json"
ACCOUNT = "acc-doc"


def _deref(document: dict[str, Any], node: Any) -> Any:
    """Follow local ``$ref``s (path items, responses) to the object they name."""
    while isinstance(node, dict) and isinstance(node.get("$ref"), str):
        target: Any = document
        for part in node["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        node = target
    return node


def _validator(document: dict[str, Any], schema: Any) -> Draft202012Validator:
    """A validator of one schema of the document, its ``#/...`` references into the document."""
    rooted = json.loads(json.dumps(schema).replace('"#/', f'"{DOC_URI}#/'))
    registry: Registry[Any] = Registry().with_resource(
        DOC_URI, Resource(contents=document, specification=DRAFT202012)
    )
    return Draft202012Validator(rooted, registry=registry)


def _documented(
    document: dict[str, Any], *, internal: bool | None = None
) -> Iterator[tuple[str, str]]:
    """Documented operations; ``internal`` picks those served on the internal listener only
    (a path-level ``servers``) or those of the public one."""
    for path, ref in document["paths"].items():
        item = _deref(document, ref)
        if internal is not None and ("servers" in item) != internal:
            continue
        for method in item:
            if method in ("get", "post", "put", "patch", "delete"):
                yield path, method


def _check(
    document: dict[str, Any],
    path: str,
    method: str,
    status: int,
    content_type: str,
    headers: Any,
    body: bytes,
) -> None:
    """The answer is one the document lists for this operation, in shape."""
    operation = _deref(document, document["paths"][path])[method]
    assert str(status) in operation["responses"], (path, method, status, body[:300])
    response = _deref(document, operation["responses"][str(status)])
    for name, header in response.get("headers", {}).items():
        if header.get("required"):
            assert name in headers, (path, method, status, name)
    content = response.get("content")
    if not content:
        assert not body, (path, method, status, body[:300])
        return
    assert content_type in content, (path, method, status, content_type)
    instance: Any = json.loads(body) if "json" in content_type else body.decode()
    schema = content[content_type]["schema"]
    problems = [e.message for e in _validator(document, schema).iter_errors(instance)]
    assert not problems, (path, method, status, problems)


def _calls(stack: Stack) -> list[tuple[str, str, str, dict[str, str]]]:
    """(documented path, method, URL path, headers): success and failure of every route."""
    token = {"Authorization": f"Bearer {stack.settings.api_tokens[0]}"}
    problem = {**token, "Accept": PROBLEM}
    account = "/api/v1/accounts/{account_id}"
    events = f"{account}/events"
    resync = f"{account}/resync"
    calls = [
        (account, "get", f"/api/v1/accounts/{ACCOUNT}", token),
        (account, "get", "/api/v1/accounts/acc-nobody", token),
        (account, "get", "/api/v1/accounts/acc-nobody", problem),
        (account, "get", f"/api/v1/accounts/{ACCOUNT}", {}),
        (account, "delete", "/api/v1/accounts/acc-nobody", token),
        (account, "delete", "/api/v1/accounts/acc-nobody", {"Accept": PROBLEM}),
        (events, "get", f"/api/v1/accounts/{ACCOUNT}/events?{WINDOW}", token),
        (events, "get", f"/api/v1/accounts/{ACCOUNT}/events?{WINDOW}&limit=0", problem),
        (events, "get", f"/api/v1/accounts/{ACCOUNT}/events?{WINDOW}&limit=0", token),
        (events, "get", f"/api/v1/accounts/acc-nobody/events?{WINDOW}", token),
        (resync, "post", f"/api/v1/accounts/{ACCOUNT}/resync", token),
        (resync, "post", "/api/v1/accounts/acc-nobody/resync", token),
        ("/api/v1/openapi.json", "get", "/api/v1/openapi.json", token),
        ("/api/v1/openapi.json", "get", "/api/v1/openapi.json", {}),
        ("/connect", "get", f"/connect?token={mint_link(stack, ACCOUNT)}", {}),
        ("/connect", "get", "/connect?token=not-a-jwt", {}),
        ("/connect", "get", f"/connect?token={mint_link(stack, ACCOUNT, secret='x' * 40)}", {}),
        ("/auth/callback", "get", "/auth/callback?state=unknown&code=x", {}),
        ("/admin-consent", "get", f"/admin-consent?token={mint_link(stack, ACCOUNT)}", {}),
        ("/admin-consent", "get", "/admin-consent?token=not-a-jwt", {}),
        ("/admin-consent/callback", "get", "/admin-consent/callback?state=unknown", {}),
        ("/api/v1/operator/status", "get", "/api/v1/operator/status", token),
        ("/api/v1/operator/status", "get", "/api/v1/operator/status", {}),
        ("/operator", "get", "/operator", {}),
        ("/operator/operator.js", "get", "/operator/operator.js", {}),
        ("/operator/operator.css", "get", "/operator/operator.css", {}),
        ("/healthz", "get", "/healthz", {}),
        ("/readyz", "get", "/readyz", {}),
        ("/metrics", "get", "internal:/metrics", {}),
    ]
    for hook in ("/graph/notifications", "/graph/lifecycle"):
        calls += [
            (hook, "get", f"{hook}?validationToken=Validation%3A+abc", {}),
            (hook, "get", hook, {}),
            (hook, "post", f"{hook}?validationToken=Validation%3A+abc", {}),
            (hook, "post", hook, {"Content-Type": "application/json"}),
        ]
    return calls


async def test_every_documented_route_answers_as_documented(
    tmp_path: Path, amqp_url: str, mongodb_url: str
) -> None:
    """Each documented operation is called (success and failure cases): its status is one
    the document lists, required headers are there, and the body matches the documented
    schema for its content type, problem+json included when asked for."""
    document = openapi_document()
    async with running_stack(
        tmp_path, amqp_url=amqp_url, mongodb_url=mongodb_url, roles=("receiver",)
    ) as stack:
        await stack.rt.store.accounts.create(ACCOUNT)
        calls = _calls(stack)
        seen_types: set[str] = set()
        async with aiohttp.ClientSession(trust_env=False) as http:
            for path, method, url, headers in calls:
                body_kwargs: dict[str, Any] = {}
                if method == "post" and path.startswith("/graph/"):
                    body_kwargs["data"] = b"{not json"
                port, target = stack.port, url
                if url.startswith("internal:"):
                    port, target = stack.metrics_port, url.removeprefix("internal:")
                async with http.request(
                    method.upper(),
                    f"http://127.0.0.1:{port}{target}",
                    headers=headers,
                    allow_redirects=False,
                    **body_kwargs,
                ) as resp:
                    body = await resp.read()
                    _check(
                        document, path, method, resp.status, resp.content_type, resp.headers, body
                    )
                    seen_types.add(resp.content_type)
        assert set(_documented(document)) <= {(p, m) for p, m, _, _ in calls}
        assert PROBLEM in seen_types  # asked for, problem+json is what comes back


async def test_every_route_the_receiver_serves_is_documented(
    tmp_path: Path, amqp_url: str, mongodb_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The routes of the app the receiver really runs, method by method, are exactly the
    documented public operations (the /api/v1 catch-all aside), and every route of the
    internal listener is documented."""
    served: list[web.Application] = []
    internal: list[web.Application] = []

    class RecordingRunner(web.AppRunner):
        def __init__(self, app: web.Application, **kwargs: Any) -> None:
            if SETTINGS_KEY in app:  # the receiver's app, not the Graph simulator's
                served.append(app)
            elif any(r.canonical == "/metrics" for r in app.router.resources()):
                internal.append(app)
            super().__init__(app, **kwargs)

    monkeypatch.setattr(web, "AppRunner", RecordingRunner)
    async with running_stack(
        tmp_path, amqp_url=amqp_url, mongodb_url=mongodb_url, roles=("receiver",)
    ):
        assert len(served) == 1
        assert len(internal) == 1
        routes = _routes(served[0])
        internal_routes = _routes(internal[0])
    routes.discard((CATCH_ALL, "*"))
    document = openapi_document()
    assert routes == set(_documented(document, internal=False))
    assert set(_documented(document, internal=True)) <= internal_routes
    assert internal_routes <= set(_documented(document))


def _routes(app: web.Application) -> set[tuple[str, str]]:
    return {
        (route.resource.canonical, route.method.lower())
        for route in app.router.routes()
        if route.resource is not None
    }
