"""Run the simulator (or any ASGI app) on loopback inside the current event loop.

Tests start and stop dozens of servers per process, from several event loops and
from portal threads, so this never calls ``uvicorn.Server.serve()``: that installs
signal handlers, which only work in the main thread and would steal Ctrl-C from
the test runner. Instead it drives uvicorn's startup/main_loop/shutdown steps
itself on a socket it bound, which also makes ``port=0`` report the real port.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import uvicorn

from gpumanager.sockets import bind_socket


def port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def free_port_on(hosts: Iterable[str]) -> int:
    """A TCP port free on every one of `hosts` (loopback addresses standing for machines that all
    serve Ollama on one port, as GPU hosts do on 11434)."""
    hosts = list(hosts)
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind(("127.0.0.1", 0))
            port: int = probe.getsockname()[1]
        if all(port_is_free(host, port) for host in hosts):
            return port
    raise OSError(f"no TCP port is free on all of {', '.join(hosts)}")


class SimServer:
    """A uvicorn server running in the current loop; ``kill()`` simulates a crashed host."""

    def __init__(self, server: uvicorn.Server, host: str, port: int) -> None:
        self.server = server
        self._host = host
        self._port = port

    @property
    def host(self) -> str:
        return self._host

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"http://{host}:{self._port}"

    async def stop(self) -> None:
        """Graceful stop: refuse new connections, let running responses finish."""
        self.server.should_exit = True
        if self.server.started:
            self.server.started = False
            await self.server.shutdown()

    def kill(self) -> None:
        """Stop listening and reset every open connection at once, like a host losing power."""
        for listener in getattr(self.server, "servers", []):
            listener.close()
        for connection in list(self.server.server_state.connections):
            transport = getattr(connection, "transport", None)
            if transport is not None:
                transport.abort()


@asynccontextmanager
async def running_server(
    app: Any, *, host: str = "127.0.0.1", port: int = 0, **uvicorn_kwargs: Any
) -> AsyncIterator[SimServer]:
    """Serve ``app`` on ``host:port`` (0 picks a free port) until the block exits.

    ``uvicorn_kwargs`` override the quiet defaults: httptools, no lifespan, no access
    log, warnings only, ``log_config=None`` so the host program's logging setup is
    left alone, and a bounded graceful shutdown so a forgotten stream cannot hang a test.
    """
    options: dict[str, Any] = {
        "log_level": "warning",
        "lifespan": "off",
        "access_log": False,
        "http": "httptools",
        "log_config": None,
        "timeout_graceful_shutdown": 5,
        **uvicorn_kwargs,
    }
    sock = bind_socket(host, port)
    try:
        config = uvicorn.Config(app, host=host, port=sock.getsockname()[1], **options)
        config.load()
        server = uvicorn.Server(config)
        server.lifespan = config.lifespan_class(config)
        await server.startup(sockets=[sock])
        handle = SimServer(server, host, sock.getsockname()[1])
        error: Exception | None = None
        async with anyio.create_task_group() as tg:
            tg.start_soon(server.main_loop)  # refreshes the Date header once a second
            try:
                yield handle
            except Exception as exc:  # re-raised below, so callers see it outside an ExceptionGroup
                error = exc
            finally:
                with anyio.CancelScope(shield=True):
                    await handle.stop()
                tg.cancel_scope.cancel()
        if error is not None:
            raise error
    finally:
        sock.close()
