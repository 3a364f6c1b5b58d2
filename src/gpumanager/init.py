"""`gpumanager init`: write a commented `config.toml`, and a `.env` beside it, for the hosts and
clouds a newcomer names on the command line.

The config is built with tomlkit so that every section and the keys that matter carry a comment.
The `.env` lists the names of the secrets the chosen sources need, with empty values, mode 0600.
Before anything is written, the config is decoded with `gpumanager.config.loads`, so `init` never
leaves a file that `gpumanager server` would refuse.
"""

from __future__ import annotations

import ipaddress
import os
import re
import shlex
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import tomlkit
from tomlkit.items import AoT, Item, Table

from gpumanager.config import (
    PathsConfig,
    SchedulerConfig,
    ServerConfig,
    TimingConfig,
    config_path,
    loads,
)
from gpumanager.errors import ConfigError

DEFAULT_OLLAMA = "http://127.0.0.1:11434"
UPSTREAM_TOKEN = "GPUMANAGER_UPSTREAM_TOKEN"
SURF_STARTUP_SECONDS = 900  # a SURF resume can hang ~10 minutes when no GPU is free
COMMENT_COLUMN = 34  # inline comments start here when the key and value are shorter

_ENDPOINT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


@dataclass(frozen=True)
class Sources:
    """What the user named: static Ollama URLs and the clouds to manage."""

    ollama: Sequence[str] = ()
    surf: str | None = None
    ec2_tags: Sequence[str] = ()
    runpod_endpoints: Sequence[str] = ()


@dataclass(frozen=True)
class Secret:
    name: str
    comment: str
    needed: bool  # the chosen sources do not work without it


@dataclass(frozen=True)
class Plan:
    """The validated form of `Sources`: what the written files will hold."""

    hosts: list[tuple[str, str]] = field(default_factory=list)  # (name, url) of each static host
    surf: str | None = None
    ec2_tags: dict[str, str] = field(default_factory=dict)
    runpod_endpoints: list[str] = field(default_factory=list)
    default_host: bool = False  # no source was named: one static host on this machine

    @property
    def providers(self) -> list[str]:
        names = ["surf"] if self.surf is not None else []
        names += ["aws"] if self.ec2_tags else []
        names += ["runpod"] if self.runpod_endpoints else []
        return names


@dataclass(frozen=True)
class Written:
    config: Path
    env: Path
    plan: Plan
    secrets: list[Secret]


# -- validating what the user named ---------------------------------------------------------------


def plan(sources: Sources) -> Plan:
    """Check the options and name the hosts. Raises `ConfigError` with one line naming the option."""
    urls = _unique(normalise_url(url) for url in sources.ollama)
    surf = None
    if sources.surf is not None:
        surf = sources.surf.strip()
        if not surf:
            raise ConfigError(
                "--surf", "", "the filter must not be empty: workspaces whose name contains it are woken and paused"
            )
    tags: dict[str, str] = {}
    for text in sources.ec2_tags:
        key, value = parse_tag(text)
        if tags.get(key, value) != value:
            raise ConfigError("--ec2-tag", "", f"tag {key!r} given twice with different values")
        tags[key] = value
    endpoints = _unique(parse_endpoint(endpoint) for endpoint in sources.runpod_endpoints)
    default_host = not (urls or surf is not None or tags or endpoints)
    if default_host:
        urls = [DEFAULT_OLLAMA]
    return Plan(
        hosts=list(zip(host_names(urls), urls, strict=True)),
        surf=surf,
        ec2_tags=tags,
        runpod_endpoints=endpoints,
        default_host=default_host,
    )


def normalise_url(url: str) -> str:
    """An Ollama base URL: http:// or https://, a host, an optional port and path, no trailing slash."""
    text = url.strip()
    parts = urlsplit(text)
    if parts.scheme.lower() not in ("http", "https") or not text.lower().startswith(("http://", "https://")):
        raise ConfigError("--ollama", "", f"must start with http:// or https://, got {url!r}")
    try:
        _ = parts.port  # a port that is not a number from 0 to 65535 raises
    except ValueError:
        raise ConfigError("--ollama", "", f"bad port in {url!r}") from None
    if not parts.hostname:
        raise ConfigError("--ollama", "", f"no host in {url!r}")
    if parts.query or parts.fragment:
        raise ConfigError("--ollama", "", f"give the Ollama's base URL, without ?query or #fragment: {url!r}")
    return f"{parts.scheme.lower()}://{parts.netloc}{parts.path.rstrip('/')}"


def parse_tag(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    key, value = key.strip(), value.strip()
    if not sep:
        raise ConfigError("--ec2-tag", "", f"expected KEY=VALUE (e.g. gpumanager=true), got {text!r}")
    if not key or not value:
        raise ConfigError("--ec2-tag", "", f"both the key and the value must be given (KEY=VALUE), got {text!r}")
    return key, value


def parse_endpoint(text: str) -> str:
    endpoint = text.strip()
    if not _ENDPOINT_ID.match(endpoint):
        raise ConfigError(
            "--runpod-endpoint",
            "",
            f"expected an endpoint id such as i02xupws21hp6i (the part after /v2/ in its URL), got {text!r}",
        )
    return endpoint


def host_names(urls: Sequence[str]) -> list[str]:
    """A short, unique name per URL: the first label of a DNS name, an IP address as written,
    `local` for this machine; the port, then a counter, tell apart hosts that share it."""
    names: list[str] = []
    for url in urls:
        parts = urlsplit(url)
        base = _base_name(parts.hostname or "host")
        candidates = [base, *([f"{base}-{parts.port}"] if parts.port else [])]
        candidates += (f"{base}-{n}" for n in range(2, len(urls) + 3))
        names.append(next(c for c in candidates if c not in names))
    return names


def _base_name(hostname: str) -> str:
    hostname = hostname.lower().rstrip(".")
    try:
        address = ipaddress.ip_address(hostname)
    except ValueError:
        if hostname == "localhost" or hostname.endswith(".localhost"):
            return "local"
        label = hostname.split(".")[0]
    else:
        if address.is_loopback:
            return "local"
        label = str(address)
    return re.sub(r"[^a-z0-9._-]+", "-", label).strip("-") or "host"


def _unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))


# -- the documents ------------------------------------------------------------------------------


def secrets(chosen: Plan) -> list[Secret]:
    """The variables of `.env`, in the order written."""
    found = [
        Secret(
            UPSTREAM_TOKEN,
            "Sent to every host as `Authorization: Bearer ...`. Set it when the hosts run gpu-node/ (Ollama\n"
            "behind an nginx door that checks it); leave it empty for an Ollama that checks nothing.",
            needed=False,
        ),
        Secret(
            "GPUMANAGER_API_KEY",
            "An admin key for `gpumanager hosts` (made with `gpumanager generate-key --admin`).",
            needed=False,
        ),
    ]
    if chosen.surf is not None:
        found += [
            Secret(
                "CLOUD_API_TOKEN",
                "SURF Research Cloud: the API token from the portal (Profile -> API tokens).",
                needed=True,
            ),
            Secret("CLOUD_CSRF_TOKEN", "SURF: only if your account's API demands a CSRF token.", needed=False),
        ]
    if chosen.ec2_tags:
        found += [
            Secret(
                "AWS_ACCESS_KEY_ID",
                "AWS EC2. Leave the keys empty to use ~/.aws/credentials or the instance role instead. The\n"
                "policy needs ec2:DescribeInstances, ec2:StartInstances and ec2:StopInstances.",
                needed=False,
            ),
            Secret("AWS_SECRET_ACCESS_KEY", "", needed=False),
            Secret("AWS_DEFAULT_REGION", "The region of the instances, unless `region` is set in config.toml.", True),
        ]
    if chosen.runpod_endpoints:
        found.append(
            Secret(
                "RUNPOD_API_KEY",
                "RunPod: an API key that may read and write (a read-only key cannot wake anything).",
                needed=True,
            )
        )
    return found


def env_text(chosen: Plan) -> str:
    lines = [
        "# Secrets for gpumanager, read from this file beside config.toml; real environment variables win.",
        "# An empty value counts as not set. Keep this file private (mode 0600) and out of version control.",
    ]
    for secret in secrets(chosen):
        if secret.comment:
            lines += ["", *(f"# {line}" for line in secret.comment.splitlines())]
        lines.append(f"{secret.name}=")
    return "\n".join(lines) + "\n"


def config_document(chosen: Plan) -> tomlkit.TOMLDocument:
    server, timing, paths, scheduler = ServerConfig(), TimingConfig(), PathsConfig(), SchedulerConfig()
    doc = tomlkit.document()
    _comments(
        doc,
        """\
gpumanager configuration, written by `gpumanager init`; `gpumanager check-config` checks it.
Every section is optional: the values below are the defaults, written out to be changed, and
config.toml.example documents every key. Durations accept fractions (0.5 = half a second), a count
of 0 means "no limit", and relative paths are relative to the folder of this file.

Secrets never go here: they come from the environment or from the .env file beside this file.
GPUMANAGER_UPSTREAM_TOKEN there is sent to every host as `Authorization: Bearer ...`: set it when
the hosts run gpu-node/ (Ollama behind a door that checks the token), and on the hosts too.""",
    )
    doc.add(tomlkit.nl())

    section = tomlkit.table()
    _comments(section, "Where clients (OpenAI and Ollama SDKs, curl, apps) reach gpumanager.")
    _key(section, "host", server.host, 'address to listen on ("127.0.0.1": this machine only)')
    _key(section, "port", server.port, "`gpumanager server --port` overrides it")
    doc.add("server", section)

    section = tomlkit.table()
    _comments(
        section,
        "How long woken cloud hosts stay up and how long waits may last. Static hosts are never paused.",
    )
    _key(
        section,
        "reservation_minutes",
        timing.reservation_minutes,
        "after each request, its host stays up this long; then it is paused",
    )
    _key(
        section,
        "fallback_reservation_minutes",
        timing.fallback_reservation_minutes,
        "window of a host woken without use, or found running at start-up",
    )
    _key(
        section,
        "startup_timeout_seconds",
        timing.startup_timeout_seconds,
        "a wake that takes longer fails (504): cloud resume + boot + Ollama ready",
    )
    _key(section, "queue_timeout_seconds", timing.queue_timeout_seconds, "longest wait for a free slot before a 503")
    _key(
        section,
        "wake_keepalive_seconds",
        timing.wake_keepalive_seconds,
        "a streaming client waiting for a wake gets a heartbeat this often",
    )
    _key(
        section,
        "failed_cooldown_seconds",
        timing.failed_cooldown_seconds,
        "a host that failed to wake is not tried again for this long",
    )
    _key(
        section,
        "probe_timeout_seconds",
        timing.probe_timeout_seconds,
        "timeout of one readiness probe or model-list read of a host",
    )
    doc.add("timing", section)

    section = tomlkit.table()
    _comments(section, "Files gpumanager writes, relative to the folder of this file.")
    _key(section, "api_keys_file", paths.api_keys_file, "hashed API keys (`gpumanager generate-key` writes it)")
    _key(section, "state_dir", paths.state_dir, "cache of each host's models: paused hosts stay routable")
    _key(section, "log_file", paths.log_file, '"" logs to the console only')
    doc.add("paths", section)

    section = tomlkit.table()
    _comments(section, "Slots: how many requests a host runs at once. Requests beyond them wait in a fair queue.")
    _key(
        section,
        "default_slots",
        scheduler.default_slots,
        "slots of a host whose entry sets none (match its OLLAMA_NUM_PARALLEL)",
    )
    _key(section, "max_queue", scheduler.max_queue, "requests waiting for a slot, all keys together (429 past it)")
    _key(section, "max_per_key", scheduler.max_per_key, "running + waiting requests of one key (429 past it)")
    doc.add("scheduler", section)

    providers = _providers(chosen)
    if providers:
        doc.add(tomlkit.nl())
        _comments(
            doc,
            """\
Providers: clouds whose GPU hosts gpumanager resumes when a request needs them and pauses when
they have been idle for reservation_minutes. Each may also set startup_timeout_seconds,
ollama_port (default 11434) and cost_per_hour of its hosts (config.toml.example has every key).""",
        )
        doc.add("providers", providers)

    if chosen.hosts:
        doc.add(tomlkit.nl())
        _comments(
            doc,
            """\
Static hosts: Ollama servers that are always on and never paused. Their models are read from
their /api/tags; `models` is what one is assumed to serve before it was ever seen answering.""",
        )
        hosts = tomlkit.aot()
        for name, url in chosen.hosts:
            entry = tomlkit.table()
            if chosen.default_host:
                _comments(entry, "An Ollama on this machine (no source was named to `gpumanager init`).")
            _key(entry, "name", name, "how logs, `check-config` and the management API call it")
            _key(entry, "url", url)
            _key(entry, "slots", scheduler.default_slots, "requests at once: match the host's OLLAMA_NUM_PARALLEL")
            _key(entry, "models", tomlkit.array(), 'e.g. ["llama3.2:latest"]')
            _key(entry, "cost_per_hour", 0.0, "showback only: a static host is never paused")
            hosts.append(entry)
        doc.add("hosts", hosts)
    return doc


def _providers(chosen: Plan) -> AoT | None:
    if not chosen.providers:
        return None
    providers = tomlkit.aot()
    if chosen.surf is not None:
        entry = tomlkit.table()
        _comments(
            entry,
            """\
SURF Research Cloud: workspaces whose name contains machine_name_filter. Needs CLOUD_API_TOKEN
in .env (and CLOUD_CSRF_TOKEN if your account's API demands it).""",
        )
        _key(entry, "type", "surf")
        _key(entry, "name", "surf")
        _key(entry, "machine_name_filter", chosen.surf, "every workspace matching it is woken and paused")
        _key(
            entry,
            "startup_timeout_seconds",
            SURF_STARTUP_SECONDS,
            "a resume takes minutes (~10 when no GPU is free), then boot",
        )
        providers.append(entry)
    if chosen.ec2_tags:
        entry = tomlkit.table()
        _comments(
            entry,
            """\
AWS EC2 (pip install 'gpumanager[aws]'): instances with every tag of tag_filter are started on
demand and stopped when idle. Credentials come from .env, ~/.aws/credentials or the instance role;
the region from `region` below or AWS_DEFAULT_REGION.""",
        )
        _key(entry, "type", "ec2")
        _key(entry, "name", "aws")
        tags = tomlkit.inline_table()
        tags.update(chosen.ec2_tags)
        _key(entry, "tag_filter", tags, "instances with all these tags")
        entry.add(tomlkit.comment('region = "eu-west-1"              # wins over AWS_DEFAULT_REGION'))
        _key(entry, "hibernate", False, "GPU families cannot hibernate")
        _key(entry, "address", "private", 'or "public" when gpumanager runs outside the VPC')
        providers.append(entry)
    if chosen.runpod_endpoints:
        entry = tomlkit.table()
        _comments(
            entry,
            """\
RunPod serverless endpoints (OpenAI-compatible workers, e.g. vLLM). Needs RUNPOD_API_KEY in .env
(with write access: waking sets an endpoint's min workers).""",
        )
        _key(entry, "type", "runpod")
        _key(entry, "name", "runpod")
        _key(entry, "endpoints", list(chosen.runpod_endpoints), "endpoint ids")
        _key(entry, "warm_workers", 1, "min workers while awake (billed); 0 while paused")
        providers.append(entry)
    return providers


def _comments(container: tomlkit.TOMLDocument | Table, text: str) -> None:
    for line in text.splitlines():
        container.add(tomlkit.comment(line))


def _key(table: Table, key: str, value: Any, comment: str = "") -> None:
    item: Item = tomlkit.item(value)
    if comment:
        item.comment(comment)
        width = len(key) + 3 + len(item.as_string())
        item.trivia.comment_ws = " " * max(1, COMMENT_COLUMN - width)
    table.add(key, item)


# -- writing ------------------------------------------------------------------------------------


def write(path: Path, sources: Sources, *, force: bool = False) -> Written:
    """Write `path` and the `.env` beside it. Without `force`, refuse when either exists."""
    chosen = plan(sources)
    text = tomlkit.dumps(config_document(chosen))
    loads(text, path)  # the file must be one that `gpumanager server` accepts
    env = path.parent / ".env"
    if not force:
        for existing in (path, env):
            if existing.exists() or existing.is_symlink():
                raise ConfigError(str(existing), "", "already exists; pass --force to overwrite it")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w" if force else "x", encoding="utf-8") as out:
            out.write(text)
        flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if force else os.O_EXCL)
        fd = os.open(env, flags, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            os.fchmod(fd, 0o600)  # an existing file keeps its mode through O_TRUNC
            out.write(env_text(chosen))
    except FileExistsError as exc:
        raise ConfigError(str(exc.filename), "", "already exists; pass --force to overwrite it") from None
    except OSError as exc:
        raise ConfigError(str(exc.filename or path), "", f"cannot write: {exc.strerror}") from None
    return Written(config=path, env=env, plan=chosen, secrets=secrets(chosen))


def report(written: Written, *, config_arg: str | None) -> str:
    """What `init` prints: what was written, what to fill in, the next two commands."""
    chosen = written.plan
    lines = [f"Wrote {written.config}:"]
    for name, url in chosen.hosts:
        lines.append(f"  static host {name!r}: {url}")
    described = {
        "surf": f"SURF workspaces whose name contains {chosen.surf!r}",
        "aws": "EC2 instances tagged " + ", ".join(f"{k}={v}" for k, v in chosen.ec2_tags.items()),
        "runpod": "RunPod endpoints " + ", ".join(chosen.runpod_endpoints),
    }
    for name in chosen.providers:
        lines.append(f"  provider {name!r}: {described[name]}")
    if chosen.default_host:
        lines.append(
            "No source option was given, so its one host is an Ollama on this machine "
            "(`gpumanager init --help` lists the options)."
        )
    names = ", ".join(secret.name for secret in written.secrets)
    lines.append(f"Wrote {written.env} (mode 0600): {names}, all empty.")
    needed = [secret.name for secret in written.secrets if secret.needed]
    token = f"{UPSTREAM_TOKEN} when the hosts check one (gpu-node/)"
    if needed:
        lines.append(f"Fill in {', '.join(needed)} there before starting the server, and {token}.")
    else:
        lines.append(f"Set {token}.")
    option = f" --config {shlex.quote(config_arg)}" if config_arg else ""
    lines += [
        "",
        "Next:",
        f'  gpumanager generate-key{option} --name "Your Name" --email you@example.org',
        f"  gpumanager server{option}",
    ]
    return "\n".join(lines)


def default_config_arg(path: Path, environ: dict[str, str] | os._Environ[str]) -> str | None:
    """The `--config` the next commands need: none when they would find `path` by themselves."""
    return None if config_path(None, environ).resolve() == path.resolve() else str(path)
