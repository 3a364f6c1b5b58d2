"""Running the server in the foreground: bind, start, say ready, and shut down gracefully.

The caller binds the socket first (`sockets.bind_socket`), so a busy port is one clear line and exit 1.
"Ready" is said once uvicorn listens. Signals are gpumanager's own (uvicorn's handler would close
the listeners first, and nobody could be told anything): on SIGTERM or SIGINT it keeps listening,
`/health` says draining and new requests get 503 with `Retry-After`; open streams get
`shutdown_grace_seconds` to finish, and any still open then end with an in-band error; then uvicorn
is told to exit. A second signal exits at once.
"""

from __future__ import annotations

import contextlib
import resource
import signal
import socket
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import anyio
import uvicorn
from loguru import logger
from starlette.applications import Starlette

from gpumanager.runtime import Runtime

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class _Server(uvicorn.Server):
    """uvicorn without its own signal handlers: `serve_app` handles the signals."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def raise_open_file_limit(max_connections: int) -> None:
    """Lift the soft limit of open files to the hard one; warn when it is still below twice
    `max_connections` (each stream holds two descriptors: the client's and the host's)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    if soft != resource.RLIM_INFINITY and soft < 2 * max_connections:
        logger.warning(
            "the open-file limit is {} but max_connections = {} needs {} (two per stream); "
            "raise it (`ulimit -n`, LimitNOFILE=) or lower [server] max_connections",
            soft,
            max_connections,
            2 * max_connections,
        )


def server_for(app: Starlette, *, max_connections: int) -> uvicorn.Server:
    config = uvicorn.Config(
        app,
        log_config=None,
        access_log=False,
        server_header=False,
        lifespan="on",
        limit_concurrency=max_connections,  # past it, uvicorn answers new requests 503 itself
        timeout_keep_alive=75,
        timeout_graceful_shutdown=2,  # streams were drained before uvicorn is told to exit
    )
    return _Server(config)


async def serve_app(
    server: uvicorn.Server,
    sock: socket.socket,
    runtime: Runtime,
    url: str,
    grace: float,
    *,
    when_ready: Callable[[], Coroutine[Any, Any, None]] | None = None,
) -> None:
    """Serve until a signal (or `server.should_exit`), draining open streams first. `when_ready`
    runs once the server listens, and is cancelled when it stops (the demo's narration)."""
    async with anyio.create_task_group() as tg:

        async def run_server() -> None:
            await server.serve(sockets=[sock])
            tg.cancel_scope.cancel()

        tg.start_soon(run_server)
        with anyio.fail_after(600):  # discovery and first probes are bounded well below this
            while not server.started:  # noqa: ASYNC110 - uvicorn tells it by this flag alone
                await anyio.sleep(0.02)
        hosts = len(runtime.fleet.hosts)
        logger.info(
            "gpumanager is ready on {}: {} host{}, models: {}",
            url,
            hosts,
            "" if hosts == 1 else "s",
            ", ".join(runtime.fleet.models()) or "none yet",
        )
        if when_ready is not None:
            tg.start_soon(when_ready)
        with anyio.open_signal_receiver(*SIGNALS) as signals:
            async for signum in signals:
                name = signal.Signals(signum).name
                if runtime.draining:  # the second signal: no more grace
                    logger.warning("second {}: ending open streams and exiting now", name)
                    await runtime.drain(0)
                    server.should_exit = True
                    continue
                logger.info("{}: draining (new requests get 503), open streams have {:g}s to finish", name, grace)
                tg.start_soon(_drain_then_exit, server, runtime, grace)


async def _drain_then_exit(server: uvicorn.Server, runtime: Runtime, grace: float) -> None:
    await runtime.drain(grace)
    server.should_exit = True


def local_url(host: str, port: int) -> str:
    shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    return f"http://[{shown}]:{port}" if ":" in shown else f"http://{shown}:{port}"
