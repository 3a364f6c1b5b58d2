"""Plain ASGI authentication: `Authorization: Bearer <key>` or `X-API-Key: <key>`.

A known key puts its `Identity` in `scope["auth"]`; anything else is answered 401 in the route's
dialect before any routing happens. The key itself goes no further than this module.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from gpumanager.errors import Forbidden, Unauthorized
from gpumanager.keys import Identity, KeyStore
from gpumanager.proxy.dialects import dialect_for, error_body, error_headers

Scope = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Any, Any], Awaitable[None]]

PUBLIC_PATHS = frozenset({"/health", "/"})


def key_from_headers(headers: list[tuple[bytes, bytes]]) -> str | None:
    for name, value in headers:
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
        elif name == b"x-api-key" and value:
            return value.decode("latin-1").strip()
    return None


class AuthMiddleware:
    def __init__(self, app: ASGIApp, keys: KeyStore, public: frozenset[str] = PUBLIC_PATHS) -> None:
        self.app, self.keys, self.public = app, keys, public

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] in self.public:
            await self.app(scope, receive, send)
            return
        key = key_from_headers(scope["headers"])
        identity = self.keys.authenticate(key) if key else None
        if identity is None:
            message = "invalid API key" if key else "missing API key: send `Authorization: Bearer <key>`"
            await deny(send, scope["path"], Unauthorized(message))
            return
        scope["auth"] = identity
        await self.app(scope, receive, send)


async def deny(send: Any, path: str, exc: Unauthorized | Forbidden) -> None:
    await send({"type": "http.response.start", "status": exc.status, "headers": error_headers(exc)})
    await send({"type": "http.response.body", "body": error_body(dialect_for(path), exc)})


def require_admin(scope: Scope) -> Identity:
    """The caller's identity, if it holds an admin key; else `Forbidden`."""
    identity: Identity | None = scope.get("auth")
    if identity is None or not identity.admin:
        raise Forbidden("this route needs an admin key")
    return identity
