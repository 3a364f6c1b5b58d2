"""The simulated Ollama, checked over real loopback HTTP with the real clients.

The sync ``ollama`` and ``openai`` clients run against a sim served from a portal
thread; everything else talks to the sim with httpx inside the test's own loop.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import anyio
import httpx
import ollama
import openai
import pytest
from anyio.from_thread import start_blocking_portal

from gpumanager.sim import SimOllama, SimServer, expected_text, running_server
from gpumanager.sim.ollama import embedding_for

pytestmark = pytest.mark.anyio

MODELS = ("llama3.2", "qwen2.5:7b", "all-minilm")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def threaded_sim() -> Iterator[tuple[SimOllama, str]]:
    """A sim served from a portal thread, so blocking clients can call it from the test."""
    sim = SimOllama(models=MODELS, token_delay=0.001, embedding_dim=8)
    with start_blocking_portal() as portal, portal.wrap_async_context_manager(running_server(sim)) as server:
        yield sim, server.url


@pytest.fixture
async def served() -> AsyncIterator[tuple[SimOllama, SimServer, httpx.AsyncClient]]:
    sim = SimOllama(models=MODELS, token_delay=0.002, slots=3)
    async with running_server(sim) as server, httpx.AsyncClient(base_url=server.url, timeout=5) as client:
        yield sim, server, client


async def _poll(condition: Callable[[], bool]) -> None:
    with anyio.fail_after(2.0):
        # The conditions read the sim's plain counters, which announce no change: polling is the point.
        while not condition():
            await anyio.sleep(0.005)


# -- the real ollama client -------------------------------------------------------------


def test_ollama_client_generation(threaded_sim: tuple[SimOllama, str]) -> None:
    sim, url = threaded_sim
    with ollama.Client(host=url) as client:
        messages = [{"role": "user", "content": "say hello please"}]
        reply = client.chat(model="llama3.2", messages=messages, options={"num_predict": 5})
        assert reply.message.content == expected_text(5)
        assert (reply.done_reason, reply.eval_count, reply.prompt_eval_count) == ("stop", 5, 3)

        parts = list(client.chat(model="llama3.2", messages=messages, stream=True, options={"num_predict": 4}))
        assert [p.message.content for p in parts[:-1]] == [f"tok{i} " for i in range(4)]
        assert parts[-1].done and parts[-1].done_reason == "stop" and parts[-1].eval_count == 4

        assert client.generate(model="qwen2.5:7b", prompt="hi").response == expected_text(sim.default_tokens)
        chunks = [p.response for p in client.generate(model="qwen2.5:7b", prompt="hi", stream=True)]
        assert "".join(chunks) == expected_text(sim.default_tokens)
        assert len(chunks) == sim.default_tokens + 1  # one per token plus the done frame


def test_ollama_client_models(threaded_sim: tuple[SimOllama, str]) -> None:
    sim, url = threaded_sim
    with ollama.Client(host=url) as client:
        assert [m.model for m in client.list().models] == ["llama3.2:latest", "qwen2.5:7b", "all-minilm:latest"]
        assert client.ps().models == []
        client.generate(model="llama3.2", prompt="load me")
        (loaded,) = client.ps().models
        assert loaded.model == "llama3.2:latest" and loaded.context_length == sim.context_length

        shown = client.show("llama3.2")
        assert shown.capabilities == ["completion"] and shown.modelinfo["llama.context_length"] == 4096
        assert client.show("all-minilm").capabilities == ["embedding"]

        embedded = client.embed(model="all-minilm", input=["one", "two words"])
        assert [list(e) for e in embedded.embeddings] == [embedding_for("one", 8), embedding_for("two words", 8)]

        assert client.pull("mistral").status == "success"
        statuses = [p.status for p in client.pull("phi3:mini", stream=True)]
        assert statuses[0] == "pulling manifest" and statuses[-1] == "success"
        assert {"mistral:latest", "phi3:mini"} <= {m.model for m in client.list().models}

        with pytest.raises(ollama.ResponseError) as caught:
            client.chat(model="missing", messages=[{"role": "user", "content": "hi"}])
        assert caught.value.status_code == 404 and caught.value.error == "model 'missing' not found"


# -- the real openai client ---------------------------------------------------------------


def test_openai_client_chat_and_completions(threaded_sim: tuple[SimOllama, str]) -> None:
    _, url = threaded_sim
    with openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0) as client:
        messages: list[Any] = [{"role": "user", "content": "hello"}]
        reply = client.chat.completions.create(model="llama3.2", messages=messages, max_tokens=6)
        assert reply.choices[0].message.content == expected_text(6)
        assert reply.choices[0].finish_reason == "stop" and reply.usage is not None
        assert reply.usage.completion_tokens == 6 and reply.system_fingerprint == "fp_ollama"

        stream = client.chat.completions.create(
            model="llama3.2", messages=messages, max_tokens=5, stream=True, stream_options={"include_usage": True}
        )
        chunks = list(stream)
        content = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
        assert content == [f"tok{i} " for i in range(5)]
        assert chunks[0].choices[0].delta.role == "assistant"
        assert chunks[-2].choices[0].finish_reason == "stop"
        assert chunks[-1].choices == [] and chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 5

        completion = client.completions.create(model="qwen2.5:7b", prompt="once upon", max_tokens=3)
        assert completion.choices[0].text == expected_text(3)
        texts = [c.choices[0].text for c in client.completions.create(model="qwen2.5:7b", prompt="x", stream=True)]
        assert "".join(texts) == expected_text(20)


def test_openai_client_models_embeddings_errors(threaded_sim: tuple[SimOllama, str]) -> None:
    sim, url = threaded_sim
    with openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0) as client:
        assert [m.id for m in client.models.list()] == ["llama3.2:latest", "qwen2.5:7b", "all-minilm:latest"]
        assert client.models.retrieve("qwen2.5:7b").owned_by == "library"

        # The client asks for base64 unless told otherwise; both encodings must decode to the same floats.
        for fmt in ("float", None):
            kwargs: dict[str, Any] = {"encoding_format": fmt} if fmt else {}
            vectors = client.embeddings.create(model="all-minilm", input=["a", "b c"], **kwargs).data
            for got, text in zip(vectors, ["a", "b c"], strict=True):
                assert got.embedding == pytest.approx(embedding_for(text, 8), rel=1e-6)

        with pytest.raises(openai.NotFoundError) as caught:
            client.chat.completions.create(model="missing", messages=[{"role": "user", "content": "hi"}])
        assert caught.value.code is None and caught.value.type == "not_found_error"

        sim.set_models([])
        assert client.models.list().data == []


# -- raw HTTP: shapes, errors, management ---------------------------------------------------


async def test_routes_and_errors(served: tuple[SimOllama, SimServer, httpx.AsyncClient]) -> None:
    _, _, client = served
    root = await client.get("/")
    assert (root.status_code, root.text, root.headers["content-type"]) == (
        200,
        "Ollama is running",
        "text/plain; charset=utf-8",
    )
    assert (await client.head("/api/version")).status_code == 200
    assert (await client.get("/api/version")).json() == {"version": "0.12.6"}
    assert (await client.get("/api/chat")).status_code == 405
    assert (await client.post("/api/unknown")).status_code == 404
    assert (await client.post("/api/chat", content=b"{nope")).status_code == 400
    assert (await client.post("/api/chat", json={"messages": []})).json() == {"error": "model is required"}

    missing = await client.post("/api/generate", json={"model": "nope", "prompt": "hi"})
    assert (missing.status_code, missing.json()) == (404, {"error": "model 'nope' not found"})
    v1_missing = await client.post("/v1/chat/completions", json={"model": "nope", "messages": []})
    assert (v1_missing.status_code, v1_missing.json()["error"]["type"]) == (404, "not_found_error")
    not_chat = await client.post("/api/chat", json={"model": "all-minilm", "messages": [{"content": "x"}]})
    assert (not_chat.status_code, not_chat.json()) == (400, {"error": '"all-minilm" does not support chat'})
    empty = await client.post("/v1/chat/completions", json={"model": "llama3.2", "messages": []})
    assert empty.json()["error"] == {
        "message": "[] is too short - 'messages'",
        "type": "invalid_request_error",
        "param": None,
        "code": None,
    }


async def test_stream_default_and_load_answer(served: tuple[SimOllama, SimServer, httpx.AsyncClient]) -> None:
    _, _, client = served
    streamed = await client.post(
        "/api/generate", json={"model": "llama3.2", "prompt": "hi", "options": {"num_predict": 2}}
    )
    assert streamed.headers["content-type"] == "application/x-ndjson"
    assert [line["done"] for line in map(json.loads, streamed.text.splitlines())] == [False, False, True]

    load = await client.post("/api/chat", json={"model": "llama3.2", "messages": []})
    assert load.headers["content-type"] == "application/json; charset=utf-8"
    assert load.json()["done_reason"] == "load" and load.json()["message"]["content"] == ""
    assert [m["name"] for m in (await client.get("/api/ps")).json()["models"]] == ["llama3.2:latest"]

    unload = await client.post("/api/generate", json={"model": "llama3.2", "keep_alive": 0})
    assert unload.json()["done_reason"] == "unload"
    assert (await client.get("/api/ps")).json() == {"models": []}


async def test_model_management(served: tuple[SimOllama, SimServer, httpx.AsyncClient]) -> None:
    sim, _, client = served
    pulled = await client.post("/api/pull", json={"model": "gemma3"})
    lines = [json.loads(line) for line in pulled.text.splitlines()]
    assert lines[-1] == {"status": "success"} and any("completed" in line for line in lines)
    assert (await client.post("/api/copy", json={"source": "gemma3", "destination": "g2"})).status_code == 200
    assert (await client.post("/api/copy", json={"source": "zz", "destination": "g3"})).status_code == 404
    created = await client.post("/api/create", json={"model": "mine", "from": "llama3.2", "stream": False})
    assert created.json() == {"status": "success"}
    assert (await client.request("DELETE", "/api/delete", json={"model": "g2"})).status_code == 200
    assert (await client.request("DELETE", "/api/delete", json={"model": "g2"})).status_code == 404
    assert sim.models == ["llama3.2:latest", "qwen2.5:7b", "all-minilm:latest", "gemma3:latest", "mine:latest"]
    pushed = await client.post("/api/push", json={"model": "mine"})
    assert json.loads(pushed.text.splitlines()[-1]) == {"status": "success"}


async def test_stats_and_headers(served: tuple[SimOllama, SimServer, httpx.AsyncClient]) -> None:
    sim, _, client = served
    await client.get("/api/tags", headers={"X-Trace": "abc"})
    await client.get("/api/tags")
    assert sim.requests["/api/tags"] == 2 and "x-trace" not in sim.last_headers
    await client.get("/api/version", headers={"X-Trace": "abc"})
    assert sim.last_headers["x-trace"] == "abc"
    sim.reset_stats()
    assert (sim.requests, sim.max_active, sim.cancelled, sim.last_headers) == ({}, 0, 0, {})


# -- concurrency, cancellation and crashes ----------------------------------------------------


async def test_slots_are_never_exceeded(served: tuple[SimOllama, SimServer, httpx.AsyncClient]) -> None:
    sim, _, client = served
    seen: list[int] = []

    async def one(i: int) -> None:
        body = {
            "model": "llama3.2",
            "messages": [{"content": "hi"}],
            "options": {"num_predict": 3},
            "stream": i % 2 == 0,
        }
        response = await client.post("/api/chat", json=body)
        seen.append(sim.active)
        frames = [json.loads(line) for line in response.text.splitlines()]
        assert "".join(f["message"]["content"] for f in frames) == expected_text(3)

    async with anyio.create_task_group() as tg:
        for i in range(20):
            tg.start_soon(one, i)
    assert sim.max_active == sim.slots == 3 and sim.active == 0
    assert max(seen) <= 3 and sim.requests["/api/chat"] == 20


async def test_disconnect_cancels_generation_and_frees_slot() -> None:
    sim = SimOllama(slots=1, token_delay=0.005, default_tokens=10_000)
    async with running_server(sim) as server, httpx.AsyncClient(base_url=server.url, timeout=5) as client:
        body = {"model": "llama3.2", "prompt": "go"}
        async with client.stream("POST", "/api/generate", json=body) as response:
            async for _ in response.aiter_lines():
                break  # leaving the block mid-body closes the connection
        await _poll(lambda: sim.cancelled == 1 and sim.active == 0)
        # A non-streaming answer is abandoned the same way when the client gives up waiting.
        with pytest.raises(httpx.ReadTimeout):
            await client.post("/api/generate", json={**body, "stream": False}, timeout=0.05)
        await _poll(lambda: sim.cancelled == 2 and sim.active == 0)
        short = await client.post("/api/generate", json={**body, "stream": False, "options": {"num_predict": 2}})
        assert short.json()["response"] == expected_text(2)


async def test_kill_breaks_open_streams_and_refuses_connections() -> None:
    sim = SimOllama(token_delay=0.005, default_tokens=10_000)
    async with running_server(sim) as server, httpx.AsyncClient(base_url=server.url, timeout=5) as client:
        with pytest.raises(httpx.TransportError):
            async with client.stream(
                "POST",
                "/v1/chat/completions",
                json={"model": "llama3.2", "messages": [{"content": "x"}], "stream": True},
            ) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: "):
                        server.kill()
        with pytest.raises(httpx.ConnectError):
            await client.get("/")


async def test_fail_after_tokens_drops_the_connection(served: tuple[SimOllama, SimServer, httpx.AsyncClient]) -> None:
    sim, _, client = served
    sim.fail_after_tokens = 3
    lines: list[str] = []
    with pytest.raises(httpx.RemoteProtocolError):
        async with client.stream("POST", "/api/chat", json={"model": "llama3.2", "messages": [{"content": "x"}]}) as r:
            async for line in r.aiter_lines():
                lines.append(line)
    assert [json.loads(line)["message"]["content"] for line in lines] == ["tok0 ", "tok1 ", "tok2 "]
    sim.fail_after_tokens = None
    assert (
        await client.post("/api/chat", json={"model": "llama3.2", "messages": [{"content": "x"}], "stream": False})
    ).status_code == 200


async def test_load_delay_is_paid_once_by_concurrent_first_users() -> None:
    sim = SimOllama(load_delay=0.1)
    body = {"model": "llama3.2", "prompt": "x", "stream": False}
    loads: list[int] = []
    async with running_server(sim) as server, httpx.AsyncClient(base_url=server.url) as client:

        async def generate() -> None:
            loads.append((await client.post("/api/generate", json=body)).json()["load_duration"])

        with anyio.fail_after(0.25):  # three sequential loads would take 0.3 s
            async with anyio.create_task_group() as tg:
                for _ in range(3):
                    tg.start_soon(generate)
        await generate()
    assert all(load >= 100_000_000 for load in loads[:3]) and loads[3] < 50_000_000


def test_servers_in_several_event_loops() -> None:
    async def serve_once() -> str:
        async with running_server(SimOllama()) as server, httpx.AsyncClient(base_url=server.url) as client:
            return (await client.get("/")).text

    assert [anyio.run(serve_once) for _ in range(2)] == ["Ollama is running"] * 2
