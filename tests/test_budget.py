"""Money controls through the real server: each key's limits (models, requests a minute, tokens and
dollars a day) with their errors in both dialects and the real clients, limits changed on a running
server, the no-wake rule of a nearly spent key, the fleet's spend cap and its override, and
counters that survive a restart."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import ollama
import openai
import pytest

from gpumanager.keys import Limits
from tests.clouds import Machine
from tests.harness import SimHost, Stack, cycle_timing, running_cloud_stack, running_stack, wait_until

MESSAGES = [{"role": "user", "content": "one two"}]  # 2 prompt tokens on the simulated Ollama


def limited(stack: Stack, **limits: Any) -> tuple[str, str]:
    """A new key with these limits: (its id, the key)."""
    record, key = stack.keys.generate("limited", "l@example.org", limits=Limits(**limits))
    return record.id, key


def seconds_to_midnight_utc() -> float:
    now = datetime.now(UTC)
    return (datetime(now.year, now.month, now.day, tzinfo=UTC) + timedelta(days=1) - now).total_seconds()


def me(stack: Stack, key: str) -> dict[str, Any]:
    answer = httpx.get(stack.url + "/usage/me", headers=stack.headers(key), timeout=10)
    assert answer.status_code == 200, answer.text
    return dict(answer.json()["limits"])


def test_a_key_sees_and_uses_only_its_models(tmp_path: Path) -> None:
    hosts = [SimHost("gpu", models=("llama3.2:latest", "qwen2.5:7b", "mistral:7b"))]
    with running_stack(tmp_path, hosts) as stack:
        _, key = limited(stack, models=("llama3*", "qwen2.5:*"))
        with ollama.Client(host=stack.url, headers=stack.headers(key)) as client:
            listed = {m.model for m in client.list().models}
            assert listed == {"llama3.2:latest", "qwen2.5:7b"}
            with pytest.raises(ollama.ResponseError) as refused:
                client.chat(model="mistral", messages=MESSAGES)
            assert refused.value.status_code == 403 and "llama3*, qwen2.5:*" in refused.value.error
            assert client.chat(model="llama3.2", messages=MESSAGES, options={"num_predict": 2}).message.content
        with openai.OpenAI(base_url=stack.v1, api_key=key, max_retries=0) as oai:
            assert {m.id for m in oai.models.list()} == {"llama3.2:latest", "qwen2.5:7b"}
            with pytest.raises(openai.PermissionDeniedError, match="may not use model 'mistral:7b'"):
                oai.chat.completions.create(model="mistral:7b", messages=MESSAGES)  # type: ignore[arg-type]
            with pytest.raises(openai.NotFoundError):
                oai.models.retrieve("mistral:7b")
        everything = httpx.get(stack.url + "/api/tags", headers=stack.headers(), timeout=10).json()["models"]
        assert len(everything) == 3  # keys without a model list see the whole fleet


def test_requests_per_minute_answers_429_with_the_wait(tmp_path: Path) -> None:
    with running_stack(tmp_path, [SimHost("gpu")]) as stack:
        _, key = limited(stack, requests_per_minute=2)
        with ollama.Client(host=stack.url, headers=stack.headers(key)) as client:
            for _ in range(2):
                client.generate(model="llama3.2", prompt="x", options={"num_predict": 1})
            with pytest.raises(ollama.ResponseError) as refused:
                client.generate(model="llama3.2", prompt="x", options={"num_predict": 1})
        assert refused.value.status_code == 429 and "2 requests a minute" in refused.value.error
        answer = httpx.post(
            stack.v1 + "/chat/completions",
            json={"model": "llama3.2", "messages": MESSAGES},
            headers=stack.headers(key),
            timeout=10,
        )
        assert answer.status_code == 429 and answer.json()["error"]["code"] == "rate_limit_exceeded"
        assert 50 <= int(answer.headers["retry-after"]) <= 60 and "x-should-retry" not in answer.headers
        with (
            openai.OpenAI(base_url=stack.v1, api_key=key, max_retries=0) as oai,
            pytest.raises(openai.RateLimitError, match="requests a minute"),
        ):
            oai.chat.completions.create(model="llama3.2", messages=MESSAGES)  # type: ignore[arg-type]


def test_max_concurrent_bounds_one_keys_requests_running_at_once(tmp_path: Path) -> None:
    with running_stack(tmp_path, [SimHost("gpu", token_delay=0.05)]) as stack:
        _, key = limited(stack, max_concurrent=1)
        body = {"model": "llama3.2", "prompt": "x", "options": {"num_predict": 20}}
        with httpx.stream("POST", stack.url + "/api/generate", json=body, headers=stack.headers(key)) as first:
            lines = first.iter_lines()  # kept: a dropped iterator closes the response
            assert next(lines)  # streaming: it holds the key's one place
            second = httpx.post(stack.url + "/api/generate", json=body, headers=stack.headers(key), timeout=10)
            assert second.status_code == 429 and "1 requests running or waiting (max_concurrent)" in second.text
            with (
                openai.OpenAI(base_url=stack.v1, api_key=key, max_retries=0) as oai,
                pytest.raises(openai.RateLimitError, match="max_concurrent"),
            ):
                oai.chat.completions.create(model="llama3.2", messages=MESSAGES)  # type: ignore[arg-type]
            other = httpx.post(
                stack.url + "/api/generate", json={**body, "stream": False}, headers=stack.headers(), timeout=10
            )
            assert other.status_code == 200  # another key is not held back
            assert '"done":true' in list(lines)[-1]


def test_a_spent_token_budget_is_429_until_midnight_and_not_retried(tmp_path: Path) -> None:
    with running_stack(tmp_path, [SimHost("gpu")]) as stack:
        key_id, key = limited(stack, tokens_per_day=5)
        with openai.OpenAI(base_url=stack.v1, api_key=key, max_retries=0) as oai:
            oai.chat.completions.create(model="llama3.2", messages=MESSAGES, max_tokens=4)  # type: ignore[arg-type]
            wait_until(lambda: me(stack, key)["tokens_today"] == 2 + 4, timeout=10)
            with pytest.raises(openai.RateLimitError) as refused:
                oai.chat.completions.create(model="llama3.2", messages=MESSAGES)  # type: ignore[arg-type]
        response = refused.value.response
        assert "daily budget of 5 tokens is used up (6 used); it resets at 00:00 UTC" in refused.value.message
        assert response.headers["x-should-retry"] == "false"  # the openai client would otherwise retry
        assert abs(int(response.headers["retry-after"]) - seconds_to_midnight_utc()) < 5
        assert response.json()["error"]["code"] == "budget_exceeded"
        with openai.OpenAI(base_url=stack.v1, api_key=key) as patient:  # default retries: still one request
            started = time.monotonic()
            with pytest.raises(openai.RateLimitError):
                patient.chat.completions.create(model="llama3.2", messages=MESSAGES)  # type: ignore[arg-type]
            assert time.monotonic() - started < 2
        with (
            ollama.Client(host=stack.url, headers=stack.headers(key)) as client,
            pytest.raises(ollama.ResponseError) as again,
        ):
            client.chat(model="llama3.2", messages=MESSAGES)
        assert again.value.status_code == 429 and "resets at 00:00 UTC" in again.value.error
    with running_stack(tmp_path, [SimHost("gpu")]) as restarted:  # seeded from the ledger
        answer = httpx.post(
            restarted.url + "/api/generate",
            json={"model": "llama3.2", "prompt": "x"},
            headers=restarted.headers(key),
            timeout=10,
        )
        assert answer.status_code == 429 and "(6 used)" in answer.json()["error"]
        assert me(restarted, key)["tokens_today"] == 6 and key_id


def test_a_spent_dollar_budget_is_429_and_limits_change_on_a_running_server(tmp_path: Path) -> None:
    hosts = [SimHost("gpu", token_delay=0.02, cost_per_hour=36_000.0)]  # ten dollars a second
    with running_stack(tmp_path, hosts) as stack:
        key_id, key = limited(stack, dollars_per_day=0.5)
        with ollama.Client(host=stack.url, headers=stack.headers(key)) as client:
            client.generate(model="llama3.2", prompt="x", options={"num_predict": 5})  # about 0.1 s: $1
            wait_until(lambda: me(stack, key)["dollars_today"] >= 0.5, timeout=10)
            with pytest.raises(ollama.ResponseError) as refused:
                client.generate(model="llama3.2", prompt="x")
        assert refused.value.status_code == 429
        assert "daily GPU budget of $0.50 is spent" in refused.value.error
        with (
            openai.OpenAI(base_url=stack.v1, api_key=key, max_retries=0) as oai,
            pytest.raises(openai.RateLimitError, match=r"daily GPU budget of \$0.50 is spent .* resets at 00:00 UTC"),
        ):
            oai.chat.completions.create(model="llama3.2", messages=MESSAGES)  # type: ignore[arg-type]
        stack.keys.set_limits(key_id, {"dollars_per_day": 1000.0})  # the admin raises it
        with openai.OpenAI(base_url=stack.v1, api_key=key, max_retries=0) as oai:

            def allowed() -> bool:
                try:
                    oai.chat.completions.create(model="llama3.2", messages=MESSAGES, max_tokens=1)  # type: ignore[arg-type]
                except openai.RateLimitError:
                    return False
                return True

            wait_until(allowed, timeout=5)
            stack.keys.set_limits(key_id, {"max_concurrent": 1}, clear=["dollars_per_day"])
            wait_until(lambda: "dollars_per_day" not in me(stack, key)["limits"], timeout=5)
            assert me(stack, key)["limits"] == {"max_concurrent": 1}


LIFE = cycle_timing(0.005, queue_timeout_seconds=5)


def test_a_nearly_spent_key_may_use_an_awake_host_but_not_wake_one(tmp_path: Path) -> None:
    # A cold start here is priced at 2.5 s (a quarter of startup_timeout_seconds, before any wake
    # was measured) plus the 0.3 s fallback window, at a dollar a second: $2.80.
    machine = Machine("gpu-1", cost=3600.0)
    extra = cycle_timing(0.1, fallback=0.005, queue_timeout_seconds=5)
    with running_cloud_stack(tmp_path, "simulated", [machine], extra=extra) as (stack, cloud):
        _, key = limited(stack, dollars_per_day=2.0)
        with openai.OpenAI(base_url=stack.v1, api_key=key, max_retries=0) as oai:
            with pytest.raises(openai.RateLimitError) as refused:
                oai.chat.completions.create(model="llama3.2", messages=MESSAGES)  # type: ignore[arg-type]
            assert "less than waking gpu-1 would cost (about $2.80" in refused.value.message
            assert "may use hosts that are awake, but not wake one" in refused.value.message
            assert cloud.resumes("gpu-1") == 0
            admin = stack.headers(stack.admin_key)
            assert httpx.post(stack.url + "/gpu/gpu-1/resume", headers=admin, timeout=10).status_code == 202
            wait_until(lambda: stack.call(lambda: str(stack.runtime.fleet.hosts["gpu-1"].state)) == "ready", timeout=10)
            answer = oai.chat.completions.create(model="llama3.2", messages=MESSAGES, max_tokens=2)  # type: ignore[arg-type]
        assert answer.choices[0].message.content and cloud.resumes("gpu-1") == 1


def test_the_fleet_cap_lets_streams_end_pauses_hosts_refuses_wakes_and_can_be_lifted(tmp_path: Path) -> None:
    machine = Machine("gpu-1", cost=3600.0, token_delay=0.05)  # a dollar a second
    extra = LIFE + "[budget]\ndaily_dollars = 1.5\n"
    static = [SimHost("box", models=("qwen2.5:7b",), cost_per_hour=3600.0)]  # showback: not fleet spend
    with running_cloud_stack(tmp_path, "simulated", [machine], extra=extra, static=static) as (stack, cloud):
        user = stack.headers()
        body = {"model": "llama3.2", "prompt": "x", "options": {"num_predict": 60}}  # 3 s of answer
        with httpx.stream("POST", stack.url + "/api/generate", json=body, headers=user, timeout=30) as stream:
            lines = list(stream.iter_lines())
        assert '"done":true' in lines[-1] and len(lines) == 61  # the cap passed meanwhile: never cut
        wait_until(lambda: cloud.pauses("gpu-1") == 1, timeout=10)
        metrics = httpx.get(stack.url + "/metrics", headers=stack.headers(stack.admin_key), timeout=10).text
        assert 'gpumanager_pauses_total{host="gpu-1",reason="budget"} 1.0' in metrics
        with openai.OpenAI(base_url=stack.v1, api_key=stack.user_key, max_retries=2) as oai:
            with pytest.raises(openai.InternalServerError) as refused:
                oai.chat.completions.create(model="llama3.2", messages=MESSAGES)  # type: ignore[arg-type]
            assert "the fleet's daily GPU budget of $1.50 is spent; it resets at 00:00 UTC" in refused.value.message
            assert refused.value.response.headers["x-should-retry"] == "false"
            static_answer = oai.chat.completions.create(model="qwen2.5:7b", messages=MESSAGES, max_tokens=2)  # type: ignore[arg-type]
            assert static_answer.choices[0].message.content  # static hosts keep serving
        with ollama.Client(host=stack.url, headers=user) as client, pytest.raises(ollama.ResponseError) as again:
            client.generate(model="llama3.2", prompt="x")
        assert again.value.status_code == 503 and "GPU budget" in again.value.error
        assert cloud.resumes("gpu-1") == 1
        admin = stack.headers(stack.admin_key)
        status = httpx.get(stack.url + "/gpu/budget", headers=admin, timeout=10).json()
        assert status["capped"] and status["dollars_today"] >= 1.5 and status["daily_dollars"] == 1.5
        assert httpx.post(stack.url + "/gpu/budget/override", headers=user, timeout=10).status_code == 403
        lifted = httpx.post(stack.url + "/gpu/budget/override", headers=admin, timeout=10)
        assert lifted.status_code == 200 and lifted.json()["capped"] is None and "00:00" in lifted.json()["message"]
        with ollama.Client(host=stack.url, headers=user) as client:
            assert client.generate(model="llama3.2", prompt="x", options={"num_predict": 2}).response
        assert cloud.resumes("gpu-1") == 2
