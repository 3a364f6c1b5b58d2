"""The `gpumanager` command: server (the default), demo, generate-key, list-keys, revoke-key,
check-config, hosts. Every subcommand takes `--config PATH` after its name; `GPUMANAGER_CONFIG`
works for all. The `.env` beside the config is loaded into the environment at start (never
overriding what is already set): the only place that writes the environment.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from dotenv import load_dotenv

from gpumanager import __version__
from gpumanager.config import CONFIG_ENV, Config, config_path, load
from gpumanager.errors import ConfigError, GpuManagerError

COMMANDS = ("server", "demo", "generate-key", "list-keys", "revoke-key", "check-config", "hosts")


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

    lst = sub.add_parser("list-keys", help="list API keys (never the keys or their hashes)")
    _config_arg(lst)

    rev = sub.add_parser(
        "revoke-key",
        help="revoke an API key by id or prefix",
        description="Revoke a key; a running server stops accepting it within a second.",
    )
    _config_arg(rev)
    rev.add_argument("key_id", metavar="ID_OR_PREFIX", help="the key's id, or the start of the key (gm_...)")

    chk = sub.add_parser("check-config", help="validate the config and print the hosts it would manage")
    _config_arg(chk)

    hosts = sub.add_parser("hosts", help="print the fleet of a running server (needs an admin key)")
    _config_arg(hosts)
    hosts.add_argument("--url", help="the server's URL (default: from [server] of the config)")
    hosts.add_argument("--key", help="admin key (default: $GPUMANAGER_API_KEY)")
    return parser


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
    import uvicorn

    from gpumanager import logs
    from gpumanager.app import build_app

    config, _ = load_config(args)
    logs.setup(args.log_level, config.paths.log_file)
    app = build_app(config)
    uv = uvicorn.Config(
        app,
        host=args.host or config.server.host,
        port=args.port or config.server.port,
        log_config=None,
        access_log=False,
        server_header=False,
        lifespan="on",
        # uvicorn waits this long for open streams (it takes fractions too).
        timeout_graceful_shutdown=config.timing.shutdown_grace_seconds,  # type: ignore[arg-type]
        timeout_keep_alive=75,
    )
    uvicorn.Server(uv).run()
    return 0


def _generate_key(args: argparse.Namespace) -> int:
    from gpumanager.keys import KeyStore

    config, _ = load_config(args, required=False)
    record, key = KeyStore(config.paths.api_keys_file).generate(args.name, args.email, admin=args.admin)
    if args.quiet:
        print(key)
        return 0
    role = "admin key" if record.admin else "key"
    print(f"New {role} for {record.name} <{record.email}> (id {record.id}), stored in {config.paths.api_keys_file}:")
    print()
    print(f"    {key}")
    print()
    print("It is shown only this once. Clients send it as `Authorization: Bearer <key>` (OpenAI clients: api_key).")
    return 0


def _list_keys(args: argparse.Namespace) -> int:
    from gpumanager.keys import KeyStore

    config, _ = load_config(args, required=False)
    records = KeyStore(config.paths.api_keys_file).records()
    if not records:
        print(f"no keys in {config.paths.api_keys_file}; make one with `gpumanager generate-key`")
        return 0
    rows = [("ID", "PREFIX", "NAME", "EMAIL", "ADMIN", "STATUS", "CREATED")]
    for r in records:
        rows.append(
            (
                r.id,
                r.prefix or "(plaintext)",
                r.name,
                r.email,
                "yes" if r.admin else "",
                "revoked" if r.revoked else "active",
                r.created,
            )
        )
    _print_table(rows)
    return 0


def _revoke_key(args: argparse.Namespace) -> int:
    from gpumanager.keys import KeyStore

    config, _ = load_config(args, required=False)
    record = KeyStore(config.paths.api_keys_file).revoke(args.key_id)
    print(f"revoked key {record.id} ({record.name} <{record.email}>)")
    return 0


def _check_config(args: argparse.Namespace) -> int:
    from gpumanager.config import describe

    config, path = load_config(args)
    rows = [("NAME", "PROVIDER", "URL", "SLOTS", "MODELS", "PROTECTED")]
    for row in describe(config):
        rows.append(
            (
                row["name"],
                row["provider"],
                row["url"],
                str(row["slots"]),
                ", ".join(row["models"]),
                "yes" if row["protected"] else "",
            )
        )
    print(f"{path}: ok")
    _print_table(rows)
    return 0


def _hosts(args: argparse.Namespace) -> int:
    import httpx

    config, _ = load_config(args, required=False)
    url = (args.url or _local_url(config)).rstrip("/")
    key = args.key or os.environ.get("GPUMANAGER_API_KEY")
    if not key:
        raise ConfigError("hosts", "--key", "an admin key is needed: pass --key or set GPUMANAGER_API_KEY")
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


def _local_url(config: Config) -> str:
    host = config.server.host
    return f"http://{'127.0.0.1' if host in ('0.0.0.0', '::', '') else host}:{config.server.port}"


def _demo(args: argparse.Namespace) -> int:
    from gpumanager.demo import run_demo

    return run_demo(args)


def _print_table(rows: Sequence[tuple[str, ...]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


_HANDLERS: dict[str, Callable[[argparse.Namespace], int]] = {
    "server": _server,
    "demo": _demo,
    "generate-key": _generate_key,
    "list-keys": _list_keys,
    "revoke-key": _revoke_key,
    "check-config": _check_config,
    "hosts": _hosts,
}

if __name__ == "__main__":
    raise SystemExit(main())
