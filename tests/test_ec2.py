"""The EC2 provider against moto (behind the fake's timing proxy): what the shared suite does not see."""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio
import pytest

from gpumanager.cloud import CloudState
from gpumanager.config import Ec2ProviderConfig
from gpumanager.errors import CapacityError, ConfigError, HostNotFound, ProviderUnavailable
from gpumanager.providers.ec2 import Ec2Provider
from tests.fakes.ec2 import FakeEC2

pytestmark = pytest.mark.anyio


def provider_for(fake: FakeEC2, environ: dict[str, str] | None = None, **options: object) -> Ec2Provider:
    settings: dict[str, object] = {
        "name": "aws",
        "region": fake.region,
        "endpoint_url": fake.endpoint_url,
        "tag_filter": {"gpumanager": "true"},
        "ollama_port": fake.ollama_port,
        "poll_seconds": 0.02,
        "retry_seconds": 0.01,
        "api_timeout_seconds": 5,
        **options,
    }
    return Ec2Provider(Ec2ProviderConfig(**settings), {**fake.credentials, **(environ or {})})  # type: ignore[arg-type]


@pytest.fixture
async def fake() -> AsyncIterator[FakeEC2]:
    async with FakeEC2(boot_seconds=0.1, stop_seconds=0.1) as running:
        yield running


async def test_discovery_by_tag_and_by_id_named_by_the_name_tag(fake: FakeEC2) -> None:
    fake.add_instance("gpu-a", tags={"gpumanager": "true", "gpumanager:models": "llama3.2:latest, phi3:latest"})
    fake.add_instance("gpu-b", running=True, tags={"gpumanager": "true"})
    extra = fake.add_instance("by-id")
    fake.add_instance("someone-else", tags={"team": "db"})
    hosts = {h.name: h for h in await provider_for(fake, instance_ids=[extra]).list()}
    assert sorted(hosts) == ["by-id", "gpu-a", "gpu-b"]
    assert hosts["gpu-a"].models == ("llama3.2:latest", "phi3:latest") and hosts["gpu-a"].state is CloudState.PAUSED
    await fake.wait_for("gpu-b", "running", serving=True)
    running = await provider_for(fake).inspect(fake.instance_id("gpu-b"))
    assert running.address == fake.ollama_url("gpu-b") and running.details["flavor"] == "g5.xlarge"


async def test_start_waits_out_a_stopping_instance_and_stop_is_idempotent(fake: FakeEC2) -> None:
    iid = fake.add_instance("gpu-a", running=True, tags={"gpumanager": "true"})
    provider = provider_for(fake)
    await provider.pause(iid)
    assert (await provider.inspect(iid)).state is CloudState.PAUSING
    await provider.resume(iid)  # IncorrectInstanceState while stopping: waits, then starts
    assert fake.calls[-1] == ("start", "gpu-a") and fake.calls.count(("start", "gpu-a")) >= 2
    await fake.wait_for("gpu-a", "running", serving=True)
    await provider.resume(iid)  # running already: success
    await provider.pause(iid)
    await provider.pause(iid)
    await fake.wait_for("gpu-a", "stopped")
    await provider.pause(iid)
    assert fake.hibernate_requests and not any(fake.hibernate_requests)  # GPU families: a plain stop


async def test_a_refused_hibernate_falls_back_to_a_plain_stop(fake: FakeEC2) -> None:
    iid = fake.add_instance("gpu-a", running=True, tags={"gpumanager": "true"})
    fake.fail_stops("gpu-a", times=1, status=400, code="UnsupportedHibernationConfiguration")
    await provider_for(fake, hibernate=True).pause(iid)
    assert fake.hibernate_requests == [True, False]
    await fake.wait_for("gpu-a", "stopped")


async def test_capacity_errors_are_told_apart_and_not_retried(fake: FakeEC2) -> None:
    iid = fake.add_instance("gpu-a", tags={"gpumanager": "true"})
    fake.fail_next_start("gpu-a")
    with pytest.raises(CapacityError, match="no capacity"):
        await provider_for(fake).resume(iid)
    assert fake.calls == [("start", "gpu-a")]  # botocore's own retries are off: our policy applies


async def test_5xx_is_retried_and_unknown_instances_are_not_found(fake: FakeEC2) -> None:
    iid = fake.add_instance("gpu-a", tags={"gpumanager": "true"})
    provider = provider_for(fake)
    fake.fail_requests(times=2, status=503)
    assert (await provider.inspect(iid)).state is CloudState.PAUSED
    fake.fail_requests(times=3, status=500)
    with pytest.raises(ProviderUnavailable):
        await provider.inspect(iid)
    with pytest.raises(HostNotFound):
        await provider.inspect("i-00000000000000000")


async def test_the_public_address_is_read_again_after_every_start(fake: FakeEC2) -> None:
    iid = fake.add_instance("gpu-a", running=True, tags={"gpumanager": "true"}, public_ip=True)
    provider = provider_for(fake, address="public")
    await fake.wait_for("gpu-a", "running")
    first = (await provider.inspect(iid)).address
    await provider.pause(iid)
    await fake.wait_for("gpu-a", "stopped")
    assert (await provider.inspect(iid)).address is None
    await provider.resume(iid)
    await fake.wait_for("gpu-a", "running")
    second = (await provider.inspect(iid)).address
    assert first and second and first != second and fake.private_ip("gpu-a") not in second


async def test_config_wins_over_the_environment(fake: FakeEC2) -> None:
    fake.add_instance("gpu-a", tags={"gpumanager": "true"})
    provider = provider_for(
        fake, environ={"AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_DEFAULT_REGION": "xx-nowhere-1"}
    )
    assert [h.name for h in await provider.list()] == ["gpu-a"]


def test_a_provider_without_filter_or_region_is_refused_at_start() -> None:
    with pytest.raises(ConfigError, match="tag_filter"):
        Ec2Provider(Ec2ProviderConfig(name="aws", region="eu-west-1"), {})
    with pytest.raises(ConfigError, match="needs a region"):
        Ec2Provider(Ec2ProviderConfig(name="aws", tag_filter={"a": "b"}), {})


async def test_calls_run_off_the_event_loop(fake: FakeEC2) -> None:
    fake.add_instance("gpu-a", tags={"gpumanager": "true"})
    provider = provider_for(fake)
    fake.slow_requests(0.3)
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            await anyio.sleep(0.01)
            ticks += 1

    async with anyio.create_task_group() as tg:
        tg.start_soon(tick)
        await provider.list()
        tg.cancel_scope.cancel()
    assert ticks >= 15  # the loop kept running while boto3 waited
