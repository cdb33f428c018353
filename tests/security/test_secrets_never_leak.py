"""Secrets and content never leak: not into logs, not into the database, not into the
service's own messages (docs/design.md "What must always hold" 5, docs/contract.md §4).

One scenario runs every path that touches a secret: an account connected through the real
MSAL flow, Outlook changes with attendees, bodies and locations, 1Relation's outbound
changes, token refreshes (access tokens short-lived enough that MSAL refreshes on use), a
forged notification carrying the real clientState, a revoked sign-in that turns the account
reauthorization_required, and a reconnect through /connect. Every log line (structlog as
the service configures it, and the standard library of aiohttp, aio-pika, pymongo, MSAL and
urllib3 at DEBUG), every document and every message the service publishes is then searched
for every secret and every piece of content the scenario saw.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import structlog

from handlers.routing import ONERELATION_INBOUND
from processor.broker import ORIGIN_QUEUE_HEADER
from processor.logs import configure_logging
from processor.topology import (
    DEAD_QUEUE,
    LIFECYCLE_QUEUE,
    OUTBOUND_INTAKE_QUEUE,
    RETRY_DELAYS_S,
    RETRY_QUEUE,
)
from processor.verify import plaintext_findings, sensitive_values
from tests.e2e.harness import Stack, api, browser_connect, eventually, mint_link, running_stack
from tests.e2e.outbound_support import message, publish_outbound, relation_event

pytestmark = pytest.mark.e2e

ACCOUNT = "acc-leak"
#: Libraries whose standard-library logging is captured at DEBUG.
LIBRARIES = ("aiohttp", "aio_pika", "aiormq", "pymongo", "msal", "urllib3", "requests", "asyncio")
#: The simulator is Microsoft's side, not the service: its own loggers are left out.
SIMULATOR_LOGGERS = ("graphsim",)


@dataclass
class Captured:
    """Every log line of the run: structlog's JSON lines and the standard library's records."""

    structlog_stream: io.StringIO = field(default_factory=io.StringIO)
    records: list[tuple[str, str]] = field(default_factory=list)  # (logger, formatted text)

    def lines(self) -> list[tuple[str, str]]:
        lines = [("structlog", line) for line in self.structlog_stream.getvalue().splitlines()]
        return lines + [r for r in self.records if not r[0].startswith(SIMULATOR_LOGGERS)]


class _ListHandler(logging.Handler):
    def __init__(self, sink: list[tuple[str, str]]) -> None:
        super().__init__(logging.DEBUG)
        self.sink = sink
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.sink.append((record.name, self.format(record)))
        except Exception:  # a record that cannot format is a finding of its own
            self.sink.append((record.name, f"UNFORMATTABLE {record.msg!r} {record.args!r}"))


@contextmanager
def captured_logs() -> Iterator[Captured]:
    """The service's logging at debug into a buffer, plus every library at DEBUG."""
    captured = Captured()
    root = logging.getLogger()
    root_handlers, root_level = list(root.handlers), root.level
    configure_logging("debug", stream=captured.structlog_stream)
    handler = _ListHandler(captured.records)
    saved = {name: logging.getLogger(name).level for name in LIBRARIES}
    root.addHandler(handler)
    for name in ("", *LIBRARIES):
        logging.getLogger(name).setLevel(logging.DEBUG)
    try:
        yield captured
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)
        root.handlers[:] = (
            root_handlers  # configure_logging's basicConfig(force=True) replaced them
        )
        root.setLevel(root_level)
        structlog.reset_defaults()


@dataclass
class Published:
    """Everything the service handed to the broker: (exchange, routing key, headers, body)."""

    messages: list[tuple[str, str, dict[str, Any], bytes]] = field(default_factory=list)

    def install(self, stack: Stack) -> None:
        publisher = stack.rt.publisher
        original = publisher.publish_raw

        async def recording(exchange: str, routing_key: str, msg: Any, *, timeout_s: float) -> None:
            self.messages.append((exchange, routing_key, dict(msg.headers or {}), bytes(msg.body)))
            await original(exchange, routing_key, msg, timeout_s=timeout_s)

        publisher.publish_raw = recording  # type: ignore[method-assign]


@dataclass
class Issued:
    """Every token and code the simulator's identity platform hands out."""

    tokens: list[str] = field(default_factory=list)

    def install(self, stack: Stack) -> None:
        identity = stack.sim.identity
        for name in ("_access_token", "_id_token"):
            original = getattr(identity, name)

            def recording(*args: Any, _original: Any = original, **kwargs: Any) -> str:
                token: str = _original(*args, **kwargs)
                self.tokens.append(token)
                return token

            setattr(identity, name, recording)

    def all(self, stack: Stack) -> set[str]:
        state = stack.sim.identity.state
        return {*self.tokens, *state.refresh_tokens, *state.codes}


def _event(n: int, *, attendee: str) -> dict[str, Any]:
    start = time.gmtime(time.time() + 86400 * (2 + n))
    day = time.strftime("%Y-%m-%d", start)
    return {
        "subject": f"Leak probe subject {n} {uuid.uuid4().hex[:10]}",
        "body": {
            "contentType": "html",
            "content": f"<p>Leak probe body {n} {uuid.uuid4().hex}</p>",
        },
        "start": {"dateTime": f"{day}T09:00:00", "timeZone": "UTC"},
        "end": {"dateTime": f"{day}T10:00:00", "timeZone": "UTC"},
        "location": {"displayName": f"Leak probe room {n} {uuid.uuid4().hex[:8]}"},
        "attendees": [
            {"emailAddress": {"address": attendee, "name": "Probe Guest"}, "type": "required"}
        ],
    }


def _key_forms(raw: bytes) -> set[str]:
    """How a key could show up in text: base64, URL-safe base64, hex, repr, latin-1."""
    return {
        base64.b64encode(raw).decode(),
        base64.urlsafe_b64encode(raw).decode().rstrip("="),
        raw.hex(),
        repr(raw)[2:-1],
        raw.decode("latin-1"),
    }


def _settings_secrets(stack: Stack) -> set[str]:
    env, settings = stack.env, stack.settings
    values = {settings.client_secret, *settings.connect_secrets, *settings.api_tokens}
    values.add(env["M365SYNC_HASH_KEY"])
    values |= _key_forms(settings.hash_key)
    for key in settings.master_keys:
        values |= _key_forms(key.key)
    values |= {spec.split(":", 1)[1] for spec in env["M365SYNC_MASTER_KEYS"].split(",")}
    return values


async def _drain(stack: Stack, queue_name: str) -> list[tuple[dict[str, Any], bytes]]:
    """Take every message left in a queue of the test's private vhost."""
    out = []
    channel = await stack.rt.connection.channel()
    try:
        queue = await channel.get_queue(queue_name, ensure=False)
        while (msg := await queue.get(no_ack=True, fail=False)) is not None:
            out.append((dict(msg.headers or {}), bytes(msg.body)))
    finally:
        await channel.close()
    return out


def _findings(text: str, forbidden: set[str]) -> list[str]:
    return sorted(secret for secret in forbidden if secret in text)


async def test_no_secret_or_content_in_logs_documents_or_messages(
    tmp_path: Path, amqp_url: str, mongodb_url: str
) -> None:
    """After connect (MSAL), Outlook and 1Relation changes with content, token refreshes, a
    forged notification, a revoked sign-in and a reconnect: no token, authorization code,
    client secret, master or hash key, connect secret, API token, clientState, subject,
    body, location or attendee/organizer address appears in any log line, any document, or
    any message the service published (1Relation's own messages excepted)."""
    published, issued = Published(), Issued()
    with captured_logs() as logs:
        async with running_stack(
            tmp_path,
            amqp_url=amqp_url,
            mongodb_url=mongodb_url,
            roles=("receiver", "worker", "outbound"),
            # MSAL refreshes tokens with less than 5 minutes left: every use refreshes.
            sim_config={"access_token_lifetime_s": 240},
        ) as stack:
            published.install(stack)
            issued.install(stack)
            users = await stack.control.users()
            ann = users[0]
            await stack.connect_account(ACCOUNT, ann["id"])
            guest = f"guest.{uuid.uuid4().hex[:8]}@fabrikam.example"

            # Outlook changes with content; then 1Relation's.
            outlook = [
                await stack.control.create_event(
                    ann["id"], _event(n, attendee=guest), immutable=True
                )
                for n in range(3)
            ]
            outlook.append(
                await stack.control.update_event(
                    ann["id"],
                    outlook[0]["id"],
                    {"subject": f"Leak probe edited {uuid.uuid4().hex[:10]}"},
                    immutable=True,
                )
            )
            await stack.control.delete_event(ann["id"], outlook[2]["id"])
            relation = [
                {
                    **relation_event(f"Relation probe {n} {uuid.uuid4().hex[:10]}", day=5 + n),
                    "attendees": [
                        {
                            "emailAddress": {
                                "address": f"rel{n}.{uuid.uuid4().hex[:6]}@contoso.example",
                                "name": "Rel Guest",
                            },
                            "type": "optional",
                        }
                    ],
                }
                for n in range(2)
            ]
            invalid = message(ACCOUNT, "rel-bad", 1, {**relation[0], "webLink": "x"})
            await publish_outbound(
                stack,
                [
                    message(ACCOUNT, "rel-1", 1, relation[0]),
                    message(ACCOUNT, "rel-2", 1, relation[1]),
                    message(
                        ACCOUNT,
                        "rel-1",
                        2,
                        {**relation[0], "subject": relation[0]["subject"] + " v2"},
                    ),
                    invalid,
                ],
            )

            async def synced() -> bool:
                subjects = {e["subject"] for e in await stack.control.events(ann["id"])}
                stored = await stack.rt.events.collection.count_documents(
                    {"account_id": ACCOUNT, "deleted": False}
                )
                return (
                    relation[0]["subject"] + " v2" in subjects
                    and relation[1]["subject"] in subjects
                    and stored >= 4
                    and await stack.control.is_idle()
                )

            await eventually(synced, timeout_s=30)

            # Input that carries real secrets but must not be believed or logged.
            [subscription] = [
                s for s in await stack.control.subscriptions() if s.get("clientState")
            ]
            forged = {
                "subscriptionId": subscription["id"],
                "clientState": subscription["clientState"],
                "tenantId": str(uuid.uuid4()),
                "changeType": "updated",
                "resource": f"Users/{ann['id']}/Events/{outlook[0]['id']}",
            }
            async with aiohttp.ClientSession(trust_env=False) as http:
                async with http.post(
                    f"http://127.0.0.1:{stack.port}/graph/notifications",
                    data=json.dumps({"value": [forged]}),
                ) as resp:
                    assert resp.status == 202
                async with http.get(
                    f"http://127.0.0.1:{stack.port}/connect",
                    params={"token": mint_link(stack, ACCOUNT, secret="x" * 44)},
                ) as resp:
                    assert resp.status == 403
            status, _, _ = await api(
                stack,
                "GET",
                f"/api/v1/accounts/{ACCOUNT}",
                token=stack.settings.api_tokens[0] + "x",
            )
            assert status == 401
            status, body, _ = await api(
                stack,
                "GET",
                f"/api/v1/accounts/{ACCOUNT}/events?start={_iso(-1)}&end={_iso(60)}",
            )
            assert status == 200
            assert body["events"]  # content leaves only through the authenticated API

            # The sign-in is revoked: the next change meets it, the account needs reauthorization.
            await stack.control.revoke_tokens(ann["id"], access_tokens=True)
            stack.rt.tokens.invalidate(ACCOUNT)
            outlook.append(
                await stack.control.create_event(
                    ann["id"], _event(7, attendee=guest), immutable=True
                )
            )
            await eventually(lambda: _status_is(stack, "reauthorization_required"), timeout_s=20)
            # The user reconnects through /connect → authorize → /auth/callback.
            run = await browser_connect(stack, ACCOUNT, user_id=ann["id"])
            assert run.query().get("status") == "connected", (run.status, run.location)
            await eventually(lambda: _status_is(stack, "connected"), timeout_s=10)

            async def last_synced() -> bool:
                doc = await stack.rt.events.collection.find_one(
                    {"_id": stack.rt.events.event_key(ACCOUNT, outlook[-1]["id"])}
                )
                return doc is not None

            await eventually(last_synced, timeout_s=20)
            await eventually(stack.control.is_idle, timeout_s=10)

            # -- what must never show up -------------------------------------------------
            subscriptions = await stack.control.subscriptions()
            cache = await stack.rt.store.token_caches.load(ACCOUNT)
            assert cache is not None
            cached_tokens = {
                entry["secret"]
                for section in ("AccessToken", "RefreshToken", "IdToken")
                for entry in json.loads(cache[0]).get(section, {}).values()
            }
            tokens = issued.all(stack) | cached_tokens
            assert len(issued.tokens) >= 4  # sign-in, refreshes, reconnect
            content = sensitive_values(
                [*outlook, *await stack.control.events(ann["id"], immutable=True)]
            ) | sensitive_values(relation)
            content |= {ann["mail"], ann["userPrincipalName"], guest}
            content = {c for c in content if not c.startswith("AAMk") and len(c) >= 6}
            microsoft_ids = sensitive_values([*outlook]) - content
            client_states = {s["clientState"] for s in subscriptions if s.get("clientState")}
            secrets = tokens | _settings_secrets(stack) | client_states
            forbidden = {s for s in secrets | content if len(s) >= 6}

            # Database: nothing in plaintext (Microsoft ids neither, docs/contract.md §4).
            assert await plaintext_findings(stack.rt.store, forbidden | microsoft_ids) == []

            # The service's messages: announced, in flight, retried, dead-lettered, left over.
            leftovers: list[tuple[str, dict[str, Any], bytes]] = []
            # Shard queues (single active consumer) refuse basic.get; what went into them is
            # in `published`, recorded at the publisher.
            queues = [
                *(
                    RETRY_QUEUE.format(target=t, delay_s=d)
                    for t in ("inbound", "outbound")
                    for d in RETRY_DELAYS_S
                ),
                LIFECYCLE_QUEUE,
                DEAD_QUEUE,
            ]
            for name in queues:
                leftovers += [(name, headers, body) for headers, body in await _drain(stack, name)]
            announcements = await stack.announcements()
            assert any(a["routing_key"] == "event.rejected" for a in announcements)

        # -- logs: everything written while the stack ran, and while it stopped -----------
        lines = logs.lines()
    assert any('"event": "tokens.refreshed"' in text for _, text in lines)
    assert any(name.startswith("pymongo") for name, _ in lines)  # DEBUG capture is live
    leaks = [
        (name, _findings(text, forbidden), text[:300])
        for name, text in lines
        if _findings(text, forbidden)
    ]
    assert leaks == []

    ours = [
        (exchange, key, headers, body)
        for exchange, key, headers, body in published.messages
        # A dead-lettered 1Relation message is 1Relation's own body, kept for the operator.
        if headers.get(ORIGIN_QUEUE_HEADER) != OUTBOUND_INTAKE_QUEUE
    ]
    assert any(exchange == ONERELATION_INBOUND for exchange, *_ in ours)
    assert any(key.startswith("shard.") for _, key, _, _ in ours)
    for exchange, key, headers, body in ours:
        text = body.decode("utf-8", "replace") + json.dumps(headers, default=str)
        assert _findings(text, forbidden | microsoft_ids) == [], (exchange, key)
    for name, headers, body in leftovers:
        if headers.get(ORIGIN_QUEUE_HEADER) == OUTBOUND_INTAKE_QUEUE:
            continue
        text = body.decode("utf-8", "replace") + json.dumps(headers, default=str)
        assert _findings(text, forbidden | microsoft_ids) == [], name
    for body in announcements:
        assert _findings(json.dumps(body), forbidden | microsoft_ids) == []


def _iso(days: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 86400 * days))


async def _status_is(stack: Stack, status: str) -> bool:
    return await stack.status(ACCOUNT) == status
