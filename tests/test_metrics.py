"""`GET /metrics`: Prometheus series of requests, tokens and the fleet, for admins (or public)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import ollama
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.clouds import Machine
from tests.harness import FAST_TIMING, SimHost, Stack, cycle_timing, running_cloud_stack, running_stack, wait_until

PROMPT = [{"role": "user", "content": "one two three"}]  # 3 prompt tokens on the simulated Ollama


def scrape(stack: Stack, key: str | None = None) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    answer = httpx.get(stack.url + "/metrics", headers={"Authorization": f"Bearer {key or stack.admin_key}"})
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(answer.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    hosts = [SimHost("gpu", models=("llama3.2:latest",), slots=3, token_delay=0.001)]
    with running_stack(tmp_path_factory.mktemp("metrics"), hosts, extra=FAST_TIMING) as s:
        yield s


def test_requests_tokens_and_the_fleet_are_on_metrics(stack: Stack) -> None:
    user = stack.user_key
    user_id = stack.keys.authenticate(user).id  # type: ignore[union-attr]
    with ollama.Client(host=stack.url, headers=stack.headers()) as client:
        list(client.chat(model="llama3.2", messages=PROMPT, stream=True, options={"num_predict": 4}))
        client.generate(model="llama3.2", prompt="a b", options={"num_predict": 2})
    with openai.OpenAI(base_url=stack.v1, api_key=user) as client:
        list(client.chat.completions.create(model="llama3.2", stream=True, max_tokens=5, messages=PROMPT))  # type: ignore[call-overload]
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="made-up-model", max_tokens=1, messages=PROMPT)  # type: ignore[call-overload]

    def answered() -> float:  # a request is recorded just after its answer's last byte went out
        return sum(v for (name, _), v in scrape(stack).items() if name == "gpumanager_requests_total")

    wait_until(lambda: answered() == 4, timeout=10)
    m = scrape(stack)
    assert (
        m[("gpumanager_requests_total", (("model", "llama3.2:latest"), ("route", "/api/chat"), ("status", "200")))] == 1
    )
    assert (
        m[("gpumanager_requests_total", (("model", "llama3.2:latest"), ("route", "/api/generate"), ("status", "200")))]
        == 1
    )
    chat = (("model", "llama3.2:latest"), ("route", "/v1/chat/completions"), ("status", "200"))
    assert m[("gpumanager_requests_total", chat)] == 1
    other = (("model", "other"), ("route", "/v1/chat/completions"), ("status", "404"))
    assert m[("gpumanager_requests_total", other)] == 1  # an unknown model never becomes a label
    tokens = {
        kind: m[("gpumanager_tokens_total", (("key", user_id), ("kind", kind), ("model", "llama3.2:latest")))]
        for kind in ("prompt", "completion")
    }
    assert tokens == {"prompt": 3 + 2 + 3, "completion": 4 + 2 + 5}
    assert m[("gpumanager_request_duration_seconds_count", (("route", "/api/chat"),))] == 1
    assert m[("gpumanager_time_to_first_byte_seconds_count", (("route", "/v1/chat/completions"),))] == 1
    assert m[("gpumanager_overhead_seconds_count", ())] >= 3
    assert m[("gpumanager_slots", (("host", "gpu"),))] == 3
    assert m[("gpumanager_inflight", (("host", "gpu"),))] == 0
    assert m[("gpumanager_host_state", (("host", "gpu"), ("state", "ready")))] == 1
    assert m[("gpumanager_host_state", (("host", "gpu"), ("state", "paused")))] == 0
    assert m[("gpumanager_queue_depth", (("model", "llama3.2:latest"),))] == 0
    assert ("process_cpu_seconds_total", ()) in m and any(name.startswith("python_gc") for name, _ in m)
    assert stack.user_key not in httpx.get(stack.url + "/metrics", headers=stack.headers(stack.admin_key)).text


def test_metrics_needs_an_admin_key(stack: Stack) -> None:
    assert httpx.get(stack.url + "/metrics").status_code == 401
    refused = httpx.get(stack.url + "/metrics", headers=stack.headers())
    assert refused.status_code == 403 and "admin" in refused.json()["error"]


def test_public_metrics_need_no_key(tmp_path: Path) -> None:
    with running_stack(tmp_path, [SimHost("gpu")], extra=FAST_TIMING + "[metrics]\npublic = true\n") as s:
        assert httpx.get(s.url + "/metrics").status_code == 200
        assert httpx.get(s.url + "/api/tags").status_code == 401  # nothing else became public


LIFE = cycle_timing()


def test_wakes_their_phases_and_pauses_are_on_metrics(tmp_path: Path) -> None:
    machine = Machine("gpu-1", cost=3600.0)  # a dollar a second: a cent is 10 ms of it
    with running_cloud_stack(tmp_path, "simulated", [machine], extra=LIFE) as (stack, cloud):
        with openai.OpenAI(base_url=stack.v1, api_key=stack.user_key, max_retries=0) as client:
            answer = client.chat.completions.create(model="llama3.2", max_tokens=2, messages=PROMPT)  # type: ignore[call-overload]
        assert answer.choices[0].message.content
        wait_until(lambda: cloud.pauses("gpu-1") == 1, timeout=10)  # idle past its window
        phase = ("gpumanager_wake_phase_seconds_count", (("host", "gpu-1"), ("phase", "first_byte")))
        wait_until(lambda: phase in scrape(stack), timeout=10)
        m = scrape(stack)
        assert m[("gpumanager_wakes_total", (("host", "gpu-1"), ("outcome", "ready")))] == 1
        for phase in ("resume", "boot", "model", "first_byte"):
            assert m[("gpumanager_wake_phase_seconds_count", (("host", "gpu-1"), ("phase", phase)))] == 1, phase
        ready = (("host", "gpu-1"), ("outcome", "ready"))
        assert m[("gpumanager_wake_seconds_count", ready)] == 1
        whole = sum(
            m[("gpumanager_wake_phase_seconds_sum", (("host", "gpu-1"), ("phase", phase)))]
            for phase in ("resume", "boot", "model")
        )
        assert m[("gpumanager_wake_seconds_sum", ready)] == pytest.approx(whole)  # the phases add up to the wake
        resume = m[("gpumanager_wake_phase_seconds_sum", (("host", "gpu-1"), ("phase", "resume")))]
        assert resume >= 0.2  # the simulated machine boots for boot_seconds before it runs
        assert m[("gpumanager_pauses_total", (("host", "gpu-1"), ("reason", "idle")))] == 1
        admin = {"Authorization": f"Bearer {stack.admin_key}"}
        assert httpx.post(stack.url + "/gpu/gpu-1/resume", headers=admin).status_code == 202
        wait_until(lambda: stack.call(lambda: str(stack.runtime.fleet.hosts["gpu-1"].state)) == "ready", timeout=10)
        assert httpx.post(stack.url + "/gpu/gpu-1/pause", headers=admin).status_code == 202
        wait_until(lambda: cloud.pauses("gpu-1") == 2, timeout=10)
        wait_until(lambda: stack.call(lambda: str(stack.runtime.fleet.hosts["gpu-1"].state)) == "paused", timeout=10)
        m = scrape(stack)
        assert m[("gpumanager_pauses_total", (("host", "gpu-1"), ("reason", "admin")))] == 1
        assert m[("gpumanager_wakes_total", (("host", "gpu-1"), ("outcome", "ready")))] == 2
        # Paused: the host bills nothing more, and every billed second of it had one owner.
        awake = m[("gpumanager_host_awake_seconds_total", (("host", "gpu-1"),))]
        cost = m[("gpumanager_host_cost_dollars_total", (("host", "gpu-1"),))]
        assert awake >= 2 * 0.2 and cost == pytest.approx(awake)  # two boots at least; $1 a second
        owners = {labels: v for (name, labels), v in m.items() if name == "gpumanager_cost_dollars_total"}
        admin_id = stack.keys.authenticate(stack.admin_key).id  # type: ignore[union-attr]
        user_id = stack.keys.authenticate(stack.user_key).id  # type: ignore[union-attr]
        assert {dict(labels)["key"] for labels in owners} == {user_id, admin_id}  # nothing unattributed
        assert sum(owners.values()) == pytest.approx(cost, abs=0.01)  # to the cent
        assert m[("gpumanager_savings_dollars_total", (("host", "gpu-1"),))] > 0
        assert scrape(stack)[("gpumanager_host_awake_seconds_total", (("host", "gpu-1"),))] == awake

        def ledger_cost() -> float:  # the same, from the ledger's rows (written within a second)
            report = httpx.get(stack.url + "/usage?since=1h&by=key", headers=admin).json()
            return float(report["total"]["cost_micro"]) / 1_000_000

        wait_until(lambda: ledger_cost() == pytest.approx(cost, abs=0.01), timeout=10)
