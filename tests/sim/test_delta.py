"""calendarView delta: paging, incremental rounds, @removed, token expiry, replays."""

from __future__ import annotations

from typing import Any

from graphsim.client import SimControl

from .conftest import Graph, event_body

WINDOW = "startDateTime=2026-12-01T00:00:00Z&endDateTime=2026-12-31T00:00:00Z"


async def _round(
    graph: Graph, url: str, page_size: int | None = None
) -> tuple[list[dict[str, Any]], str, int]:
    """Follow nextLinks to the deltaLink; returns (items, deltaLink, pages)."""
    headers = {"Prefer": f"odata.maxpagesize={page_size}"} if page_size else {}
    items: list[dict[str, Any]] = []
    pages = 0
    while True:
        status, body, _ = await graph.call("GET", url, headers=headers)
        assert status == 200, body
        pages += 1
        items += body["value"]
        if "@odata.deltaLink" in body:
            return items, body["@odata.deltaLink"], pages
        url = body["@odata.nextLink"]


async def test_first_round_pages_then_only_changes(
    me_graph: Graph, control: SimControl, ann: str
) -> None:
    """Round one pages through everything; round two returns changes and @removed only."""
    ids = (
        await control.bulk_create_events(ann, count=25, start="2026-12-02T08:00:00Z", notify=False)
    )["ids"]
    items, delta_link, pages = await _round(me_graph, f"/me/calendarView/delta?{WINDOW}")
    assert pages == 3
    assert len(items) == 25
    assert "$deltatoken=" in delta_link
    items, delta_link, _ = await _round(me_graph, delta_link)
    assert items == []

    await control.update_event(ann, ids[0], {"subject": "changed"})
    await control.delete_event(ann, ids[1])
    created = await control.create_event(
        ann, event_body(start="2026-12-20T09:00:00", end="2026-12-20T10:00:00")
    )
    items, delta_link, _ = await _round(me_graph, delta_link, page_size=50)
    by_id = {i["id"]: i for i in items}
    assert by_id[ids[0]]["subject"] == "changed"
    assert by_id[ids[1]]["@removed"] == {"reason": "deleted"}
    assert created["id"] in by_id
    assert len(items) == 3


async def test_out_of_window_changes_arrive_as_removed(
    me_graph: Graph, control: SimControl, ann: str
) -> None:
    """An event created or moved outside the window is reported as @removed deleted."""
    inside = await control.create_event(ann, event_body())
    _, delta_link, _ = await _round(me_graph, f"/me/calendarView/delta?{WINDOW}")
    outside = await control.create_event(
        ann, event_body(start="2027-03-01T09:00:00", end="2027-03-01T10:00:00")
    )
    await control.update_event(
        ann,
        inside["id"],
        {
            "start": {"dateTime": "2027-02-01T09:00:00", "timeZone": "UTC"},
            "end": {"dateTime": "2027-02-01T10:00:00", "timeZone": "UTC"},
        },
    )
    items, _, _ = await _round(me_graph, delta_link)
    assert {i["id"]: i.get("@removed") for i in items} == {
        inside["id"]: {"reason": "deleted"},
        outside["id"]: {"reason": "deleted"},
    }


async def test_series_in_delta_has_no_master(
    me_graph: Graph, control: SimControl, ann: str
) -> None:
    """Delta returns occurrences and exceptions of a series, never the master."""
    await control.create_event(
        ann,
        event_body(
            recurrence={
                "pattern": {"type": "daily", "interval": 2},
                "range": {"type": "endDate", "startDate": "2026-12-03", "endDate": "2026-12-09"},
            }
        ),
    )
    items, _, _ = await _round(me_graph, f"/me/calendarView/delta?{WINDOW}")
    assert [i["type"] for i in items] == ["occurrence"] * 4


async def test_expired_tokens(me_graph: Graph, control: SimControl, ann: str) -> None:
    """Expired tokens answer 410 Gone with Location, or 400 syncStateNotFound, as chosen."""
    await control.create_event(ann, event_body())
    _, delta_link, _ = await _round(me_graph, f"/me/calendarView/delta?{WINDOW}")
    await control.expire_delta_tokens(ann, mode="gone")
    status, body, headers = await me_graph.call("GET", delta_link)
    assert status == 410
    assert "startDateTime=" in headers["Location"]
    assert body["error"]["code"] == "resyncRequired"

    _, delta_link, _ = await _round(me_graph, f"/me/calendarView/delta?{WINDOW}")
    await control.expire_delta_tokens(mode="syncStateNotFound")
    status, body, _ = await me_graph.call("GET", delta_link)
    assert status == 400
    assert body["error"]["code"] == "syncStateNotFound"


async def test_delta_requires_window_and_rejects_select(me_graph: Graph) -> None:
    """The first delta call needs a window; $select is not allowed with delta."""
    assert (await me_graph.call("GET", "/me/calendarView/delta"))[0] == 400
    status, _, _ = await me_graph.call("GET", f"/me/calendarView/delta?{WINDOW}&$select=subject")
    assert status == 400


async def test_delta_replay_fault(me_graph: Graph, control: SimControl, ann: str) -> None:
    """With delta_replay=1 unchanged items are sent again in the next round."""
    await control.bulk_create_events(ann, count=3, start="2026-12-02T08:00:00Z", notify=False)
    _, delta_link, _ = await _round(me_graph, f"/me/calendarView/delta?{WINDOW}")
    await control.set_faults(delta_replay=1.0)
    items, _, _ = await _round(me_graph, delta_link)
    assert len(items) == 3
    assert all("@removed" not in i for i in items)
