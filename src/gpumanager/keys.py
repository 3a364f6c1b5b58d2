"""API keys: hashed at rest, generated once, listed without secrets, revoked, reloaded when the file changes.

`api_keys.json` holds `{"keys": [{"id", "name", "email", "key_hash": "sha256:<hex>", "prefix", "created",
"admin", "revoked", "limits"}]}`, written atomically with mode 0600. A hand-written entry may carry a
plaintext `"key"` instead of `key_hash`; it is accepted (hashed in memory) with a warning. `limits`
are the key's budgets and rights (`Limits`), enforced at admission (`budget.py`).
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import os
import secrets
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Protocol

import msgspec
from loguru import logger

from gpumanager.errors import KeyStoreError

KEY_PREFIX = "gm_"
RECHECK_SECONDS = 0.5


PositiveInt = Annotated[int, msgspec.Meta(ge=1)]
PositiveDollars = Annotated[float, msgspec.Meta(gt=0)]


class Limits(msgspec.Struct, omit_defaults=True, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What one key may use; None: no limit. Days and months are `[budget] timezone`'s."""

    tokens_per_day: PositiveInt | None = None  # prompt + completion tokens
    dollars_per_day: PositiveDollars | None = None  # GPU cost charged to the key (DESIGN.md §10)
    dollars_per_month: PositiveDollars | None = None
    requests_per_minute: PositiveInt | None = None
    max_concurrent: PositiveInt | None = None  # requests running or waiting (else `[scheduler] max_per_key`)
    models: tuple[str, ...] | None = None  # glob patterns of the models it may use ("llama3*")

    def allows(self, names: Iterable[str]) -> bool:
        """Whether a model known by any of `names` (its spellings) matches one of the patterns."""
        if self.models is None:
            return True
        return any(fnmatch.fnmatchcase(name, pattern) for name in names for pattern in self.models)

    @property
    def spends(self) -> bool:
        return self.dollars_per_day is not None or self.dollars_per_month is not None


NO_LIMITS = Limits()
LIMIT_NAMES = tuple(Limits.__struct_fields__)


class KeyRecord(msgspec.Struct, omit_defaults=True, kw_only=True):
    id: str
    name: str
    email: str = ""
    key_hash: str = ""
    prefix: str = ""
    created: str = ""
    admin: bool = False
    revoked: bool = False
    limits: Limits = NO_LIMITS
    key: str | None = None  # plaintext, only in hand-written entries


class KeyFile(msgspec.Struct):
    keys: list[KeyRecord] = []


class Identity(msgspec.Struct, frozen=True):
    """Who a request is from, as the rest of gpumanager sees it: never the key itself."""

    id: str
    name: str
    admin: bool
    limits: Limits = NO_LIMITS


_decoder = msgspec.json.Decoder(KeyFile)
_encoder = msgspec.json.Encoder()


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class KeySource(Protocol):
    """Where the key records live: a file (one process), or Redis (several replicas)."""

    where: str  # for messages: the file's path, or the Redis key

    def stamp(self) -> object | None:
        """Changes whenever the records do; None when there are none yet."""
        ...

    def read(self) -> list[KeyRecord]: ...

    def write(self, records: list[KeyRecord], stamp: object | None) -> None:
        """Store `records`, read when the source's stamp was `stamp`: `KeyStoreError` if another
        writer came between (Redis), so no change is lost."""
        ...


class KeyFileSource:
    """`api_keys.json`: written atomically with mode 0600."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.where = str(self.path)

    def stamp(self) -> tuple[int, int, int] | None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def read(self) -> list[KeyRecord]:
        try:
            return decode_keys(self.path.read_bytes(), self.where)
        except OSError as exc:
            raise KeyStoreError(f"{self.path}: cannot read: {exc.strerror}") from None

    def write(self, records: list[KeyRecord], stamp: object | None) -> None:
        """Atomic replace with mode 0600: a crash leaves the old file or the new one, never half."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".api_keys.", suffix=".tmp")
        try:
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(encode_keys(records))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def encode_keys(records: list[KeyRecord]) -> bytes:
    """The key file's JSON (Redis holds the same)."""
    return msgspec.json.format(_encoder.encode(KeyFile(records)), indent=2) + b"\n"


def decode_keys(data: bytes, where: str) -> list[KeyRecord]:
    try:
        return _decoder.decode(data).keys
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise KeyStoreError(f"{where}: not a valid key file: {exc}") from None


class KeyStore:
    """The keys of one file (or of the replicas' Redis, through `source`). `authenticate()` is on
    the hot path: a dict lookup and one compare."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        clock: Callable[[], float] = time.monotonic,
        source: KeySource | None = None,
    ) -> None:
        self.source: KeySource = source or KeyFileSource(path)
        self.path = self.source.where
        self._clock = clock
        self._by_hash: dict[str, tuple[str, Identity]] = {}
        self._by_id: dict[str, Identity] = {}  # the keys in use (not revoked)
        self._records: list[KeyRecord] = []
        self._stamp: object | None = None
        self._next_check = 0.0
        # Told of each key created, revoked or given new limits since the previous load: (record, change).
        self.on_change: Callable[[KeyRecord, str], None] | None = None
        self._loaded = False
        self.reload()

    # -- reading -----------------------------------------------------------------------------------

    def reload(self) -> None:
        """Read the file if it changed. A broken file keeps the keys already loaded (and says why)."""
        stamp = self.source.stamp()
        if stamp == self._stamp:
            return
        records = self.source.read() if stamp is not None else []
        before = {r.id: r for r in self._records} if self._loaded else None
        self._records = records
        self._by_hash, self._by_id = {}, {}
        for record in records:
            if record.revoked:
                continue
            if record.key:
                logger.warning(
                    "api key {} is stored in plaintext in {}; prefer `gpumanager generate-key`", record.id, self.path
                )
                digest = hash_key(record.key)
            else:
                digest = record.key_hash.removeprefix("sha256:")
            limits = NO_LIMITS if record.limits == NO_LIMITS else record.limits  # the admission's fast path
            identity = Identity(record.id, record.name, record.admin, limits)
            self._by_hash[digest] = (digest, identity)
            self._by_id[record.id] = identity
        self._stamp, self._loaded = stamp, True
        if before is not None and self.on_change is not None:
            for record in records:
                old = before.get(record.id)
                if old is None:
                    self.on_change(record, "revoked" if record.revoked else "created")
                elif record.revoked and not old.revoked:
                    self.on_change(record, "revoked")
                elif record.limits != old.limits:
                    self.on_change(record, "limits")

    def authenticate(self, key: str) -> Identity | None:
        """The identity of `key`, or None. Picks up changes to the file within half a second."""
        now = self._clock()
        if now >= self._next_check:
            self._reload_quietly(now)
        digest = hash_key(key)
        found = self._by_hash.get(digest)
        if found is None:
            # A key made a moment ago must work at once: look at the file again on a miss.
            self._reload_quietly(now)
            found = self._by_hash.get(digest)
        if found is None or not hmac.compare_digest(found[0], digest):
            return None
        return found[1]

    def identity(self, key_id: str) -> Identity | None:
        """The identity of the key with this id while it is in use (None once revoked or deleted):
        a dashboard session holds the id, never the key. Picks up changes within half a second."""
        now = self._clock()
        if now >= self._next_check:
            self._reload_quietly(now)
        return self._by_id.get(key_id)

    def _reload_quietly(self, now: float) -> None:
        self._next_check = now + RECHECK_SECONDS
        try:
            self.reload()
        except KeyStoreError as exc:
            logger.error("{}; keeping the keys loaded before", exc)

    def records(self) -> list[KeyRecord]:
        self.reload()
        return list(self._records)

    # -- writing -----------------------------------------------------------------------------------

    def generate(
        self, name: str, email: str, *, admin: bool = False, limits: Limits = NO_LIMITS
    ) -> tuple[KeyRecord, str]:
        """Make a key, store its hash and return (record, key). The key is never stored."""
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        existing = {r.id for r in self.records()}
        key_id = secrets.token_hex(4)
        while key_id in existing:
            key_id = secrets.token_hex(4)
        record = KeyRecord(
            id=key_id,
            name=name,
            email=email,
            key_hash="sha256:" + hash_key(key),
            prefix=key[:10],
            created=datetime.now(UTC).isoformat(timespec="seconds"),
            admin=admin,
            limits=limits,
        )
        self._write([*self._records, record])
        return record, key

    def revoke(self, id_or_prefix: str) -> KeyRecord:
        """Revoke the key with this id, or the key itself, or the one key whose prefix matches."""
        records = self.records()
        target = self._find(records, id_or_prefix)
        target.revoked = True
        self._write(records)
        return target

    def set_limits(self, id_or_prefix: str, changes: Mapping[str, object], clear: Iterable[str] = ()) -> KeyRecord:
        """Set some limits of a key (`changes`: name -> value) and remove others (`clear`); the rest
        stay. `KeyStoreError` for an unknown key, limit name or a value out of range."""
        records = self.records()
        target = self._find(records, id_or_prefix)
        fields = {name: value for name, value in msgspec.structs.asdict(target.limits).items() if value is not None}
        for name in clear:
            if name not in LIMIT_NAMES:
                raise KeyStoreError(f"no limit named {name!r}; limits: {', '.join(LIMIT_NAMES)}")
            fields.pop(name, None)
        fields.update(changes)
        target.limits = limits_from(fields)
        self._write(records)
        return target

    def _find(self, records: list[KeyRecord], id_or_prefix: str) -> KeyRecord:
        """The key with this id, or the key itself, or the one key whose prefix matches."""
        digest = "sha256:" + hash_key(id_or_prefix)
        matches = [r for r in records if r.id == id_or_prefix or r.key_hash == digest] or [
            r for r in records if r.prefix and (r.prefix.startswith(id_or_prefix) or id_or_prefix.startswith(r.prefix))
        ]
        if not matches:
            raise KeyStoreError(f"no key with id or prefix {id_or_prefix!r} in {self.path}")
        if len(matches) > 1:
            ids = ", ".join(r.id for r in matches)
            raise KeyStoreError(f"{id_or_prefix!r} matches several keys ({ids}); give the id")
        return matches[0]

    def replace_all(self, records: list[KeyRecord]) -> None:
        """Store exactly `records` (`gpumanager keys import`)."""
        self.records()
        self._write(records)

    def _write(self, records: list[KeyRecord]) -> None:
        self.source.write(records, self._stamp)
        self._stamp = None
        self.reload()


def limits_from(fields: Mapping[str, object]) -> Limits:
    """`Limits` from plain values (the CLI's, a JSON body's), or `KeyStoreError` saying what is wrong."""
    try:
        limits = msgspec.convert(dict(fields), Limits)
    except msgspec.ValidationError as exc:
        raise KeyStoreError(f"invalid limits: {exc}") from None
    return NO_LIMITS if limits == NO_LIMITS else limits  # one object: it is left out of the file
