"""The pure policy `choose()`, the fair queue and the host transition table, table-style."""

from __future__ import annotations

import pytest

from gpumanager.errors import InvalidTransition
from gpumanager.hosts import TRANSITIONS, HostEvent, HostState, transition
from gpumanager.scheduler import Ask, FairQueue, HostView, Reject, Snapshot, Use, Wait, Waiter, Wake, choose

S = HostState


def host(
    name: str,
    state: HostState = S.READY,
    *,
    leases: int = 0,
    slots: int = 2,
    cost: float = 1.0,
    loaded: bool = False,
    ctx_match: bool = True,
    reserved: str | None = None,
    until: float = 100.0,
    healthy: bool = True,
    draining: bool = False,
) -> HostView:
    return HostView(name, state, healthy, draining, leases, slots, cost, loaded, ctx_match, reserved, until)


ASK = Ask("m", "k1")


@pytest.mark.parametrize(
    ("hosts", "extra", "expected"),
    [
        # 4. no candidate at all
        ((), {}, Reject(404, "model 'm' not found")),
        # 1. ready hosts with a free slot
        ((host("a"),), {}, Use("a")),
        ((host("a", leases=1), host("b")), {}, Use("b")),  # lower leases/slots
        ((host("a", cost=2.0), host("b", cost=1.0)), {}, Use("b")),  # then cheaper
        ((host("a", cost=2.0), host("b", loaded=True, cost=3.0)), {}, Use("b")),  # loaded beats cheaper
        ((host("a", loaded=True, ctx_match=False), host("b", loaded=True)), {}, Use("b")),  # same num_ctx first
        ((host("a", reserved="k1"), host("b", loaded=True)), {}, Use("a")),  # my reservation first
        ((host("a", reserved="k2"), host("b", leases=1)), {}, Use("b")),  # another key's host last...
        ((host("a", reserved="k2"), host("b", leases=2)), {}, Use("a")),  # ...unless nothing else is free
        ((host("a", reserved="k2", until=5.0), host("b", leases=1)), {}, Use("a")),  # an expired reservation is none
        ((host("a", healthy=False), host("b", leases=1)), {}, Use("b")),
        ((host("a", draining=True), host("b", S.PAUSED)), {}, Wake("b")),  # a draining host pauses first...
        ((host("a", draining=True),), {}, Wake("a")),  # ...and is woken again after, when it is the only one
        # 2. busy or waking: wait, and scale up past the queue depth
        ((host("a", leases=2),), {}, Wait("every host with the model is busy or waking")),
        ((host("a", S.RESUMING),), {}, Wait("every host with the model is busy or waking")),
        (
            (host("a", leases=2), host("b", S.PAUSED)),
            {"queued": 7},
            Wait("every host with the model is busy or waking"),
        ),
        ((host("a", leases=2), host("b", S.PAUSED)), {"queued": 8}, Wake("b")),
        (
            (host("a", S.STARTING), host("b", S.PAUSED)),
            {"queued": 8, "emergency": True},
            Wait("every host with the model is busy or waking"),
        ),
        # 3. wake the cheapest paused candidate
        ((host("a", S.PAUSED, cost=2.0), host("b", S.PAUSED, cost=1.0)), {}, Wake("b")),
        ((host("a", S.PAUSED), host("b", S.PAUSED, loaded=True)), {}, Wake("b")),  # ties: loaded last time
        ((host("b", S.PAUSED), host("a", S.PAUSED)), {}, Wake("a")),  # then by name
        ((host("a", S.PAUSING),), {}, Wake("a")),  # woken again once its pause is done
        (
            (host("a", S.PAUSED),),
            {"awake": 2, "max_awake": 2},
            Wait("2 hosts are awake (max_awake_hosts); waiting for one to pause"),
        ),
        (
            (host("a", S.PAUSED),),
            {"emergency": True},
            Reject(503, "emergency-off is on: no host is woken until an admin turns it off"),
        ),
        # failed hosts are no candidates
        ((host("a", S.FAILED),), {}, Reject(503, "every host with model 'm' failed to wake; try again later")),
        ((host("a", S.FAILED), host("b", S.PAUSED)), {}, Wake("b")),
        ((host("a", healthy=False),), {}, Reject(503, "no host with model 'm' is answering now")),
    ],
)
def test_choose(hosts: tuple[HostView, ...], extra: dict[str, object], expected: object) -> None:
    snapshot = Snapshot(hosts, now=10.0, **extra)  # type: ignore[arg-type]
    assert choose(snapshot, ASK) == expected


WAIT = Wait("every host with the model is busy or waking")
EW = {"scale_up": "expected_wait"}
BUSY, WAKING_C = host("a", leases=2), host("c", S.STARTING)


def cold(name: str, seconds: float) -> HostView:
    """A paused host whose wake takes `seconds`."""
    return HostView(name, S.PAUSED, True, False, 0, 2, 1.0, False, True, None, 0.0, cold_start=seconds)


@pytest.mark.parametrize(
    ("hosts", "extra", "expected"),
    [
        # One busy host of 2 slots, answers of 60 s: the wait is (ahead + 1) x 60 / 2 = 30 s per place.
        # A cold start of 120 s pays once 4 wait ahead (150 s > 120 s); 3 ahead (120 s) is not enough.
        ((host("a", leases=2), cold("b", 120)), {**EW, "service_seconds": 60.0, "queued": 3}, WAIT),
        ((host("a", leases=2), cold("b", 120)), {**EW, "service_seconds": 60.0, "queued": 4}, Wake("b")),
        # Short answers: 8 queued (the queue_depth rule would wake) wait only 9 x 2 / 2 = 9 s.
        ((host("a", leases=2), cold("b", 30)), {**EW, "service_seconds": 2.0, "queued": 8}, WAIT),
        ((host("a", leases=2), cold("b", 30)), {"service_seconds": 2.0, "queued": 8}, Wake("b")),  # queue_depth
        # A fast-waking host pays even for a short wait: the first request beyond the slots.
        ((host("a", leases=2), cold("b", 10)), {**EW, "service_seconds": 30.0, "queued": 0}, Wake("b")),
        # A host already waking adds its slots: 5 ahead wait 6 x 60 / 4 = 90 s, not over 120 s.
        (
            (host("a", leases=2), host("c", S.STARTING), cold("b", 120)),
            {**EW, "service_seconds": 60.0, "queued": 5},
            WAIT,
        ),
        (
            (host("a", leases=2), host("c", S.STARTING), cold("b", 120)),
            {**EW, "service_seconds": 60.0, "queued": 8},
            Wake("b"),
        ),
        # No answer of the model measured yet: the queue_depth rule decides.
        ((host("a", leases=2), cold("b", 1)), {**EW, "queued": 7}, WAIT),
        ((host("a", leases=2), cold("b", 1)), {**EW, "queued": 8}, Wake("b")),
        # The budget forbids it (no_wake) or emergency-off: never.
        ((host("a", leases=2), cold("b", 1)), {**EW, "service_seconds": 600.0, "queued": 9, "emergency": True}, WAIT),
    ],
)
def test_expected_wait_wakes_only_when_the_wait_is_longer_than_the_cold_start(
    hosts: tuple[HostView, ...], extra: dict[str, object], expected: object
) -> None:
    assert choose(Snapshot(hosts, now=10.0, **extra), ASK) == expected  # type: ignore[arg-type]
    budget_spent = Ask("m", "k1", no_wake="this key's budget cannot pay a cold start")
    assert choose(Snapshot(hosts, now=10.0, **extra), budget_spent) == WAIT  # type: ignore[arg-type]


def test_choose_prefers_the_same_num_ctx_only_when_asked() -> None:
    hosts = (host("a", loaded=True, ctx_match=False), host("b", loaded=True, cost=0.5))
    assert choose(Snapshot(hosts, now=0), Ask("m", "k", num_ctx=8192)) == Use("b")


def waiter(key: str, model: str = "m") -> Waiter:
    return Waiter(Ask(model, key), 0.0, object())


def test_fair_queue_is_round_robin_across_keys_and_fifo_within_one() -> None:
    queue = FairQueue()
    a1, a2, a3, b1, c1, c2 = waiter("a"), waiter("a"), waiter("a"), waiter("b"), waiter("c"), waiter("c")
    for w in (a1, a2, a3, b1, c1, c2):
        queue.push(w)
    assert list(queue) == [a1, b1, c1, a2, c2, a3]
    queue.remove(a1)
    queue.served("a")  # a was just served: it goes to the back of the rotation
    assert list(queue) == [b1, c1, a2, c2, a3]
    assert (len(queue), queue.count_key("a"), queue.count_key("z"), queue.count_model("m")) == (5, 2, 0, 5)
    assert not queue.remove(a1)


@pytest.mark.parametrize(("state", "event", "after"), [(s, e, a) for (s, e), a in TRANSITIONS.items()])
def test_every_listed_transition(state: HostState, event: HostEvent, after: HostState) -> None:
    assert transition(state, event) is after


@pytest.mark.parametrize(
    ("state", "event"),
    [
        (S.PAUSED, HostEvent.OLLAMA_READY),  # Ollama cannot answer on a paused machine
        (S.READY, HostEvent.RESUME),  # a ready host is never resumed
        (S.RESUMING, HostEvent.OLLAMA_READY),  # the cloud must say running first
        (S.PAUSING, HostEvent.RESUME),  # a wake waits for the pause to end
        (S.FAILED, HostEvent.RESUME),  # not before the cooldown is over
    ],
)
def test_forbidden_transitions(state: HostState, event: HostEvent) -> None:
    with pytest.raises(InvalidTransition):
        transition(state, event)


def test_the_lifecycle_path_of_one_wake_and_pause() -> None:
    state = S.UNKNOWN
    for event in (
        HostEvent.CLOUD_PAUSED,
        HostEvent.RESUME,
        HostEvent.CLOUD_RUNNING,
        HostEvent.OLLAMA_READY,
        HostEvent.PAUSE,
        HostEvent.CLOUD_PAUSED,
    ):
        state = transition(state, event)
    assert state is S.PAUSED
