"""Webhooks through the real server: events POSTed as JSON (signed) or as Slack text, filtered by
type, retried with backoff and counted on /metrics when they fail, and a dead or hanging receiver
that delays neither requests nor pauses.

The receiver is a small Starlette app on loopback, in its own event loop (its URL must be in the
config before gpumanager starts), that records every POST and can fail or hang on demand.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import itertools
import json
import re
import socket
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx
import openai
import pytest
from anyio.from_thread import start_blocking_portal
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gpumanager.app import build_app
from gpumanager.config import loads
from gpumanager.errors import ConfigError
from gpumanager.sim import running_server
from tests.clouds import CLOUDS, Cloud, Machine, SimulatedCloud
from tests.harness import FAST_TIMING, SimHost, Stack, cycle_timing, running_cloud_stack, running_stack, wait_until

PROMPT = [{"role": "user", "content": "one two three"}]  # 3 prompt tokens on the simulated Ollama
SECRET_ENV = "TEST_WEBHOOK_SECRET"
SECRET = "s3cret-for-the-webhook-test"
HANG_LIMIT = 30.0  # a hanging receiver answers after this at the latest (it is released at teardown)

# A cloud host that wakes in ~0.2 s and pauses ~0.6 s after its last request.
LIFE = cycle_timing()


# -- the receiver --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Behaviour:
    fail_first: int = 0  # answer 500 to this many POSTs first
    fail_always: bool = False
    hang: bool = False  # never answer (until released at teardown)


@dataclass(frozen=True)
class Post:
    hook: str  # the last part of the path it was POSTed to
    headers: dict[str, str]
    body: bytes
    at: float  # time.monotonic() at receipt
    status: int  # what it was answered (0: it hung)

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Receiver:
    behaviours: dict[str, Behaviour]
    url: str = ""
    posts: list[Post] = field(default_factory=list)
    release: anyio.Event | None = None

    def to(self, hook: str) -> list[Post]:
        return [p for p in self.posts if p.hook == hook]

    def hook_url(self, hook: str) -> str:
        return f"{self.url}/hooks/{hook}"

    async def receive(self, request: Request) -> Response:
        hook = request.path_params["hook"]
        body = await request.body()
        behaviour = self.behaviours.get(hook, Behaviour())
        at = time.monotonic()
        if behaviour.hang:
            self.posts.append(Post(hook, dict(request.headers), body, at, 0))
            assert self.release is not None
            with anyio.move_on_after(HANG_LIMIT):
                await self.release.wait()
            return Response(status_code=200)
        failing = behaviour.fail_always or len(self.to(hook)) < behaviour.fail_first
        status = 500 if failing else 200
        self.posts.append(Post(hook, dict(request.headers), body, at, status))
        return Response(status_code=status)


@contextlib.contextmanager
def receiving(**behaviours: Behaviour) -> Iterator[Receiver]:
    """A webhook receiver on loopback, in an event loop of its own, until the block ends."""
    receiver = Receiver(behaviours)
    app = Starlette(routes=[Route("/hooks/{hook}", receiver.receive, methods=["POST"])])
    with start_blocking_portal() as portal:
        receiver.release = portal.call(anyio.Event)
        with portal.wrap_async_context_manager(running_server(app, timeout_graceful_shutdown=1)) as server:
            receiver.url = server.url
            try:
                yield receiver
            finally:
                portal.call(receiver.release.set)  # hanging answers end, so the server stops at once


@contextlib.contextmanager
def dead_url() -> Iterator[str]:
    """A loopback URL where nothing listens: the port is held (bound, never listening) meanwhile."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/hook"


@contextlib.asynccontextmanager
async def signed_simulated_cloud(machines: list[Machine], *, boot_seconds: float = 0.2) -> AsyncIterator[Cloud]:
    """The simulated cloud, with the webhook's secret in the environment gpumanager is given."""
    cloud = SimulatedCloud(machines, boot_seconds=boot_seconds)
    cloud.environ = {SECRET_ENV: SECRET}
    yield cloud


# -- helpers -------------------------------------------------------------------------------------


def webhook(url: str, **settings: object) -> str:
    lines = ["[[webhooks]]", f'url = "{url}"']
    lines += [f"{name} = {json.dumps(value)}" for name, value in settings.items()]
    return "\n".join(lines) + "\n"


def signature_ok(post: Post, secret: str) -> bool:
    expected = "sha256=" + hmac.new(secret.encode(), post.body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(post.headers.get("x-gpumanager-signature", ""), expected)


def scrape(stack: Stack) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    answer = httpx.get(stack.url + "/metrics", headers=stack.headers(stack.admin_key), timeout=10)
    assert answer.status_code == 200, answer.text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(answer.text)
        for sample in family.samples
    }


def failures(stack: Stack, name: str) -> float:
    return scrape(stack).get(("gpumanager_webhook_failures_total", (("webhook", name),)), 0.0)


def ask(stack: Stack) -> str:
    with openai.OpenAI(base_url=stack.v1, api_key=stack.user_key, max_retries=0, timeout=20) as client:
        answer = client.chat.completions.create(model="llama3.2", max_tokens=2, messages=PROMPT)  # type: ignore[call-overload]
    content = answer.choices[0].message.content
    assert content
    return str(content)


def user_id(stack: Stack) -> str:
    record = stack.keys.authenticate(stack.user_key)
    assert record is not None
    return record.id


# -- the tests -----------------------------------------------------------------------------------


def test_json_events_are_signed_and_only_the_chosen_types_arrive(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(CLOUDS, "simulated-signed", signed_simulated_cloud)
    chosen = ["wake_started", "paused", "request"]
    with receiving() as receiver:
        extra = LIFE + webhook(
            receiver.hook_url("ops"), name="ops", events=chosen, format="json", secret_env=SECRET_ENV
        )
        with running_cloud_stack(tmp_path, "simulated-signed", [Machine("gpu-1")], extra=extra) as (stack, cloud):
            ask(stack)  # wakes gpu-1, which then pauses once idle past its window
            wait_until(lambda: cloud.pauses("gpu-1") == 1, timeout=10)
            wait_until(lambda: any(p.json()["type"] == "paused" for p in receiver.to("ops")), timeout=10)
            history = stack.call(lambda: stack.runtime.events.history())
            me = user_id(stack)
        posts = receiver.to("ops")

    # Every chosen event published up to the pause, in order, byte for byte; nothing else.
    paused_id = next(e.id for e in history if e.type == "paused")
    expected = [e for e in history if e.type in chosen and e.id <= paused_id]
    assert [p.body for p in posts] == [e.data for e in expected]
    assert [p.json()["type"] for p in posts] == ["wake_started", "request", "paused"]
    assert {"host_state", "wake_phase"} <= {e.type for e in history}  # published, never sent
    for post in posts:
        assert post.status == 200
        assert post.headers["content-type"] == "application/json"
        assert post.headers["x-gpumanager-event"] == post.json()["type"]
        assert signature_ok(post, SECRET), post.headers
        assert not signature_ok(post, SECRET + "x")
    woke, request, paused = (p.json() for p in posts)
    asked = {"llama3.2", "llama3.2:latest"}  # the name the client used, or its full name
    assert woke.pop("model") in asked
    assert woke == {"type": "wake_started", "host": "gpu-1", "key": me}
    assert request["host"] == "gpu-1" and request["key"] == me and request["status"] == 200
    assert request["route"] == "/v1/chat/completions" and request["model"] in asked
    assert (request["prompt_tokens"], request["completion_tokens"]) == (3, 2)
    assert paused == {"type": "paused", "host": "gpu-1", "reason": "idle"}


def test_slack_format_is_one_readable_line(tmp_path: Path) -> None:
    with receiving() as receiver:
        chosen = ["wake_started", "paused"]
        extra = LIFE + webhook(receiver.hook_url("chat"), name="chat", events=chosen, format="slack")
        with running_cloud_stack(tmp_path, "simulated", [Machine("gpu-1")], extra=extra) as (stack, cloud):
            ask(stack)
            wait_until(lambda: cloud.pauses("gpu-1") == 1, timeout=10)
            wait_until(lambda: len(receiver.to("chat")) == 2, timeout=10)
            me = user_id(stack)
        posts = receiver.to("chat")

    assert all(p.json().keys() == {"text"} for p in posts)
    woke, paused = (p.json()["text"] for p in posts)
    assert woke.startswith("gpumanager: ") and "\n" not in woke
    assert "gpu-1" in woke and "waking for llama3.2" in woke and me in woke
    assert paused.startswith("gpumanager: ") and "\n" not in paused
    assert "gpu-1" in paused and "paused" in paused and "idle" in paused
    for post in posts:
        assert post.headers["content-type"] == "application/json"
        assert "x-gpumanager-signature" not in post.headers  # no secret_env: unsigned


def test_failed_posts_are_retried_with_backoff_and_counted_when_given_up(tmp_path: Path) -> None:
    with receiving(flaky=Behaviour(fail_first=2), broken=Behaviour(fail_always=True)) as receiver:
        extra = (
            FAST_TIMING
            + webhook(
                receiver.hook_url("flaky"),
                name="flaky",
                events=["request"],
                secret_env=SECRET_ENV,
                retries=3,
                retry_seconds=0.05,
            )
            + webhook(receiver.hook_url("broken"), name="broken", events=["request"], retries=1, retry_seconds=0.05)
        )
        with running_stack(tmp_path, [SimHost("gpu")], extra=extra, environ={SECRET_ENV: SECRET}) as stack:
            ask(stack)
            wait_until(lambda: len(receiver.to("flaky")) == 3, timeout=10)
            ask(stack)  # its event is sent after the first one's last attempt: a barrier
            wait_until(lambda: len(receiver.to("flaky")) == 4, timeout=10)
            wait_until(lambda: failures(stack, "broken") == 2, timeout=10)
            assert failures(stack, "flaky") == 0
        flaky, broken = receiver.to("flaky"), receiver.to("broken")

    assert [p.status for p in flaky] == [500, 500, 200, 200]
    first, second = {p.body for p in flaky[:3]}, flaky[3].body
    assert len(first) == 1 and second not in first  # the same event three times, then the next one
    assert all(signature_ok(p, SECRET) for p in flaky)  # every retry signed alike
    gaps = [later.at - earlier.at for earlier, later in itertools.pairwise(flaky[:3])]
    assert gaps[0] >= 0.05 and gaps[1] >= 0.1  # the backoff doubles
    assert [p.status for p in broken] == [500] * 4  # two events, each tried twice
    assert [p.json()["type"] for p in broken] == ["request"] * 4
    assert broken[0].body == broken[1].body != broken[2].body == broken[3].body


def test_a_dead_or_hanging_receiver_delays_neither_requests_nor_pauses(tmp_path: Path) -> None:
    timeout, retries = 5, 1  # each event holds a hanging receiver's webhook >= 10 s
    with receiving(hangs=Behaviour(hang=True)) as receiver, dead_url() as nowhere:
        extra = (
            LIFE
            + webhook(receiver.hook_url("hangs"), name="hangs", timeout_seconds=timeout, retries=retries)
            + webhook(nowhere, name="dead", timeout_seconds=timeout, retries=3, retry_seconds=2)
            + webhook(receiver.hook_url("live"), name="live", events=["paused"])
        )
        bound = 4.0
        assert bound < timeout * (retries + 1)
        with running_cloud_stack(tmp_path, "simulated", [Machine("gpu-1")], extra=extra) as (stack, cloud):
            started = time.monotonic()
            ask(stack)  # a wake: its events are stuck at both broken webhooks from here on
            assert time.monotonic() - started < bound
            wait_until(lambda: len(receiver.to("hangs")) == 1, timeout=bound)  # hung on its first event
            started = time.monotonic()
            ask(stack)  # the host is awake: answered at once
            assert time.monotonic() - started < 2
            wait_until(lambda: cloud.pauses("gpu-1") == 1, timeout=bound)  # on time, idle past its window
            wait_until(lambda: len(receiver.to("live")) == 1, timeout=bound)  # other webhooks flow
            assert receiver.to("live")[0].json() == {"type": "paused", "host": "gpu-1", "reason": "idle"}
            started = time.monotonic()
            ask(stack)  # wakes it again, as usual
            assert time.monotonic() - started < bound
            assert len(receiver.to("hangs")) == 1  # still hung on that first event
            assert failures(stack, "hangs") == 0 and failures(stack, "dead") == 0  # still trying


@pytest.mark.parametrize(
    ("entry", "problem"),
    [
        ('url = "http://[::1/x"', "webhooks[0].url: must be an http:// or https:// URL with a host"),
        ('url = "ftp://example.org/"', "webhooks[0].url: must be an http:// or https:// URL with a host"),
        ('url = "http://127.0.0.1:9/"\nevents = ["pasued"]', "webhooks[0].events: unknown event type pasued"),
        (
            'url = "http://127.0.0.1:9/"\nsecret_env = "NO_SUCH_SECRET"',
            "webhooks[0].secret_env: $NO_SUCH_SECRET is not set",
        ),
    ],
)
def test_a_bad_webhook_is_refused_at_start_with_one_line(tmp_path: Path, entry: str, problem: str) -> None:
    text = f'[paths]\nstate_dir = "{tmp_path}"\n[[webhooks]]\n{entry}\n'
    with pytest.raises(ConfigError, match=re.escape(problem)):  # when the file is read, or at the latest at start
        build_app(loads(text, tmp_path / "config.toml"), environ={})
