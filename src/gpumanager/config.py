"""config.toml, decoded into frozen msgspec Structs, one per section.

Every section is optional and has defaults; a file with one `[[hosts]]` entry is valid. Unknown keys
and wrong types fail at start with one line naming the file, the key and the problem (`ConfigError`).
Relative paths resolve against the folder of the config file. Durations are floats in seconds (or
minutes, where the key says so), so tests can use milliseconds.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import msgspec

from gpumanager.errors import ConfigError

DEFAULT_CONFIG = "config.toml"
CONFIG_ENV = "GPUMANAGER_CONFIG"
REDIS_ENV = "GPUMANAGER_REDIS_URL"

NonNegative = Annotated[float, msgspec.Meta(ge=0)]
Positive = Annotated[float, msgspec.Meta(gt=0)]
Count = Annotated[int, msgspec.Meta(ge=0)]
Port = Annotated[int, msgspec.Meta(ge=0, le=65535)]
Slots = Annotated[int, msgspec.Meta(ge=1)]


class _Section(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    pass


# The origins Ollama allows by default: local pages on any port, and desktop apps' own schemes.
OLLAMA_CORS_ORIGINS = [
    "http://localhost",
    "https://localhost",
    "http://localhost:*",
    "https://localhost:*",
    "http://127.0.0.1",
    "https://127.0.0.1",
    "http://127.0.0.1:*",
    "https://127.0.0.1:*",
    "http://0.0.0.0",
    "https://0.0.0.0",
    "http://0.0.0.0:*",
    "https://0.0.0.0:*",
    "app://*",
    "file://*",
    "tauri://*",
]


class ServerConfig(_Section, frozen=True):
    host: str = "0.0.0.0"
    port: Port = 8000
    max_body_mb: Positive = 32
    cors_origins: list[str] = msgspec.field(default_factory=lambda: list(OLLAMA_CORS_ORIGINS))
    client_timeout_seconds: Positive = 30  # a request body that stalls longer between two reads: 408
    max_connections: Annotated[int, msgspec.Meta(ge=1)] = 10_000  # uvicorn's limit_concurrency
    public_url: str = ""  # how browsers reach gpumanager (https://gpu.example.org behind a TLS proxy)


class CloudApiConfig(_Section, frozen=True):
    """The seed's SURF section: shorthand for one `type = "surf"` provider named "surf"."""

    base_url: str = "https://gw.live.surfresearchcloud.nl/v1"
    machine_name_filter: str = "GroulsR"
    ollama_port: Port = 11434


class TimingConfig(_Section, frozen=True):
    reservation_minutes: NonNegative = 10
    fallback_reservation_minutes: NonNegative = 3
    startup_timeout_seconds: Positive = 600
    ollama_readiness_wait_seconds: Positive = 0.5
    probe_timeout_seconds: Positive = 2
    queue_timeout_seconds: Positive = 300
    reconcile_interval_seconds: Positive = 30
    inventory_refresh_seconds: Positive = 60
    wake_keepalive_seconds: Positive = 10
    failed_cooldown_seconds: NonNegative = 300
    upstream_read_timeout_seconds: Positive = 600
    shutdown_grace_seconds: NonNegative = 10
    pause_retry_seconds: Positive = 5
    upstream_idle_seconds: Positive = 120  # a host silent this long mid-answer ends the stream
    pause_warning_minutes: NonNegative = 2  # a pause_warning event this long before an idle host is paused
    job_poll_seconds: Positive = 10  # a RunPod job no client asked about this long is checked by gpumanager


class PathsConfig(_Section, frozen=True):
    api_keys_file: str = "api_keys.json"
    state_dir: str = "state"
    log_file: str = "logs/app.log"


class SchedulerConfig(_Section, frozen=True):
    default_slots: Slots = 4
    max_queue: Count = 256
    max_per_key: Count = 0
    scale_up_queue_depth: Count = 8
    max_awake_hosts: Count = 0
    # When every awake host with the model is busy, wake another: "expected_wait" when the wait for
    # a slot would be longer than the host's cold start; "queue_depth" past scale_up_queue_depth.
    scale_up: Literal["expected_wait", "queue_depth"] = "expected_wait"


class HostConfig(_Section, frozen=True):
    """A `[[hosts]]` entry: a static host when it has a `url`, else overrides for a discovered host."""

    name: str
    url: str | None = None
    provider: str | None = None
    slots: Slots | None = None
    models: list[str] = []
    cost_per_hour: NonNegative | None = None
    protected: bool = False
    api: Literal["ollama", "openai"] = "ollama"  # "openai": vLLM, llama-server, SGLang, TGI, LM Studio
    api_key_env: str | None = None  # the variable holding an OpenAI-compatible static host's bearer token
    stream_usage: bool = True  # false: never send it `stream_options` (its OpenAI streams go uncounted)
    jobs: bool = False  # a RunPod serverless endpoint: serve its job API at /v2/{name}/... (README)


class _ProviderBase(_Section, frozen=True, tag_field="type"):
    name: str
    ollama_port: Port = 11434
    startup_timeout_seconds: Positive | None = None
    ollama_readiness_wait_seconds: Positive | None = None
    cost_per_hour: NonNegative = 0.0


class _CloudBase(_ProviderBase, frozen=True):
    """What every real cloud's provider takes: call timeouts, retries of 5xx and timeouts, polling."""

    api_timeout_seconds: Positive = 30  # one API call
    poll_seconds: Positive = 5  # state reads while a host resumes or pauses
    retries: Annotated[int, msgspec.Meta(ge=1)] = 3  # attempts of a call that times out or gets a 5xx
    retry_seconds: Positive = 1  # first backoff between attempts (doubles)


class SurfProviderConfig(_CloudBase, frozen=True, tag="surf"):
    base_url: str = "https://gw.live.surfresearchcloud.nl/v1"
    machine_name_filter: str = ""


class SimulatedHostConfig(_Section, frozen=True):
    name: str
    models: list[str] = msgspec.field(default_factory=lambda: ["llama3.2:latest"])
    slots: Slots = 4
    cost_per_hour: NonNegative = 1.0
    boot_seconds: NonNegative = 2.0  # from resume to the machine running
    ollama_seconds: NonNegative = 0.0  # from the machine running to its Ollama answering
    pause_seconds: NonNegative = 0.5
    token_delay_seconds: NonNegative = 0.02
    running: bool = False
    fail_resume: bool = False
    answer: str = ""  # what its model answers, word by word (default: "tok0 tok1 ...")
    gpu: str = "NVIDIA A100 80GB (simulated)"  # its GPU at /gpu-metrics, as a GPU node's door serves it; "" = none


class SimulatedProviderConfig(_ProviderBase, frozen=True, tag="simulated"):
    hosts: list[SimulatedHostConfig] = []


class Ec2ProviderConfig(_CloudBase, frozen=True, tag="ec2"):
    region: str | None = None  # wins over AWS_DEFAULT_REGION
    profile: str | None = None  # a profile of ~/.aws/credentials
    endpoint_url: str | None = None  # wins over AWS_ENDPOINT_URL (moto, AWS-compatible clouds)
    tag_filter: dict[str, str] = {}  # discovery: instances with every one of these tags
    instance_ids: list[str] = []  # ...and these, whatever their tags
    hibernate: bool = False  # GPU families cannot hibernate; a failed hibernate falls back to a stop
    address: Literal["private", "public"] = "private"  # the public IP changes on every start


class RunpodProviderConfig(_CloudBase, frozen=True, tag="runpod"):
    endpoints: list[str] = []  # serverless endpoint ids (none and no pods: every one matching name_filter)
    pods: list[str] = []  # pod ids
    name_filter: str = ""
    api_url: str = "https://api.runpod.io"  # GraphQL at /graphql, REST at /v2
    serverless_url: str = "https://api.runpod.ai/v2"
    pod_address: Literal["proxy", "direct"] = "proxy"  # RunPod's HTTPS proxy, or the pod's public TCP port
    pod_proxy_url: str = "https://{pod_id}-{port}.proxy.runpod.net"
    warm_workers: Annotated[int, msgspec.Meta(ge=1)] = 1  # min workers while awake (0 while paused)
    poll_seconds: Positive = 2
    jobs: bool = False  # every endpoint serves RunPod's job API at /v2/{name}/... (README)


class MetricsConfig(_Section, frozen=True):
    public: bool = False  # /metrics without an admin key (only behind a network you trust)
    gpu_scrape_seconds: Positive = 15  # awake hosts' GPU metrics (dcgm-exporter behind the node's door)


class BudgetConfig(_Section, frozen=True):
    """The fleet's spend cap, and the calendar of every daily and monthly budget."""

    timezone: str = "UTC"  # an IANA name ("Europe/Amsterdam"): when days and months begin
    daily_dollars: Annotated[float, msgspec.Meta(gt=0)] | None = None  # billed cloud cost a day, at most
    monthly_dollars: Annotated[float, msgspec.Meta(gt=0)] | None = None
    warn_percent: Annotated[float, msgspec.Meta(gt=0, le=100)] = 80  # a warning once spend reaches this
    spare_protected: bool = False  # protected hosts keep running past the cap

    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)


class EventsConfig(_Section, frozen=True):
    history: Annotated[int, msgspec.Meta(ge=1)] = 1000  # events kept for Last-Event-ID resume
    buffer: Annotated[int, msgspec.Meta(ge=1)] = 1000  # events a slow reader may fall behind before it loses some
    heartbeat_seconds: Positive = 15  # a comment line this often on a quiet GET /events


class WebhookConfig(_Section, frozen=True):
    """A `[[webhooks]]` entry: events POSTed to a URL (Slack, Mattermost, your own scripts)."""

    url: str
    name: str = ""  # for logs and metrics (default: webhook-N); never the URL, which may hold a token
    events: list[str] = []  # event types to send; [] = every type
    format: Literal["json", "slack"] = "json"  # slack: {"text": "..."}, as Slack and Mattermost take it
    secret_env: str | None = None  # the variable holding the HMAC-SHA256 signing secret
    timeout_seconds: Positive = 5
    retries: Count = 3  # after the first attempt, with backoff
    retry_seconds: Positive = 1  # the first backoff, doubling


class UsageConfig(_Section, frozen=True):
    database_url: str = ""  # "" = sqlite:///<state_dir>/usage.db
    retention_days: Annotated[int, msgspec.Meta(ge=1)] = 400  # older rows are pruned


class ClusterConfig(_Section, frozen=True):
    """`[cluster]`: several replicas sharing one fleet through Redis (DESIGN.md §12)."""

    redis_url: str = ""  # "" = one process, state in memory; GPUMANAGER_REDIS_URL wins over it
    name: str = "gpumanager"  # the fleet's namespace in Redis: replicas of one fleet share it
    lease_ttl_seconds: Positive = 15  # a dead replica's slots, wake locks and leadership free themselves this soon
    retry_seconds: Positive = 1  # waiters retry, and shared state is read again, this often


ProviderConfig = SurfProviderConfig | SimulatedProviderConfig | Ec2ProviderConfig | RunpodProviderConfig


class HostTiming(msgspec.Struct, frozen=True, kw_only=True):
    """The timing of one provider's hosts: `[timing]`, with the provider's own overrides applied."""

    startup_timeout_seconds: float
    ollama_readiness_wait_seconds: float


class Config(_Section, frozen=True):
    server: ServerConfig = ServerConfig()
    cloud_api: CloudApiConfig | None = None
    timing: TimingConfig = TimingConfig()
    paths: PathsConfig = PathsConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    metrics: MetricsConfig = MetricsConfig()
    usage: UsageConfig = UsageConfig()
    budget: BudgetConfig = BudgetConfig()
    events: EventsConfig = EventsConfig()
    cluster: ClusterConfig = ClusterConfig()
    webhooks: list[WebhookConfig] = []
    hosts: list[HostConfig] = []
    providers: list[ProviderConfig] = []

    def all_providers(self) -> list[ProviderConfig]:
        """`[[providers]]` plus the provider the seed's `[cloud_api]` section stands for."""
        providers = list(self.providers)
        if self.cloud_api is not None:
            api = self.cloud_api
            providers.insert(
                0,
                SurfProviderConfig(
                    name="surf",
                    base_url=api.base_url,
                    machine_name_filter=api.machine_name_filter,
                    ollama_port=api.ollama_port,
                ),
            )
        return providers

    def host_timing(self, provider: str) -> HostTiming:
        """`[timing]` for the hosts of `provider`, with what that provider's block overrides."""
        pconf = next((p for p in self.all_providers() if p.name == provider), None)
        startup = pconf.startup_timeout_seconds if pconf is not None else None
        readiness = pconf.ollama_readiness_wait_seconds if pconf is not None else None
        return HostTiming(
            startup_timeout_seconds=startup if startup is not None else self.timing.startup_timeout_seconds,
            ollama_readiness_wait_seconds=(
                readiness if readiness is not None else self.timing.ollama_readiness_wait_seconds
            ),
        )


def redis_url(config: Config, environ: Mapping[str, str]) -> str:
    """The cluster's Redis: `GPUMANAGER_REDIS_URL`, else `[cluster] redis_url`; "" for one process."""
    return environ.get(REDIS_ENV) or config.cluster.redis_url


def config_path(cli_value: str | None, environ: dict[str, str] | os._Environ[str]) -> Path:
    """`--config` wins, then `GPUMANAGER_CONFIG`, then `./config.toml`."""
    return Path(cli_value or environ.get(CONFIG_ENV) or DEFAULT_CONFIG)


def load(path: str | os.PathLike[str]) -> Config:
    """Read, decode and check a config file. Raises `ConfigError` with one clear line."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(str(path), "", "file not found (start from config.toml.example)") from None
    except OSError as exc:
        raise ConfigError(str(path), "", f"cannot read: {exc.strerror}") from None
    return loads(data, path)


def loads(data: bytes | str, path: str | os.PathLike[str] = DEFAULT_CONFIG) -> Config:
    path = Path(path)
    try:
        config = msgspec.toml.decode(data, type=Config)
    except msgspec.ValidationError as exc:
        key, problem = _explain(str(exc))
        raise ConfigError(str(path), key, problem) from None
    except msgspec.DecodeError as exc:
        raise ConfigError(str(path), "", f"not valid TOML: {exc}") from None
    _check(config, str(path))
    return _resolve_paths(config, path.resolve().parent)


_MSGSPEC_ERROR = re.compile(r"^(?P<problem>.*?)(?: - at `\$(?P<where>[^`]*)`)?$")


def _explain(message: str) -> tuple[str, str]:
    """Turn msgspec's "Expected `int`, got `str` - at `$.server.port`" into ("server.port", problem)."""
    match = _MSGSPEC_ERROR.match(message)
    assert match is not None
    problem, where = match["problem"], (match["where"] or "").lstrip(".")
    if found := re.match(r"Object contains unknown field `(.+)`", problem):
        return _join(where, found[1]), "unknown key"
    if found := re.match(r"Object missing required field `(.+)`", problem):
        return _join(where, found[1]), "missing value"
    if found := re.match(r"Expected `(.+)`, got `(.+)`", problem):
        return where, f"wrong type: expected {found[1]}, got {found[2]}"
    if where.endswith(".type") or where == "type":
        return where, f"{problem[0].lower()}{problem[1:]} (known types: {_provider_types()})"
    return where, problem[0].lower() + problem[1:]


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _provider_types() -> str:
    return ", ".join(t.__struct_config__.tag for t in ProviderConfig.__args__)


def _check(config: Config, path: str) -> None:
    """Checks that the types alone cannot express."""
    try:
        config.budget.zone()
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError(
            path,
            "budget.timezone",
            f"unknown time zone {config.budget.timezone!r} (an IANA name: UTC, Europe/Amsterdam)",
        ) from None
    check_redis_url(config.cluster.redis_url, path, "cluster.redis_url")
    if not re.match(r"^[A-Za-z0-9_.-]+$", config.cluster.name):
        raise ConfigError(path, "cluster.name", "letters, digits, '.', '_' and '-' only (it names keys in Redis)")
    public = config.server.public_url
    if public and not re.match(r"^https?://[^/\s]+/?$", public):
        raise ConfigError(path, "server.public_url", "must be an origin such as https://gpu.example.org (no path)")
    for i, hook in enumerate(config.webhooks):  # the URL may hold a token: never repeated in the error
        if not re.match(r"^https?://[^/\s]+", hook.url):
            raise ConfigError(path, f"webhooks[{i}].url", "must be an http:// or https:// URL with a host")
    seen: set[str] = set()
    for i, host in enumerate(config.hosts):
        if host.name in seen:
            raise ConfigError(path, f"hosts[{i}].name", f"duplicate host name {host.name!r}")
        seen.add(host.name)
        if host.url is not None and not re.match(r"^https?://[^/]+", host.url):
            raise ConfigError(path, f"hosts[{i}].url", f"must start with http:// or https://, got {host.url!r}")
        if host.url is None and (host.api != "ollama" or host.api_key_env):
            key = "api" if host.api != "ollama" else "api_key_env"
            raise ConfigError(path, f"hosts[{i}].{key}", "only a static host (one with a `url`) takes it")
        if host.jobs and host.url is not None:
            raise ConfigError(
                path, f"hosts[{i}].jobs", "only a RunPod serverless endpoint serves jobs, not a static one"
            )
    names = {"static"}
    labelled = [(f"providers[{i}]", p) for i, p in enumerate(config.providers)]
    if config.cloud_api is not None:
        labelled.insert(0, ("cloud_api", config.all_providers()[0]))
    for where, provider in labelled:
        if provider.name in names:
            raise ConfigError(path, f"{where}.name", f"duplicate provider name {provider.name!r}")
        names.add(provider.name)
        _check_scope(provider, where, path)
    for i, host in enumerate(config.hosts):
        if host.provider is not None and host.provider not in names:
            raise ConfigError(
                path, f"hosts[{i}].provider", f"no provider named {host.provider!r} (known: {', '.join(sorted(names))})"
            )
        if host.url is not None and host.provider not in (None, "static"):
            raise ConfigError(path, f"hosts[{i}].url", "a host with a url is static; drop `provider` or `url`")
        runpod = [p.name for p in config.providers if isinstance(p, RunpodProviderConfig)]
        if host.jobs and (not runpod or (host.provider is not None and host.provider not in runpod)):
            problem = 'only a RunPod serverless endpoint serves jobs: name a `type = "runpod"` provider'
            raise ConfigError(path, f"hosts[{i}].jobs", problem)


def check_redis_url(url: str, path: str, key: str) -> None:
    if url and not re.match(r"^(rediss?|unix)://", url):
        raise ConfigError(path, key, "must be a Redis URL: redis://HOST:PORT/DB, rediss://... or unix:///path")


def _check_scope(provider: ProviderConfig, where: str, path: str) -> None:
    """A cloud provider must be told which machines are its own: gpumanager pauses what it manages,
    and must never adopt (and stop) every machine of an account."""
    if isinstance(provider, SurfProviderConfig) and not provider.machine_name_filter:
        raise ConfigError(
            path,
            f"{where}.machine_name_filter",
            "must not be empty: the workspaces whose name contains it are managed (woken and paused) by gpumanager",
        )
    if isinstance(provider, RunpodProviderConfig) and not (provider.endpoints or provider.pods or provider.name_filter):
        raise ConfigError(
            path,
            where,
            "a runpod provider needs `endpoints`, `pods` or a non-empty `name_filter`: "
            "what it finds is woken and paused by gpumanager",
        )
    if isinstance(provider, Ec2ProviderConfig) and not (provider.tag_filter or provider.instance_ids):
        raise ConfigError(
            path,
            where,
            "an ec2 provider needs `tag_filter` or `instance_ids`: what it finds is started and stopped by gpumanager",
        )


def _resolve_paths(config: Config, base: Path) -> Config:
    def resolve(value: str) -> str:
        return str(base / Path(value).expanduser())

    paths = config.paths
    resolved = msgspec.structs.replace(
        paths,
        api_keys_file=resolve(paths.api_keys_file),
        state_dir=resolve(paths.state_dir),
        log_file=resolve(paths.log_file) if paths.log_file else "",
    )
    # "" is SQLite in the state folder; a relative `sqlite:///path` is relative to the config's folder.
    url = config.usage.database_url or "sqlite:///" + str(Path(resolved.state_dir) / "usage.db")
    if url.startswith("sqlite:///") and len(url) > len("sqlite:///"):
        url = "sqlite:///" + resolve(url.removeprefix("sqlite:///"))
    usage = msgspec.structs.replace(config.usage, database_url=url)
    return msgspec.structs.replace(config, paths=resolved, usage=usage)


def describe(config: Config) -> list[dict[str, Any]]:
    """What `check-config` prints: the hosts gpumanager would manage, known before any discovery."""
    rows: list[dict[str, Any]] = []
    for host in config.hosts:
        rows.append(
            {
                "name": host.name,
                "provider": host.provider or ("static" if host.url else "(discovered)"),
                "url": host.url or "",
                "slots": host.slots or config.scheduler.default_slots,
                "models": host.models,
                "protected": host.protected,
            }
        )
    for provider in config.all_providers():
        rows.append(
            {
                "name": f"(hosts found by {provider.name})",
                "provider": provider.name,
                "url": "",
                "slots": config.scheduler.default_slots,
                "models": [],
                "protected": False,
            }
        )
    return rows
