"""Webhooks: events of the bus POSTed to URLs (`[[webhooks]]`), as JSON or as Slack/Mattermost text.

Each webhook reads its own subscription of the bus in its own task, so a dead or slow receiver
never delays a request or a pause: its events wait in the subscription's bounded buffer (the
oldest dropped when it is full, and counted). A POST is signed, when a secret is set, with
`X-GPUManager-Signature: sha256=<hex HMAC-SHA256 of the body>`; it times out after
`timeout_seconds` and is retried `retries` times with doubling backoff. Every failed delivery is
logged (never the URL: it may hold a token) and counted (`webhook_failures_total{webhook}`).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Mapping, Sequence

import anyio
import httpx
import msgspec
from loguru import logger

from gpumanager.config import WebhookConfig
from gpumanager.errors import ConfigError
from gpumanager.events import TYPES, Bus, Envelope, Lost, describe

SIGNATURE_HEADER = "x-gpumanager-signature"


def sign(secret: bytes, body: bytes) -> str:
    """The signature header's value: how a receiver checks that the body came from this gpumanager."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


class Webhook:
    def __init__(self, config: WebhookConfig, name: str, secret: bytes | None) -> None:
        self.config, self.name, self.secret = config, name, secret
        self.sent = 0
        self.failed = 0  # deliveries given up after every retry
        self.lost = 0  # events dropped because the receiver was too slow

    def body(self, envelope: Envelope) -> bytes:
        if self.config.format == "slack":
            return msgspec.json.encode({"text": f"gpumanager: {describe(envelope.event())}"})
        return envelope.data

    async def deliver(self, client: httpx.AsyncClient, envelope: Envelope) -> bool:
        body = self.body(envelope)
        headers = {"content-type": "application/json", "x-gpumanager-event": envelope.type}
        if self.secret is not None:
            headers[SIGNATURE_HEADER] = sign(self.secret, body)
        delay = self.config.retry_seconds
        for attempt in range(self.config.retries + 1):
            try:
                with anyio.fail_after(self.config.timeout_seconds):  # the whole POST, not each read
                    response = await client.post(
                        self.config.url, content=body, headers=headers, timeout=self.config.timeout_seconds
                    )
                if response.status_code < 300:
                    self.sent += 1
                    return True
                problem = f"it answered {response.status_code}"
            except Exception as exc:  # httpx's errors, and whatever else a transport raises: never fatal
                problem = f"{type(exc).__name__}"
            if attempt < self.config.retries:
                logger.warning("webhook {}: {} event: {}; retrying in {:g}s", self.name, envelope.type, problem, delay)
                await anyio.sleep(delay)
                delay *= 2
        logger.error(
            "webhook {}: {} event not delivered after {} attempts: {}", self.name, envelope.type, attempt + 1, problem
        )
        self.failed += 1
        return False


class Webhooks:
    """The configured webhooks, each fed by its own subscription of the bus."""

    def __init__(
        self,
        configs: Sequence[WebhookConfig],
        bus: Bus,
        environ: Mapping[str, str],
        *,
        on_failure: Callable[[str], None] | None = None,
        config_path: str = "config.toml",
    ) -> None:
        self.bus, self.on_failure = bus, on_failure
        # Whether this replica sends: with several, the leader alone does (every event reaches its bus).
        self.sends: Callable[[], bool] = lambda: True
        self.hooks: list[Webhook] = []
        for i, hook in enumerate(configs):
            where = f"webhooks[{i}]"
            try:
                valid = hook.url.startswith(("http://", "https://")) and bool(httpx.URL(hook.url).host)
            except httpx.InvalidURL:
                valid = False
            if not valid:
                raise ConfigError(config_path, f"{where}.url", "must be an http:// or https:// URL with a host")
            unknown = [t for t in hook.events if t not in TYPES]
            if unknown:
                raise ConfigError(
                    config_path,
                    f"{where}.events",
                    f"unknown event type {', '.join(unknown)}; types: {', '.join(TYPES)}",
                )
            secret = None
            if hook.secret_env:
                value = environ.get(hook.secret_env)
                if not value:
                    raise ConfigError(
                        config_path, f"{where}.secret_env", f"${hook.secret_env} is not set (nor in .env)"
                    )
                secret = value.encode()
            self.hooks.append(Webhook(hook, hook.name or f"webhook-{i + 1}", secret))

    async def run(self, client: httpx.AsyncClient) -> None:
        """Deliver every webhook's events until cancelled."""
        async with anyio.create_task_group() as tg:
            for hook in self.hooks:
                tg.start_soon(self._feed, client, hook)

    async def _feed(self, client: httpx.AsyncClient, hook: Webhook) -> None:
        # From the bus's first event: what happened while the server started is delivered too.
        with self.bus.subscribe(hook.config.events or None, after=0) as subscription:
            while True:
                item = await subscription.get()
                if isinstance(item, Lost):
                    hook.lost += item.count
                    logger.warning("webhook {}: {} events dropped: the receiver is too slow", hook.name, item.count)
                elif item is None or not self.sends():
                    continue
                elif not await hook.deliver(client, item) and self.on_failure is not None:
                    self.on_failure(hook.name)
