"""What the fleet does, as typed events on one in-process bus (DESIGN.md §11).

The core publishes through the `Publisher` it is given; publishing never blocks and never raises.
`Bus` keeps a bounded history (for `Last-Event-ID` resume) and hands each event to every
subscriber's bounded buffer: a subscriber that falls behind loses its oldest events and is told how
many (`Lost`). `GET /events`, `gpumanager events` and the webhooks read the bus; `describe()` is
the one-line text of an event that the terminal and Slack show.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Protocol

import anyio
import msgspec


class Event(msgspec.Struct, frozen=True, kw_only=True, tag_field="type"):
    pass


class HostStateChanged(Event, frozen=True, tag="host_state"):
    host: str
    old: str  # the state before ("from")
    new: str  # the state after ("to")
    reason: str  # the lifecycle event that moved it: resume, cloud_running, ollama_ready, pause, ...


class WakeStarted(Event, frozen=True, tag="wake_started"):
    host: str
    model: str | None  # the model the waiting request needs (None: an admin's resume, or found running)
    key: str | None  # the key id whose request started it


class WakePhase(Event, frozen=True, tag="wake_phase"):
    host: str
    phase: str  # resume, boot, model, first_byte
    seconds: float


class WakeFailed(Event, frozen=True, tag="wake_failed"):
    host: str
    error: str


class PauseWarning(Event, frozen=True, tag="pause_warning"):
    host: str
    seconds_left: float
    keys: list[str]  # key ids whose requests ended on it within its window


class Paused(Event, frozen=True, tag="paused"):
    host: str
    reason: str  # idle, admin, emergency, failed_wake, budget


class RequestDone(Event, frozen=True, tag="request"):
    key: str
    route: str
    model: str
    host: str
    status: int
    prompt_tokens: int | None
    completion_tokens: int | None
    seconds: float


class BudgetLevel(Event, frozen=True, tag="budget"):
    scope: str  # "key" or "fleet"
    key: str | None  # the key id (scope "key")
    level: int  # 80 (warn_percent) or 100
    period: str  # "day" or "month"
    spent: float  # dollars (tokens for a token budget)
    limit: float
    unit: str = "dollars"  # or "tokens"


class Emergency(Event, frozen=True, tag="emergency"):
    on: bool
    key: str  # the admin key id


class KeyChanged(Event, frozen=True, tag="key"):
    key: str  # its id
    name: str
    change: str  # created, revoked, limits


class Snapshot(Event, frozen=True, tag="snapshot"):
    """The fleet when a stream begins (never on the bus itself)."""

    hosts: list[dict[str, object]]
    emergency: bool
    queued: int


AnyEvent = (
    HostStateChanged
    | WakeStarted
    | WakePhase
    | WakeFailed
    | PauseWarning
    | Paused
    | RequestDone
    | BudgetLevel
    | Emergency
    | KeyChanged
    | Snapshot
)
# What every replica of a fleet may tell of the same change (DESIGN.md §12).
FLEET_NEWS = frozenset({"host_state", "wake_started", "wake_failed", "paused", "emergency", "key", "budget"})
TYPES = tuple(t.__struct_config__.tag for t in AnyEvent.__args__ if t is not Snapshot)


class Publisher(Protocol):
    def publish(self, event: Event) -> None: ...


class NoPublisher:
    def publish(self, event: Event) -> None:
        pass


class Envelope(msgspec.Struct, frozen=True):
    """An event as published: its number on the bus, its type, when, and its JSON."""

    id: int
    type: str
    time: float  # Unix seconds
    data: bytes  # the event as JSON (with its "type")

    def event(self) -> AnyEvent:
        return _decode(self.data)


class Lost(msgspec.Struct, frozen=True):
    """A subscriber fell behind (or resumed from too far back): this many events were not delivered."""

    count: int


_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(AnyEvent).decode


class Subscription:
    """One reader's bounded buffer of envelopes, filtered by type."""

    def __init__(self, bus: Bus, types: frozenset[str] | None, size: int) -> None:
        self.bus, self.types, self.size = bus, types, size
        self._buffer: deque[Envelope] = deque()
        self.lost = 0
        self._ready = anyio.Event()

    def wants(self, envelope: Envelope) -> bool:
        return self.types is None or envelope.type in self.types

    def put(self, envelope: Envelope) -> None:
        if not self.wants(envelope):
            return
        if len(self._buffer) >= self.size:
            self._buffer.popleft()
            self.lost += 1
        self._buffer.append(envelope)
        self._ready.set()

    async def get(self, patience: float | None = None) -> Envelope | Lost | None:
        """The next envelope, a `Lost` notice first if any were dropped, or None after `patience` seconds."""
        if self.lost:
            lost, self.lost = self.lost, 0
            return Lost(lost)
        if not self._buffer:
            self._ready = anyio.Event()
            with anyio.move_on_after(patience):
                await self._ready.wait()
            if self.lost:
                lost, self.lost = self.lost, 0
                return Lost(lost)
            if not self._buffer:
                return None
        return self._buffer.popleft()

    def close(self) -> None:
        self.bus._subscribers.discard(self)

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Bus:
    """The in-process event bus: a `Publisher`, a bounded history, and subscribers."""

    def __init__(self, *, history: int = 1000, buffer: int = 1000) -> None:
        self._history: deque[Envelope] = deque(maxlen=history)
        self._subscribers: set[Subscription] = set()
        self._next = 1
        self.buffer = buffer
        # Told of each event published here (not of those `receive`d): other replicas' buses get them.
        self.relay: Callable[[Envelope], None] | None = None
        # With several replicas, each one follows every host's changes and says so: a fleet event
        # the same as one delivered less than `dedupe_seconds` ago is the same news, delivered once.
        self.dedupe_seconds = 0.0
        self._recent: dict[bytes, float] = {}

    def publish(self, event: Event) -> None:
        envelope = self._deliver(event.__struct_config__.tag, time.time(), _encode(event))  # type: ignore[arg-type]
        if envelope is not None and self.relay is not None:
            self.relay(envelope)

    def receive(self, type: str, when: float, data: bytes) -> bool:
        """An event another replica published: delivered here as if published here (unless it is
        news already), not relayed."""
        return self._deliver(type, when, data) is not None

    def _deliver(self, type: str, when: float, data: bytes) -> Envelope | None:
        if self.dedupe_seconds and type in FLEET_NEWS:
            now = time.monotonic()
            if self._recent.get(data, -math.inf) > now - self.dedupe_seconds:
                return None
            if len(self._recent) > 1000:
                self._recent = {k: t for k, t in self._recent.items() if t > now - self.dedupe_seconds}
            self._recent[data] = now
        envelope = Envelope(self._next, type, when, data)
        self._next += 1
        self._history.append(envelope)
        for subscriber in list(self._subscribers):
            subscriber.put(envelope)
        return envelope

    def subscribe(self, types: Iterable[str] | None = None, *, after: int | None = None) -> Subscription:
        """A new subscription (use it as a context manager). With `after`, the history's events
        after that id come first; a `Lost` notice if the history no longer reaches back that far."""
        subscription = Subscription(self, frozenset(types) if types is not None else None, self.buffer)
        if after is not None:
            oldest = self._history[0].id if self._history else self._next
            if after + 1 < oldest:
                subscription.lost = oldest - after - 1
            for envelope in self._history:
                if envelope.id > after:
                    subscription.put(envelope)
        self._subscribers.add(subscription)
        return subscription

    def history(self, types: Iterable[str] | None = None) -> list[Envelope]:
        wanted = frozenset(types) if types is not None else None
        return [e for e in self._history if wanted is None or e.type in wanted]

    @property
    def last_id(self) -> int:
        return self._next - 1

    @property
    def first_id(self) -> int:
        """The oldest event still in the history (the next one when there is none)."""
        return self._history[0].id if self._history else self._next


def describe(event: AnyEvent) -> str:
    """One line for a person: the terminal's `gpumanager events` and Slack."""
    match event:
        case HostStateChanged():
            return f"{event.host}: {event.old} -> {event.new} ({event.reason})"
        case WakeStarted():
            why = f"for {event.model}" if event.model else "by an admin or found running"
            return f"{event.host}: waking {why}" + (f" (key {event.key})" if event.key else "")
        case WakePhase():
            return f"{event.host}: wake phase {event.phase} took {event.seconds:.1f}s"
        case WakeFailed():
            return f"{event.host}: wake failed: {event.error}"
        case PauseWarning():
            users = ", ".join(event.keys) or "nobody"
            return f"{event.host}: pauses in {event.seconds_left:.0f}s unless used (last used by {users})"
        case Paused():
            return f"{event.host}: paused ({event.reason})"
        case RequestDone():
            tokens = f"{event.prompt_tokens or 0}+{event.completion_tokens or 0} tokens"
            where = f"key={event.key} host={event.host or '-'}"
            return f"{event.route} {event.model} {where} {event.status} {tokens} {event.seconds:.2f}s"
        case BudgetLevel():
            who = f"key {event.key}" if event.scope == "key" else "the fleet"
            amount = (
                f"${event.spent:,.2f} of ${event.limit:,.2f}"
                if event.unit == "dollars"
                else f"{event.spent:,.0f} of {event.limit:,.0f} tokens"
            )
            period = {"day": "daily", "month": "monthly"}.get(event.period, event.period)
            return f"budget: {who} has used {event.level}% of its {period} budget ({amount})"
        case Emergency():
            return f"emergency-{'off' if event.on else 'on'} by key {event.key}"
        case KeyChanged():
            return f"key {event.key} ({event.name}) {event.change}"
        case Snapshot():
            states = ", ".join(f"{h.get('name')} {h.get('status')}" for h in event.hosts)
            return f"fleet: {states or 'no hosts'}" + (" (emergency-off)" if event.emergency else "")
    return repr(event)
