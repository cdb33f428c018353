"""Issue 11 row 13: garbage in a cursor or limit is a 400, and ids match whole."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from handlers.outbound import InvalidMessage, validate_message
from tests.e2e.harness import api, running_stack

pytestmark = pytest.mark.e2e

WINDOW = "start=2026-12-01T00:00:00Z&end=2026-12-02T00:00:00Z"


def _cursor(raw: str) -> str:
    return base64.urlsafe_b64encode(raw.encode()).rstrip(b"=").decode("ascii")


GARBAGE = [
    ("limit=%C2%B2", "limit"),  # "²": str.isdigit() says yes, int() says no
    ("limit=%D9%A3", "limit"),  # Arabic-Indic three
    ("cursor=" + _cursor('{"s":100000000000000000000,"k":"x"}'), "cursor"),
    ("cursor=" + _cursor('{"s":-100000000000000000000,"k":"x"}'), "cursor"),
    ("cursor=" + _cursor('{"s":1e20,"k":"x"}'), "cursor"),
    ("cursor=" + _cursor("[1,2]"), "cursor"),
]


async def test_cursor_and_limit_garbage_is_answered_400(
    tmp_path: Path, amqp_url: str, mongodb_url: str
) -> None:
    """An authenticated caller sending an out-of-range cursor time or a non-ASCII digit as
    limit gets a 400 naming the parameter, never a 500."""
    async with running_stack(
        tmp_path, amqp_url=amqp_url, mongodb_url=mongodb_url, roles=("receiver",)
    ) as stack:
        await stack.rt.store.accounts.create("acc-g")
        for query, name in GARBAGE:
            status, body, _ = await api(
                stack, "GET", f"/api/v1/accounts/acc-g/events?{WINDOW}&{query}"
            )
            assert status == 400, query
            assert body["error"]["code"] == "bad_request"
            assert name in body["error"]["message"], query


def _message(**changes: object) -> dict[str, object]:
    body: dict[str, object] = {
        "schema": "onerelation.event.v1",
        "op": "delete",
        "account_id": "acc-42",
        "relation_event_id": "rel-1",
        "revision": 1,
        "occurred_at": "2026-12-01T08:15:00Z",
    }
    body.update(changes)
    return body


@pytest.mark.parametrize("name", ["account_id", "relation_event_id"])
@pytest.mark.parametrize("value", ["acc-42\n", "acc-42\r\n", "\nacc-42"])
def test_identifiers_must_match_whole(name: str, value: str) -> None:
    """An id with a trailing newline (which a ``$``-anchored pattern lets through) is refused."""
    with pytest.raises(InvalidMessage) as caught:
        validate_message(_message(**{name: value}))
    assert name in caught.value.reason
    assert json.dumps(value)[1:-1] in caught.value.reason or repr(value) in caught.value.reason
