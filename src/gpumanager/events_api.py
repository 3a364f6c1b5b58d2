"""`GET /events`: the event bus as Server-Sent Events, for admins.

A stream begins with a `snapshot` of the fleet (no `id:`), then every event as it is published,
each with its bus number as `id:`. A client that reconnects with `Last-Event-ID` (or `?after=N`)
gets the events it missed from the bounded history first (and a `lost` event if the history no
longer reaches back that far); a reader too slow for its buffer gets a `lost` event with the count.
`?type=wake_started,paused` keeps only those types; `?follow=false` sends the snapshot and the
history, then ends. A comment line (`: heartbeat`) goes out every `events_heartbeat_seconds` of
quiet, so proxies and clients can tell a quiet stream from a dead one.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable

import msgspec
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from gpumanager.admin import describe
from gpumanager.auth import require_admin
from gpumanager.errors import BadRequest
from gpumanager.events import TYPES, Bus, Envelope, Lost, Snapshot
from gpumanager.fleet import Fleet

_encode = msgspec.json.Encoder().encode
CHECK_SECONDS = 0.5  # how often a quiet stream looks whether the server is shutting down


def sse(envelope: Envelope) -> bytes:
    return b"id: %d\nevent: %s\ndata: %s\n\n" % (envelope.id, envelope.type.encode(), envelope.data)


def fleet_snapshot(fleet: Fleet) -> bytes:
    """The `snapshot` event a stream begins with: every host as the admin API describes it."""
    now = fleet.clock()
    hosts = [describe(host, now) for host in fleet.hosts.values()]
    data = _encode(Snapshot(hosts=hosts, emergency=fleet.emergency, queued=len(fleet.queue)))
    return b"event: snapshot\ndata: %s\n\n" % data


def events_route(fleet: Fleet, bus: Bus, *, heartbeat: float, closing: Callable[[], bool]) -> Route:
    async def stream(request: Request) -> Response:
        require_admin(request.scope)
        return event_stream(request, bus, lambda: fleet_snapshot(fleet), heartbeat=heartbeat, closing=closing)

    return Route("/events", stream, methods=["GET"])


def event_stream(
    request: Request,
    bus: Bus,
    snapshot: Callable[[], bytes],
    *,
    heartbeat: float,
    closing: Callable[[], bool],
    keep: Callable[[Envelope], bool] | None = None,
    types: list[str] | None = None,
) -> Response:
    """The bus as SSE for one client (see the module's docstring); `keep` drops the events it
    refuses (a user's dashboard sees only what is its own to see), `types` narrows the stream
    further than `?type=`. The stream also ends once the client's session does (a revoked key)."""
    asked = _types(request.query_params.get("type"))
    if types is not None:
        asked = [t for t in (asked or types) if t in types]
    follow = request.query_params.get("follow", "true").lower() not in ("false", "0", "no")
    after = _after(request.headers.get("last-event-id") or request.query_params.get("after"))
    if after is not None and after > bus.last_id:
        after = None  # an id from before a restart (they start again at 1): begin afresh
    from_history = after if after is not None else (None if follow else bus.first_id - 1)
    still_valid: Callable[[], bool] = request.scope.get("still_valid") or (lambda: True)

    async def body() -> AsyncIterator[bytes]:
        with bus.subscribe(asked, after=from_history) as subscription:  # left by every way out
            if after is None:
                yield snapshot()
            quiet_since = time.monotonic()
            while not closing():
                if not still_valid():  # the session ended (its key revoked): say so, the page asks why
                    yield b"event: ended\ndata: {}\n\n"
                    return
                item = await subscription.get(patience=min(CHECK_SECONDS, heartbeat))
                if isinstance(item, Lost):
                    yield b"event: lost\ndata: %s\n\n" % _encode({"lost": item.count})
                elif item is not None and (keep is None or keep(item)):
                    yield sse(item)
                elif item is None and not follow:
                    return
                elif time.monotonic() - quiet_since >= heartbeat:  # quiet, or only others' events
                    yield b": heartbeat\n\n"
                else:
                    continue
                quiet_since = time.monotonic()

    headers = {"cache-control": "no-cache", "x-accel-buffering": "no"}
    return StreamingResponse(body(), media_type="text/event-stream", headers=headers)


def _types(text: str | None) -> list[str] | None:
    if not text:
        return None
    wanted = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in wanted if t not in TYPES]
    if unknown:
        raise BadRequest(f"unknown event type {', '.join(unknown)}; types: {', '.join(TYPES)}")
    return wanted


def _after(text: str | None) -> int | None:
    if text is None or not text.strip():
        return None
    try:
        return max(0, int(text))
    except ValueError:
        raise BadRequest(f"Last-Event-ID must be an event number, not {text!r}") from None
