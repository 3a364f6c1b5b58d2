"""Slots, the wait queue and its limits, disconnects and failing hosts, through a running gpumanager."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import anyio
import httpx
import ollama
import openai
import pytest

from gpumanager.sim import expected_text
from tests.harness import FAST_TIMING, SimHost, Stack, async_wait_until, running_stack, wait_until

pytestmark = pytest.mark.anyio

CHAT = {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}], "stream": False}


def chat(tokens: int, *, stream: bool = False) -> dict[str, object]:
    return {**CHAT, "stream": stream, "options": {"num_predict": tokens}}


async def fire(client: httpx.AsyncClient, path: str, body: dict[str, object]) -> None:
    """A request whose answer the test does not look at (it holds a slot or a queue place)."""
    await client.post(path, json=body)


@pytest.fixture
def two_hosts(tmp_path: Path) -> Iterator[Stack]:
    hosts = [
        SimHost("a", slots=2, sim_slots=10, token_delay=0.01),
        SimHost("b", slots=2, sim_slots=10, token_delay=0.01),
    ]
    with running_stack(tmp_path, hosts, extra=FAST_TIMING + "[scheduler]\nmax_queue = 100\n") as stack:
        yield stack


async def test_slots_are_never_exceeded_under_50_concurrent_requests(two_hosts: Stack) -> None:
    results: list[str] = []

    async def one(client: httpx.AsyncClient) -> None:
        answer = await client.post("/api/chat", json=chat(5), headers=two_hosts.headers())
        assert answer.status_code == 200, answer.text
        results.append(answer.json()["message"]["content"])

    async with httpx.AsyncClient(base_url=two_hosts.url, timeout=30) as client, anyio.create_task_group() as tg:
        for _ in range(50):
            tg.start_soon(one, client)
    assert results == [expected_text(5)] * 50
    assert two_hosts.sims["a"].max_active <= 2 and two_hosts.sims["b"].max_active <= 2
    assert two_hosts.sims["a"].max_active + two_hosts.sims["b"].max_active == 4  # both hosts were used fully
    fleet = two_hosts.runtime.fleet  # a slot is freed just after its answer's last byte went out
    await async_wait_until(lambda: two_hosts.call(lambda: sum(h.leases for h in fleet.hosts.values())) == 0)


@pytest.fixture
def one_slot(tmp_path: Path) -> Iterator[Stack]:
    extra = FAST_TIMING + "[scheduler]\nmax_queue = 2\nmax_per_key = 0\n"
    with running_stack(tmp_path, [SimHost("solo", slots=1, sim_slots=4, token_delay=0.05)], extra=extra) as stack:
        yield stack


async def test_a_full_queue_answers_429_in_each_dialect(one_slot: Stack) -> None:
    fleet = one_slot.runtime.fleet
    async with (
        httpx.AsyncClient(base_url=one_slot.url, timeout=30, headers=one_slot.headers()) as client,
        anyio.create_task_group() as tg,
    ):
        for _ in range(3):  # one holds the slot, two wait
            tg.start_soon(fire, client, "/api/chat", chat(20))
        await async_wait_until(lambda: len(fleet.queue) == 2)
        refused = await client.post("/api/chat", json=chat(1))
        assert refused.status_code == 429 and "queue is full" in refused.json()["error"]
        assert "retry-after" in refused.headers
        refused = await client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 1})
        assert refused.status_code == 429 and refused.json()["error"]["type"] == "rate_limit_error"


async def test_a_queued_client_that_disconnects_leaves_the_queue(one_slot: Stack) -> None:
    fleet, sim = one_slot.runtime.fleet, one_slot.sims["solo"]
    async with (
        httpx.AsyncClient(base_url=one_slot.url, timeout=30, headers=one_slot.headers()) as client,
        anyio.create_task_group() as tg,
    ):
        tg.start_soon(fire, client, "/api/chat", chat(100))  # holds the only slot for ~5 s
        await async_wait_until(lambda: sim.active == 1)
        for stream in (False, True):  # held without bytes, or with heartbeats: both leave when they go
            with anyio.move_on_after(0.3):  # waits in the queue, then gives up
                await client.post("/api/chat", json=chat(1, stream=stream))
            await async_wait_until(lambda: len(fleet.queue) == 0, timeout=5)
        assert sim.active == 1 and sim.requests["/api/chat"] == 1  # they never reached the host
        tg.cancel_scope.cancel()


async def test_a_client_that_disconnects_mid_stream_frees_its_slot(one_slot: Stack) -> None:
    host, sim = one_slot.runtime.fleet.hosts["solo"], one_slot.sims["solo"]
    async with httpx.AsyncClient(base_url=one_slot.url, timeout=30, headers=one_slot.headers()) as client:
        async with client.stream("POST", "/api/chat", json=chat(200, stream=True)) as response:
            async for _ in response.aiter_lines():
                break
            assert host.leases == 1
        await async_wait_until(lambda: host.leases == 0, timeout=5)
        await async_wait_until(lambda: sim.cancelled == 1, timeout=5)  # the upstream request was closed too
        answer = await client.post("/api/chat", json=chat(2))  # the slot is free for the next one
        assert answer.status_code == 200


async def test_a_queue_wait_that_times_out_gets_503_with_retry_after(tmp_path: Path) -> None:
    extra = FAST_TIMING.replace("queue_timeout_seconds = 5", "queue_timeout_seconds = 0.3")
    with running_stack(tmp_path, [SimHost("solo", slots=1, token_delay=0.05)], extra=extra) as stack:
        async with (
            httpx.AsyncClient(base_url=stack.url, timeout=30, headers=stack.headers()) as client,
            anyio.create_task_group() as tg,
        ):
            tg.start_soon(fire, client, "/api/chat", chat(20))
            await async_wait_until(lambda: stack.sims["solo"].active == 1)
            late = await client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 1})
            assert late.status_code == 503 and 1 <= int(late.headers["retry-after"]) <= 60
            assert late.json()["error"]["type"] == "server_error"


async def test_one_key_cannot_take_more_than_max_per_key(tmp_path: Path) -> None:
    extra = FAST_TIMING + "[scheduler]\nmax_per_key = 2\n"
    with running_stack(tmp_path, [SimHost("big", slots=8, token_delay=0.05)], extra=extra) as stack:
        other = stack.new_key("other")
        async with (
            httpx.AsyncClient(base_url=stack.url, timeout=30, headers=stack.headers()) as client,
            anyio.create_task_group() as tg,
        ):
            for _ in range(2):
                tg.start_soon(fire, client, "/api/chat", chat(20))
            await async_wait_until(lambda: stack.sims["big"].active == 2)
            third = await client.post("/api/chat", json=chat(1))
            assert third.status_code == 429 and "max_per_key" in third.json()["error"]
            served = await client.post("/api/chat", json=chat(1), headers=stack.headers(other))
            assert served.status_code == 200


def test_a_host_killed_mid_stream_ends_the_stream_with_an_in_band_error(tmp_path: Path) -> None:
    hosts = [SimHost("doomed", models=("llama3.2:latest",), token_delay=0.02)]
    with (
        running_stack(tmp_path, hosts) as stack,
        ollama.Client(host=stack.url, headers=stack.headers()) as oll,
        openai.OpenAI(base_url=stack.v1, api_key=stack.user_key, max_retries=0) as oai,
    ):
        got: list[str] = []
        with pytest.raises(ollama.ResponseError) as oll_error:
            for chunk in oll.chat(
                model="llama3.2", messages=[{"role": "user", "content": "x"}], stream=True, options={"num_predict": 500}
            ):
                got.append(chunk.message.content or "")
                if len(got) == 3:
                    stack.call(stack.servers["doomed"].kill)
        assert "".join(got).startswith("tok0 tok1 tok2") and "doomed" in oll_error.value.error
        wait_until(lambda: stack.call(lambda: stack.runtime.fleet.hosts["doomed"].leases) == 0)
        with pytest.raises((openai.APIError, openai.APIConnectionError)):
            list(
                oai.chat.completions.create(
                    model="llama3.2", messages=[{"role": "user", "content": "x"}], stream=True, max_tokens=5
                )
            )


def test_openai_stream_from_a_host_that_dies_gets_an_in_band_error(tmp_path: Path) -> None:
    with (
        running_stack(tmp_path, [SimHost("flaky", token_delay=0.01)]) as stack,
        openai.OpenAI(base_url=stack.v1, api_key=stack.user_key, max_retries=0) as oai,
    ):
        stack.sims["flaky"].fail_after_tokens = 2
        pieces: list[str] = []
        with pytest.raises(openai.APIError) as error:
            for chunk in oai.chat.completions.create(
                model="llama3.2", stream=True, max_tokens=50, messages=[{"role": "user", "content": "x"}]
            ):
                pieces.extend(c.delta.content or "" for c in chunk.choices)
        assert "".join(pieces) == expected_text(2)
        assert "flaky" in error.value.message


def test_a_host_that_cannot_be_reached_is_retried_on_another_and_skipped(tmp_path: Path) -> None:
    hosts = [SimHost("first"), SimHost("second")]
    with running_stack(tmp_path, hosts) as stack:
        stack.call(stack.servers["first"].kill)
        for _ in range(4):
            answer = httpx.post(stack.url + "/api/chat", json=chat(2), headers=stack.headers(), timeout=10)
            assert answer.status_code == 200 and answer.headers["x-gpumanager-host"] == "second"
        assert not stack.call(lambda: stack.runtime.fleet.hosts["first"].healthy)
        stack.call(stack.servers["second"].kill)
        answer = httpx.post(stack.url + "/api/chat", json=chat(2), headers=stack.headers(), timeout=10)
        assert answer.status_code in (502, 503), answer.text


def test_a_host_that_stopped_answering_is_used_again_once_it_answers(tmp_path: Path) -> None:
    with running_stack(tmp_path, [SimHost("back", models=("llama3.2:latest",))]) as stack:
        server = stack.servers["back"]
        stack.call(server.kill)
        refused = httpx.post(stack.url + "/api/chat", json=chat(1), headers=stack.headers(), timeout=10)
        assert refused.status_code in (502, 503) and not stack.runtime.fleet.hosts["back"].healthy
        stack.serve(stack.sims["back"], port=server.port)  # the same Ollama comes back on the same port
        wait_until(
            lambda: stack.call(lambda: stack.runtime.fleet.hosts["back"].healthy), timeout=10
        )  # noticed by the health probe
        answer = httpx.post(stack.url + "/api/chat", json=chat(2), headers=stack.headers(), timeout=10)
        assert answer.status_code == 200 and answer.json()["message"]["content"] == expected_text(2)


def test_the_upstream_token_is_sent_and_the_client_key_never_is(tmp_path: Path) -> None:
    with running_stack(tmp_path, [SimHost("door")], environ={"GPUMANAGER_UPSTREAM_TOKEN": "fleet-secret"}) as stack:
        assert httpx.post(stack.url + "/api/chat", json=chat(1), headers=stack.headers(), timeout=10).status_code == 200
        seen = stack.sims["door"].last_headers
        assert seen["authorization"] == "Bearer fleet-secret" and stack.user_key not in str(seen)
        stack.call(stack.runtime.reconciler.refresh, stack.runtime.fleet.hosts["door"])
        assert stack.sims["door"].last_headers["authorization"] == "Bearer fleet-secret"  # probes too


async def refuse(scope: dict[str, object], receive: object, send: object) -> None:
    """A GPU node's door that does not know gpumanager's token."""
    await send(
        {
            "type": "http.response.start",
            "status": 401,  # type: ignore[operator]
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": b'{"error":"unauthorized"}'})  # type: ignore[operator]


def test_a_host_refusing_gpumanagers_credentials_is_a_502_not_the_clients_fault(tmp_path: Path) -> None:
    with running_stack(tmp_path, [SimHost("locked")]) as stack:
        door = stack.serve(refuse)
        stack.call(setattr, stack.runtime.fleet.hosts["locked"], "url", door.url)
        answer = httpx.post(
            stack.url + "/v1/chat/completions",
            headers=stack.headers(),
            timeout=10,
            json={"model": "llama3.2", "messages": [{"role": "user", "content": "x"}]},
        )
        assert answer.status_code == 502 and "GPUMANAGER_UPSTREAM_TOKEN" in answer.json()["error"]["message"]
