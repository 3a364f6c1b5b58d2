"""Ollama requests translated for OpenAI-only hosts are counted and timed as direct ones are.

The tokens come from the host's own `usage` (a stream's from the usage event gpumanager asks for),
reach `/metrics` and the ledger, and each request has its time to first byte and its overhead; a
host that sends no counts leaves them unknown, never guessed. Every host here answers `/v1/*` only
(`OpenAIServer`), so each count went through the translation.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import ollama
import pytest
from anyio.from_thread import start_blocking_portal
from prometheus_client.parser import text_string_to_metric_families

from gpumanager.sim import SimOllama, expected_text, running_server
from gpumanager.sim.wire import read_body
from tests.clouds import Machine
from tests.harness import (
    FAST_TIMING,
    Stack,
    refuse_stream_options,
    replaying,
    running_cloud_stack,
    running_stack,
    wait_until,
)
from tests.test_openai_hosts import OpenAIServer

HF = "Qwen/Qwen2.5-0.5B-Instruct"
EMBED = "nomic-ai/nomic-embed-text-v1.5"
PROMPT = "one two three four"  # the simulated host counts prompt tokens as words: 4
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


class Door:
    """An OpenAI-only host that keeps every body it was sent, and may refuse `stream_options`
    as an older OpenAI-compatible server does (400, naming the field)."""

    def __init__(self, server: OpenAIServer, *, refuses_stream_options: bool = False) -> None:
        self.server, self.refuses = server, refuses_stream_options
        self.bodies: list[dict[str, Any]] = []  # of generation requests, as they arrived
        self.refused = 0

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] not in ("/v1/chat/completions", "/v1/completions"):
            return await self.server(scope, receive, send)
        body = await read_body(receive)
        self.bodies.append(json.loads(body))
        if self.refuses and b"stream_options" in body:
            self.refused += 1
            return await refuse_stream_options(send)
        await self.server(scope, replaying(body, receive), send)


# name, models, more of its [[hosts]] entry, whether it refuses stream_options
HOSTS = [
    ("vllm", (HF, EMBED), "", False),
    ("tgi", ("llama3.2:latest",), "stream_usage = false", False),  # configured: never asked
    ("old", ("phi3:latest",), "", True),  # learns it at its first stream
]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, dict[str, Door]]]:
    with start_blocking_portal() as portal, contextlib.ExitStack() as exits:
        doors: dict[str, Door] = {}
        entries = []
        for name, models, more, refuses in HOSTS:
            server = OpenAIServer(SimOllama(name=name, models=models, token_delay=0.001))
            doors[name] = Door(server, refuses_stream_options=refuses)
            running = exits.enter_context(portal.wrap_async_context_manager(running_server(doors[name])))
            entries.append(f'[[hosts]]\nname = "{name}"\nurl = "{running.url}"\napi = "openai"\nslots = 4\n{more}')
        extra = "\n\n".join([FAST_TIMING, *entries])
        with running_stack(tmp_path_factory.mktemp("translated"), [], extra=extra) as stack:
            wait_until(lambda: sorted(h.name for h in _hosts(stack) if h.healthy) == sorted(doors), timeout=10)
            yield stack, doors
        for door in doors.values():
            assert door.server.native == []  # nothing of Ollama's own API was asked of them


def _hosts(stack: Stack) -> list[Any]:
    return list(stack.call(lambda: list(stack.runtime.fleet.hosts.values())))


def scrape(stack: Stack) -> Samples:
    answer = httpx.get(stack.url + "/metrics", headers=stack.headers(stack.admin_key), timeout=10)
    assert answer.status_code == 200
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(answer.text)
        for sample in family.samples
    }


def tokens(m: Samples, key_id: str, model: str) -> dict[str, float | None]:
    return {
        kind: m.get(("gpumanager_tokens_total", (("key", key_id), ("kind", kind), ("model", model))))
        for kind in ("prompt", "completion")
    }


def count(m: Samples, name: str, route: str | None = None) -> float:
    return m.get((name, (("route", route),) if route else ()), 0.0)


def answered(stack: Stack, route: str) -> float:
    """The requests on `route` recorded so far (a request is recorded just after its last byte went out)."""
    return sum(
        v
        for (name, labels), v in scrape(stack).items()
        if name == "gpumanager_requests_total" and ("route", route) in labels
    )


def ledger(stack: Stack, key_id: str) -> dict[str, Any] | None:
    report = httpx.get(stack.url + "/usage?since=1h&by=key", headers=stack.headers(stack.admin_key), timeout=10)
    assert report.status_code == 200, report.text
    return next((g["totals"] for g in report.json()["groups"] if g["group"] == key_id), None)


def test_translated_answers_are_counted_and_timed(fleet: tuple[Stack, dict[str, Door]]) -> None:
    stack, doors = fleet
    key = stack.new_key("translated")
    key_id = stack.keys.authenticate(key).id  # type: ignore[union-attr]
    before = scrape(stack)
    chats, generates = answered(stack, "/api/chat"), answered(stack, "/api/generate")
    messages = [{"role": "user", "content": PROMPT}]
    with ollama.Client(host=stack.url, headers=stack.headers(key)) as client:
        parts = list(client.chat(model=HF, messages=messages, stream=True, options={"num_predict": 5}))
        assert "".join(p.message.content or "" for p in parts) == expected_text(5)
        assert (parts[-1].prompt_eval_count, parts[-1].eval_count) == (4, 5)  # the host's usage event
        whole = client.chat(model=HF, messages=messages, options={"num_predict": 3})
        assert whole.message.content == expected_text(3) and (whole.prompt_eval_count, whole.eval_count) == (4, 3)
        generated = client.generate(model=HF, prompt="one two three", options={"num_predict": 2})
        assert generated.response == expected_text(2) and generated.eval_count == 2
        streamed = list(client.generate(model=HF, prompt="one two three", stream=True, options={"num_predict": 4}))
        assert "".join(p.response for p in streamed) == expected_text(4) and streamed[-1].eval_count == 4
        embedded = client.embed(model=EMBED, input=["a b", "c"])
        assert embedded.prompt_eval_count == 3
    streams = [b for b in doors["vllm"].bodies if b.get("stream")]
    assert len(streams) == 2 and all(b["stream_options"] == {"include_usage": True} for b in streams)

    wait_until(lambda: answered(stack, "/api/chat") == chats + 2, timeout=10)
    wait_until(lambda: answered(stack, "/api/generate") == generates + 2, timeout=10)
    wait_until(lambda: answered(stack, "/api/embed") >= 1, timeout=10)
    m = scrape(stack)
    assert tokens(m, key_id, HF) == {"prompt": 4 + 4 + 3 + 3, "completion": 5 + 3 + 2 + 4}
    assert tokens(m, key_id, EMBED) == {"prompt": 3, "completion": None}  # embeddings have no completion
    first_byte = "gpumanager_time_to_first_byte_seconds_count"
    assert count(m, first_byte, "/api/chat") == count(before, first_byte, "/api/chat") + 2
    assert count(m, first_byte, "/api/generate") == count(before, first_byte, "/api/generate") + 2
    assert count(m, first_byte, "/api/embed") == count(before, first_byte, "/api/embed") + 1
    overhead = "gpumanager_overhead_seconds_count"
    assert count(m, overhead) == count(before, overhead) + 5
    assert count(m, "gpumanager_overhead_seconds_sum") - count(before, "gpumanager_overhead_seconds_sum") < 5
    duration = "gpumanager_request_duration_seconds_sum"
    assert (
        m[(first_byte.replace("_count", "_sum"), (("route", "/api/chat"),))] <= m[(duration, (("route", "/api/chat"),))]
    )

    wait_until(lambda: (ledger(stack, key_id) or {}).get("requests") == 5, timeout=10)
    totals = ledger(stack, key_id)
    assert totals is not None
    assert (totals["prompt_tokens"], totals["completion_tokens"]) == (4 + 4 + 3 + 3 + 3, 5 + 3 + 2 + 4)


def test_a_host_configured_without_stream_usage_leaves_its_streams_uncounted(
    fleet: tuple[Stack, dict[str, Door]],
) -> None:
    stack, doors = fleet
    key = stack.new_key("tgi-user")
    key_id = stack.keys.authenticate(key).id  # type: ignore[union-attr]
    chats = answered(stack, "/api/chat")
    messages = [{"role": "user", "content": PROMPT}]
    with ollama.Client(host=stack.url, headers=stack.headers(key)) as client:
        parts = list(client.chat(model="llama3.2", messages=messages, stream=True, options={"num_predict": 5}))
        assert "".join(p.message.content or "" for p in parts) == expected_text(5)
        assert parts[-1].done and parts[-1].eval_count is None  # no counts sent, none made up
        whole = client.chat(model="llama3.2", messages=messages, options={"num_predict": 3})
        assert whole.eval_count == 3
    assert [("stream_options" in b) for b in doors["tgi"].bodies] == [False, False]
    wait_until(lambda: answered(stack, "/api/chat") == chats + 2, timeout=10)
    m = scrape(stack)
    assert tokens(m, key_id, "llama3.2:latest") == {"prompt": 4, "completion": 3}  # the whole answer's only
    wait_until(lambda: (ledger(stack, key_id) or {}).get("requests") == 2, timeout=10)
    totals = ledger(stack, key_id)
    assert totals is not None and (totals["prompt_tokens"], totals["completion_tokens"]) == (4, 3)


def test_a_host_that_refuses_stream_options_is_asked_again_without(fleet: tuple[Stack, dict[str, Door]]) -> None:
    stack, doors = fleet
    key = stack.new_key("old-user")
    key_id = stack.keys.authenticate(key).id  # type: ignore[union-attr]
    generates = answered(stack, "/api/generate")
    with ollama.Client(host=stack.url, headers=stack.headers(key)) as client:
        for _ in range(2):
            parts = list(client.generate(model="phi3", prompt=PROMPT, stream=True, options={"num_predict": 3}))
            assert "".join(p.response for p in parts) == expected_text(3) and parts[-1].eval_count is None
        whole = client.generate(model="phi3", prompt=PROMPT, options={"num_predict": 2})
        assert whole.response == expected_text(2) and whole.eval_count == 2
    assert doors["old"].refused == 1  # remembered: the second stream was sent without at once
    assert [("stream_options" in b) for b in doors["old"].bodies] == [True, False, False, False]
    assert stack.call(lambda: stack.runtime.fleet.hosts["old"].stream_usage) is False
    wait_until(lambda: answered(stack, "/api/generate") == generates + 3, timeout=10)
    assert tokens(scrape(stack), key_id, "phi3:latest") == {"prompt": 4, "completion": 2}


def test_a_translated_request_ends_the_wake_of_a_runpod_endpoint(tmp_path: Path) -> None:
    timing = FAST_TIMING + "reservation_minutes = 0.05\nstartup_timeout_seconds = 10\n"
    with running_cloud_stack(
        tmp_path, "runpod-endpoint", [Machine("gpu-rp", models=(HF,), token_delay=0.002)], extra=timing
    ) as (
        stack,
        _,
    ):
        user_id = stack.keys.authenticate(stack.user_key).id  # type: ignore[union-attr]
        with ollama.Client(host=stack.url, headers=stack.headers()) as client:
            parts = list(
                client.chat(
                    model=HF, messages=[{"role": "user", "content": PROMPT}], stream=True, options={"num_predict": 6}
                )
            )
        assert "".join(p.message.content or "" for p in parts) == expected_text(6)
        phase = ("gpumanager_wake_phase_seconds_count", (("host", "gpu-rp"), ("phase", "first_byte")))
        wait_until(lambda: phase in scrape(stack), timeout=10)
        m = scrape(stack)
        assert m[phase] == 1
        assert m[("gpumanager_time_to_first_byte_seconds_count", (("route", "/api/chat"),))] == 1
        assert tokens(m, user_id, HF) == {"prompt": 4, "completion": 6}
