"""The inbound path end to end: Outlook change → Graph notification → … → MongoDB."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.harness import eventually, running_stack

pytestmark = pytest.mark.e2e


async def test_an_outlook_change_reaches_the_database_encrypted(
    tmp_path: Path, amqp_url: str, mongodb_url: str
) -> None:
    """An event created in Outlook is stored (decryptable, equal to Graph's) and announced."""
    async with running_stack(tmp_path, amqp_url=amqp_url, mongodb_url=mongodb_url) as stack:
        users = await stack.control.users()
        user_id = users[0]["id"]
        await stack.connect_account("acc-1", user_id)
        created = await stack.control.create_event(
            user_id,
            {
                "subject": "Quarterly review",
                "start": {"dateTime": "2026-12-03T10:00:00", "timeZone": "UTC"},
                "end": {"dateTime": "2026-12-03T11:00:00", "timeZone": "UTC"},
            },
            immutable=True,
        )
        key = stack.rt.events.event_key("acc-1", created["id"])

        async def stored() -> object:
            return await stack.rt.events.collection.find_one({"_id": key})

        doc = await eventually(stored)
        cipher = await stack.rt.store.keys.cipher_for("acc-1")
        graph_id, content = stack.rt.events.decrypt(doc, cipher)
        assert graph_id == created["id"]
        assert content["subject"] == "Quarterly review"
        announcements = await eventually(stack.announcements)
        assert [a["event_key"] for a in announcements] == [key]
        assert announcements[0]["change"] == "upserted"
