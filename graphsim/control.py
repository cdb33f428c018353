"""The unauthenticated control API under /_sim/ that tests use to drive the simulator."""

from __future__ import annotations

import datetime as dt
import json
from typing import TYPE_CHECKING, Any

from aiohttp import web

from .errors import GraphError
from .ids import make_id
from .store import Instance
from .timezones import parse_query_instant

if TYPE_CHECKING:
    from .server import Simulator


def _ok(body: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, text=json.dumps(body), content_type="application/json")


class ControlApi:
    """Routes that mutate or inspect the simulator; Outlook-side edits notify like Graph ones."""

    def __init__(self, sim: Simulator) -> None:
        self.sim = sim

    def routes(self) -> list[web.RouteDef]:
        p = "/_sim"
        return [
            web.get(f"{p}/state", self.state),
            web.post(f"{p}/reset", self.reset),
            web.get(f"{p}/users", self.users),
            web.post(f"{p}/users", self.create_user),
            web.post(f"{p}/tenants", self.create_tenant),
            web.post(f"{p}/signin-user", self.signin_user),
            web.post(f"{p}/consent", self.consent),
            web.post(f"{p}/admin-consent-decision", self.admin_decision),
            web.post(f"{p}/redirect-uris", self.redirect_uris),
            web.post(f"{p}/revoke", self.revoke),
            web.get(f"{p}/users/{{uid}}/events", self.list_events),
            web.post(f"{p}/users/{{uid}}/events", self.create_event),
            web.post(f"{p}/users/{{uid}}/events/bulk", self.bulk_create),
            web.patch(f"{p}/users/{{uid}}/events/{{eid}}", self.update_event),
            web.delete(f"{p}/users/{{uid}}/events/{{eid}}", self.delete_event),
            web.get(f"{p}/users/{{uid}}/calendar-view", self.calendar_view),
            web.get(f"{p}/counters", self.counters),
            web.post(f"{p}/counters/reset", self.reset_counters),
            web.get(f"{p}/deliveries", self.deliveries),
            web.get(f"{p}/deliveries/idle", self.idle),
            web.get(f"{p}/subscriptions", self.subscriptions),
            web.post(f"{p}/subscriptions/{{sid}}/lifecycle", self.lifecycle),
            web.get(f"{p}/faults", self.faults),
            web.post(f"{p}/faults", self.set_faults),
            web.get(f"{p}/clock", self.clock),
            web.post(f"{p}/clock/advance", self.advance),
            web.post(f"{p}/clock/speed", self.speed),
            web.post(f"{p}/delta/expire", self.expire_delta),
        ]

    @web.middleware
    async def middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if not request.path.startswith("/_sim/"):
            result: web.StreamResponse = await handler(request)
            return result
        try:
            return await handler(request)  # type: ignore[no-any-return]
        except GraphError as err:
            return _ok({"error": {"code": err.code, "message": err.message}}, err.status)
        except (KeyError, ValueError, TypeError) as err:
            return _ok({"error": {"code": "BadRequest", "message": repr(err)}}, 400)

    @staticmethod
    async def _json(request: web.Request) -> dict[str, Any]:
        raw = await request.read()
        data = json.loads(raw) if raw else {}
        if not isinstance(data, dict):
            raise TypeError("body must be a JSON object")
        return data

    def _user_id(self, request: web.Request) -> str:
        user = self.sim.store.find_user(request.match_info["uid"])
        if user is None:
            raise GraphError(404, "ErrorInvalidUser", "unknown user")
        return user.id

    # ---- directory and identity ------------------------------------------------------------

    async def state(self, request: web.Request) -> web.Response:
        return _ok(self.sim.describe())

    async def reset(self, request: web.Request) -> web.Response:
        self.sim.reset()
        return _ok(self.sim.describe())

    async def users(self, request: web.Request) -> web.Response:
        return _ok([b.user.to_json() for b in self.sim.store.mailboxes.values()])

    async def create_user(self, request: web.Request) -> web.Response:
        body = await self._json(request)
        user = self.sim.store.add_user(
            body["displayName"],
            upn=body.get("userPrincipalName"),
            tenant_id=body.get("tenantId"),
            user_id=body.get("id"),
            mail=body.get("mail"),
        )
        return _ok(user.to_json(), 201)

    async def create_tenant(self, request: web.Request) -> web.Response:
        body = await self._json(request)
        tenant = self.sim.store.add_tenant(
            body.get("id"),
            body.get("domain", "fabrikam.example"),
            body.get("displayName", "Fabrikam"),
        )
        tenant.consented = bool(body.get("consented", True))
        return _ok(tenant.to_json(), 201)

    async def signin_user(self, request: web.Request) -> web.Response:
        body = await self._json(request)
        user = self.sim.store.find_user(body["userId"])
        if user is None:
            raise GraphError(404, "ErrorInvalidUser", "unknown user")
        self.sim.identity.state.signin_user_id = user.id
        return _ok({"signinUserId": user.id})

    async def consent(self, request: web.Request) -> web.Response:
        body = await self._json(request)
        tenant = self.sim.store.find_tenant(body.get("tenantId") or self.sim.config.tenant_id)
        if tenant is None:
            raise GraphError(404, "NotFound", "unknown tenant")
        tenant.consented = bool(body["consented"])
        if not tenant.consented:
            for box in self.sim.store.mailboxes.values():
                if box.user.tenant_id == tenant.id:
                    self.sim.identity.revoke_user(box.user.id, access_tokens=False)
        return _ok(tenant.to_json())

    async def admin_decision(self, request: web.Request) -> web.Response:
        body = await self._json(request)
        self.sim.identity.state.admin_consent_accepts = bool(body["accept"])
        return _ok({"accept": self.sim.identity.state.admin_consent_accepts})

    async def redirect_uris(self, request: web.Request) -> web.Response:
        body = await self._json(request)
        self.sim.identity.state.redirect_uris = [str(u) for u in body["redirectUris"]]
        return _ok({"redirectUris": self.sim.identity.state.redirect_uris})

    async def revoke(self, request: web.Request) -> web.Response:
        body = await self._json(request)
        user = self.sim.store.find_user(body["userId"])
        if user is None:
            raise GraphError(404, "ErrorInvalidUser", "unknown user")
        result: dict[str, Any] = self.sim.identity.revoke_user(
            user.id, access_tokens=bool(body.get("accessTokens", False))
        )
        if body.get("removeSubscriptions"):
            result["subscriptions_removed"] = self.sim.subs.remove_user_subscriptions(user.id)
        return _ok(result)

    # ---- mailbox content (acting as the user in Outlook) -----------------------------------

    def _render(self, inst: Instance, request: web.Request) -> dict[str, Any]:
        return self.sim.store.render(inst, immutable=request.query.get("immutable") == "1")

    async def list_events(self, request: web.Request) -> web.Response:
        uid = self._user_id(request)
        return _ok(
            [
                self._render(self.sim.store.instance(r, None), request)
                for r in self.sim.store.list_events(uid)
            ]
        )

    async def calendar_view(self, request: web.Request) -> web.Response:
        uid = self._user_id(request)
        ws = parse_query_instant(request.query["start"])
        we = parse_query_instant(request.query["end"])
        return _ok([self._render(i, request) for i in self.sim.store.calendar_view(uid, ws, we)])

    async def create_event(self, request: web.Request) -> web.Response:
        uid = self._user_id(request)
        record, _ = self.sim.store.create_event(uid, await self._json(request))
        return _ok(self._render(self.sim.store.instance(record, None), request), 201)

    async def update_event(self, request: web.Request) -> web.Response:
        uid = self._user_id(request)
        record, orig = self.sim.store.update_event(
            uid, request.match_info["eid"], await self._json(request)
        )
        return _ok(self._render(self.sim.store.instance(record, orig), request))

    async def delete_event(self, request: web.Request) -> web.Response:
        uid = self._user_id(request)
        self.sim.store.delete_event(uid, request.match_info["eid"])
        return web.Response(status=204)

    async def bulk_create(self, request: web.Request) -> web.Response:
        uid = self._user_id(request)
        body = await self._json(request)
        notify = bool(body.get("notify", True))
        events: list[dict[str, Any]] = list(body.get("events") or [])
        gen = body.get("generate")
        if gen:
            start = parse_query_instant(gen.get("start", "2026-12-01T08:00:00Z"))
            spacing = dt.timedelta(minutes=float(gen.get("spacingMinutes", 60)))
            duration = dt.timedelta(minutes=float(gen.get("durationMinutes", 30)))
            prefix = gen.get("subjectPrefix", "Event")
            for n in range(int(gen["count"])):
                s = start + n * spacing
                events.append(
                    {
                        "subject": f"{prefix} {n}",
                        "start": {"dateTime": s.strftime("%Y-%m-%dT%H:%M:%S"), "timeZone": "UTC"},
                        "end": {
                            "dateTime": (s + duration).strftime("%Y-%m-%dT%H:%M:%S"),
                            "timeZone": "UTC",
                        },
                    }
                )
        immutable = request.query.get("immutable") == "1"
        ids = []
        for event in events:
            record, _ = self.sim.store.create_event(uid, event, notify=notify)
            ids.append(make_id(record.key, immutable=immutable))
        return _ok({"count": len(ids), "ids": ids}, 201)

    # ---- observation -----------------------------------------------------------------------

    async def counters(self, request: web.Request) -> web.Response:
        return _ok(self.sim.graph.counters.to_json())

    async def reset_counters(self, request: web.Request) -> web.Response:
        self.sim.graph.reset()
        return _ok(self.sim.graph.counters.to_json())

    async def deliveries(self, request: web.Request) -> web.Response:
        since = int(request.query.get("since", 0))
        kind = request.query.get("kind")
        sub = request.query.get("subscriptionId")
        out = [
            d
            for d in self.sim.delivery.log[since:]
            if (kind is None or d["kind"] == kind) and (sub is None or sub in d["subscription_ids"])
        ]
        return _ok(out)

    async def idle(self, request: web.Request) -> web.Response:
        return _ok({"idle": self.sim.delivery.idle()})

    async def subscriptions(self, request: web.Request) -> web.Response:
        self.sim.subs.sweep()
        return _ok([s.to_json() for s in self.sim.subs.subs.values()])

    async def lifecycle(self, request: web.Request) -> web.Response:
        body = await self._json(request)
        sid = request.match_info["sid"]
        if sid not in self.sim.subs.subs:
            raise GraphError(404, "NotFound", "unknown subscription")
        return _ok(self.sim.subs.lifecycle(sid, body["event"]))

    async def faults(self, request: web.Request) -> web.Response:
        return _ok(self.sim.faults.to_json())

    async def set_faults(self, request: web.Request) -> web.Response:
        self.sim.faults.update(await self._json(request))
        return _ok(self.sim.faults.to_json())

    async def clock(self, request: web.Request) -> web.Response:
        return _ok(self.sim.clock.snapshot())

    async def advance(self, request: web.Request) -> web.Response:
        body = await self._json(request)
        self.sim.clock.advance(float(body["seconds"]))
        self.sim.subs.sweep()
        return _ok(self.sim.clock.snapshot())

    async def speed(self, request: web.Request) -> web.Response:
        body = await self._json(request)
        self.sim.clock.set_speed(float(body["speed"]))
        return _ok(self.sim.clock.snapshot())

    async def expire_delta(self, request: web.Request) -> web.Response:
        body = await self._json(request)
        count = self.sim.delta.expire(body.get("userId"), body.get("mode", "gone"))
        return _ok({"expired": count})
