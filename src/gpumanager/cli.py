"""The `gpumanager` command: server (the default), demo, init, generate-key, list-keys, set-limits,
revoke-key, check-config, hosts, usage, simulate, events. Every subcommand takes `--config PATH`
after its name; `GPUMANAGER_CONFIG` works for all. The `.env` beside the config is loaded into the
environment at start (never overriding what is already set): the only place that writes the
environment.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from dotenv import load_dotenv

from gpumanager import __version__
from gpumanager.config import CONFIG_ENV, Config, HostConfig, config_path, load
from gpumanager.errors import ConfigError, GpuManagerError

if TYPE_CHECKING:
    from gpumanager.keys import KeyStore, Limits

COMMANDS = (
    "server",
    "demo",
    "init",
    "generate-key",
    "list-keys",
    "set-limits",
    "revoke-key",
    "check-config",
    "hosts",
    "usage",
    "simulate",
    "events",
    "keys",
)
PROBE_SECONDS = 2.0  # check-config's wait for a static host's /api/tags


def _config_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="PATH", help=f"config file (default: ${CONFIG_ENV}, else ./config.toml)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gpumanager",
        description="A streaming OpenAI/Ollama proxy that shares GPU hosts among API keys, "
        "wakes paused hosts on demand and pauses them when idle.",
        epilog="Run `gpumanager COMMAND --help` for a command's options. With no command, `server` runs.",
    )
    parser.add_argument("--version", action="version", version=f"gpumanager {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    server = sub.add_parser(
        "server",
        help="serve the proxy (the default command)",
        description="Serve the proxy on [server] host/port of the config.",
    )
    _config_arg(server)
    server.add_argument("--host", help="address to listen on (overrides [server] host)")
    server.add_argument("--port", type=int, help="port to listen on (overrides [server] port)")
    server.add_argument(
        "--log-level",
        default=os.environ.get("GPUMANAGER_LOG_LEVEL", "INFO"),
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="log level (default INFO)",
    )

    demo = sub.add_parser(
        "demo",
        help="run a demo with simulated GPU hosts (no cloud account needed)",
        description="Start the proxy in front of a simulated cloud of two paused GPU hosts, "
        "make an admin key, send one request and narrate the wake, the answer, "
        "the idle window and the pause. Stays up for your own requests.",
    )
    demo.add_argument("--port", type=int, default=8000, help="port to serve on (default 8000)")
    demo.add_argument("--host", default="127.0.0.1", help="address to serve on (default 127.0.0.1)")
    demo.add_argument("--dir", help="folder for the demo's keys, state and log (default: a temporary one)")
    demo.add_argument("--once", action="store_true", help="exit after the narrated cycle (for scripts)")

    init = sub.add_parser(
        "init",
        help="write a commented config.toml (and .env) for your Ollama hosts and clouds",
        description="Write a commented config.toml for the hosts and clouds named by the options below, "
        "and a .env beside it with the names of the secrets they need (empty values, mode 0600). "
        "With no source option, the config has one static host: an Ollama on this machine at http://127.0.0.1:11434. "
        "Refuses to overwrite an existing config.toml or .env without --force.",
        epilog="example: gpumanager init --ollama http://10.0.0.5:11434 --surf gpu-",
    )
    init.add_argument(
        "--config",
        metavar="PATH",
        help=f"where to write the config (default: ${CONFIG_ENV}, else ./config.toml); .env goes beside it",
    )
    init.add_argument(
        "--ollama",
        metavar="URL",
        action="append",
        default=[],
        help="an always-on Ollama, e.g. http://10.0.0.5:11434: one static [[hosts]] entry, named after "
        "the URL's host (repeatable)",
    )
    init.add_argument(
        "--surf",
        metavar="FILTER",
        help="wake and pause the SURF Research Cloud workspaces whose name contains FILTER "
        "(.env gets CLOUD_API_TOKEN and CLOUD_CSRF_TOKEN)",
    )
    init.add_argument(
        "--ec2-tag",
        metavar="KEY=VALUE",
        action="append",
        default=[],
        dest="ec2_tags",
        help="start and stop the EC2 instances with this tag (repeatable: an instance needs all of them; "
        ".env gets AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and AWS_DEFAULT_REGION)",
    )
    init.add_argument(
        "--runpod-endpoint",
        metavar="ID",
        action="append",
        default=[],
        dest="runpod_endpoints",
        help="wake and pause this RunPod serverless endpoint (repeatable; .env gets RUNPOD_API_KEY)",
    )
    init.add_argument("--force", action="store_true", help="overwrite an existing config.toml and .env")

    gen = sub.add_parser(
        "generate-key",
        help="make an API key (printed once, stored hashed)",
        description="Make an API key. The key is printed once; only its sha256 is stored.",
    )
    _config_arg(gen)
    gen.add_argument("--name", required=True, help="who the key is for")
    gen.add_argument("--email", required=True, help="their email address")
    gen.add_argument("--admin", action="store_true", help="allow the management API and model management")
    gen.add_argument("--quiet", "-q", action="store_true", help="print nothing but the key")
    _limit_args(gen)

    lst = sub.add_parser(
        "list-keys",
        help="list API keys with their limits and today's use (never the keys or their hashes)",
        description="List API keys, their limits, and their use today ([budget] timezone's day, from the ledger).",
    )
    _config_arg(lst)

    lim = sub.add_parser(
        "set-limits",
        help="change a key's limits (a running server applies them within a second)",
        description="Set or remove limits of a key; the others stay as they are. A running server picks the "
        "change up within a second.",
        epilog="examples:\n"
        "  gpumanager set-limits 1a2b3c4d --dollars-per-day 5 --requests-per-minute 30\n"
        "  gpumanager set-limits gm_AbCd --models 'llama3*' --models 'qwen2.5:*'\n"
        "  gpumanager set-limits 1a2b3c4d --clear dollars-per-day --clear models",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _config_arg(lim)
    lim.add_argument("key_id", metavar="ID_OR_PREFIX", help="the key's id, or the start of the key (gm_...)")
    _limit_args(lim)
    lim.add_argument(
        "--clear",
        metavar="NAME",
        action="append",
        default=[],
        help="remove this limit (repeatable): tokens-per-day, dollars-per-day, dollars-per-month, "
        "requests-per-minute, max-concurrent, models",
    )

    rev = sub.add_parser(
        "revoke-key",
        help="revoke an API key by id or prefix",
        description="Revoke a key; a running server stops accepting it within a second.",
    )
    _config_arg(rev)
    rev.add_argument("key_id", metavar="ID_OR_PREFIX", help="the key's id, or the start of the key (gm_...)")

    chk = sub.add_parser(
        "check-config",
        help="validate the config and print the hosts it would manage",
        description="Validate the config and print the hosts it would manage. The models of a static host "
        f"are those its /api/tags lists now (asked with a {PROBE_SECONDS:g} s timeout, all hosts at once); "
        "when it does not answer, the config's `models`, marked (from config).",
    )
    _config_arg(chk)

    hosts = sub.add_parser("hosts", help="print the fleet of a running server (needs an admin key)")
    _config_arg(hosts)
    hosts.add_argument("--url", help="the server's URL (default: from [server] of the config)")
    hosts.add_argument("--key", help="admin key (default: $GPUMANAGER_API_KEY)")

    usage = sub.add_parser(
        "usage",
        help="print who used the GPUs and what it cost, from the usage ledger",
        description="""Print requests, tokens, GPU-seconds and dollars of a period from the usage ledger
([usage] database_url, by default <state_dir>/usage.db), read directly: the server need not run.
Keys show with their names from the key file. Billed time that served no request (waking, reserved,
draining, ...) is charged to the key that caused it, or shows as `unattributed`, with its reason.
Token sums leave out requests whose host sent no counts (the NO COUNTS column). The table ends with
each priced host's savings against running it the whole period (cost_per_hour from the config).""",
        epilog="""TIME is a span back from now (90m, 24h, 7d, 2w), a UTC date (2026-05-01) or time (2026-05-01T13:30,
or with an offset: 2026-05-01T13:30+02:00), or now. Days and hours are UTC.

examples:
  gpumanager usage                                  the last 24 hours by key
  gpumanager usage --since 7d --by day              the last week, day by day
  gpumanager usage --since 2026-05-01 --until 2026-06-01 --by host --format csv > may.csv
  gpumanager usage --key 1a2b3c4d --by model --format json""",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _config_arg(usage)
    usage.add_argument("--since", metavar="TIME", type=_when, default="24h", help="start of the period (default 24h)")
    usage.add_argument("--until", metavar="TIME", type=_when, default="now", help="end of the period (default now)")
    usage.add_argument(
        "--by", choices=["key", "model", "host", "day", "hour"], default="key", help="one row per ... (default key)"
    )
    usage.add_argument("--key", metavar="ID", help="only this key's use (its id, or its name in the key file)")
    usage.add_argument(
        "--format",
        choices=["table", "csv", "json"],
        default="table",
        help="table (default); csv: dollars to the micro-dollar, savings after a blank line; "
        "json: money in integer micro-dollars, times in Unix seconds",
    )
    sim = sub.add_parser(
        "simulate",
        help="replay past traffic against other reservation windows and scale-up rules: cost and cold starts",
        description="""Replay the ledger's requests of a period (their arrival, model and time holding a slot) against
the hosts that served them (their cost_per_hour from the config, their measured cold starts) on a
virtual clock, through the server's own scheduling and idle rules, once for each reservation window
and scale-up rule. For each it prints billed GPU-hours and dollars and the cold starts requests
waited through, against every host always on and against the oracle (a policy that knows the
future: each idle gap billed min(gap, cold start)). With --trace, a CSV of time,model,duration_s
is replayed instead, on the hosts the config names (or --hosts N identical ones).""",
        epilog="""examples:
  gpumanager simulate                                        last week, windows 3/10/20 min, both rules
  gpumanager simulate --since 30d --reservation-minutes 1,5,15,60
  gpumanager simulate --trace bench/traces/workday.csv --hosts 2 --price 2.5 --cold-start 90""",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _config_arg(sim)
    sim.add_argument("--since", metavar="TIME", type=_when, default="7d", help="start of the period (default 7d)")
    sim.add_argument("--until", metavar="TIME", type=_when, default="now", help="end of the period (default now)")
    sim.add_argument(
        "--reservation-minutes", metavar="LIST", type=_numbers, default=[3.0, 10.0, 20.0], help="default 3,10,20"
    )
    sim.add_argument(
        "--scale-up", metavar="LIST", type=_rules, default=["expected_wait", "queue_depth"], help="default both"
    )
    sim.add_argument("--trace", metavar="FILE", help="replay this CSV (time,model,duration_s) instead of the ledger")
    sim.add_argument("--hosts", type=int, metavar="N", help="replay on N identical hosts (not the config's)")
    sim.add_argument("--slots", type=int, metavar="N", help="slots of each of those hosts ([scheduler] default_slots)")
    sim.add_argument("--price", type=float, metavar="X", default=1.0, help="their dollars an hour (default 1.00)")
    sim.add_argument(
        "--cold-start", type=float, metavar="S", help="their seconds to wake (startup_timeout_seconds / 4)"
    )
    sim.add_argument("--format", choices=["table", "json"], default="table")

    keys = sub.add_parser(
        "keys",
        help="move keys between the key file and the cluster's Redis",
        description="With [cluster] redis_url (or $GPUMANAGER_REDIS_URL) the replicas read their keys from "
        "Redis, and generate-key, revoke-key, set-limits and list-keys work there.",
    )
    keys_sub = keys.add_subparsers(dest="keys_command", required=True, metavar="COMMAND")
    imp = keys_sub.add_parser(
        "import",
        help="copy the keys of an api_keys.json into the cluster's Redis",
        description="Copy every key of FILE (hashes, limits, revoked ones too) into the cluster's Redis. "
        "Keys already there stay; a key id in both is an error unless --replace. Every replica "
        "accepts the imported keys within a second.",
    )
    _config_arg(imp)
    imp.add_argument("file", metavar="FILE", help="an api_keys.json (as generate-key writes without a cluster)")
    imp.add_argument("--replace", action="store_true", help="a key id already in Redis takes the file's record")

    ev = sub.add_parser(
        "events",
        help="print what the fleet does, one line per event (needs an admin key)",
        description="Print the fleet's events from a running server (GET /events): the fleet as it is now, "
        "then the recent events (or, with --follow, every event as it happens), one line each.",
    )
    _config_arg(ev)
    ev.add_argument("--follow", "-f", action="store_true", help="keep printing events as they happen (Ctrl-C ends)")
    ev.add_argument(
        "--type",
        action="append",
        metavar="TYPE",
        help="only this event type (repeatable): host_state, wake_started, wake_phase, wake_failed, "
        "pause_warning, paused, request, budget, emergency, key",
    )
    ev.add_argument("--json", action="store_true", help="print each event's JSON instead of a sentence")
    ev.add_argument("--url", help="the server's URL (default: from [server] of the config)")
    ev.add_argument("--key", help="admin key (default: $GPUMANAGER_API_KEY)")
    return parser


def _numbers(text: str) -> list[float]:
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {text!r}") from None
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected minutes (0 or more) separated by commas, got {text!r}")
    return values


def _rules(text: str) -> list[str]:
    rules = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [r for r in rules if r not in ("expected_wait", "queue_depth")]
    if not rules or unknown:
        raise argparse.ArgumentTypeError(f"scale-up rules are expected_wait and queue_depth, got {text!r}")
    return rules


def _limit_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("limits (none by default; days and months are [budget] timezone's)")
    group.add_argument("--tokens-per-day", type=int, metavar="N", help="prompt + completion tokens a day")
    group.add_argument("--dollars-per-day", type=float, metavar="X", help="GPU cost charged to the key a day")
    group.add_argument("--dollars-per-month", type=float, metavar="X", help="GPU cost charged to the key a month")
    group.add_argument("--requests-per-minute", type=int, metavar="N", help="requests in any 60 seconds")
    group.add_argument(
        "--max-concurrent", type=int, metavar="N", help="requests running or waiting at once ([scheduler] max_per_key)"
    )
    group.add_argument(
        "--models",
        metavar="PATTERN",
        action="append",
        help="a model it may use, a glob such as 'llama3*' (repeatable, or comma-separated); others are hidden",
    )


def _limit_changes(args: argparse.Namespace) -> dict[str, object]:
    """The limits given on the command line: name -> value."""
    from gpumanager.keys import LIMIT_NAMES

    changes: dict[str, object] = {}
    for name in LIMIT_NAMES:
        value = getattr(args, name, None)
        if value is not None:
            changes[name] = value
    if "models" in changes:
        patterns = [p.strip() for given in args.models for p in given.split(",") if p.strip()]
        if not patterns:
            raise GpuManagerError("--models needs at least one pattern")
        changes["models"] = patterns
    return changes


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if not args_list or (args_list[0].startswith("-") and args_list[0] not in ("-h", "--help", "--version")):
        args_list.insert(0, "server")
    args = build_parser().parse_args(args_list)
    handler = _HANDLERS[args.command]
    try:
        return handler(args)
    except GpuManagerError as exc:
        print(f"gpumanager: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def load_config(args: argparse.Namespace, *, required: bool = True) -> tuple[Config, Path]:
    """The config, with the `.env` beside it loaded. Without `required`, a missing default file
    means the defaults (so `generate-key` works in a fresh folder)."""
    path = config_path(getattr(args, "config", None), os.environ)
    explicit = bool(getattr(args, "config", None) or os.environ.get(CONFIG_ENV))
    load_dotenv(path.resolve().parent / ".env", override=False)
    if not path.exists() and not required and not explicit:
        from gpumanager.config import loads

        return loads(b"", path), path
    return load(path), path


def _server(args: argparse.Namespace) -> int:
    import anyio

    from gpumanager import logs
    from gpumanager.app import build_app
    from gpumanager.serve import local_url, raise_open_file_limit, serve_app, server_for
    from gpumanager.sockets import bind_socket

    config, _ = load_config(args)
    logs.setup(args.log_level, config.paths.log_file)
    host, port = args.host or config.server.host, args.port or config.server.port
    try:
        sock = bind_socket(host, port)
    except OSError as exc:
        print(f"gpumanager: error: cannot listen on {host}:{port}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    with sock:
        raise_open_file_limit(config.server.max_connections)
        app = build_app(config)
        server = server_for(app, max_connections=config.server.max_connections)
        url = local_url(host, sock.getsockname()[1])
        try:
            anyio.run(serve_app, server, sock, app.state.runtime, url, config.timing.shutdown_grace_seconds)
        except SystemExit as exc:  # uvicorn's answer to a start-up that failed (it logged why)
            return int(exc.code or 1)
    return 0


def _key_store(config: Config) -> KeyStore:
    """The keys the server reads: the cluster's Redis when one is configured, else the key file."""
    from gpumanager.config import redis_url
    from gpumanager.keys import KeyStore

    url = redis_url(config, os.environ)
    if not url:
        return KeyStore(config.paths.api_keys_file)
    from gpumanager.cluster import redis_key_store

    return redis_key_store(url, config.cluster.name)


def _keys(args: argparse.Namespace) -> int:
    from gpumanager.config import redis_url
    from gpumanager.errors import KeyStoreError
    from gpumanager.keys import KeyFileSource

    config, _ = load_config(args, required=False)
    if not redis_url(config, os.environ):
        raise GpuManagerError("no cluster: set [cluster] redis_url in the config, or $GPUMANAGER_REDIS_URL")
    source = KeyFileSource(args.file)
    if source.stamp() is None:
        raise KeyStoreError(f"{args.file}: no such file")
    incoming = source.read()
    store = _key_store(config)
    records = store.records()
    ids = {r.id for r in records}
    clash = [r.id for r in incoming if r.id in ids]
    if clash and not args.replace:
        raise KeyStoreError(f"{', '.join(clash)} already in {store.path}; give --replace to take the file's records")
    kept = [r for r in records if r.id not in {i.id for i in incoming}]
    store.replace_all([*kept, *incoming])
    print(f"imported {len(incoming)} keys from {args.file} into {store.path} ({len(kept) + len(incoming)} there now)")
    return 0


def _generate_key(args: argparse.Namespace) -> int:
    from gpumanager.keys import limits_from

    config, _ = load_config(args, required=False)
    limits = limits_from(_limit_changes(args))
    store = _key_store(config)
    record, key = store.generate(args.name, args.email, admin=args.admin, limits=limits)
    if args.quiet:
        print(key)
        return 0
    role = "admin key" if record.admin else "key"
    print(f"New {role} for {record.name} <{record.email}> (id {record.id}), stored in {store.path}:")
    print()
    print(f"    {key}")
    print()
    print("It is shown only this once. Clients send it as `Authorization: Bearer <key>` (OpenAI clients: api_key).")
    described = _describe_limits(record.limits, None)
    if described:
        print(f"Limits: {described}")
    return 0


def _set_limits(args: argparse.Namespace) -> int:
    config, _ = load_config(args, required=False)
    changes = _limit_changes(args)
    clear = [name.replace("-", "_") for name in args.clear]
    if not changes and not clear:
        raise GpuManagerError("nothing to change: give a limit (--dollars-per-day 5 ...) or --clear NAME")
    record = _key_store(config).set_limits(args.key_id, changes, clear)
    print(f"limits of key {record.id} ({record.name}): {_describe_limits(record.limits, None) or 'none'}")
    return 0


def _describe_limits(limits: Limits, used: _TodaysUse | None) -> str:
    """A key's limits in one cell, with its use today where `used` knows it."""
    parts = []
    if limits.tokens_per_day is not None:
        seen = f" (used {used.tokens:,})" if used else ""
        parts.append(f"{limits.tokens_per_day:,} tokens/day{seen}")
    if limits.dollars_per_day is not None:
        seen = f" (used ${used.dollars:,.2f})" if used else ""
        parts.append(f"${limits.dollars_per_day:,.2f}/day{seen}")
    if limits.dollars_per_month is not None:
        parts.append(f"${limits.dollars_per_month:,.2f}/month")
    if limits.requests_per_minute is not None:
        parts.append(f"{limits.requests_per_minute}/min")
    if limits.max_concurrent is not None:
        parts.append(f"{limits.max_concurrent} at once")
    if limits.models is not None:
        parts.append("models " + ",".join(limits.models))
    return "; ".join(parts)


def _list_keys(args: argparse.Namespace) -> int:
    config, _ = load_config(args, required=False)
    store = _key_store(config)
    records = store.records()
    if not records:
        print(f"no keys in {store.path}; make one with `gpumanager generate-key`")
        return 0
    today = _todays_use(config)
    rows = [("ID", "PREFIX", "NAME", "EMAIL", "ADMIN", "STATUS", "CREATED", "TODAY", "LIMITS")]
    for r in records:
        used = today.get(r.id, _TodaysUse(0, 0.0))
        rows.append(
            (
                r.id,
                r.prefix or "(plaintext)",
                r.name,
                r.email,
                "yes" if r.admin else "",
                "revoked" if r.revoked else "active",
                r.created,
                f"{used.tokens:,} tokens, ${used.dollars:,.2f}",
                _describe_limits(r.limits, used) or "-",
            )
        )
    _print_table(rows)
    return 0


class _TodaysUse(NamedTuple):
    tokens: int
    dollars: float


def _todays_use(config: Config) -> dict[str, _TodaysUse]:
    """Each key's tokens and GPU dollars so far today ([budget] timezone), from the ledger."""
    import time

    from gpumanager.budget import Calendar
    from gpumanager.ledger import reader
    from gpumanager.ledger.schema import LedgerError, database_path

    now = time.time()
    day = Calendar(config.budget.zone()).day(now)
    try:
        found = reader.usage(database_path(config), day.start, now, "key")
    except LedgerError:  # no ledger yet: nothing used
        return {}
    return {
        g.group: _TodaysUse(g.totals.prompt_tokens + g.totals.completion_tokens, g.totals.cost_micro / 1_000_000)
        for g in found.groups
    }


def _revoke_key(args: argparse.Namespace) -> int:
    config, _ = load_config(args, required=False)
    record = _key_store(config).revoke(args.key_id)
    print(f"revoked key {record.id} ({record.name} <{record.email}>)")
    return 0


def _init(args: argparse.Namespace) -> int:
    from gpumanager.init import Sources, default_config_arg, report, write

    path = config_path(args.config, os.environ)
    sources = Sources(
        ollama=args.ollama, surf=args.surf, ec2_tags=args.ec2_tags, runpod_endpoints=args.runpod_endpoints
    )
    written = write(path, sources, force=args.force)
    print(report(written, config_arg=default_config_arg(path, os.environ)))
    return 0


def _check_config(args: argparse.Namespace) -> int:
    from gpumanager.config import describe

    config, path = load_config(args)
    configured = {host.name for host in config.hosts}
    live = _live_models({host.name: host for host in config.hosts if host.url})
    rows = [("NAME", "PROVIDER", "URL", "SLOTS", "MODELS", "PROTECTED")]
    for row in describe(config):
        found = live.get(row["name"])
        if isinstance(found, list):
            models = ", ".join(found) or "(none pulled)"
        elif row["name"] in configured:
            models = (", ".join(row["models"]) or "none") + " (from config)"
        else:
            models = ", ".join(row["models"])
        rows.append(
            (
                row["name"],
                row["provider"],
                row["url"],
                str(row["slots"]),
                models,
                "yes" if row["protected"] else "",
            )
        )
    print(f"{path}: ok")
    _print_table(rows)
    if live:
        failed = {name: why for name, why in live.items() if isinstance(why, str)}
        print()
        print("MODELS of static hosts: what their /api/tags (OpenAI-only hosts: /v1/models) lists now.")
        if failed:
            print("(from config): the host did not answer, so the config's `models` are shown:")
        for name, why in failed.items():
            print(f"  {name}: {why}")
    return 0


def _live_models(hosts: dict[str, HostConfig], timeout: float = PROBE_SECONDS) -> dict[str, list[str] | str]:
    """GET `{url}/api/tags` of every static host at once (`/v1/models` of an OpenAI-only one): its
    model names, or why it gave none."""
    import anyio
    import httpx

    from gpumanager.init import UPSTREAM_TOKEN

    results: dict[str, list[str] | str] = {}

    async def probe(client: httpx.AsyncClient, name: str, host: HostConfig) -> None:
        openai = host.api == "openai"
        url = (host.url or "").rstrip("/").removesuffix("/v1") if openai else (host.url or "").rstrip("/")
        where = f"{url}/v1/models" if openai else f"{url}/api/tags"
        variable = host.api_key_env or UPSTREAM_TOKEN
        token = os.environ.get(variable, "")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        try:
            with anyio.fail_after(timeout):
                response = await client.get(where, headers=headers)
        except (TimeoutError, httpx.TimeoutException):
            results[name] = f"{where}: no answer within {timeout:g} s"
            return
        except Exception as exc:  # a refused connection, a bad address: a diagnosis, never a crash
            cause: BaseException = exc
            while isinstance(cause, BaseExceptionGroup) and len(cause.exceptions) == 1:
                cause = cause.exceptions[0]
            results[name] = f"{where}: not reachable ({str(cause) or type(cause).__name__})"
            return
        if response.status_code != 200:
            hint = f" (check {variable})" if response.status_code in (401, 403) else ""
            results[name] = f"{where}: HTTP {response.status_code}{hint}"
            return
        try:
            if openai:
                results[name] = [str(model["id"]) for model in response.json()["data"]]
            else:
                results[name] = [str(model["name"]) for model in response.json()["models"]]
        except (ValueError, KeyError, TypeError):
            results[name] = f"{where}: not an {'OpenAI' if openai else 'Ollama'} answer"

    async def probe_all() -> None:
        async with (
            httpx.AsyncClient(timeout=timeout, trust_env=False) as client,
            anyio.create_task_group() as tg,
        ):
            for name, host in hosts.items():
                tg.start_soon(probe, client, name, host)

    if hosts:
        anyio.run(probe_all)
    return {name: results[name] for name in hosts}


def _hosts(args: argparse.Namespace) -> int:
    import httpx

    url, key = _server_and_key(args, "hosts")
    try:
        response = httpx.get(url + "/gpu/discover", headers={"Authorization": f"Bearer {key}"}, timeout=10)
    except httpx.HTTPError as exc:
        print(f"gpumanager: error: cannot reach {url}: {exc}", file=sys.stderr)
        return 2
    if response.status_code != 200:
        print(f"gpumanager: error: {url} answered {response.status_code}: {response.text}", file=sys.stderr)
        return 2
    rows = [("NAME", "STATE", "PROVIDER", "LEASES", "IDLE LEFT", "MODELS")]
    for gpu in response.json()["gpus"]:
        idle = gpu.get("idle_seconds_left")
        rows.append(
            (
                gpu["name"],
                gpu["status"] + ("" if gpu.get("healthy", True) else " (not answering)"),
                gpu.get("provider", ""),
                f"{gpu.get('leases', 0)}/{gpu.get('slots', '?')}",
                "" if idle is None else f"{idle:.0f}s",
                ", ".join(gpu.get("models", [])),
            )
        )
    _print_table(rows)
    return 0


def _events(args: argparse.Namespace) -> int:
    import httpx

    url, key = _server_and_key(args, "events")
    params = {"follow": "true" if args.follow else "false"}
    if args.type:
        params["type"] = ",".join(args.type)
    headers = {"Authorization": f"Bearer {key}", "Accept": "text/event-stream"}
    timeout = httpx.Timeout(10, read=None)  # a followed stream may be quiet for long
    try:
        with httpx.stream("GET", url + "/events", params=params, headers=headers, timeout=timeout) as response:
            if response.status_code != 200:
                response.read()
                print(f"gpumanager: error: {url} answered {response.status_code}: {response.text}", file=sys.stderr)
                return 2
            kind = ""
            for line in response.iter_lines():
                if line.startswith("event: "):
                    kind = line.removeprefix("event: ")
                elif line.startswith("data: "):
                    print(_event_line(kind, line.removeprefix("data: "), as_json=args.json), flush=True)
    except httpx.HTTPError as exc:
        print(f"gpumanager: error: cannot reach {url}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0
    return 0


def _event_line(kind: str, data: str, *, as_json: bool) -> str:
    """One event of the stream as `gpumanager events` prints it."""
    import datetime as dt

    import msgspec

    from gpumanager.events import AnyEvent, describe

    if as_json:
        return data
    stamp = dt.datetime.now().strftime("%H:%M:%S")
    if kind == "lost":
        return f"{stamp} {kind:<13} {msgspec.json.decode(data)['lost']} events not received (this reader fell behind)"
    return f"{stamp} {kind:<13} {describe(msgspec.json.decode(data, type=AnyEvent))}"


def _server_and_key(args: argparse.Namespace, command: str) -> tuple[str, str]:
    """The running server's URL (`--url`, else the config's [server]) and the admin key to call it
    with (`--key`, else $GPUMANAGER_API_KEY)."""
    config, _ = load_config(args, required=False)
    url = (args.url or _local_url(config)).rstrip("/")
    key = args.key or os.environ.get("GPUMANAGER_API_KEY")
    if not key:
        raise ConfigError(command, "--key", "an admin key is needed: pass --key or set GPUMANAGER_API_KEY")
    return url, key


def _local_url(config: Config) -> str:
    from gpumanager.serve import local_url

    return local_url(config.server.host, config.server.port)


def _demo(args: argparse.Namespace) -> int:
    from gpumanager.demo import run_demo

    return run_demo(args)


def _when(text: str) -> float:
    import time

    from gpumanager.ledger.report import parse_when

    try:
        return parse_when(text, time.time())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _usage(args: argparse.Namespace) -> int:
    from gpumanager.errors import KeyStoreError
    from gpumanager.keys import KeyStore
    from gpumanager.ledger import reader, report
    from gpumanager.ledger.schema import database_path

    config, _ = load_config(args, required=False)
    if args.since >= args.until:
        print("gpumanager: error: --since must be before --until", file=sys.stderr)
        return 2
    try:
        names = {r.id: r.name for r in KeyStore(config.paths.api_keys_file).records()}
    except KeyStoreError as exc:  # names are a courtesy: the ledger is still worth reading
        print(f"gpumanager: warning: key names not shown: {exc}", file=sys.stderr)
        names = {}
    key = args.key
    if key is not None and key not in names:
        by_name = [key_id for key_id, name in names.items() if name == key]
        key = by_name[0] if len(by_name) == 1 else key
    path = database_path(config)
    prices = report.host_prices(config, reader.hosts(path, args.since, args.until))
    result = reader.usage(path, args.since, args.until, args.by, key, prices=prices).with_names(names)
    render = {"table": report.render_table, "csv": report.render_csv, "json": report.render_json}[args.format]
    print(render(result))
    return 0


def _simulate(args: argparse.Namespace) -> int:
    import msgspec

    from gpumanager import simulate
    from gpumanager.ledger.schema import database_path

    config, _ = load_config(args, required=False)
    if args.trace:
        requests = simulate.read_trace(args.trace)
        hosts = [] if args.hosts else simulate.config_hosts(config)
    else:
        if args.since >= args.until:
            raise GpuManagerError("--since must be before --until")
        path = database_path(config)
        requests = simulate.ledger_requests(path, args.since, args.until)
        if not requests:
            raise GpuManagerError("no answered requests in the ledger for that period (try --since 30d, or --trace)")
        hosts = [] if args.hosts else simulate.ledger_hosts(config, path, args.since, args.until)
    if not hosts:
        count = args.hosts or 1
        cold = args.cold_start if args.cold_start is not None else config.timing.startup_timeout_seconds / 4
        slots = args.slots or config.scheduler.default_slots
        hosts = [
            simulate.HostSpec(name=f"gpu-{i + 1}", slots=slots, price=args.price, cold_start=cold) for i in range(count)
        ]
    chosen = simulate.settings(args.reservation_minutes, args.scale_up, config)
    report = simulate.simulate(requests, hosts, chosen, period=None if args.trace else (args.since, args.until))
    print(msgspec.json.encode(report).decode() if args.format == "json" else simulate.table(report))
    return 0


def _print_table(rows: Sequence[tuple[str, ...]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


_HANDLERS: dict[str, Callable[[argparse.Namespace], int]] = {
    "server": _server,
    "demo": _demo,
    "init": _init,
    "generate-key": _generate_key,
    "list-keys": _list_keys,
    "set-limits": _set_limits,
    "revoke-key": _revoke_key,
    "check-config": _check_config,
    "hosts": _hosts,
    "usage": _usage,
    "simulate": _simulate,
    "events": _events,
    "keys": _keys,
}

if __name__ == "__main__":
    raise SystemExit(main())
