"""The listening socket that gpumanager and its simulator bind before uvicorn serves on it."""

from __future__ import annotations

import socket


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (`port=0` lets the kernel choose), or `OSError` (the port
    is busy, or the address is not this machine's).

    `proto` must be IPPROTO_TCP, not the default 0: asyncio only sets TCP_NODELAY on accepted
    sockets whose proto says TCP, and without it every keep-alive answer written as headers + body
    stalls ~40 ms on Nagle and delayed ACKs.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock
