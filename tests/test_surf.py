"""The SURF provider against the fake SURF API: the wire details the shared lifecycle suite does not see."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import httpx
import pytest

from gpumanager.app import build_app
from gpumanager.cloud import CloudState
from gpumanager.config import SurfProviderConfig, load
from gpumanager.errors import ConfigError, HostNotFound, ProviderRejected, ProviderTimeout, ProviderUnavailable
from gpumanager.providers.surf import SurfProvider
from tests.clouds import Machine
from tests.fakes.surf import FakeSurf
from tests.harness import running_cloud_stack, wait_until

pytestmark = pytest.mark.anyio


def provider_for(fake: FakeSurf, **options: object) -> SurfProvider:
    settings: dict[str, object] = {
        "name": "surf",
        "base_url": fake.base_url,
        "machine_name_filter": "gpu",
        "ollama_port": fake.ollama_port,
        "poll_seconds": 0.02,
        "retry_seconds": 0.01,
        "api_timeout_seconds": 3,
        **options,
    }
    config = SurfProviderConfig(**settings)  # type: ignore[arg-type]
    return SurfProvider(
        config,
        {"CLOUD_API_TOKEN": fake.token, **({"CLOUD_CSRF_TOKEN": fake.require_csrf} if fake.require_csrf else {})},
    )


@pytest.fixture
async def running(request: pytest.FixtureRequest) -> AsyncIterator[tuple[FakeSurf, SurfProvider]]:
    options = getattr(request, "param", {})
    async with FakeSurf(transition_seconds=0.05, **options) as fake, anyio.create_task_group() as tg:
        provider = provider_for(fake)
        await tg.start(provider.run)
        yield fake, provider
        tg.cancel_scope.cancel()


async def test_list_pages_through_every_workspace_and_keeps_the_matching_ones(
    running: tuple[FakeSurf, SurfProvider],
) -> None:
    fake, provider = running
    for i in range(130):  # more than one page of 100
        fake.add_workspace(f"gpu-{i:03d}")
    fake.add_workspace("desktop-1")
    fake.add_workspace("gpu-old", deleted=True)
    fake.add_workspace("gpu-disk", application_type="Storage")
    hosts = await provider.list()
    assert sorted(h.name for h in hosts) == [f"gpu-{i:03d}" for i in range(130)]
    assert fake.requests[("GET", "list")] == 2


async def test_states_addresses_and_details(running: tuple[FakeSurf, SurfProvider]) -> None:
    fake, provider = running
    fake.add_workspace("gpu-up", status="running")
    fake.add_workspace("gpu-down")
    await fake.wait_for("gpu-up", "running", serving=True)
    up = await provider.inspect(str(fake.workspace("gpu-up")["id"]))
    assert up.state is CloudState.RUNNING and up.address == fake.ollama_url("gpu-up")
    assert up.details["flavor"] == "A10 - 2 GPU" and up.details["can_pause"]
    down = await provider.inspect(str(fake.workspace("gpu-down")["id"]))
    assert down.state is CloudState.PAUSED and down.address is None and down.details["can_resume"]


async def test_resume_and_pause_are_idempotent(running: tuple[FakeSurf, SurfProvider]) -> None:
    fake, provider = running
    ws = str(fake.add_workspace("gpu-1")["id"])
    await provider.resume(ws)
    await provider.resume(ws)  # already resuming: a 409 that counts as success
    await fake.wait_for("gpu-1", "running", serving=True)
    await provider.resume(ws)
    assert fake.calls == [("resume", "gpu-1")]
    await provider.pause(ws)
    await provider.pause(ws)
    await fake.wait_for("gpu-1", "paused")
    await provider.pause(ws)
    assert fake.calls == [("resume", "gpu-1"), ("pause", "gpu-1")]


async def test_a_resume_of_a_pausing_workspace_waits_for_the_pause(running: tuple[FakeSurf, SurfProvider]) -> None:
    fake, provider = running
    ws = str(fake.add_workspace("gpu-1", status="running", pause_seconds=0.3)["id"])
    await provider.pause(ws)
    await provider.resume(ws)
    assert fake.calls == [("pause", "gpu-1"), ("resume", "gpu-1")]
    await fake.wait_for("gpu-1", "running", serving=True)


@pytest.mark.parametrize("running", [{"history_newest_first": True}, {}], indirect=True)
async def test_a_failed_resume_is_told_by_the_newest_action(running: tuple[FakeSurf, SurfProvider]) -> None:
    fake, provider = running
    ws = str(fake.add_workspace("gpu-1")["id"])
    fake.fail_next_resume("gpu-1", error="No GPU available.")
    await provider.resume(ws)
    await fake.wait_for("gpu-1", "paused")
    assert (await provider.inspect(ws)).error == "No GPU available."
    await provider.resume(ws)  # a new resume: the old failure is no longer the newest action
    assert (await provider.inspect(ws)).error == ""


async def test_5xx_and_timeouts_are_retried_4xx_never(running: tuple[FakeSurf, SurfProvider]) -> None:
    fake, provider = running
    ws = str(fake.add_workspace("gpu-1")["id"])
    fake.fail_requests(times=2, status=503)
    assert (await provider.inspect(ws)).state is CloudState.PAUSED  # third attempt
    fake.fail_requests(times=3, status=502)
    with pytest.raises(ProviderUnavailable):
        await provider.inspect(ws)
    before = fake.requests[("GET", "workspace")]
    with pytest.raises(HostNotFound):
        await provider.inspect("no-such-id")
    assert fake.requests[("GET", "workspace")] == before + 1
    fake.slow_requests(2)
    impatient = provider_for(fake, api_timeout_seconds=0.3)
    async with anyio.create_task_group() as tg:
        await tg.start(impatient.run)
        with pytest.raises(ProviderTimeout):  # the call's timeout, three times
            await impatient.inspect(ws)
        tg.cancel_scope.cancel()


@pytest.mark.parametrize("running", [{"require_csrf": "csrf-abc"}], indirect=True)
async def test_the_csrf_token_is_sent_on_actions_when_set(running: tuple[FakeSurf, SurfProvider]) -> None:
    fake, provider = running
    ws = str(fake.add_workspace("gpu-1")["id"])
    await provider.resume(ws)
    assert fake.calls == [("resume", "gpu-1")]
    without = SurfProvider(provider.config, {"CLOUD_API_TOKEN": fake.token})
    async with anyio.create_task_group() as tg:
        await tg.start(without.run)
        with pytest.raises(ProviderRejected, match="CLOUD_CSRF_TOKEN"):
            await without.pause(ws)
        tg.cancel_scope.cancel()


async def test_a_wrong_token_is_a_clear_error_without_retries(running: tuple[FakeSurf, SurfProvider]) -> None:
    fake, provider = running
    wrong = SurfProvider(provider.config, {"CLOUD_API_TOKEN": "Bearer " + fake.token})
    async with anyio.create_task_group() as tg:
        await tg.start(wrong.run)
        with pytest.raises(ProviderRejected, match="CLOUD_API_TOKEN"):
            await wrong.list()
        tg.cancel_scope.cancel()
    assert fake.requests[("GET", "list")] == 1


def test_a_missing_token_fails_at_start_naming_the_variable(tmp_path: Path) -> None:
    (tmp_path / "config.toml").write_text('[cloud_api]\nmachine_name_filter = "gpu"\n')
    with pytest.raises(ConfigError) as error:
        build_app(load(tmp_path / "config.toml"), environ={})
    assert str(error.value).startswith("CLOUD_API_TOKEN is not set: put it in .env or the environment")


def test_polling_a_wake_is_rate_limit_friendly(tmp_path: Path) -> None:
    extra = "[timing]\nreconcile_interval_seconds = 60\nollama_readiness_wait_seconds = 0.05\n"
    with running_cloud_stack(tmp_path, "surf", [Machine("gpu-1")], extra=extra, boot_seconds=1) as (stack, cloud):
        fake = cloud.fake  # type: ignore[attr-defined]
        before = sum(fake.requests.values())
        answer = httpx.post(
            stack.url + "/api/chat",
            headers=stack.headers(),
            timeout=30,
            json={"model": "llama3.2", "messages": [{"role": "user", "content": "x"}], "stream": False},
        )
        assert answer.status_code == 200
        # A 1 s resume polled every poll_seconds (0.05 s): about 20 reads, far under 1000 a minute.
        assert sum(fake.requests.values()) - before <= 40


def test_models_seen_once_are_routable_after_a_restart_while_paused(tmp_path: Path) -> None:
    running = [Machine("gpu-1", running=True, models=("phi3:latest",))]
    with running_cloud_stack(
        tmp_path,
        "surf",
        running,
        extra="[timing]\nfallback_reservation_minutes = 0.005\nollama_readiness_wait_seconds = 0.05\n",
    ) as (stack, cloud):
        wait_until(lambda: stack.call(lambda: stack.runtime.fleet.hosts["gpu-1"].state) == "paused", timeout=10)
    (tmp_path / "api_keys.json").unlink()
    paused = [Machine("gpu-1", models=("phi3:latest",), announce_models=False)]
    with running_cloud_stack(tmp_path, "surf", paused, extra="[timing]\nollama_readiness_wait_seconds = 0.05\n") as (
        stack,
        cloud,
    ):
        tags = httpx.get(stack.url + "/api/tags", headers=stack.headers()).json()["models"]
        assert [t["name"] for t in tags] == ["phi3:latest"] and tags[0]["size"] > 0  # from the cache, in full
        answer = httpx.post(
            stack.url + "/api/generate",
            headers=stack.headers(),
            timeout=30,
            json={"model": "phi3", "prompt": "x", "stream": False},
        )
        assert answer.status_code == 200 and cloud.resumes("gpu-1") == 1
