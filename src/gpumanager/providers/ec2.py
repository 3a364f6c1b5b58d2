"""AWS EC2 instances, stopped when idle and started on demand (optional extra `gpumanager[aws]`).

boto3 is synchronous: every call runs in a worker thread, bounded by the provider's timeout, with
botocore's own retries off so this provider's policy applies (5xx, throttling and timeouts are
retried with backoff, other 4xx never). Discovery is by tag filter and explicit instance ids. The
address is re-read after every start: the public IP changes each time (or use the private one).
`InsufficientInstanceCapacity` becomes a `CapacityError`, so waiting requests move to another host.
"""

from __future__ import annotations

import builtins
import functools
from collections.abc import Callable, Mapping
from typing import Any, TypeVar, cast

import anyio

from gpumanager.cloud import CloudState, HostInfo
from gpumanager.config import Ec2ProviderConfig
from gpumanager.errors import (
    CapacityError,
    ConfigError,
    HostNotFound,
    ProviderRejected,
    ProviderTimeout,
    ProviderUnavailable,
)
from gpumanager.providers.base import cloud_call

T = TypeVar("T")

STATES = {
    0: CloudState.RESUMING,
    16: CloudState.RUNNING,
    32: CloudState.UNKNOWN,
    48: CloudState.UNKNOWN,
    64: CloudState.PAUSING,
    80: CloudState.PAUSED,
}
RETRYABLE_CODES = {
    "RequestLimitExceeded",
    "Throttling",
    "ThrottlingException",
    "InternalError",
    "Unavailable",
    "ServiceUnavailable",
    "InternalFailure",
}
CAPACITY_CODES = {"InsufficientInstanceCapacity", "Server.InsufficientInstanceCapacity", "InsufficientCapacity"}
HIBERNATE_REFUSED = {"UnsupportedHibernationConfiguration", "UnsupportedOperation", "InvalidParameterCombination"}
MODELS_TAG = "gpumanager:models"  # optional: what a never-seen instance serves, comma-separated


class Ec2Provider:
    def __init__(self, config: Ec2ProviderConfig, environ: Mapping[str, str]) -> None:
        try:
            import boto3
            import botocore.config
        except ImportError:
            raise ConfigError(
                "", "", f"the ec2 provider {config.name!r} needs boto3: pip install 'gpumanager[aws]'"
            ) from None
        if not config.tag_filter and not config.instance_ids:
            raise ConfigError(
                "",
                "",
                f"the ec2 provider {config.name!r} needs `tag_filter` or `instance_ids`: "
                "it must never stop instances it was not meant to manage",
            )
        region = config.region or environ.get("AWS_DEFAULT_REGION") or environ.get("AWS_REGION")
        if not region:
            raise ConfigError(
                "",
                "",
                f"the ec2 provider {config.name!r} needs a region: set `region` in its "
                "[[providers]] block or AWS_DEFAULT_REGION",
            )
        self.name, self.config, self.poll_seconds = config.name, config, config.poll_seconds
        session = boto3.session.Session(
            profile_name=config.profile,
            region_name=region,
            aws_access_key_id=environ.get("AWS_ACCESS_KEY_ID"),
            aws_secret_access_key=environ.get("AWS_SECRET_ACCESS_KEY"),
            aws_session_token=environ.get("AWS_SESSION_TOKEN"),
        )
        client_config = botocore.config.Config(
            retries={"total_max_attempts": 1, "mode": "standard"},
            connect_timeout=config.api_timeout_seconds,
            read_timeout=config.api_timeout_seconds,
        )
        self._ec2 = session.client(
            "ec2", endpoint_url=config.endpoint_url or environ.get("AWS_ENDPOINT_URL"), config=client_config
        )

    # -- the Provider protocol ---------------------------------------------------------------------

    async def list(self) -> list[HostInfo]:
        found: dict[str, HostInfo] = {}
        if self.config.tag_filter:
            filters = [{"Name": f"tag:{k}", "Values": [v]} for k, v in self.config.tag_filter.items()]
            for instance in await self._describe(Filters=filters):
                found[instance["InstanceId"]] = self._info(instance)
        if self.config.instance_ids:
            for instance in await self._describe(InstanceIds=list(self.config.instance_ids)):
                found[instance["InstanceId"]] = self._info(instance)
        return [info for info in found.values() if info.cloud_status != "terminated"]

    async def inspect(self, host_id: str) -> HostInfo:
        instances = await self._describe(InstanceIds=[host_id], host=host_id)
        if not instances:
            raise HostNotFound("EC2 does not know this instance", provider=self.name, host=host_id, action="inspect")
        return self._info(instances[0])

    async def resume(self, host_id: str) -> None:
        """Start the instance; a pending or running one is success, a stopping one is started once stopped."""
        while True:
            try:
                await self._call("start", host_id, self._ec2.start_instances, InstanceIds=[host_id])
                return
            except ProviderRejected as exc:
                if "IncorrectInstanceState" not in exc.message:
                    raise
            info = await self.inspect(host_id)
            if info.state in (CloudState.RESUMING, CloudState.RUNNING):
                return
            await anyio.sleep(self.poll_seconds)

    async def pause(self, host_id: str) -> None:
        """Stop (or hibernate, when configured and possible) the instance; stopped or stopping is success."""
        try:
            await self._call(
                "stop", host_id, self._ec2.stop_instances, InstanceIds=[host_id], Hibernate=self.config.hibernate
            )
            return
        except ProviderRejected as exc:
            if self.config.hibernate and any(code in exc.message for code in HIBERNATE_REFUSED):
                await self._call("stop", host_id, self._ec2.stop_instances, InstanceIds=[host_id], Hibernate=False)
                return
            if "IncorrectInstanceState" not in exc.message:
                raise
        if (await self.inspect(host_id)).state not in (CloudState.PAUSING, CloudState.PAUSED):
            raise ProviderRejected(
                "EC2 cannot stop the instance in its current state", provider=self.name, host=host_id, action="stop"
            )

    # -- boto3, in a worker thread -----------------------------------------------------------------

    async def _describe(self, *, host: str = "", **kwargs: Any) -> builtins.list[dict[str, Any]]:
        def pages() -> builtins.list[dict[str, Any]]:
            paginator = self._ec2.get_paginator("describe_instances")
            return [
                cast(dict[str, Any], instance)
                for page in paginator.paginate(**kwargs)
                for reservation in page["Reservations"]
                for instance in reservation["Instances"]
            ]

        try:
            return await self._call("describe", host, pages)
        except ProviderRejected as exc:
            if "InvalidInstanceID" in exc.message:
                raise HostNotFound(
                    "EC2 does not know this instance", provider=self.name, host=host, action="describe"
                ) from None
            raise

    async def _call(self, action: str, host: str, fn: Callable[..., T], **kwargs: Any) -> T:
        async def once() -> T:
            return await anyio.to_thread.run_sync(
                functools.partial(self._translated, action, host, fn, kwargs), abandon_on_cancel=True
            )

        return await cloud_call(self.config, once, what=f"EC2 {action} {host}".strip())

    def _translated(self, action: str, host: str, fn: Callable[..., T], kwargs: dict[str, Any]) -> T:
        """Run one boto3 call; botocore's errors become this project's, with the host and action."""
        from botocore.exceptions import BotoCoreError, ClientError, ConnectTimeoutError, ReadTimeoutError

        context = {"provider": self.name, "host": host, "action": action}
        try:
            return fn(**kwargs)
        except ClientError as exc:
            error = exc.response.get("Error", {})
            code, message = str(error.get("Code", "")), str(error.get("Message", exc))
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
            if code in CAPACITY_CODES:
                raise CapacityError(
                    f"EC2 has no capacity for this instance now ({code}: {message})", **context
                ) from None
            if code in RETRYABLE_CODES or status >= 500:
                raise ProviderUnavailable(f"EC2 answered {code or status}: {message}", **context) from None
            raise ProviderRejected(f"EC2 refused: {code}: {message}", **context) from None
        except (ConnectTimeoutError, ReadTimeoutError) as exc:
            raise ProviderTimeout(f"EC2 did not answer: {exc}", **context) from None
        except BotoCoreError as exc:
            raise ProviderUnavailable(f"EC2 unreachable: {exc}", **context) from None

    def _info(self, instance: dict[str, Any]) -> HostInfo:
        tags = {t["Key"]: t["Value"] for t in instance.get("Tags", [])}
        code = int(instance.get("State", {}).get("Code", -1)) & 0xFF
        state = STATES.get(code, CloudState.UNKNOWN)
        ip = instance.get("PrivateIpAddress") if self.config.address == "private" else instance.get("PublicIpAddress")
        reason = instance.get("StateReason", {}) or {}
        error = str(reason.get("Message") or reason.get("Code")) if "Capacity" in str(reason.get("Code", "")) else ""
        models = tuple(m.strip() for m in tags.get(MODELS_TAG, "").split(",") if m.strip())
        return HostInfo(
            id=instance["InstanceId"],
            name=tags.get("Name") or instance["InstanceId"],
            state=state,
            cloud_status=str(instance.get("State", {}).get("Name", "unknown")),
            address=f"http://{ip}:{self.config.ollama_port}"
            if ip and state in (CloudState.RESUMING, CloudState.RUNNING)
            else None,
            error=error if state is not CloudState.RUNNING else "",
            models=models,
            details={
                "flavor": instance.get("InstanceType", ""),
                "ip_address": ip or "",
                "availability_zone": instance.get("Placement", {}).get("AvailabilityZone", ""),
            },
        )
