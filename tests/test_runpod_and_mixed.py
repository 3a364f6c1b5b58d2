"""RunPod endpoints through gpumanager with the real clients, and a mixed fleet of every kind of host."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import ollama
import openai
import pytest

from gpumanager.app import build_app
from gpumanager.config import load
from gpumanager.errors import ConfigError
from gpumanager.sim import expected_text
from tests.clouds import Cloud, Machine, RunpodCloud
from tests.harness import SimHost, Stack, running_cloud_stack, running_mixed_stack

HF = "meta-llama/Llama-3.1-8B-Instruct"
TIMING = """
[timing]
reservation_minutes = 0.05
fallback_reservation_minutes = 0.05
startup_timeout_seconds = 5
ollama_readiness_wait_seconds = 0.05
reconcile_interval_seconds = 0.3
"""


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, Cloud]]:
    machines = [Machine("gpu-rp", models=(HF, "all-minilm:latest"), token_delay=0.002)]
    with running_cloud_stack(tmp_path_factory.mktemp("rp"), "runpod-endpoint", machines, extra=TIMING) as pair:
        yield pair


def test_the_openai_client_streams_from_a_runpod_endpoint(endpoint: tuple[Stack, Cloud]) -> None:
    stack, cloud = endpoint
    with openai.OpenAI(base_url=stack.v1, api_key=stack.user_key, max_retries=0) as client:
        stream = client.chat.completions.create(
            model=HF, messages=[{"role": "user", "content": "hi"}], stream=True, max_tokens=12
        )
        pieces = [c.choices[0].delta.content for c in stream if c.choices and c.choices[0].delta.content]
    assert "".join(pieces) == expected_text(12) and len(pieces) == 12
    assert isinstance(cloud, RunpodCloud)
    seen = cloud.fake.upstream_headers["gpu-rp"]
    assert seen["authorization"] == f"Bearer {cloud.fake.api_key}"  # RunPod's key, never the client's
    assert stack.user_key not in str(seen)


def test_the_ollama_client_gets_ndjson_for_a_model_only_an_endpoint_serves(endpoint: tuple[Stack, Cloud]) -> None:
    stack, _ = endpoint
    with ollama.Client(host=stack.url, headers=stack.headers()) as client:
        assert HF in {m.model for m in client.list().models}  # no `:latest` for a Hugging Face id
        chunks = list(
            client.chat(model=HF, messages=[{"role": "user", "content": "x"}], stream=True, options={"num_predict": 7})
        )
        assert "".join(c.message.content or "" for c in chunks) == expected_text(7)
        assert len([c for c in chunks if c.message.content]) == 7
        assert chunks[-1].done and chunks[-1].eval_count == 7
        whole = client.chat(model=HF, messages=[{"role": "user", "content": "x"}], options={"num_predict": 3})
        assert whole.message.content == expected_text(3) and whole.done_reason == "stop"
        generated = client.generate(model=HF, prompt="once", options={"num_predict": 4})
        assert generated.response == expected_text(4)
    with httpx.stream(
        "POST",
        stack.url + "/api/generate",
        headers=stack.headers(),
        timeout=30,
        json={"model": HF, "prompt": "x", "options": {"num_predict": 3}},
    ) as response:
        assert response.headers["content-type"] == "application/x-ndjson"
        assert response.headers["x-gpumanager-host"] == "gpu-rp"
        assert len(list(response.iter_lines())) == 4


def test_what_cannot_be_translated_is_refused_in_ollamas_dialect(endpoint: tuple[Stack, Cloud]) -> None:
    stack, _ = endpoint
    images = httpx.post(
        stack.url + "/api/chat",
        headers=stack.headers(),
        timeout=30,
        json={"model": HF, "messages": [{"role": "user", "content": "what is this?", "images": ["aGk="]}]},
    )
    assert images.status_code == 400 and "images" in images.json()["error"]
    raw = httpx.post(
        stack.url + "/api/generate", headers=stack.headers(), timeout=30, json={"model": HF, "prompt": "x", "raw": True}
    )
    assert raw.status_code == 400 and "raw" in raw.json()["error"]


def test_an_endpoint_cut_to_max_workers_0_is_reported_not_woken_forever(tmp_path: Path) -> None:
    with running_cloud_stack(tmp_path, "runpod-endpoint", [Machine("gpu-rp", models=(HF,))], extra=TIMING) as (
        stack,
        cloud,
    ):
        assert isinstance(cloud, RunpodCloud)
        cloud.fake.set_max_workers("gpu-rp", 0)
        answer = httpx.post(
            stack.url + "/v1/chat/completions",
            headers=stack.headers(),
            timeout=30,
            json={"model": HF, "messages": [{"role": "user", "content": "x"}]},
        )
        assert answer.status_code == 504 and "max workers" in answer.json()["error"]["message"]
        status = httpx.get(
            stack.url + f"/gpu/{cloud.host_id('gpu-rp')}/status", headers=stack.headers(stack.admin_key)
        ).json()
        assert status["status"] == "failed" and "max workers" in status["last_error"]
        assert cloud.resumes("gpu-rp") == 0  # never set warm: it could not have served


def test_a_missing_runpod_key_fails_at_start_naming_it(tmp_path: Path) -> None:
    (tmp_path / "config.toml").write_text('[[providers]]\ntype = "runpod"\nname = "rp"\nname_filter = "gpu"\n')
    with pytest.raises(ConfigError, match=r"^RUNPOD_API_KEY is not set: put it in \.env or the environment"):
        build_app(load(tmp_path / "config.toml"), environ={})


def test_a_mixed_fleet_routes_each_request_to_the_right_place(tmp_path: Path) -> None:
    fleet = {
        "surf": [Machine("gpu-surf", models=("mistral:latest",))],
        "ec2": [Machine("gpu-ec2", models=("qwen2.5:7b",))],
        "runpod-endpoint": [Machine("gpu-rp", models=(HF,))],
    }
    static = [SimHost("lab-box", models=("phi3:latest",))]
    with (
        running_mixed_stack(tmp_path, fleet, extra=TIMING, static=static) as (stack, clouds),
        httpx.Client(base_url=stack.url, headers=stack.headers(), timeout=30) as client,
    ):
        listed = {m["name"] for m in client.get("/api/tags").json()["models"]}
        assert listed == {"phi3:latest", "mistral:latest", "qwen2.5:7b", HF}
        for model, host in (("phi3", "lab-box"), ("mistral", "gpu-surf"), ("qwen2.5:7b", "gpu-ec2"), (HF, "gpu-rp")):
            answer = client.post(
                "/api/generate", json={"model": model, "prompt": "x", "stream": False, "options": {"num_predict": 2}}
            )
            assert answer.status_code == 200 and answer.headers["x-gpumanager-host"] == host, answer.text
            assert answer.json()["response"] == expected_text(2)
            chat = client.post(
                "/v1/chat/completions",
                json={"model": model, "max_tokens": 2, "messages": [{"role": "user", "content": "x"}]},
            )
            assert chat.status_code == 200 and chat.headers["x-gpumanager-host"] == host
        assert [clouds[k].resumes(m[0].name) for k, m in fleet.items()] == [1, 1, 1]  # each woken once
        assert stack.sims["lab-box"].requests["/api/generate"] == 1


@pytest.mark.anyio
async def test_a_pod_is_reached_through_runpods_proxy_by_default_or_its_public_port() -> None:
    import anyio

    from gpumanager.cloud import CloudState
    from gpumanager.config import RunpodProviderConfig
    from gpumanager.providers.runpod import RunpodProvider
    from tests.fakes.runpod import FakeRunPod

    async with FakeRunPod(boot_seconds=0.05) as fake, anyio.create_task_group() as tg:
        pod = fake.add_pod("gpu-pod", running=True)
        await fake.wait_for("gpu-pod")
        urls = {}
        for mode in ("proxy", "direct"):
            provider = RunpodProvider(
                RunpodProviderConfig(name="rp", api_url=fake.api_url, pods=[pod], pod_address=mode),  # type: ignore[arg-type]
                {"RUNPOD_API_KEY": fake.api_key},
            )
            await tg.start(provider.run)
            (info,) = await provider.list()
            assert info.state is CloudState.RUNNING and info.cost_per_hour == 0.44
            urls[mode] = info.address
        tg.cancel_scope.cancel()
    assert urls["proxy"] == f"https://{pod}-11434.proxy.runpod.net"
    assert urls["direct"] is not None and urls["direct"].startswith("http://127.0.0.1:")
