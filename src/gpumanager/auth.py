"""Plain ASGI authentication: `Authorization: Bearer <key>`, a bare `Authorization: <key>` (as RunPod's
job API takes it), or `X-API-Key: <key>`.

A known key puts its `Identity` in `scope["auth"]`; anything else is answered 401 in the route's
dialect before any routing happens. The key itself goes no further than this module, and never
into the log: a refused request is logged with the client's address, the route and the reason
(a missing key, an unknown one, a revoked one), at most a few lines per address per minute.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

from loguru import logger

from gpumanager.errors import Forbidden, KeyStoreError, Unauthorized
from gpumanager.keys import Identity, KeyStore, hash_key
from gpumanager.logs import clean
from gpumanager.proxy.dialects import dialect_for, error_body, error_headers
from gpumanager.sessions import CROSS_ORIGIN, Sessions, cookie_value, same_origin

Scope = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Any, Any], Awaitable[None]]

PUBLIC_PATHS = frozenset({"/health", "/", "/dashboard"})
# The dashboard's page, its files and its login and logout, which check what they need themselves.
PUBLIC_PREFIXES = ("/dashboard/static/", "/dashboard/login", "/dashboard/logout")
# Where a dashboard session (its cookie) stands in for a key: the page's own API, and the admin
# routes, the event stream and the usage the page calls. Never the model routes.
SESSION_PREFIXES = ("/dashboard/api/", "/gpu/", "/events", "/usage")
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def key_from_headers(headers: list[tuple[bytes, bytes]]) -> str | None:
    for name, value in headers:
        if name == b"authorization":
            scheme, space, token = value.decode("latin-1").strip().partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
            if scheme and not space:  # a bare key, as RunPod's docs show for its job API
                return scheme
        elif name == b"x-api-key" and value:
            return value.decode("latin-1").strip()
    return None


@dataclass(slots=True)
class _Window:
    start: float
    refused: int = 1
    unlogged: int = 0


class FailedLogins:
    """Which refused logins to log: the first `per_window` of each client address in a window of
    `window` seconds that starts at its first refusal; the rest are counted, and that count is
    reported once the window has ended, at the address's next request (refused or not).

    At most `max_addresses` addresses are tracked; past that the oldest window is forgotten, and
    with it any count it had not reported yet.
    """

    def __init__(
        self,
        *,
        per_window: int = 5,
        window: float = 60.0,
        max_addresses: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.per_window, self.window, self.max_addresses, self.clock = per_window, window, max_addresses, clock
        self._windows: dict[str, _Window] = {}  # oldest window first

    def __len__(self) -> int:
        return len(self._windows)

    def refused(self, address: str) -> tuple[bool, int]:
        """Count a refusal: (log it?, refusals left unlogged by the address's window that has just ended)."""
        now = self.clock()
        window = self._windows.get(address)
        if window is not None and now - window.start < self.window:
            window.refused += 1
            if window.refused <= self.per_window:
                return True, 0
            window.unlogged += 1
            return False, 0
        ended = 0
        if window is not None:
            ended = window.unlogged
            del self._windows[address]
        elif len(self._windows) >= self.max_addresses:
            del self._windows[next(iter(self._windows))]
        self._windows[address] = _Window(now)
        return self.per_window > 0, ended

    def allowed(self, address: str) -> int:
        """A request from `address` got in: the refusals its ended window left unlogged (0 if none)."""
        window = self._windows.get(address)
        if window is None or self.clock() - window.start < self.window:
            return 0
        del self._windows[address]
        return window.unlogged


def _client_address(scope: Scope) -> str:
    client = scope.get("client")
    return clean(str(client[0]), 64) if client else "unknown address"


class AuthMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        keys: KeyStore,
        public: frozenset[str] = PUBLIC_PATHS,
        *,
        sessions: Sessions | None = None,
        public_url: str = "",
        clock: Callable[[], float] = time.monotonic,
        failures: FailedLogins | None = None,
    ) -> None:
        self.app, self.keys, self.public = app, keys, public
        self.sessions, self.public_url = sessions, public_url
        self.failures = FailedLogins(clock=clock) if failures is None else failures

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or path in self.public or path.startswith(PUBLIC_PREFIXES):
            await self.app(scope, receive, send)
            return
        key = key_from_headers(scope["headers"])
        if key is None and self.sessions is not None and path.startswith(SESSION_PREFIXES):
            cookie = cookie_value(scope["headers"])
            if cookie is not None:
                await self._with_session(scope, receive, send, self.sessions, cookie)
                return
        identity = self.keys.authenticate(key) if key else None
        if identity is None:
            self._log_refusal(scope, key)
            message = "invalid API key" if key else "missing API key: send `Authorization: Bearer <key>`"
            await deny(send, scope["path"], Unauthorized(message))
            return
        if self.failures:
            address = _client_address(scope)
            self._log_suppressed(address, self.failures.allowed(address))
        scope["auth"] = identity
        await self.app(scope, receive, send)

    async def _with_session(self, scope: Scope, receive: Any, send: Any, sessions: Sessions, cookie: str) -> None:
        """A dashboard's request: its session stands in for the key. A state-changing request must
        come from the dashboard's own origin; a stream ends once the session does (`still_valid`)."""
        identity = sessions.identity(cookie)
        if identity is None:
            await deny(send, scope["path"], Unauthorized("the dashboard session has ended: log in again"))
            return
        if scope.get("method") not in SAFE_METHODS and not same_origin(scope, self.public_url):
            logger.warning(
                "403 cross-origin {} {} refused (key {})", clean(scope["method"], 16), clean(scope["path"]), identity.id
            )
            await deny(send, scope["path"], Forbidden(CROSS_ORIGIN))
            return
        scope["auth"] = identity
        scope["still_valid"] = lambda: sessions.identity(cookie) == identity  # not revoked, not demoted
        await self.app(scope, receive, send)

    def _log_refusal(self, scope: Scope, key: str | None) -> None:
        address = _client_address(scope)
        log, ended = self.failures.refused(address)
        self._log_suppressed(address, ended)
        if log:
            logger.warning(
                "401 {} from {} on {} {}",
                _reason(self.keys, key),
                address,
                clean(str(scope.get("method", "")), 16),
                clean(scope["path"]),
            )

    def _log_suppressed(self, address: str, count: int) -> None:
        if count:
            logger.warning(
                "401 from {}: {} more refused request{} not logged (at most {} per {:g} s per address)",
                address,
                count,
                "" if count == 1 else "s",
                self.failures.per_window,
                self.failures.window,
            )


def _reason(keys: KeyStore, key: str | None) -> str:
    """Why `key` was refused, in words that reveal nothing of the key."""
    if not key:
        return "missing API key"
    digest = hash_key(key)
    try:
        records = keys.records()
    except KeyStoreError:
        return "unknown or revoked API key"
    for record in records:
        if not record.revoked:
            continue
        stored = hash_key(record.key) if record.key else record.key_hash.removeprefix("sha256:")
        if hmac.compare_digest(stored.encode(), digest.encode()):
            return f"revoked API key (id {clean(record.id, 32)})"
    return "unknown API key"


async def deny(send: Any, path: str, exc: Unauthorized | Forbidden) -> None:
    await send({"type": "http.response.start", "status": exc.status, "headers": error_headers(exc)})
    await send({"type": "http.response.body", "body": error_body(dialect_for(path), exc)})


def require_admin(scope: Scope) -> Identity:
    """The caller's identity, if it holds an admin key; else `Forbidden`."""
    identity: Identity | None = scope.get("auth")
    if identity is None or not identity.admin:
        raise Forbidden("this route needs an admin key")
    return identity
