"""Token counts are read from every answer as it passes, in both dialects, streamed or not, and an
OpenAI stream reaches its client exactly as it would have without gpumanager counting it."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import httpx
import ollama
import openai
import pytest
from loguru import logger

from gpumanager.sim import SimOllama, expected_text
from tests.harness import FAST_TIMING, SimHost, Stack, refuse_stream_options, replaying, running_stack, wait_until

PROMPT = "one two three four"  # the simulated Ollama counts prompt tokens as words: 4


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running_stack(tmp_path_factory.mktemp("usage"), [SimHost("gpu", token_delay=0.001)], extra=FAST_TIMING) as s:
        yield s


@pytest.fixture
def counted() -> Iterator[list[tuple[str, str, str]]]:
    """(path, prompt tokens, completion tokens) of each request line gpumanager logs."""
    seen: list[tuple[str, str, str]] = []
    pattern = re.compile(r"^POST (\S+) .* tokens=(\S+)/(\S+)$")

    def sink(message: Any) -> None:
        if found := pattern.match(message.record["message"]):
            seen.append((found[1], found[2], found[3]))

    handle = logger.add(sink, level="INFO")
    yield seen
    logger.remove(handle)


def settle(counted: list[tuple[str, str, str]], n: int) -> None:
    wait_until(lambda: len(counted) >= n, timeout=10)


def test_ollama_answers_are_counted_streamed_or_not(stack: Stack, counted: list[tuple[str, str, str]]) -> None:
    messages = [{"role": "user", "content": PROMPT}]
    with ollama.Client(host=stack.url, headers=stack.headers()) as client:
        parts = list(client.chat(model="llama3.2", messages=messages, stream=True, options={"num_predict": 7}))
        assert "".join(p.message.content or "" for p in parts) == expected_text(7)
        whole = client.generate(model="llama3.2", prompt=PROMPT, options={"num_predict": 3})
        assert whole.response == expected_text(3)
        client.embed(model="llama3.2", input=["a b", "c"])
    settle(counted, 3)  # a request's line is logged just after its answer's last byte went out
    assert counted == [("/api/chat", "4", "7"), ("/api/generate", "4", "3"), ("/api/embed", "3", "-")]


def test_an_openai_stream_is_counted_and_unchanged_when_usage_was_not_asked(
    stack: Stack, counted: list[tuple[str, str, str]]
) -> None:
    sim = stack.sims["gpu"]
    body = {"model": "llama3.2", "stream": True, "max_tokens": 5, "messages": [{"role": "user", "content": PROMPT}]}
    direct = httpx.post(stack.servers["gpu"].url + "/v1/chat/completions", json=body, timeout=30)
    direct_events = [json.loads(e[6:]) for e in direct.text.split("\n\n") if e.startswith("data: {")]
    with httpx.stream("POST", stack.v1 + "/chat/completions", json=body, headers=stack.headers(), timeout=30) as r:
        text = r.read().decode()
    events = [json.loads(e[6:]) for e in text.split("\n\n") if e.startswith("data: {")]
    assert text.rstrip().endswith("data: [DONE]")
    assert [e["choices"] for e in events] == [e["choices"] for e in direct_events]  # no usage-only event
    assert all("usage" not in e for e in events)
    assert json.loads(sim.last_body)["stream_options"] == {"include_usage": True}  # asked upstream for it
    with openai.OpenAI(base_url=stack.v1, api_key=stack.user_key) as client:
        chunks = list(
            client.chat.completions.create(model="llama3.2", stream=True, max_tokens=5, messages=body["messages"])
        )  # type: ignore[call-overload]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected_text(5)
    assert all(c.usage is None and c.choices for c in chunks)
    settle(counted, 2)
    assert counted == [("/v1/chat/completions", "4", "5")] * 2


def test_an_openai_stream_that_asked_for_usage_gets_it(stack: Stack, counted: list[tuple[str, str, str]]) -> None:
    with openai.OpenAI(base_url=stack.v1, api_key=stack.user_key) as client:
        chunks = list(
            client.chat.completions.create(
                model="llama3.2",
                stream=True,
                max_tokens=6,
                stream_options={"include_usage": True},
                messages=[{"role": "user", "content": PROMPT}],
            )
        )
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 6
        whole = client.completions.create(model="llama3.2", prompt=PROMPT, max_tokens=2)
        assert whole.usage is not None and whole.usage.prompt_tokens == 4
    settle(counted, 2)
    assert counted == [("/v1/chat/completions", "4", "6"), ("/v1/completions", "4", "2")]


def test_a_host_that_refuses_stream_options_is_asked_again_without(tmp_path: Any) -> None:
    sim = SimOllama(name="old", token_delay=0.001)
    refusals: list[bytes] = []

    async def older_ollama(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] == "/v1/chat/completions":
            message = await receive()
            body = message.get("body", b"")
            if b"stream_options" in body:
                refusals.append(body)
                return await refuse_stream_options(send)
            await sim(scope, replaying(body, receive), send)
            return
        await sim(scope, receive, send)

    with running_stack(tmp_path, [SimHost("old")], extra=FAST_TIMING) as s:
        door = s.serve(older_ollama)
        s.call(setattr, s.runtime.fleet.hosts["old"], "url", door.url)
        with openai.OpenAI(base_url=s.v1, api_key=s.user_key) as client:
            for _ in range(2):
                chunks = list(
                    client.chat.completions.create(
                        model="llama3.2", stream=True, max_tokens=3, messages=[{"role": "user", "content": "x"}]
                    )
                )  # type: ignore[call-overload]
                assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected_text(3)
        assert len(refusals) == 1  # remembered: the second stream was sent without it at once
        assert s.call(lambda: s.runtime.fleet.hosts["old"].stream_usage) is False
