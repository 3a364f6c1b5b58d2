"""Refused logins are logged with address, route and reason, never the key, and without flooding."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from loguru import logger

from gpumanager.auth import AuthMiddleware, FailedLogins
from gpumanager.keys import KeyStore
from tests.harness import SimHost, Stack, running_stack, wait_until

WRONG_KEY = "gm_NotAKeyOfOurs0123456789abcdefghijklmnopqrstu"


class Lines:
    """Loguru's messages at WARNING and above, from any thread, while the `with` block lasts."""

    def __init__(self) -> None:
        self._lines: list[str] = []
        self._lock = threading.Lock()

    def __enter__(self) -> Lines:
        self._sink = logger.add(self._write, level="WARNING", format="{message}")
        return self

    def __exit__(self, *exc: object) -> None:
        logger.remove(self._sink)

    def _write(self, message: Any) -> None:
        with self._lock:
            self._lines.append(str(message).removesuffix("\n"))

    def refusals(self, address: str | None = None) -> list[str]:
        """The lines about refused logins (from `address`)."""
        with self._lock:
            lines = [line for line in self._lines if line.startswith("401 ")]
        return [line for line in lines if address is None or f" {address} " in line or f" {address}:" in line]

    def all(self) -> str:
        with self._lock:
            return "\n".join(self._lines)


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    with running_stack(tmp_path, [SimHost("box")]) as running:
        yield running


def client_from(address: str, stack: Stack) -> httpx.Client:
    """A client whose requests come from `address` (any 127.x.y.z is this machine on Linux)."""
    return httpx.Client(base_url=stack.url, transport=httpx.HTTPTransport(local_address=address), timeout=10)


def test_a_refusal_is_logged_with_address_route_and_reason(stack: Stack) -> None:
    revoked_key = stack.new_key("leaver")
    revoked_id = stack.keys.revoke(revoked_key).id
    with Lines() as lines, client_from("127.0.0.2", stack) as client:
        assert client.get("/api/tags").status_code == 401
        wait_until(lambda: len(lines.refusals()) == 1)
        assert lines.refusals() == ["401 missing API key from 127.0.0.2 on GET /api/tags"]

        response = client.post("/v1/chat/completions", json={"model": "x"}, headers=stack.headers(WRONG_KEY))
        assert response.status_code == 401
        wait_until(lambda: len(lines.refusals()) == 2)
        assert lines.refusals()[1] == "401 unknown API key from 127.0.0.2 on POST /v1/chat/completions"

        assert client.get("/v1/models", headers={"X-API-Key": revoked_key}).status_code == 401
        wait_until(lambda: len(lines.refusals()) == 3)
        assert lines.refusals()[2] == f"401 revoked API key (id {revoked_id}) from 127.0.0.2 on GET /v1/models"

        assert client.get("/api/tags", headers=stack.headers()).status_code == 200  # a good key: no line
        assert client.get("/health").status_code == 200
    text = lines.all()
    for key in (WRONG_KEY, revoked_key):
        assert key not in text and key[:8] not in text and key[3:11] not in text
    assert len(lines.refusals()) == 3


def test_a_path_with_line_breaks_and_terminal_escapes_is_logged_escaped(stack: Stack) -> None:
    with Lines() as lines, client_from("127.0.0.5", stack) as client:
        response = client.get("/api/tags%0A12:00:00.000 INFO    forged line%1B[31m%E2%80%A8%0D")
        assert response.status_code == 401
        wait_until(lambda: len(lines.refusals()) == 1)
    [line] = lines.refusals()
    assert (
        line
        == "401 missing API key from 127.0.0.5 on GET /api/tags\\n12:00:00.000 INFO    forged line\\x1b[31m\\u2028\\r"
    )
    assert "\n" not in lines.all() and "\x1b" not in lines.all() and "\u2028" not in lines.all()


def test_a_burst_of_refusals_from_one_address_logs_five_lines(stack: Stack) -> None:
    with Lines() as lines, client_from("127.0.0.3", stack) as burst, client_from("127.0.0.4", stack) as other:
        for _ in range(50):
            assert burst.get("/api/tags", headers=stack.headers(WRONG_KEY)).status_code == 401
        assert other.get("/api/tags").status_code == 401  # another address has its own allowance
        wait_until(lambda: len(lines.refusals("127.0.0.4")) == 1)
        assert burst.get("/api/tags", headers=stack.headers()).status_code == 200
    assert lines.refusals("127.0.0.3") == ["401 unknown API key from 127.0.0.3 on GET /api/tags"] * 5
    assert lines.refusals("127.0.0.4") == ["401 missing API key from 127.0.0.4 on GET /api/tags"]
    assert WRONG_KEY[:8] not in lines.all()


# -- the middleware alone, with a clock of its own ------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def ok(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


def asgi_client(app: AuthMiddleware, address: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app, client=(address, 40000)), base_url="http://gm")


@pytest.mark.anyio
async def test_after_the_window_one_line_gives_the_count_of_refusals_not_logged(tmp_path: Path) -> None:
    keys = KeyStore(tmp_path / "api_keys.json")
    good = keys.generate("user", "user@example.org")[1]
    clock = Clock()
    app = AuthMiddleware(ok, keys, clock=clock)
    with Lines() as lines:
        async with asgi_client(app, "203.0.113.7") as client:
            for _ in range(50):
                assert (await client.get("/api/chat", headers={"X-API-Key": WRONG_KEY})).status_code == 401
                clock.now += 0.5  # 25 s in all: one window
            assert len(lines.refusals()) == 5
            assert (await client.get("/api/chat", headers={"X-API-Key": good})).status_code == 200
            assert len(lines.refusals()) == 5  # the window has not ended: nothing yet

            clock.now += 60
            assert (await client.get("/api/chat")).status_code == 401
            assert lines.refusals()[5:] == [
                "401 from 203.0.113.7: 45 more refused requests not logged (at most 5 per 60 s per address)",
                "401 missing API key from 203.0.113.7 on GET /api/chat",
            ]
            for _ in range(7):
                assert (await client.get("/api/chat")).status_code == 401
            clock.now += 61
            assert (await client.get("/api/chat", headers={"X-API-Key": good})).status_code == 200
            missing = "401 missing API key from 203.0.113.7 on GET /api/chat"
            held_back = "401 from 203.0.113.7: 3 more refused requests not logged (at most 5 per 60 s per address)"
            assert lines.refusals()[7:] == [missing] * 4 + [held_back]  # the success after the window reports
            assert len(app.failures) == 0
    assert good not in lines.all() and WRONG_KEY[:8] not in lines.all()


@pytest.mark.anyio
async def test_a_broken_key_file_gives_unknown_or_revoked(tmp_path: Path) -> None:
    keys = KeyStore(tmp_path / "api_keys.json")
    keys.generate("user", "user@example.org")
    (tmp_path / "api_keys.json").write_text("{not json")
    app = AuthMiddleware(ok, keys, clock=Clock())
    with Lines() as lines:
        async with asgi_client(app, "198.51.100.1") as client:
            assert (await client.get("/v1/models", headers={"Authorization": f"Bearer {WRONG_KEY}"})).status_code == 401
    assert lines.refusals() == ["401 unknown or revoked API key from 198.51.100.1 on GET /v1/models"]


# -- the limiter ------------------------------------------------------------------------------------


def test_the_limiter_allows_a_few_per_address_per_window() -> None:
    clock = Clock()
    limiter = FailedLogins(per_window=5, window=60, clock=clock)
    assert [limiter.refused("a") for _ in range(8)] == [(True, 0)] * 5 + [(False, 0)] * 3
    assert limiter.refused("b") == (True, 0)
    clock.now += 59.9
    assert limiter.refused("a") == (False, 0)
    assert limiter.allowed("a") == 0  # a success within the window reports nothing yet
    clock.now += 0.1
    assert limiter.refused("a") == (True, 4)  # a new window; the old one held back 4
    assert limiter.refused("b") == (True, 0)  # b's window ended with nothing held back
    clock.now += 60
    assert limiter.allowed("a") == 0 and limiter.allowed("b") == 0 and len(limiter) == 0


def test_the_limiter_tracks_a_bounded_number_of_addresses() -> None:
    clock = Clock()
    limiter = FailedLogins(max_addresses=10_000, clock=clock)
    for n in range(25_000):
        limiter.refused(f"10.{n >> 16}.{(n >> 8) & 255}.{n & 255}")
    assert len(limiter) == 10_000
    assert limiter.refused("10.0.0.0") == (True, 0)  # the oldest were forgotten: a fresh allowance
    newest = "10.0.97.167"  # n = 24999
    assert [limiter.refused(newest)[0] for _ in range(5)] == [True] * 4 + [False]
