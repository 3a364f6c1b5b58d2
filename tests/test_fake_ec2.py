"""The EC2 fake, checked with a real boto3 client over loopback HTTP.

Other tests trust `FakeEC2` to behave like EC2 stop/start (REFERENCE.md section 5) where moto alone
does not: transition times, capacity errors, refused starts. This file pins those, the loopback
addresses and the Ollama each instance serves. boto3 is synchronous, so its calls run in a worker thread.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from functools import partial
from typing import TYPE_CHECKING, Any

import anyio
import boto3
import httpx
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError, ReadTimeoutError

from tests.fakes.ec2 import FakeEC2

if TYPE_CHECKING:
    from botocore.config import _RetryDict

pytestmark = pytest.mark.anyio

T = 0.05  # boot and stop seconds: short, so the file runs in a few seconds
SEEN = 0.3  # for a phase a test looks at midway, so a slow machine cannot skip past it
TAGGED = [{"Name": "tag:gpumanager", "Values": ["true"]}]


@pytest.fixture(scope="module")
def session() -> boto3.session.Session:
    """One session for the file: it caches botocore's EC2 model, so each client takes ms, not 150 ms."""
    return boto3.session.Session()


@contextmanager
def client(
    session: boto3.session.Session, fake: FakeEC2, retries: _RetryDict | None = None, **config: Any
) -> Iterator[Any]:
    """A client of the proxy; by default ``total_max_attempts=1``, no retries, so every injected error shows."""
    creds = fake.credentials
    ec2 = session.client(
        "ec2",
        endpoint_url=fake.endpoint_url,
        region_name=creds["AWS_DEFAULT_REGION"],
        aws_access_key_id=creds["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=creds["AWS_SECRET_ACCESS_KEY"],
        config=Config(retries=retries or {"total_max_attempts": 1}, **config),
    )
    try:
        yield ec2
    finally:
        ec2.close()


@asynccontextmanager
async def ec2(session: boto3.session.Session, **options: Any) -> AsyncIterator[tuple[FakeEC2, Any]]:
    with anyio.fail_after(15):  # bounds every wait of the test that uses it
        async with FakeEC2(**{"boot_seconds": T, "stop_seconds": T, "session": session, **options}) as fake:
            with client(session, fake) as c:
                yield fake, c


async def call(ec2_client: Any, method: str, **kwargs: Any) -> Any:
    return await anyio.to_thread.run_sync(partial(getattr(ec2_client, method), **kwargs))


async def describe(ec2_client: Any, fake: FakeEC2, name: str) -> dict[str, Any]:
    reply = await call(ec2_client, "describe_instances", InstanceIds=[fake.instance_id(name)])
    found: dict[str, Any] = reply["Reservations"][0]["Instances"][0]
    return found


async def state(ec2_client: Any, fake: FakeEC2, name: str) -> str:
    return str((await describe(ec2_client, fake, name))["State"]["Name"])


async def error_of(ec2_client: Any, method: str, **kwargs: Any) -> tuple[str, int]:
    with pytest.raises(ClientError) as caught:
        await call(ec2_client, method, **kwargs)
    return caught.value.response["Error"]["Code"], caught.value.response["ResponseMetadata"]["HTTPStatusCode"]


async def ollama_tags(fake: FakeEC2, name: str) -> list[str] | None:
    """The sim's model names at the instance's private address, or None when nothing answers there."""
    async with httpx.AsyncClient(timeout=2, trust_env=False) as http:
        try:
            response = await http.get(f"http://{fake.private_ip(name)}:{fake.ollama_port}/api/tags")
        except httpx.TransportError:
            return None
    return [m["name"] for m in response.json()["models"]]


async def test_instances_are_listed_by_tag_on_loopback_addresses(session: boto3.session.Session) -> None:
    async with ec2(session, region="eu-central-1") as (fake, c):
        iid = fake.add_instance("gpu-1", tags={"gpumanager": "true"}, instance_type="g6.xlarge")
        fake.add_instance("gpu-2", running=True, tags={"gpumanager": "true"})
        fake.add_instance("web", running=True)
        reply = await call(c, "describe_instances", Filters=TAGGED)
        found = {
            i["Tags"][0]["Value"] if i["Tags"][0]["Key"] == "Name" else "?": i
            for r in reply["Reservations"]
            for i in r["Instances"]
        }
        assert sorted(found) == ["gpu-1", "gpu-2"]
        assert found["gpu-1"]["InstanceId"] == iid == fake.instance_id("gpu-1")
        assert {t["Key"]: t["Value"] for t in found["gpu-1"]["Tags"]} == {"Name": "gpu-1", "gpumanager": "true"}
        assert found["gpu-1"]["PrivateIpAddress"] == fake.private_ip("gpu-1") == "127.0.1.2"
        assert found["gpu-2"]["PrivateIpAddress"] == "127.0.1.3"
        assert (found["gpu-1"]["State"], found["gpu-2"]["State"]) == (
            {"Code": 80, "Name": "stopped"},
            {"Code": 16, "Name": "running"},
        )
        assert found["gpu-1"]["InstanceType"] == "g6.xlarge" and "PublicIpAddress" not in found["gpu-2"]
        assert found["gpu-1"]["Placement"]["AvailabilityZone"].startswith("eu-central-1")
        assert fake.endpoint_url != fake.moto_url and fake.credentials["AWS_DEFAULT_REGION"] == "eu-central-1"
        await fake.wait_for("gpu-2", "running", serving=True)
        assert await ollama_tags(fake, "gpu-2") == ["llama3.2:latest"]


async def test_start_goes_through_pending_then_serves_ollama(session: boto3.session.Session) -> None:
    async with ec2(session, boot_seconds=SEEN) as (fake, c):
        iid = fake.add_instance("gpu-1", models=["llama3.2:latest", "qwen2.5:7b"], slots=2)
        started = await call(c, "start_instances", InstanceIds=[iid])
        assert started["StartingInstances"] == [
            {
                "InstanceId": iid,
                "CurrentState": {"Code": 0, "Name": "pending"},
                "PreviousState": {"Code": 80, "Name": "stopped"},
            }
        ]
        assert await state(c, fake, "gpu-1") == "pending"
        assert await ollama_tags(fake, "gpu-1") is None
        # What a provider would do: boto's own waiter, polling DescribeInstances through the proxy.
        waiter = c.get_waiter("instance_running")
        await call(waiter, "wait", InstanceIds=[iid], WaiterConfig={"Delay": T, "MaxAttempts": 100})
        assert fake.is_serving("gpu-1")  # the sim starts before `running` is reported
        assert (await describe(c, fake, "gpu-1"))["PrivateIpAddress"] == "127.0.1.2"
        assert await ollama_tags(fake, "gpu-1") == ["llama3.2:latest", "qwen2.5:7b"]
        assert fake.sims["gpu-1"].slots == 2 and fake.calls == [("start", "gpu-1")]
        again = await call(c, "start_instances", InstanceIds=[iid])  # a no-op, as on AWS
        assert again["StartingInstances"][0]["PreviousState"]["Name"] == "running"


async def test_stop_goes_through_stopping_then_ollama_is_gone(session: boto3.session.Session) -> None:
    async with ec2(session, stop_seconds=SEEN) as (fake, c):
        iid = fake.add_instance("gpu-1", running=True)
        await fake.wait_for("gpu-1", "running", serving=True)
        stopped = await call(c, "stop_instances", InstanceIds=[iid], Hibernate=True)
        assert stopped["StoppingInstances"][0]["CurrentState"] == {"Code": 64, "Name": "stopping"}
        assert stopped["StoppingInstances"][0]["PreviousState"] == {"Code": 16, "Name": "running"}
        assert await state(c, fake, "gpu-1") == "stopping"
        assert await ollama_tags(fake, "gpu-1") is not None  # the VM is still shutting down
        await call(
            c.get_waiter("instance_stopped"), "wait", InstanceIds=[iid], WaiterConfig={"Delay": T, "MaxAttempts": 100}
        )
        assert not fake.is_serving("gpu-1") and await ollama_tags(fake, "gpu-1") is None
        assert (await describe(c, fake, "gpu-1"))["PrivateIpAddress"] == "127.0.1.2"
        await call(c, "stop_instances", InstanceIds=[iid])
        assert fake.hibernate_requests == [True, False]
        assert fake.calls == [("stop", "gpu-1"), ("stop", "gpu-1")]
        # The private address survives the whole round trip.
        await call(c, "start_instances", InstanceIds=[iid])
        await fake.wait_for("gpu-1", "running", serving=True)
        assert (await describe(c, fake, "gpu-1"))["PrivateIpAddress"] == "127.0.1.2"
        assert fake.sims["gpu-1"].requests["/api/tags"] == 1  # the same sim, counters kept


async def test_a_start_while_stopping_is_refused_like_aws(session: boto3.session.Session) -> None:
    async with ec2(session, stop_seconds=SEEN) as (fake, c):
        iid = fake.add_instance("gpu-1", running=True)
        await call(c, "stop_instances", InstanceIds=[iid])
        assert await error_of(c, "start_instances", InstanceIds=[iid]) == ("IncorrectInstanceState", 400)
        assert fake.calls == [("stop", "gpu-1"), ("start", "gpu-1")]  # refused calls count too
        again = await call(c, "stop_instances", InstanceIds=[iid])  # a repeated stop is fine
        assert again["StoppingInstances"][0]["CurrentState"]["Name"] == "stopping"
        await fake.wait_for("gpu-1", "stopped")
        await call(c, "start_instances", InstanceIds=[iid])
        await fake.wait_for("gpu-1", "running", serving=True)


async def test_a_capacity_error_leaves_the_instance_stopped(session: boto3.session.Session) -> None:
    async with ec2(session) as (fake, c):
        iid = fake.add_instance("gpu-1")
        fake.fail_next_start("gpu-1")
        with pytest.raises(ClientError) as caught:
            await call(c, "start_instances", InstanceIds=[iid])
        error = caught.value.response
        assert error["Error"] == {"Code": "InsufficientInstanceCapacity", "Message": "Insufficient capacity."}
        assert error["ResponseMetadata"]["HTTPStatusCode"] == 500 and error["ResponseMetadata"]["RequestId"]
        await anyio.sleep(2 * T)
        assert await state(c, fake, "gpu-1") == "stopped" and not fake.is_serving("gpu-1")
        # One-shot: the next start works.
        await call(c, "start_instances", InstanceIds=[iid])
        await fake.wait_for("gpu-1", "running", serving=True)
        assert fake.calls == [("start", "gpu-1")] * 2


async def test_botocore_retries_a_500_on_its_own(session: boto3.session.Session) -> None:
    """`max_attempts` counts retries after the first try, so 1 means two requests (legacy mode, the default)."""
    async with ec2(session) as (fake, _):
        iid = fake.add_instance("gpu-1")
        fake.fail_next_start("gpu-1")
        with client(session, fake, retries={"max_attempts": 1}) as retrying:
            started = await call(retrying, "start_instances", InstanceIds=[iid])
        assert started["ResponseMetadata"]["RetryAttempts"] == 1
        assert fake.calls == [("start", "gpu-1")] * 2  # the capacity error was hidden by the retry


async def test_a_hung_start_stays_pending_until_stopped(session: boto3.session.Session) -> None:
    async with ec2(session) as (fake, c):
        iid = fake.add_instance("gpu-1")
        fake.hang_next_start("gpu-1")
        await call(c, "start_instances", InstanceIds=[iid])
        await anyio.sleep(4 * T)
        assert await state(c, fake, "gpu-1") == "pending" and not fake.is_serving("gpu-1")
        await call(c, "stop_instances", InstanceIds=[iid])
        assert await state(c, fake, "gpu-1") == "stopping"
        await fake.wait_for("gpu-1", "stopped")
        assert not fake.is_serving("gpu-1")
        await call(c, "start_instances", InstanceIds=[iid])  # the hang was one-shot
        await fake.wait_for("gpu-1", "running", serving=True)


async def test_failing_stops_change_nothing(session: boto3.session.Session) -> None:
    async with ec2(session) as (fake, c):
        iid = fake.add_instance("gpu-1", running=True)
        fake.fail_stops("gpu-1", times=2, status=503, code="Unavailable")
        for _ in range(2):
            assert await error_of(c, "stop_instances", InstanceIds=[iid]) == ("Unavailable", 503)
        assert await state(c, fake, "gpu-1") == "running"
        await fake.wait_for("gpu-1", "running", serving=True)
        await call(c, "stop_instances", InstanceIds=[iid])
        await fake.wait_for("gpu-1", "stopped", serving=False)
        assert fake.calls == [("stop", "gpu-1")] * 3


async def test_set_running_acts_like_the_console(session: boto3.session.Session) -> None:
    async with ec2(session) as (fake, c):
        iid = fake.add_instance("gpu-1")
        await fake.set_running("gpu-1", True)
        assert await state(c, fake, "gpu-1") == "running" and await ollama_tags(fake, "gpu-1") is not None
        await fake.set_running("gpu-1", False)
        assert await state(c, fake, "gpu-1") == "stopped" and await ollama_tags(fake, "gpu-1") is None
        # Started from the console while a hung start waits: the start is over.
        fake.hang_next_start("gpu-1")
        await call(c, "start_instances", InstanceIds=[iid])
        await fake.set_running("gpu-1", True)
        assert await state(c, fake, "gpu-1") == "running" and fake.is_serving("gpu-1")
        assert fake.calls == [("start", "gpu-1")]  # the console's changes are not API calls


async def test_state_filters_see_the_reported_states(session: boto3.session.Session) -> None:
    async with ec2(session, boot_seconds=SEEN) as (fake, c):
        iid = fake.add_instance("gpu-1", tags={"gpumanager": "true"})
        fake.add_instance("gpu-2", running=True, tags={"gpumanager": "true"})
        await call(c, "start_instances", InstanceIds=[iid])

        async def named(state_name: str) -> list[str]:
            filters = [*TAGGED, {"Name": "instance-state-name", "Values": [state_name]}]
            reply = await call(c, "describe_instances", Filters=filters)
            return sorted(i["InstanceId"] for r in reply["Reservations"] for i in r["Instances"])

        assert await named("pending") == [iid]  # moto itself already says running
        assert await named("running") == [fake.instance_id("gpu-2")]
        statuses = await call(c, "describe_instance_status")
        assert [s["InstanceId"] for s in statuses["InstanceStatuses"]] == [fake.instance_id("gpu-2")]
        everything = await call(c, "describe_instance_status", InstanceIds=[iid], IncludeAllInstances=True)
        assert everything["InstanceStatuses"][0]["InstanceState"] == {"Code": 0, "Name": "pending"}
        assert everything["InstanceStatuses"][0]["InstanceStatus"]["Status"] == "not-applicable"


async def test_unchanged_answers_pass_through_byte_for_byte(session: boto3.session.Session) -> None:
    async with ec2(session) as (fake, _), httpx.AsyncClient(trust_env=False) as http:
        iid = fake.add_instance("gpu-1")
        form = {"Action": "DescribeInstances", "Version": "2016-11-15", "InstanceId.1": iid}
        # moto picks the service from the credential scope; it does not check the signature.
        auth = {
            "authorization": f"AWS4-HMAC-SHA256 Credential=testing/20260101/{fake.region}/ec2/aws4_request, "
            "SignedHeaders=host, Signature=0"
        }
        via_proxy = await http.post(fake.endpoint_url, data=form, headers=auth)
        direct = await http.post(fake.moto_url, data=form, headers={**auth, "x-moto-account-id": fake.account_id})
        assert via_proxy.status_code == direct.status_code == 200
        assert via_proxy.content == direct.content
        assert b"<code>80</code><name>stopped</name>" in via_proxy.content


async def test_fail_requests_and_slow_requests(session: boto3.session.Session) -> None:
    async with ec2(session) as (fake, c):
        fake.add_instance("gpu-1")
        fake.fail_requests(times=2, status=503)
        for _ in range(2):
            assert await error_of(c, "describe_instances") == ("Unavailable", 503)
        fake.fail_requests(status=500)
        assert await error_of(c, "describe_instances") == ("InternalError", 500)
        assert len((await call(c, "describe_instances"))["Reservations"]) == 1
        fake.slow_requests(1.0)
        with client(session, fake, read_timeout=0.1) as impatient, pytest.raises(ReadTimeoutError):
            await call(impatient, "describe_instances")
        fake.slow_requests(0)
        assert len((await call(c, "describe_instances"))["Reservations"]) == 1


async def test_a_stop_cuts_open_streams_like_a_vm_going_away(session: boto3.session.Session) -> None:
    async with ec2(session) as (fake, c), httpx.AsyncClient(timeout=5, trust_env=False) as ollama:
        iid = fake.add_instance("gpu-1", running=True, token_delay=0.02)
        await fake.wait_for("gpu-1", "running", serving=True)
        body = {"model": "llama3.2", "prompt": "hi", "options": {"num_predict": 500}}
        lines = 0
        url = f"http://{fake.private_ip('gpu-1')}:{fake.ollama_port}/api/generate"
        with pytest.raises(httpx.RemoteProtocolError):
            async with ollama.stream("POST", url, json=body) as response:
                async for _ in response.aiter_lines():
                    lines += 1
                    if lines == 2:
                        await call(c, "stop_instances", InstanceIds=[iid])
        assert 2 <= lines < 100  # cut by the stop, after `stop_seconds`


async def test_fakes_are_isolated_and_exit_cleans_up(session: boto3.session.Session) -> None:
    async with ec2(session) as (first, c1), ec2(session) as (second, c2):
        first.add_instance("a", running=True)
        second.add_instance("b")
        second.add_instance("c")
        assert len((await call(c1, "describe_instances"))["Reservations"]) == 1  # moto's models are process-wide
        assert len((await call(c2, "describe_instances"))["Reservations"]) == 2
        await first.wait_for("a", "running", serving=True)
    assert await ollama_tags(first, "a") is None
    async with httpx.AsyncClient(trust_env=False) as http:
        for url in (first.moto_url, first.endpoint_url):
            with pytest.raises(httpx.ConnectError):
                await http.get(url)
