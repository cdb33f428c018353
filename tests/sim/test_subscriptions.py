"""Subscriptions: validation handshake, limits, expiry, notifications, retries, lifecycle, faults."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Any

from graphsim.client import SimControl
from graphsim.server import Simulator

from .conftest import Graph, Receiver, SubscribeFn, delegated_tokens, event_body


async def test_handshake_wrong_echo_fails(
    me_graph: Graph, receiver: Receiver, subscribe: Callable[[Graph], SubscribeFn]
) -> None:
    """A receiver that echoes the validation token wrongly makes creation fail with 400."""
    for mode in ("wrong", "json", "status500"):
        receiver.validation_mode = mode
        status, body = await subscribe(me_graph)()
        assert status == 400, mode
        assert body["error"]["code"] == "ValidationError"
        assert body["error"]["message"].startswith("Subscription validation request failed.")


async def test_handshake_validates_both_urls(
    me_graph: Graph,
    receiver: Receiver,
    control: SimControl,
    subscribe: Callable[[Graph], SubscribeFn],
) -> None:
    """Both URLs get a decoded sentence token as text/plain and creation returns 201."""
    status, body = await subscribe(me_graph)()
    assert status == 201, body
    assert len(receiver.validations) == 2
    assert receiver.validations[0].startswith(
        "Validation: Testing client application reachability for subscription Request-Id: "
    )
    validations = await control.deliveries(kind="validation")
    assert [v["url"] for v in validations] == [
        f"{receiver.url}/notify?tenant=acme",
        f"{receiver.url}/lifecycle",
    ]
    assert body["clientState"] == "sub-secret-1"
    assert body["notificationQueryOptions"] is None
    assert body["applicationId"]
    assert body["creatorId"]
    assert body["id"]
    assert body["latestSupportedTlsVersion"] == "v1_2"


async def test_expiry_limits(
    me_graph: Graph, sim: Simulator, subscribe: Callable[[Graph], SubscribeFn]
) -> None:
    """Beyond 4230 minutes is 400; under 45 minutes is raised to 45 minutes."""
    too_far = sim.clock.now() + dt.timedelta(minutes=4231)
    status, _ = await subscribe(me_graph)(expirationDateTime=too_far.isoformat())
    assert status == 400
    short = sim.clock.now() + dt.timedelta(minutes=5)
    status, body = await subscribe(me_graph)(expirationDateTime=short.isoformat())
    assert status == 201
    granted = dt.datetime.fromisoformat(body["expirationDateTime"].replace("Z", "+00:00"))
    assert granted >= sim.clock.now() + dt.timedelta(minutes=44)


async def test_expiry_by_accelerated_clock(
    me_graph: Graph,
    control: SimControl,
    receiver: Receiver,
    ann: str,
    sim: Simulator,
    subscribe: Callable[[Graph], SubscribeFn],
) -> None:
    """A subscription whose expiry passes on the sim clock disappears and notifies no more."""
    _, sub = await subscribe(me_graph)()
    await control.advance_clock(25 * 3600)
    fresh = Graph(sim, me_graph.http, (await delegated_tokens(sim, me_graph.http))["access_token"])
    status, _, _ = await fresh.call("GET", f"/subscriptions/{sub['id']}")
    assert status == 404
    states = {s["id"]: s["state"] for s in await control.subscriptions()}
    assert states[sub["id"]] == "expired"
    await control.create_event(ann, event_body())
    await control.wait_idle()
    assert receiver.notifications == []


async def test_renew_and_list_and_delete(
    me_graph: Graph, sim: Simulator, subscribe: Callable[[Graph], SubscribeFn]
) -> None:
    """PATCH renews within limits, GET lists the app's subscriptions, DELETE answers 204."""
    _, sub = await subscribe(me_graph)()
    new_expiry = (sim.clock.now() + dt.timedelta(hours=60)).isoformat()
    status, renewed, _ = await me_graph.call(
        "PATCH", f"/subscriptions/{sub['id']}", {"expirationDateTime": new_expiry}
    )
    assert status == 200
    assert renewed["expirationDateTime"] != sub["expirationDateTime"]
    _, listed, _ = await me_graph.call("GET", "/subscriptions")
    assert [s["id"] for s in listed["value"]] == [sub["id"]]
    assert (await me_graph.call("DELETE", f"/subscriptions/{sub['id']}"))[0] == 204
    assert (await me_graph.call("GET", f"/subscriptions/{sub['id']}"))[0] == 404


async def test_notification_payload(
    me_graph: Graph,
    control: SimControl,
    receiver: Receiver,
    ann: str,
    sim: Simulator,
    subscribe: Callable[[Graph], SubscribeFn],
) -> None:
    """A change yields a basic notification in the documented shape, with the URL's query kept."""
    _, sub = await subscribe(me_graph)()
    _, created, _ = await me_graph.call("POST", "/me/events", event_body())
    await control.wait_for_deliveries(lambda log: any(d["delivered"] for d in log), kind="change")
    [item] = receiver.notifications
    path = f"Users/{ann}/Events/{created['id']}"
    assert item == {
        "subscriptionId": sub["id"],
        "subscriptionExpirationDateTime": item["subscriptionExpirationDateTime"],
        "changeType": "created",
        "resource": path,
        "resourceData": {
            "@odata.type": "#Microsoft.Graph.Event",
            "@odata.id": path,
            "@odata.etag": created["@odata.etag"],
            "id": created["id"],
        },
        "clientState": "sub-secret-1",
        "tenantId": sim.tenant_id,
    }
    assert item["subscriptionExpirationDateTime"].endswith("+00:00")
    [delivery] = await control.deliveries(kind="change")
    assert delivery["url"].endswith("/notify?tenant=acme")


async def test_notifications_are_retried_after_503(
    app_graph: Graph,
    control: SimControl,
    receiver: Receiver,
    ann: str,
    subscribe: Callable[[Graph], SubscribeFn],
) -> None:
    """A receiver answering 503 gets the same items again until it answers 2xx."""
    status, sub = await subscribe(app_graph)(resource=f"users/{ann}/events")
    assert status == 201, sub
    receiver.fail_next = 2
    await control.create_event(ann, event_body())
    await control.wait_idle()
    attempts = await control.deliveries(kind="change")
    assert [a["status"] for a in attempts] == [503, 503, 202]
    assert attempts[0]["items"] == attempts[2]["items"]
    assert len(receiver.notifications) == 1


async def test_undeliverable_items_dropped_after_4h_with_missed(
    app_graph: Graph,
    control: SimControl,
    receiver: Receiver,
    ann: str,
    subscribe: Callable[[Graph], SubscribeFn],
) -> None:
    """After 4 h of sim time of failures the items are dropped and `missed` is sent."""
    _, _sub = await subscribe(app_graph)(
        resource=f"users/{ann}/events",
        notificationUrl=f"{receiver.url}/notify",
        lifecycleNotificationUrl=f"{receiver.url}/lc",
    )
    receiver.fail_next = 10_000
    await control.create_event(ann, event_body())
    await control.wait_for_deliveries(lambda log: len(log) >= 1, kind="change")
    await control.advance_clock(4 * 3600 + 1)
    log = await control.wait_for_deliveries(lambda log: any(d["kind"] == "dropped" for d in log))
    assert any(d["kind"] == "dropped" for d in log)
    receiver.fail_next = 0
    await control.wait_for_deliveries(
        lambda log: any(d["delivered"] for d in log), kind="lifecycle"
    )
    assert receiver.notifications[-1]["lifecycleEvent"] == "missed"


async def test_lifecycle_events(
    me_graph: Graph,
    control: SimControl,
    receiver: Receiver,
    sim: Simulator,
    subscribe: Callable[[Graph], SubscribeFn],
) -> None:
    """reauthorizationRequired pauses until /reauthorize; subscriptionRemoved deletes it."""
    _, sub = await subscribe(me_graph)()
    await control.trigger_lifecycle(sub["id"], "reauthorizationRequired")
    await me_graph.call("POST", "/me/events", event_body(subject="lost"))
    await control.wait_idle()
    assert [n.get("lifecycleEvent") for n in receiver.notifications] == ["reauthorizationRequired"]
    lifecycle = receiver.notifications[0]
    assert set(lifecycle) == {
        "subscriptionId",
        "subscriptionExpirationDateTime",
        "tenantId",
        "clientState",
        "lifecycleEvent",
    }
    assert (await me_graph.call("POST", f"/subscriptions/{sub['id']}/reauthorize"))[0] == 204
    await me_graph.call("POST", "/me/events", event_body(subject="seen"))
    await control.wait_idle()
    assert receiver.notifications[-1]["changeType"] == "created"
    await control.trigger_lifecycle(sub["id"], "subscriptionRemoved")
    await control.wait_idle()
    assert receiver.notifications[-1]["lifecycleEvent"] == "subscriptionRemoved"
    assert (await me_graph.call("GET", f"/subscriptions/{sub['id']}"))[0] == 404


async def test_occurrence_edit_notifies_only_master(
    me_graph: Graph,
    control: SimControl,
    receiver: Receiver,
    ann: str,
    subscribe: Callable[[Graph], SubscribeFn],
) -> None:
    """Editing or cancelling one occurrence yields only `updated` for the series master."""
    _, master, _ = await me_graph.call(
        "POST",
        "/me/events",
        event_body(
            recurrence={
                "pattern": {"type": "daily", "interval": 1},
                "range": {"type": "numbered", "startDate": "2026-12-03", "numberOfOccurrences": 3},
            }
        ),
    )
    await subscribe(me_graph)()
    view = await control.calendar_view(ann, "2026-12-01T00:00:00Z", "2026-12-31T00:00:00Z")
    await control.update_event(ann, view[0]["id"], {"subject": "changed"})
    await control.delete_event(ann, view[1]["id"])
    await control.wait_idle()
    assert [(n["changeType"], n["resourceData"]["id"]) for n in receiver.notifications] == [
        ("updated", master["id"]),
        ("updated", master["id"]),
    ]


async def test_immutable_subscription_ids(
    me_graph: Graph,
    control: SimControl,
    receiver: Receiver,
    ann: str,
    subscribe: Callable[[Graph], SubscribeFn],
) -> None:
    """A subscription created with Prefer IdType=ImmutableId notifies immutable ids."""
    await subscribe(me_graph)(headers={"Prefer": 'IdType="ImmutableId"'})
    created = await control.create_event(ann, event_body(), immutable=True)
    await control.wait_idle()
    assert receiver.notifications[0]["resourceData"]["id"] == created["id"]


async def test_duplicates_fault(
    me_graph: Graph,
    control: SimControl,
    receiver: Receiver,
    ann: str,
    subscribe: Callable[[Graph], SubscribeFn],
) -> None:
    """With duplicates on, a create yields created+updated and an edit yields 1-3 updated."""
    await subscribe(me_graph)()
    await control.set_faults(duplicates=True, seed=7)
    created = await control.create_event(ann, event_body())
    for n in range(5):
        await control.update_event(ann, created["id"], {"subject": f"v{n}"})
    await control.wait_idle()
    kinds = [n["changeType"] for n in receiver.notifications]
    assert kinds[:2] == ["created", "updated"]
    assert 5 <= kinds.count("updated") - 1 <= 15
    assert kinds.count("updated") - 1 > 5  # the seed makes at least one edit duplicate


async def test_batch_and_reorder_faults(
    me_graph: Graph,
    control: SimControl,
    receiver: Receiver,
    ann: str,
    subscribe: Callable[[Graph], SubscribeFn],
) -> None:
    """Batching puts several items in one POST; reordering still delivers every item."""
    await subscribe(me_graph)()
    await control.set_faults(batch_max_items=5, batch_window_ms=100, reorder_ms=30)
    await control.bulk_create_events(ann, count=10)
    await control.wait_idle()
    assert len(receiver.notifications) == 10
    assert max(len(p["value"]) for p in receiver.posts) > 1


async def test_subscription_write_throttling(
    me_graph: Graph, control: SimControl, subscribe: Callable[[Graph], SubscribeFn]
) -> None:
    """Subscription writes beyond the per-app-and-tenant limit get 429 with Retry-After."""
    await control.set_faults(subscription_write_limit=2)
    statuses: list[Any] = [(await subscribe(me_graph)())[0] for _ in range(3)]
    assert statuses == [201, 201, 429]


async def test_delegated_cannot_subscribe_to_other_mailbox(
    me_graph: Graph, sim: Simulator, subscribe: Callable[[Graph], SubscribeFn]
) -> None:
    """A delegated token cannot subscribe to another user's events."""
    bob = sim.store.find_user("bob@contoso.example")
    assert bob is not None
    status, _ = await subscribe(me_graph)(resource=f"users/{bob.id}/events")
    assert status == 403
