"""Streaming clients that wait for a wake get early headers and heartbeats, and survive it."""

from __future__ import annotations

import time
from pathlib import Path

import anyio
import httpx
import ollama
import openai

from gpumanager.sim import expected_text
from tests.clouds import Machine
from tests.harness import running_cloud_stack

MESSAGES = [{"role": "user", "content": "x"}]


def timing(keepalive: float) -> str:
    return f"""
[timing]
startup_timeout_seconds = 60
ollama_readiness_wait_seconds = 0.05
wake_keepalive_seconds = {keepalive}
reconcile_interval_seconds = 5
"""


def test_clients_with_short_read_timeouts_survive_a_wake_ten_times_longer(tmp_path: Path) -> None:
    """The scaled version: 0.5 s read timeout, 5 s wake, a heartbeat every 0.2 s."""
    with running_cloud_stack(tmp_path, "simulated", [Machine("gpu-1")], extra=timing(0.2), boot_seconds=5) as (
        stack,
        cloud,
    ):
        results: dict[str, str] = {}

        def with_openai() -> None:
            with openai.OpenAI(
                base_url=stack.v1, api_key=stack.user_key, max_retries=0, timeout=httpx.Timeout(0.5, connect=0.5)
            ) as client:
                stream = client.chat.completions.create(model="llama3.2", messages=MESSAGES, stream=True, max_tokens=6)
                results["openai"] = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

        def with_ollama() -> None:
            with ollama.Client(host=stack.url, headers=stack.headers(), timeout=httpx.Timeout(0.5)) as client:
                chunks = list(client.generate(model="llama3.2", prompt="x", stream=True, options={"num_predict": 6}))
                results["ollama"] = "".join(c.response for c in chunks)
                results["ollama-empty"] = str(sum(1 for c in chunks if not c.response and not c.done))

        async def both() -> None:
            async with anyio.create_task_group() as tg:
                tg.start_soon(anyio.to_thread.run_sync, with_openai)
                tg.start_soon(anyio.to_thread.run_sync, with_ollama)

        started = time.monotonic()
        anyio.run(both)
        assert time.monotonic() - started >= 5
        assert results["openai"] == expected_text(6) and results["ollama"] == expected_text(6)
        assert int(results["ollama-empty"]) >= 10  # the heartbeats, which add nothing to the answer
        assert cloud.resumes("gpu-1") == 1


def test_heartbeats_keep_a_5_second_read_timeout_alive_through_a_20_second_wake(tmp_path: Path) -> None:
    with (
        running_cloud_stack(tmp_path, "simulated", [Machine("gpu-1")], extra=timing(2), boot_seconds=20) as (stack, _),
        openai.OpenAI(
            base_url=stack.v1, api_key=stack.user_key, max_retries=0, timeout=httpx.Timeout(5, connect=5)
        ) as client,
    ):
        started = time.monotonic()
        with client.chat.completions.with_streaming_response.create(
            model="llama3.2", messages=MESSAGES, stream=True, max_tokens=4
        ) as response:
            assert time.monotonic() - started < 5  # the headers came early, long before the host was up
            assert "x-gpumanager-host" not in response.headers
            text = "".join(c.choices[0].delta.content or "" for c in response.parse() if c.choices)
        assert text == expected_text(4) and time.monotonic() - started >= 20


def test_a_non_streaming_request_is_held_without_bytes_through_a_wake(tmp_path: Path) -> None:
    with running_cloud_stack(tmp_path, "simulated", [Machine("gpu-1")], extra=timing(0.2), boot_seconds=1) as (
        stack,
        _,
    ):
        answer = httpx.post(
            stack.url + "/v1/chat/completions",
            headers=stack.headers(),
            timeout=10,
            json={"model": "llama3.2", "messages": MESSAGES, "max_tokens": 3},
        )
        assert answer.status_code == 200 and answer.headers["x-gpumanager-host"] == "gpu-1"
        assert int(answer.headers["x-gpumanager-wait-ms"]) >= 1000
        assert answer.json()["choices"][0]["message"]["content"] == expected_text(3)


def test_a_provider_may_set_its_own_startup_timeout(tmp_path: Path) -> None:
    """A warm RunPod endpoint starts in seconds, a SURF workspace in minutes: timing per provider."""
    from gpumanager.providers.simulated import SimulatedProvider
    from tests.harness import running_stack

    extra = (
        timing(0.2).replace("startup_timeout_seconds = 60", "startup_timeout_seconds = 30")
        + """
[[providers]]
type = "simulated"
name = "quick"
startup_timeout_seconds = 0.5
[[providers.hosts]]
name = "gpu"
boot_seconds = 0.1
"""
    )
    with running_stack(tmp_path, [], extra=extra) as stack:
        provider = stack.runtime.providers["quick"]
        assert isinstance(provider, SimulatedProvider)
        provider.machines["gpu"].hang_resume = True
        started = time.monotonic()
        answer = httpx.post(
            stack.url + "/api/chat",
            headers=stack.headers(),
            timeout=30,
            json={"model": "llama3.2", "messages": MESSAGES, "stream": False},
        )
        assert answer.status_code == 504 and "0.5s" in answer.json()["error"]
        assert time.monotonic() - started < 5  # the provider's 0.5 s, not the fleet's 30 s
