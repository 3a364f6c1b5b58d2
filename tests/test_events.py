"""The event bus through the real server: `GET /events` (snapshot, a wake's events in order, resume
with Last-Event-ID, the lost-event notice, type filters, admins only), `gpumanager events`, pause
warnings and the reserved-until header; and the bus's own bounded buffers."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from gpumanager.cli import main
from gpumanager.events import Bus, Lost, Paused
from tests.clouds import Machine
from tests.harness import Stack, running_cloud_stack, wait_until

LIFE = """
[timing]
reservation_minutes = {window}
fallback_reservation_minutes = 0.005
pause_warning_minutes = {warning}
startup_timeout_seconds = 10
ollama_readiness_wait_seconds = 0.02
probe_timeout_seconds = 1
reconcile_interval_seconds = 0.3
shutdown_grace_seconds = 1
[events]
history = 50
heartbeat_seconds = 0.2
"""


def life(window: float = 0.02, warning: float = 0.01) -> str:
    return LIFE.format(window=window, warning=warning)


class Reader:
    """A `GET /events` stream read in a thread: its events as (event, id, data) in arrival order."""

    def __init__(self, stack: Stack, query: str = "", headers: dict[str, str] | None = None) -> None:
        self.items: list[tuple[str, str | None, Any]] = []
        self.comments = 0
        self.status = 0
        self._stop = threading.Event()
        all_headers = {**stack.headers(stack.admin_key), **(headers or {})}
        self._thread = threading.Thread(
            target=self._read, args=(stack.url + "/events" + query, all_headers), daemon=True
        )
        self._thread.start()

    def _read(self, url: str, headers: dict[str, str]) -> None:
        with httpx.stream("GET", url, headers=headers, timeout=httpx.Timeout(10, read=30)) as response:
            self.status = response.status_code
            kind, ident = "", None
            for line in response.iter_lines():
                if self._stop.is_set():
                    return
                if line.startswith(":"):
                    self.comments += 1
                elif line.startswith("event: "):
                    kind = line.removeprefix("event: ")
                elif line.startswith("id: "):
                    ident = line.removeprefix("id: ")
                elif line.startswith("data: "):
                    self.items.append((kind, ident, json.loads(line.removeprefix("data: "))))
                    kind, ident = "", None

    def kinds(self) -> list[str]:
        return [kind for kind, _, _ in self.items]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


@pytest.fixture
def cloud_stack(tmp_path: Path) -> Iterator[tuple[Stack, Any]]:
    with running_cloud_stack(tmp_path, "simulated", [Machine("gpu-1", token_delay=0.01)], extra=life()) as pair:
        yield pair


def ask(stack: Stack, tokens: int = 2) -> httpx.Response:
    body = {"model": "llama3.2", "prompt": "x", "stream": False, "options": {"num_predict": tokens}}
    return httpx.post(stack.url + "/api/generate", json=body, headers=stack.headers(), timeout=30)


def test_a_stream_starts_with_the_fleet_then_tells_a_wake_in_order(cloud_stack: tuple[Stack, Any]) -> None:
    stack, _ = cloud_stack
    reader = Reader(stack)
    try:
        wait_until(lambda: reader.kinds()[:1] == ["snapshot"], timeout=10)
        snapshot = reader.items[0][2]
        assert snapshot["type"] == "snapshot" and [h["name"] for h in snapshot["hosts"]] == ["gpu-1"]
        assert snapshot["hosts"][0]["status"] == "paused" and reader.items[0][1] is None  # no id: not on the bus
        assert ask(stack).status_code == 200
        wait_until(lambda: "paused" in reader.kinds(), timeout=10)  # then idle past its short window
        wait_until(lambda: reader.comments >= 1, timeout=5)  # a heartbeat on a quiet stream
    finally:
        reader.close()
    events = [(kind, data) for kind, _, data in reader.items[1:]]
    user = stack.keys.authenticate(stack.user_key).id  # type: ignore[union-attr]
    assert events[0] == ("wake_started", {"type": "wake_started", "host": "gpu-1", "model": "llama3.2", "key": user})
    states = [(d["old"], d["new"]) for k, d in events if k == "host_state"]
    assert states == [("paused", "resuming"), ("resuming", "starting"), ("starting", "ready"),
                      ("ready", "pausing"), ("pausing", "paused")]  # fmt: skip
    phases = [d["phase"] for k, d in events if k == "wake_phase"]
    assert phases == ["resume", "boot", "model", "first_byte"]
    kinds = [k for k, _ in events]
    assert kinds.index("request") > kinds.index("wake_phase") and kinds[-1] == "paused"
    request = next(d for k, d in events if k == "request")
    assert (request["key"], request["host"], request["status"], request["completion_tokens"]) == (user, "gpu-1", 200, 2)
    warning = next(d for k, d in events if k == "pause_warning")
    assert warning["keys"] == [user] and 0 < warning["seconds_left"] <= 0.6  # pause_warning_minutes = 0.01
    assert kinds.index("pause_warning") < kinds.index("paused")
    ids = [int(i) for _, i, _ in reader.items[1:] if i is not None]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)


def test_a_reconnecting_reader_resumes_after_its_last_event_and_hears_what_it_lost(
    cloud_stack: tuple[Stack, Any],
) -> None:
    stack, _ = cloud_stack
    for _ in range(3):
        assert ask(stack).status_code == 200
    history = Reader(stack, "?follow=false&type=request")
    wait_until(lambda: len(history.kinds()) == 4, timeout=10)  # the snapshot, then the three requests
    history.close()
    first, second, third = (int(i) for _, i, _ in history.items[1:])  # type: ignore[arg-type]
    resumed = Reader(stack, "?type=request", headers={"Last-Event-ID": str(first)})
    try:
        wait_until(lambda: len(resumed.items) == 2, timeout=10)
        assert [int(i) for _, i, _ in resumed.items] == [second, third]  # type: ignore[arg-type]
        assert "snapshot" not in resumed.kinds()  # a resumed stream goes on where it stopped
    finally:
        resumed.close()
    restarted = Reader(stack, "?follow=false", headers={"Last-Event-ID": "999999"})  # an id of before a restart
    wait_until(lambda: bool(restarted.items), timeout=10)
    restarted.close()
    assert restarted.items[0][0] == "snapshot"  # begins afresh: the fleet as it is, then the history
    for _ in range(60):  # more than [events] history = 50 events in all
        assert ask(stack, tokens=1).status_code == 200
    behind = Reader(stack, "?follow=false", headers={"Last-Event-ID": str(first)})
    wait_until(lambda: behind.items and behind.items[0][0] == "lost", timeout=10)
    behind.close()
    assert behind.items[0][2]["lost"] > 0


def test_events_are_for_admins_and_filters_are_checked(cloud_stack: tuple[Stack, Any]) -> None:
    stack, _ = cloud_stack
    refused = httpx.get(stack.url + "/events", headers=stack.headers(), timeout=10)
    assert refused.status_code == 403 and "admin" in refused.json()["error"]
    bad = httpx.get(stack.url + "/events?type=nonsense", headers=stack.headers(stack.admin_key), timeout=10)
    assert bad.status_code == 400 and "unknown event type nonsense" in bad.json()["error"]


def test_gpumanager_events_prints_one_line_per_event(
    cloud_stack: tuple[Stack, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    stack, cloud = cloud_stack
    assert ask(stack).status_code == 200
    wait_until(lambda: cloud.pauses("gpu-1") == 1, timeout=10)
    key = ["--url", stack.url, "--key", stack.admin_key]
    wait_until(lambda: main(["events", *key, "--type", "paused"]) == 0 and "paused (idle)" in capsys.readouterr().out,
               timeout=5)  # fmt: skip
    assert main(["events", *key]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "fleet: gpu-1 paused" in lines[0]
    assert any("wake_started" in line and "gpu-1: waking for llama3.2" in line for line in lines)
    assert any("host_state" in line and "gpu-1: paused -> resuming (resume)" in line for line in lines)
    assert main(["events", "--url", stack.url, "--key", stack.user_key]) == 2
    assert "403" in capsys.readouterr().err


def test_an_answer_tells_when_its_host_will_sleep_when_that_is_near(tmp_path: Path) -> None:
    extra = life(window=0.02, warning=0.05)  # a window of 1.2 s, warnings 3 s ahead: always near
    with running_cloud_stack(tmp_path, "simulated", [Machine("gpu-1", token_delay=0.01)], extra=extra) as (stack, _):
        answer = ask(stack)
        until = datetime.fromisoformat(answer.headers["x-gpumanager-reserved-until"].replace("Z", "+00:00"))
        assert 0.5 < until.timestamp() - time.time() < 2.0
    far = life(window=1, warning=0.01)
    (tmp_path / "far").mkdir()
    with running_cloud_stack(tmp_path / "far", "simulated", [Machine("gpu-1", token_delay=0.01)], extra=far) as (
        stack,
        _,
    ):
        assert "x-gpumanager-reserved-until" not in ask(stack).headers  # a minute left: nothing to say


@pytest.mark.anyio
async def test_a_slow_subscriber_loses_the_oldest_events_and_is_told_how_many() -> None:
    bus = Bus(history=5, buffer=3)
    with bus.subscribe() as slow, bus.subscribe(["paused"]) as picky:
        for i in range(5):
            bus.publish(Paused(host=f"h{i}", reason="idle"))
        assert await slow.get() == Lost(2)
        hosts = []
        for _ in range(3):
            item = await slow.get()
            assert item is not None and not isinstance(item, Lost)
            hosts.append(item.event().host)  # type: ignore[union-attr]
        assert hosts == ["h2", "h3", "h4"] and await slow.get(patience=0.01) is None
        assert isinstance(await picky.get(), Lost)
    late = bus.subscribe(after=1)  # the history kept ids 1-5: 2-5 come again
    with anyio.fail_after(1):
        assert (await late.get()) == Lost(1)  # three of the four fit its buffer of 3
