"""Dashboard sessions: a key, once, turned into a signed cookie that holds only the key's id.

The cookie is `<payload>.<signature>`: the payload is base64url JSON `{"k": key id, "e": expiry,
"n": nonce}`, signed with HMAC-SHA256 under the session secret (`GPUMANAGER_SESSION_SECRET`, else
a random one generated once into `state_dir/session_secret`, mode 0600), so sessions survive a
restart of gpumanager and a page reconnects on its own. A session ends:

- after `LIFETIME` (12 h) from its login;
- at logout (its nonce is remembered as ended until it would have expired anyway);
- at once when its key is revoked: every request looks the key id up in the key store again.

The key itself is never in the cookie, in JavaScript or in browser storage. A one-time login link
(`gpumanager demo` prints one) is a random token good for one login within `LINK_SECONDS`.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import os
import secrets
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import msgspec
from loguru import logger

from gpumanager.errors import ConfigError, Forbidden
from gpumanager.keys import Identity, KeyStore

COOKIE = "gm_session"
LIFETIME = 12 * 3600.0
LINK_SECONDS = 600.0
SECRET_ENV = "GPUMANAGER_SESSION_SECRET"
SECRET_FILE = "session_secret"
ENDED_FILE = "sessions_ended.json"  # logged-out sessions (their nonces) until they would have expired
MIN_SECRET = 32


class _Payload(msgspec.Struct, frozen=True):
    k: str  # the key's id
    e: float  # expiry (Unix seconds)
    n: str  # nonce: what a logout ends


_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(_Payload).decode
_ended_encode = msgspec.json.Encoder().encode
_ended_decode = msgspec.json.Decoder(dict[str, float]).decode


def load_secret(environ: Mapping[str, str], state_dir: str | Path) -> bytes:
    """The session secret: `GPUMANAGER_SESSION_SECRET`, else `state_dir/session_secret`, made once
    (random, mode 0600) when missing. A file too short to be one (an interrupted write) is made
    again: a weak secret would let anyone sign a session."""
    given = environ.get(SECRET_ENV, "")
    if given:
        if len(given) < 16:
            raise ConfigError("", SECRET_ENV, "is too short: use at least 16 characters (openssl rand -hex 32)")
        return given.encode()
    path = Path(state_dir) / SECRET_FILE
    for _ in range(3):
        try:
            secret = path.read_bytes().strip()
        except FileNotFoundError:
            secret = b""
        if len(secret) >= MIN_SECRET:
            return secret
        _write_private(path, secrets.token_hex(32).encode() + b"\n", replace=path.exists())
    raise ConfigError(str(path), "", "cannot make the dashboard's session secret")


def _write_private(path: Path, data: bytes, *, replace: bool) -> None:
    """Write `data` to `path` (mode 0600) whole or not at all: into a new file beside it, then moved
    in place (`replace`) or linked (not over a file another process made meanwhile)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        if replace:
            os.replace(temporary, path)
        else:
            with contextlib.suppress(FileExistsError):
                os.link(temporary, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)


class Sessions:
    def __init__(
        self,
        secret: bytes,
        keys: KeyStore,
        *,
        state_dir: str | Path | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._secret = hashlib.sha256(b"gpumanager dashboard session\0" + secret).digest()
        self.keys, self.clock = keys, clock
        # Logged-out sessions' nonces -> their expiry; kept in `state_dir` too, since the secret
        # (and so the cookie) outlives a restart.
        self._ended_path = Path(state_dir) / ENDED_FILE if state_dir is not None else None
        self._ended: dict[str, float] = self._load_ended()
        self._links: dict[str, tuple[str, float]] = {}  # one-time token -> (key id, expiry)
        # Told of each logout (nonce, expiry): several replicas end the session on all of them.
        self.on_end: Callable[[str, float], None] | None = None

    def issue(self, key_id: str) -> str:
        """A new session's cookie value for the key with this id."""
        payload = _encode(_Payload(key_id, self.clock() + LIFETIME, secrets.token_urlsafe(12)))
        body = base64.urlsafe_b64encode(payload).rstrip(b"=")
        return (body + b"." + self._sign(body)).decode()

    def identity(self, cookie: str) -> Identity | None:
        """Who the session of this cookie is, or None: forged, expired, logged out, or its key revoked."""
        payload = self._open(cookie)
        if payload is None:
            return None
        return self.keys.identity(payload.k)

    def end(self, cookie: str) -> None:
        """Log out: the session ends here, whatever copies of the cookie exist."""
        payload = self._open(cookie)
        if payload is not None:
            self.ended(payload.n, payload.e)
            if self.on_end is not None:
                self.on_end(payload.n, payload.e)

    def ended(self, nonce: str, expiry: float) -> None:
        """The session with this nonce ended (here, or through another replica)."""
        if nonce in self._ended:
            return
        now = self.clock()
        self._ended = {n: e for n, e in self._ended.items() if e > now}
        self._ended[nonce] = expiry
        if self._ended_path is not None:
            try:
                _write_private(self._ended_path, _ended_encode(self._ended), replace=True)
            except OSError as exc:
                logger.error("cannot keep the ended session in {}: {} (it ends until a restart)", self._ended_path, exc)

    def _load_ended(self) -> dict[str, float]:
        if self._ended_path is None:
            return {}
        try:
            ended = _ended_decode(self._ended_path.read_bytes())
        except FileNotFoundError:
            return {}
        except (OSError, msgspec.DecodeError, msgspec.ValidationError) as exc:
            logger.error("cannot read the ended sessions in {}: {}", self._ended_path, exc)
            return {}
        now = self.clock()
        return {n: e for n, e in ended.items() if e > now}

    def link(self, key_id: str) -> str:
        """A one-time login token for the key with this id, good for `LINK_SECONDS`."""
        now = self.clock()
        self._links = {t: v for t, v in self._links.items() if v[1] > now}
        token = secrets.token_urlsafe(24)
        self._links[token] = (key_id, now + LINK_SECONDS)
        return token

    def redeem(self, token: str) -> str | None:
        """The key id of a one-time token, which is spent by this; None when unknown or expired."""
        found = self._links.pop(token, None)
        if found is None or found[1] <= self.clock():
            return None
        return found[0]

    def _sign(self, body: bytes) -> bytes:
        mac = hmac.new(self._secret, body, hashlib.sha256).digest()
        return base64.urlsafe_b64encode(mac).rstrip(b"=")

    def _open(self, cookie: str) -> _Payload | None:
        body, _, signature = cookie.encode("latin-1", "replace").partition(b".")
        if not body or not hmac.compare_digest(self._sign(body), signature):
            return None
        try:
            payload = _decode(base64.urlsafe_b64decode(body + b"=" * (-len(body) % 4)))
        except (ValueError, msgspec.DecodeError, msgspec.ValidationError):
            return None
        if payload.e <= self.clock() or payload.n in self._ended:
            return None
        return payload


def cookie_value(headers: list[tuple[bytes, bytes]]) -> str | None:
    """The session cookie of a request's raw headers, if it sent one."""
    for name, value in headers:
        if name == b"cookie":
            for part in value.decode("latin-1").split(";"):
                key, _, found = part.strip().partition("=")
                if key == COOKIE and found:
                    return found
    return None


def origin_of(url: str) -> str:
    """The origin (`scheme://host[:port]`) of a URL such as `[server] public_url`."""
    scheme, _, rest = url.partition("://")
    return f"{scheme.lower()}://{rest.split('/', 1)[0].lower()}" if rest else ""


def same_origin(scope: Mapping[str, object], public_url: str) -> bool:
    """Whether a request's `Origin` is exactly the dashboard's own: `[server] public_url`'s origin
    when set (behind a TLS proxy), else this server's as the request reached it. Cookies ignore
    ports, so a page on another local port is "same-site" to the cookie: this check is what stops it."""
    headers: list[tuple[bytes, bytes]] = scope.get("headers", [])  # type: ignore[assignment]
    origin = next((v.decode("latin-1") for k, v in headers if k == b"origin"), "")
    if not origin:
        return False
    if public_url:
        own = origin_of(public_url)
    else:
        host = next((v.decode("latin-1") for k, v in headers if k == b"host"), "")
        own = f"{scope.get('scheme', 'http')}://{host.lower()}"
    return origin.lower() == own


CROSS_ORIGIN = "cross-origin request refused: use the dashboard itself"


def require_same_origin(scope: Mapping[str, object], public_url: str) -> None:
    """`Forbidden` unless the request comes from the dashboard's own origin (`same_origin`)."""
    if not same_origin(scope, public_url):
        raise Forbidden(CROSS_ORIGIN)
