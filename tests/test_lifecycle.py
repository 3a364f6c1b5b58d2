"""Waking and pausing, the same suite for every cloud (tests/clouds.py), over real loopback HTTP."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import httpx
import ollama
import openai
import pytest
from loguru import logger

from gpumanager.hosts import HostState
from gpumanager.sim import expected_text
from tests.clouds import CLOUDS, Cloud, Machine
from tests.harness import Stack, running_cloud_stack, wait_until

LIFE = """
[timing]
reservation_minutes = 0.01
fallback_reservation_minutes = 0.01
startup_timeout_seconds = 5
ollama_readiness_wait_seconds = 0.05
probe_timeout_seconds = 1
queue_timeout_seconds = 10
reconcile_interval_seconds = 0.3
inventory_refresh_seconds = 1
wake_keepalive_seconds = 0.5
failed_cooldown_seconds = 30
shutdown_grace_seconds = 1
pause_retry_seconds = 0.05
"""
WINDOW = 0.6  # reservation_minutes = 0.01


@pytest.fixture(params=sorted(CLOUDS))
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def chat(tokens: int, *, stream: bool = False, model: str = "llama3.2") -> dict[str, object]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": "hi"}],
        "stream": stream,
        "options": {"num_predict": tokens},
    }


def state(stack: Stack, name: str) -> HostState:
    """A host's state, read on the server's own event loop."""
    value: HostState = stack.call(lambda: stack.runtime.fleet.hosts[name].state)
    return value


@pytest.fixture
def one_paused(tmp_path: Path, kind: str) -> Iterator[tuple[Stack, Cloud]]:
    with running_cloud_stack(tmp_path, kind, [Machine("gpu-1")], extra=LIFE) as pair:
        yield pair


def test_a_request_wakes_a_paused_host_and_streams_the_whole_answer(one_paused: tuple[Stack, Cloud]) -> None:
    stack, cloud = one_paused
    assert state(stack, "gpu-1") is HostState.PAUSED and not cloud.running("gpu-1")
    with ollama.Client(host=stack.url, headers=stack.headers(), timeout=30) as client:
        chunks = [
            c.message.content
            for c in client.chat(
                model="llama3.2", stream=True, options={"num_predict": 10}, messages=[{"role": "user", "content": "x"}]
            )
        ]
    assert "".join(chunks) == expected_text(10) and len([c for c in chunks if c]) == 10
    assert cloud.resumes("gpu-1") == 1 and state(stack, "gpu-1") is HostState.READY


def test_50_concurrent_requests_during_one_wake_cause_exactly_one_resume(one_paused: tuple[Stack, Cloud]) -> None:
    stack, cloud = one_paused
    answers: list[str] = []

    async def one(client: httpx.AsyncClient, i: int) -> None:
        stream = i % 2 == 0
        async with client.stream("POST", "/api/chat", json=chat(3, stream=stream)) as response:
            assert response.status_code == 200
            text = "".join([line async for line in response.aiter_lines()])
        answers.append(text)

    async def main() -> None:
        async with (
            httpx.AsyncClient(base_url=stack.url, headers=stack.headers(), timeout=30) as client,
            anyio.create_task_group() as tg,
        ):
            for i in range(50):
                tg.start_soon(one, client, i)

    anyio.run(main)
    assert len(answers) == 50 and all("tok2" in a for a in answers)
    assert cloud.resumes("gpu-1") == 1
    assert cloud.sim("gpu-1").max_active <= 4


def test_an_idle_host_is_paused_after_its_window_and_one_with_an_open_stream_is_not(
    one_paused: tuple[Stack, Cloud],
) -> None:
    stack, cloud = one_paused
    with httpx.Client(base_url=stack.url, headers=stack.headers(), timeout=30) as client:
        with client.stream("POST", "/api/chat", json=chat(400, stream=True)) as response:  # 400 x 5 ms: 2 s
            for number, _ in enumerate(response.iter_lines()):
                if number == 0:
                    started = time.monotonic()
            assert time.monotonic() - started > WINDOW * 2  # the stream outlived the window...
        assert cloud.pauses("gpu-1") == 0  # ...and the host stayed up while it ran
        finished = time.monotonic()
        wait_until(lambda: cloud.pauses("gpu-1") == 1, timeout=5)
        assert time.monotonic() - finished >= WINDOW * 0.9  # paused after the window, not before
        wait_until(lambda: state(stack, "gpu-1") is HostState.PAUSED and not cloud.running("gpu-1"), timeout=5)


def test_a_protected_host_is_never_auto_paused(tmp_path: Path, kind: str) -> None:
    with running_cloud_stack(tmp_path, kind, [Machine("gpu-1", protected=True)], extra=LIFE) as (stack, cloud):
        assert httpx.post(stack.url + "/api/chat", json=chat(2), headers=stack.headers(), timeout=30).status_code == 200
        time.sleep(WINDOW * 3)
        assert cloud.pauses("gpu-1") == 0 and state(stack, "gpu-1") is HostState.READY
        admin = stack.headers(stack.admin_key)
        assert httpx.delete(stack.url + "/gpu/gpu-1/protect", headers=admin).json()["protected"] is False
        wait_until(lambda: cloud.pauses("gpu-1") == 1, timeout=5)


def test_a_failed_resume_moves_the_request_to_another_host_and_pauses_the_failed_one(tmp_path: Path, kind: str) -> None:
    machines = [Machine("gpu-cheap", cost=1.0), Machine("gpu-dear", cost=2.0)]
    with running_cloud_stack(tmp_path, kind, machines, extra=LIFE) as (stack, cloud):
        stack.call(cloud.fail_next_resume, "gpu-cheap")
        answer = httpx.post(stack.url + "/api/chat", json=chat(3), headers=stack.headers(), timeout=30)
        assert answer.status_code == 200 and answer.headers["x-gpumanager-host"] == "gpu-dear"
        assert answer.json()["message"]["content"] == expected_text(3)
        assert state(stack, "gpu-cheap") is HostState.FAILED and "gpu-cheap" not in answer.text
        wait_until(lambda: cloud.pauses("gpu-cheap") >= 1, timeout=5)  # never left half-woken


def test_a_failed_resume_with_no_other_host_answers_504_in_each_dialect(one_paused: tuple[Stack, Cloud]) -> None:
    stack, cloud = one_paused
    stack.call(cloud.fail_next_resume, "gpu-1")
    answer = httpx.post(
        stack.url + "/v1/chat/completions",
        headers=stack.headers(),
        timeout=30,
        json={"model": "llama3.2", "messages": [{"role": "user", "content": "x"}]},
    )
    assert answer.status_code == 504 and "gpu-1" in answer.json()["error"]["message"]
    wait_until(lambda: cloud.pauses("gpu-1") >= 1, timeout=5)
    answer = httpx.post(stack.url + "/api/chat", json=chat(2), headers=stack.headers(), timeout=30)
    assert answer.status_code == 503 and "retry-after" in answer.headers  # failed: cooling down
    assert "failed to wake" in answer.json()["error"]


def test_a_hanging_resume_times_out_with_504_and_is_paused(tmp_path: Path, kind: str) -> None:
    extra = LIFE.replace("startup_timeout_seconds = 5", "startup_timeout_seconds = 1")
    with (
        running_cloud_stack(tmp_path, kind, [Machine("gpu-1")], extra=extra) as (stack, cloud),
        ollama.Client(host=stack.url, headers=stack.headers(), timeout=30) as client,
    ):
        stack.call(cloud.hang_next_resume, "gpu-1")
        with pytest.raises(ollama.ResponseError) as error:
            client.chat(model="llama3.2", messages=[{"role": "user", "content": "x"}])
        assert error.value.status_code == 504 and "startup_timeout_seconds" in error.value.error
        wait_until(lambda: cloud.pauses("gpu-1") >= 1, timeout=5)


def test_a_streaming_request_whose_wake_fails_gets_an_in_band_error(one_paused: tuple[Stack, Cloud]) -> None:
    stack, cloud = one_paused
    stack.call(cloud.fail_next_resume, "gpu-1")
    # Heartbeats sent 200 first: the failure comes in-band.
    with (
        openai.OpenAI(base_url=stack.v1, api_key=stack.user_key, max_retries=0) as client,
        pytest.raises(openai.APIError) as error,
    ):
        list(client.chat.completions.create(model="llama3.2", stream=True, messages=[{"role": "user", "content": "x"}]))
    assert "gpu-1" in error.value.message


def test_a_restart_finds_a_running_host_and_pauses_it_after_the_fallback_window(tmp_path: Path, kind: str) -> None:
    machines = [Machine("gpu-1", running=True, models=("qwen2.5:7b",))]
    with running_cloud_stack(tmp_path, kind, machines, extra=LIFE) as (stack, cloud):
        wait_until(lambda: state(stack, "gpu-1") is HostState.READY, timeout=5)
        assert cloud.resumes("gpu-1") == 0
        wait_until(lambda: cloud.pauses("gpu-1") == 1, timeout=5)
        wait_until(lambda: state(stack, "gpu-1") is HostState.PAUSED, timeout=5)
        # What it served is cached on disk: after a restart the paused host's models are still listed.
        state_dir = stack.runtime.config.paths.state_dir
    assert "qwen2.5:7b" in (Path(state_dir) / "inventory.json").read_text()


def test_a_host_paused_from_outside_is_noticed_by_reconcile(one_paused: tuple[Stack, Cloud]) -> None:
    stack, cloud = one_paused
    assert httpx.post(stack.url + "/api/chat", json=chat(1), headers=stack.headers(), timeout=30).status_code == 200
    stack.call(cloud.set_running, "gpu-1", False)
    wait_until(lambda: state(stack, "gpu-1") is HostState.PAUSED, timeout=5)
    answer = httpx.post(stack.url + "/api/chat", json=chat(1), headers=stack.headers(), timeout=30)
    assert answer.status_code == 200 and cloud.resumes("gpu-1") == 2  # woken again on demand


def test_emergency_off_pauses_everything_and_refuses_wakes_until_emergency_on(tmp_path: Path, kind: str) -> None:
    machines = [Machine("gpu-1"), Machine("gpu-2", models=("qwen2.5:7b",), protected=True)]
    with (
        running_cloud_stack(tmp_path, kind, machines, extra=LIFE) as (stack, cloud),
        httpx.Client(base_url=stack.url, headers=stack.headers(), timeout=30) as client,
    ):
        admin = stack.headers(stack.admin_key)
        assert client.post("/api/chat", json=chat(1, model="qwen2.5:7b")).status_code == 200
        with client.stream("POST", "/api/chat", json=chat(2000, stream=True)) as response:
            lines = response.iter_lines()
            next(lines)
            off = client.post("/gpu/emergency-off", headers=admin)
            assert off.status_code == 202
            rest = list(lines)
        assert '"error"' in rest[-1] and "emergency-off" in rest[-1]  # the open stream ended in-band
        wait_until(lambda: not cloud.running("gpu-1") and not cloud.running("gpu-2"), timeout=5)  # protected too
        refused = client.post("/api/chat", json=chat(1))
        assert refused.status_code == 503 and "emergency-off" in refused.json()["error"]
        assert client.post("/gpu/emergency-on", headers=admin).status_code == 200
        assert client.post("/api/chat", json=chat(1)).status_code == 200


def test_an_admin_pause_drains_open_streams_first(one_paused: tuple[Stack, Cloud]) -> None:
    stack, cloud = one_paused
    with httpx.Client(base_url=stack.url, headers=stack.headers(), timeout=30) as client:
        with client.stream(
            "POST", "/api/generate", json={"model": "llama3.2", "prompt": "x", "options": {"num_predict": 400}}
        ) as response:  # 2 s of stream: still open when the pause arrives on a busy machine
            lines = response.iter_lines()
            first = next(lines)
            pause = client.post("/gpu/gpu-1/pause", headers=stack.headers(stack.admin_key))
            assert pause.status_code == 202 and "open requests finish" in pause.json()["message"]
            rest = [next(lines) for _ in range(50)]
            assert cloud.pauses("gpu-1") == 0  # not while the stream runs...
            rest += list(lines)
        text = "".join(line.split('"response":"')[1].split('"')[0] for line in [first, *rest][:-1])
        assert text == expected_text(400) and '"done":true' in rest[-1]  # ...which ran to its end intact
        wait_until(lambda: cloud.pauses("gpu-1") == 1 and state(stack, "gpu-1") is HostState.PAUSED, timeout=5)
        again = client.post("/gpu/gpu-1/pause", headers=stack.headers(stack.admin_key))
        assert again.status_code == 409


def test_a_pause_that_fails_is_retried_until_it_succeeds(one_paused: tuple[Stack, Cloud]) -> None:
    stack, cloud = one_paused
    errors: list[str] = []
    sink = logger.add(lambda m: errors.append(f"{m.record['level'].name} {m.record['message']}"), level="WARNING")
    try:
        assert httpx.post(stack.url + "/api/chat", json=chat(1), headers=stack.headers(), timeout=30).status_code == 200
        stack.call(cloud.fail_pauses, "gpu-1", 3)
        wait_until(lambda: state(stack, "gpu-1") is HostState.PAUSED, timeout=10)
    finally:
        logger.remove(sink)
    assert cloud.pauses("gpu-1") >= 1
    wait_until(lambda: not cloud.running("gpu-1"), timeout=5)
    # Each failure is logged (a provider may retry a few itself first); the pause never gives up silently.
    failures = [e for e in errors if "failed" in e and ("gpu-1" in e or cloud.host_id("gpu-1") in e)]
    assert len(failures) == 3 and any(e.startswith("ERROR") and "may still be billing" in e for e in failures)


def test_the_admin_api_needs_an_admin_key_and_shows_the_fleet(one_paused: tuple[Stack, Cloud]) -> None:
    stack, cloud = one_paused
    assert httpx.get(stack.url + "/gpu/discover", headers=stack.headers()).status_code == 403
    admin = stack.headers(stack.admin_key)
    found = httpx.get(stack.url + "/gpu/discover", headers=admin).json()
    assert found["discovered_gpus"] == 1
    (gpu,) = found["gpus"]
    assert (gpu["name"], gpu["status"], gpu["can_resume"]) == ("gpu-1", "paused", True)
    host_id = cloud.host_id("gpu-1")
    assert httpx.post(stack.url + f"/gpu/{host_id}/resume", headers=admin).status_code == 202
    wait_until(
        lambda: httpx.get(stack.url + f"/gpu/{host_id}/status", headers=admin).json()["status"] == "ready", timeout=5
    )
    assert cloud.resumes("gpu-1") == 1
    assert httpx.get(stack.url + "/gpu/nope/status", headers=admin).status_code == 404


def test_a_wake_goes_on_when_the_request_that_started_it_leaves(one_paused: tuple[Stack, Cloud]) -> None:
    stack, cloud = one_paused
    with pytest.raises(httpx.ReadTimeout):  # the client gives up long before the host is up
        httpx.post(stack.url + "/api/chat", json=chat(1), headers=stack.headers(), timeout=0.05)
    wait_until(lambda: state(stack, "gpu-1") is HostState.READY, timeout=5)
    assert stack.call(lambda: len(stack.runtime.fleet.queue)) == 0 and cloud.resumes("gpu-1") == 1
    wait_until(lambda: cloud.pauses("gpu-1") == 1, timeout=5)  # woken without use: the fallback window


def test_a_request_that_arrives_while_its_host_pauses_is_not_lost(one_paused: tuple[Stack, Cloud]) -> None:
    stack, cloud = one_paused
    assert httpx.post(stack.url + "/api/chat", json=chat(1), headers=stack.headers(), timeout=30).status_code == 200
    # The pause was asked for: the request comes while the host pauses (or, where the cloud pauses at
    # once, just after); either way it must be served, by waking the host again.
    wait_until(lambda: cloud.pauses("gpu-1") == 1, timeout=5, interval=0.002)
    answer = httpx.post(stack.url + "/api/chat", json=chat(4), headers=stack.headers(), timeout=30)
    assert answer.status_code == 200 and answer.json()["message"]["content"] == expected_text(4)
    assert cloud.pauses("gpu-1") == 1 and cloud.resumes("gpu-1") == 2  # paused, then woken again for it


def test_a_deep_queue_wakes_a_second_host(tmp_path: Path, kind: str) -> None:
    extra = LIFE + "\n[scheduler]\nscale_up_queue_depth = 3\n"
    machines = [Machine("gpu-1", slots=1, token_delay=0.02), Machine("gpu-2", slots=1, cost=2.0, token_delay=0.02)]
    with running_cloud_stack(tmp_path, kind, machines, extra=extra) as (stack, cloud):

        async def one(client: httpx.AsyncClient) -> None:
            assert (await client.post("/api/chat", json=chat(10))).status_code == 200

        async def main() -> None:
            async with (
                httpx.AsyncClient(base_url=stack.url, headers=stack.headers(), timeout=30) as client,
                anyio.create_task_group() as tg,
            ):
                for _ in range(12):
                    tg.start_soon(one, client)

        anyio.run(main)
        assert cloud.resumes("gpu-1") == 1 and cloud.resumes("gpu-2") == 1
        served = cloud.sim("gpu-2").requests
        assert served["/api/chat"] + served["/v1/chat/completions"] > 0  # (translated for an OpenAI endpoint)


def test_max_awake_hosts_makes_a_request_wait_for_another_host_to_pause(tmp_path: Path, kind: str) -> None:
    extra = LIFE + "\n[scheduler]\nmax_awake_hosts = 1\n"
    machines = [Machine("gpu-1"), Machine("gpu-2", models=("qwen2.5:7b",))]
    with running_cloud_stack(tmp_path, kind, machines, extra=extra) as (stack, cloud):
        assert httpx.post(stack.url + "/api/chat", json=chat(1), headers=stack.headers(), timeout=30).status_code == 200
        answer = httpx.post(
            stack.url + "/api/chat", json=chat(1, model="qwen2.5:7b"), headers=stack.headers(), timeout=30
        )
        assert answer.status_code == 200 and answer.headers["x-gpumanager-host"] == "gpu-2"
        assert int(answer.headers["x-gpumanager-wait-ms"]) >= WINDOW * 1000 * 0.9  # gpu-1 had to pause first
        assert cloud.pauses("gpu-1") == 1 and not cloud.running("gpu-1")


def test_an_admin_pause_during_a_wake_stops_it_and_the_fleet_goes_on(tmp_path: Path, kind: str) -> None:
    with (
        running_cloud_stack(tmp_path, kind, [Machine("gpu-1")], extra=LIFE, boot_seconds=1) as (stack, cloud),
        httpx.Client(base_url=stack.url, headers=stack.headers(), timeout=30) as client,
    ):
        errors: list[str] = []
        sink = logger.add(lambda m: errors.append(m.record["message"]), level="ERROR")
        try:

            async def request() -> httpx.Response:
                async with httpx.AsyncClient(base_url=stack.url, headers=stack.headers(), timeout=30) as c:
                    return await c.post("/api/chat", json=chat(2))

            async def main() -> httpx.Response:
                result: list[httpx.Response] = []
                async with anyio.create_task_group() as tg:

                    async def go() -> None:
                        result.append(await request())

                    tg.start_soon(go)
                    with anyio.fail_after(5):
                        while state(stack, "gpu-1") not in (HostState.RESUMING, HostState.STARTING):
                            await anyio.sleep(0.005)
                    async with httpx.AsyncClient(base_url=stack.url, timeout=30) as admin:
                        paused = await admin.post(
                            f"/gpu/{cloud.host_id('gpu-1')}/pause", headers=stack.headers(stack.admin_key)
                        )
                        assert paused.status_code == 202
                return result[0]

            answer = anyio.run(main)
            # The wake was stopped and the host paused; the request that waited woke it again.
            assert answer.status_code == 200 and answer.json()["message"]["content"] == expected_text(2)
            assert cloud.pauses("gpu-1") >= 1 and cloud.resumes("gpu-1") == 2
            wait_until(lambda: cloud.pauses("gpu-1") >= 2, timeout=10)  # and the idle pause still works
        finally:
            logger.remove(sink)
        assert not [e for e in errors if "unexpectedly" in e]
        assert client.get("/health").json()["status"] == "ok"


def test_a_long_wake_does_not_use_up_the_time_its_requests_may_wait_for_a_slot(tmp_path: Path) -> None:
    extra = LIFE.replace("queue_timeout_seconds = 10", "queue_timeout_seconds = 1")
    machines = [Machine("gpu-1", slots=1, token_delay=0.02)]
    with running_cloud_stack(tmp_path, "simulated", machines, extra=extra, boot_seconds=2) as (stack, _):
        answers: list[int] = []

        async def one(client: httpx.AsyncClient) -> None:
            async with client.stream("POST", "/api/chat", json=chat(10, stream=True)) as response:
                lines = [line async for line in response.aiter_lines()]
            answers.append(0 if any('"error"' in line for line in lines) else 1)

        async def main() -> None:
            async with (
                httpx.AsyncClient(base_url=stack.url, headers=stack.headers(), timeout=30) as client,
                anyio.create_task_group() as tg,
            ):
                for _ in range(3):
                    tg.start_soon(one, client)

        anyio.run(main)
        assert answers == [1, 1, 1]  # a 2 s wake, then about 0.2 s each for the slot: all within 1 s of it
