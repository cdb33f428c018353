"""Graph event routes: CRUD, ids, time zones, extended properties, series, throttling."""

from __future__ import annotations

import asyncio

from graphsim.client import SimControl
from graphsim.server import Simulator

from .conftest import Graph, event_body

IMMUTABLE = {"Prefer": 'IdType="ImmutableId"'}


async def test_create_get_patch_delete(me_graph: Graph) -> None:
    """An event round-trips; PATCH bumps changeKey even when nothing changes; DELETE → 404."""
    status, created, _headers = await me_graph.call(
        "POST",
        "/me/events",
        event_body(
            location={"displayName": "Room 4"},
            attendees=[{"emailAddress": {"address": "zed@example.com"}, "type": "required"}],
        ),
    )
    assert status == 201
    assert created["type"] == "singleInstance"
    assert created["organizer"]["emailAddress"]["address"] == "ann@contoso.example"
    assert created["start"] == {"dateTime": "2026-12-03T09:00:00.0000000", "timeZone": "UTC"}
    assert created["@odata.etag"] == f'W/"{created["changeKey"]}"'
    assert created["lastModifiedDateTime"].endswith("Z")
    assert len(created["lastModifiedDateTime"].split(".")[1]) == 8
    assert "transactionId" not in created
    eid = created["id"]
    status, same, _ = await me_graph.call("PATCH", f"/me/events/{eid}", {})
    assert status == 200
    assert same["changeKey"] != created["changeKey"]
    status, patched, _ = await me_graph.call("PATCH", f"/me/events/{eid}", {"subject": "New"})
    assert patched["subject"] == "New"
    assert patched["location"]["displayName"] == "Room 4"
    status, got, _ = await me_graph.call("GET", f"/me/events/{eid}?$select=subject,start")
    assert set(got) == {"@odata.etag", "id", "subject", "start"}
    assert (await me_graph.call("DELETE", f"/me/events/{eid}"))[0] == 204
    status, err, _ = await me_graph.call("GET", f"/me/events/{eid}")
    assert status == 404
    assert err["error"]["code"] == "ErrorItemNotFound"


async def test_immutable_ids_and_both_forms_accepted(me_graph: Graph) -> None:
    """Prefer IdType=ImmutableId returns the immutable form; either form finds the event."""
    _, rest, _ = await me_graph.call("POST", "/me/events", event_body())
    status, imm, _ = await me_graph.call("GET", f"/me/events/{rest['id']}", headers=IMMUTABLE)
    assert status == 200
    assert imm["id"] != rest["id"]
    status, again, _ = await me_graph.call("GET", f"/me/events/{imm['id']}")
    assert status == 200
    assert again["id"] == rest["id"]


async def test_transaction_id_dedupes_creates(
    me_graph: Graph, control: SimControl, ann: str
) -> None:
    """A second create with the same transactionId returns the first event, no duplicate."""
    body = event_body(transactionId="txn-1")
    _, first, _ = await me_graph.call("POST", "/me/events", body)
    _, second, _ = await me_graph.call("POST", "/me/events", body)
    assert first["id"] == second["id"]
    assert first["transactionId"] == "txn-1"
    assert len(await control.events(ann)) == 1


async def test_time_zones(me_graph: Graph) -> None:
    """Windows zone input is converted; Prefer outlook.timezone shapes output; IANA is refused."""
    _, created, _ = await me_graph.call(
        "POST",
        "/me/events",
        event_body(
            start="2026-12-03T10:00:00", end="2026-12-03T11:00:00", tz="Romance Standard Time"
        ),
    )
    assert created["start"]["dateTime"] == "2026-12-03T09:00:00.0000000"
    _, shown, _ = await me_graph.call(
        "GET",
        f"/me/events/{created['id']}",
        headers={"Prefer": 'outlook.timezone="Pacific Standard Time"'},
    )
    assert shown["start"] == {
        "dateTime": "2026-12-03T01:00:00.0000000",
        "timeZone": "Pacific Standard Time",
    }
    status, err, _ = await me_graph.call("POST", "/me/events", event_body(tz="Europe/Paris"))
    assert status == 400
    assert err["error"]["code"] == "ErrorTimeZoneNotSupported"


async def test_extended_properties_expand_and_filter(me_graph: Graph) -> None:
    """Extended properties are returned only via $expand with an id filter, and are filterable."""
    pid = "String {66f5a359-4659-4830-9070-00047ec6ac6e} Name RelationId"
    _, created, _ = await me_graph.call(
        "POST",
        "/me/events",
        event_body(singleValueExtendedProperties=[{"id": pid, "value": "rel-1"}]),
    )
    assert "singleValueExtendedProperties" not in created
    _, got, _ = await me_graph.call(
        "GET",
        f"/me/events/{created['id']}?$expand=singleValueExtendedProperties($filter=id eq '{pid}')",
    )
    assert got["singleValueExtendedProperties"] == [{"id": pid, "value": "rel-1"}]
    status, found, _ = await me_graph.call(
        "GET",
        f"/me/events?$filter=singleValueExtendedProperties/Any(ep: ep/id eq '{pid}' "
        "and ep/value eq 'rel-1')",
    )
    assert status == 200
    assert [e["id"] for e in found["value"]] == [created["id"]]


async def test_list_paging(app_graph: Graph, control: SimControl, ann: str) -> None:
    """GET /events pages with @odata.nextLink until every event was listed once."""
    await control.bulk_create_events(ann, count=25, notify=False)
    seen: list[str] = []
    url = f"/users/{ann}/events?$top=10"
    while url:
        status, page, _ = await app_graph.call("GET", url)
        assert status == 200
        seen += [e["id"] for e in page["value"]]
        url = page.get("@odata.nextLink", "")
    assert len(seen) == len(set(seen)) == 25


async def test_delegated_token_cannot_read_other_mailbox(me_graph: Graph, sim: Simulator) -> None:
    """A delegated token gets 403 ErrorAccessDenied on another user's events."""
    bob = sim.store.find_user("bob@contoso.example")
    assert bob is not None
    status, err, _ = await me_graph.call("GET", f"/users/{bob.id}/events")
    assert status == 403
    assert err["error"]["code"] == "ErrorAccessDenied"


async def test_series_expansion_and_occurrence_edit(me_graph: Graph) -> None:
    """A weekly series expands in calendarView; editing one occurrence makes it an exception."""
    body = event_body(
        subject="Standup",
        start="2026-12-07T09:00:00",
        end="2026-12-07T09:15:00",
        tz="W. Europe Standard Time",
        recurrence={
            "pattern": {"type": "weekly", "interval": 1, "daysOfWeek": ["monday", "wednesday"]},
            "range": {"type": "numbered", "startDate": "2026-12-07", "numberOfOccurrences": 6},
        },
    )
    status, master, _ = await me_graph.call("POST", "/me/events", body)
    assert status == 201
    assert master["type"] == "seriesMaster"
    window = "startDateTime=2026-12-01T00:00:00Z&endDateTime=2027-01-31T00:00:00Z"
    _, view, _ = await me_graph.call("GET", f"/me/calendarView?{window}&$top=50")
    occ = view["value"]
    assert [o["type"] for o in occ] == ["occurrence"] * 6
    assert occ[0]["start"]["dateTime"] == "2026-12-07T08:00:00.0000000"
    assert occ[1]["start"]["dateTime"] == "2026-12-09T08:00:00.0000000"
    assert all(o["seriesMasterId"] == master["id"] for o in occ)
    assert len({o["iCalUId"] for o in occ}) == 6
    status, exc, _ = await me_graph.call(
        "PATCH", f"/me/events/{occ[2]['id']}", {"subject": "Moved standup"}
    )
    assert status == 200
    assert exc["type"] == "exception"
    assert exc["id"] == occ[2]["id"]
    assert (await me_graph.call("DELETE", f"/me/events/{occ[3]['id']}"))[0] == 204
    _, inst, _ = await me_graph.call("GET", f"/me/events/{master['id']}/instances?{window}")
    assert [i["type"] for i in inst["value"]].count("exception") == 1
    assert len(inst["value"]) == 5
    assert (await me_graph.call("GET", f"/me/events/{occ[3]['id']}"))[0] == 404
    _, events, _ = await me_graph.call("GET", "/me/events")
    assert [e["type"] for e in events["value"]] == ["seriesMaster"]


async def test_concurrency_throttling(app_graph: Graph, control: SimControl, ann: str) -> None:
    """More than 4 concurrent requests on one mailbox get 429 ApplicationThrottled + Retry-After."""
    ids = (await control.bulk_create_events(ann, count=1, notify=False))["ids"]
    await control.set_faults(latency_ms=150, throttle_retry_after="0.25")
    results = await asyncio.gather(
        *[app_graph.call("GET", f"/users/{ann}/events/{ids[0]}") for _ in range(8)]
    )
    statuses = sorted(r[0] for r in results)
    assert statuses.count(200) == 4
    assert statuses.count(429) == 4
    throttled = next(r for r in results if r[0] == 429)
    assert throttled[1]["error"]["code"] == "ApplicationThrottled"
    assert throttled[2]["Retry-After"] == "0.25"
    assert (await control.counters())["throttled_429"] == 4


async def test_random_503(app_graph: Graph, control: SimControl, ann: str) -> None:
    """With random_503_rate=1 every Graph request answers 503 serviceNotAvailable."""
    await control.set_faults(random_503_rate=1.0)
    status, err, _ = await app_graph.call("GET", f"/users/{ann}/events")
    assert status == 503
    assert err["error"]["code"] == "serviceNotAvailable"
