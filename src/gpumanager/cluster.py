"""Several replicas, one fleet: what they must agree on, kept in Redis (DESIGN.md §12).

`RedisShared` is the fleet's `Shared` when `[cluster] redis_url` is set. Every key is namespaced
`gm:{NAME}:` (a hash tag, so they all live on one node of a Redis Cluster):

    slots:HOST     sorted set: one member per lease, scored by its expiry (ms, Redis's clock)
    host:HOST      hash: deadline (ms), reserved (key id), protected ("1"/"0")
    drain:HOST     set while a replica drains HOST before pausing it: no new slot is taken
    wake:HOST      the lock of the replica that makes HOST's resume call
    leader         the lock of the replica that runs idle pauses, reconcile's fixes and webhooks
    emergency      set while emergency-off is on (the admin key's id)
    replicas       sorted set: the replicas seen, scored by when they are gone if not seen again
    job:ID         whose a RunPod job is ("KEY<tab>HOST"), for a replica asked about another's job
    watch:ID       the lock of the replica that watches a running RunPod job (the leader adopts orphans)
    keys, keys:version   the key store (the key file's JSON) and its version
    spend:day:T, spend:month:T   every replica's use per key (hashes of counters)
    bus            the channel: slot releases, events, key changes

Slots are taken and released by Lua scripts (drop the expired, check the count, add), timed by
Redis's own `TIME`, so the replicas' clocks need not agree. Each replica refreshes its leases'
expiry every `retry_seconds` while they stream: a dead replica's leases free themselves within
`lease_ttl_seconds`, as do its locks. Everything a replica reads of the others (their leases,
the shared deadlines, the drains, emergency, protection, the keys, the counters) it reads again
every `retry_seconds`, so a message lost while it reconnects costs at most that long.

If Redis cannot be reached, a replica serves hosts already awake within its own share of their
slots (slots ÷ the replicas seen at the last contact), wakes nothing, pauses nothing, says so in
the log, and goes back to normal once Redis answers again.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import secrets
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import msgspec
from anyio.abc import TaskStatus
from loguru import logger

from gpumanager.budget import Budget
from gpumanager.config import Config
from gpumanager.errors import ConfigError, Conflict, KeyStoreError, WakeFailed
from gpumanager.events import Bus, Envelope
from gpumanager.fleet import Fleet, Lease
from gpumanager.hosts import TRANSITIONS, Host, HostEvent, HostState
from gpumanager.keys import KeyFileSource, KeyRecord, KeyStore, decode_keys, encode_keys
from gpumanager.lifecycle import Lifecycle
from gpumanager.sessions import Sessions

EV, ST = HostEvent, HostState
LOUD_EVERY = 10.0  # while Redis is unreachable, the error is logged again this often (seconds)
REPLICAS_FILE = "replicas_seen"  # in the state folder: the replicas seen at the last contact with Redis
JOB_SECONDS = 2 * 86400  # whose a RunPod job is, for the other replicas: kept this long
SPEND_DAYS = 40  # the shared counters of a day (and of a month) outlive it this long

_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""
# KEYS: slots, drain. ARGV: member, slots, ttl ms. -> {taken (1), full (0) or draining (-1), count}
TAKE = (
    _NOW
    + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local n = redis.call('ZCARD', KEYS[1])
if redis.call('EXISTS', KEYS[2]) == 1 then return {-1, n} end
if n >= tonumber(ARGV[2]) then return {0, n} end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
return {1, n + 1}
"""
)
# KEYS: slots. ARGV: member, channel, message (the count is appended). -> the count left
# KEYS: slots. ARGV: channel, message (the count is appended), members... -> the count left
RELEASE = (
    _NOW
    + """
for i = 3, #ARGV do redis.call('ZREM', KEYS[1], ARGV[i]) end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local n = redis.call('ZCARD', KEYS[1])
redis.call('PUBLISH', ARGV[1], ARGV[2] .. n .. '}')
return n
"""
)
# KEYS: host hash. ARGV: window ms, key ('' = none). Moves the idle deadline to now + window at least.
TOUCH = (
    _NOW
    + """
local deadline = now + tonumber(ARGV[1])
if deadline > tonumber(redis.call('HGET', KEYS[1], 'deadline') or '0') then
  redis.call('HSET', KEYS[1], 'deadline', deadline)
end
if ARGV[2] ~= '' then redis.call('HSET', KEYS[1], 'reserved', ARGV[2]) end
redis.call('PEXPIRE', KEYS[1], 86400000)
return deadline
"""
)
# KEYS: slots, host hash, drain. ARGV: ttl ms, this replica's members...
# -> {count, now, deadline, reserved, protected, draining}
SYNC = (
    _NOW
    + """
for i = 2, #ARGV do redis.call('ZADD', KEYS[1], now + tonumber(ARGV[1]), ARGV[i]) end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local h = redis.call('HMGET', KEYS[2], 'deadline', 'reserved', 'protected')
return {redis.call('ZCARD', KEYS[1]), now, h[1] or '0', h[2] or '', h[3] or '', redis.call('EXISTS', KEYS[3])}
"""
)
# KEYS: lock. ARGV: token, ttl ms. -> 1 if held by token (taken or renewed), else 0
CLAIM = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[2]) return 1 end
return 0
"""
# KEYS: lock. ARGV: token.
UNLOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
# KEYS: replicas. ARGV: replica, ttl ms. -> the replicas seen
SEEN = (
    _NOW
    + """
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
return redis.call('ZCARD', KEYS[1])
"""
)


class Relayed(msgspec.Struct, array_like=True):
    """One event of a replica's bus, as its JSON."""

    type: str
    time: float
    data: msgspec.Raw


class Message(msgspec.Struct, omit_defaults=True):
    """One message on the bus channel: `slots` (releases: `host`, the `count` left), `events`,
    `keys` (the key store changed), or `logout` (`type`: the session's nonce, `time`: its expiry)."""

    kind: str
    replica: str = ""
    host: str = ""
    count: int = 0
    type: str = ""
    time: float = 0.0
    events: list[Relayed] = []


_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(Message).decode


class _Take:
    """One slot asked of Redis, and its answer: (1 taken, 0 full or -1 draining, the count)."""

    __slots__ = ("abandoned", "done", "error", "host", "member", "reply")

    def __init__(self, host: Host, member: str) -> None:
        self.host, self.member = host, member
        self.abandoned = False
        self.done = anyio.Event()
        self.reply: tuple[int, int] = (0, 0)
        self.error: BaseException | None = None


def prefix(name: str) -> str:
    return f"gm:{{{name}}}:"


def replica_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(2)}"


def _redis() -> Any:
    """The `redis` package, or a `ConfigError` that says how to install it."""
    try:
        import redis
        import redis.asyncio
    except ImportError:
        raise ConfigError(
            "config.toml", "cluster.redis_url", "needs the redis package: pip install 'gpumanager[cluster]'"
        ) from None
    return redis


def connect(url: str) -> Any:
    """An asyncio Redis client for `url`, with short timeouts: a replica must notice a lost Redis fast."""
    redis = _redis()
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff
    from redis.exceptions import ConnectionError as Disconnected

    # One more try on a fresh connection: after a restart of Redis the pool's connections are stale.
    return redis.asyncio.Redis.from_url(
        url,
        socket_timeout=2,
        socket_connect_timeout=2,
        health_check_interval=5,
        retry=Retry(NoBackoff(), 1),
        retry_on_error=[Disconnected],
    )


class CachedKeys:
    """The key store's `KeySource` inside a replica: the records as last read from Redis (by
    `RedisShared`, off the request path). The server never writes keys; the CLI writes Redis."""

    def __init__(self, where: str, copy: str | None = None) -> None:
        self.where = where
        self.version: object | None = None
        self.records: list[KeyRecord] = []
        # The last reading, kept in the state folder (hashes only, mode 0600): a replica that starts
        # while Redis is unreachable still knows the keys.
        self.copy = KeyFileSource(copy) if copy else None
        if self.copy is not None and self.copy.stamp() is not None:
            try:
                self.records, self.version = self.copy.read(), "copy"
            except KeyStoreError as exc:
                logger.warning("{}; the keys come from Redis alone", exc)

    def update(self, records: list[KeyRecord], version: object | None) -> None:
        self.records, self.version = records, version
        if self.copy is not None:
            try:
                self.copy.write(records, None)
            except OSError as exc:
                logger.warning("cannot keep a copy of the keys in {}: {}", self.copy.where, exc)

    def stamp(self) -> object | None:
        return self.version

    def read(self) -> list[KeyRecord]:
        return list(self.records)

    def write(self, records: list[KeyRecord], stamp: object | None) -> None:
        raise KeyStoreError("a replica does not write keys: use the gpumanager CLI with the same [cluster] redis_url")


class RedisKeys:
    """The key store's `KeySource` for the CLI: Redis, read and written directly (synchronously),
    one short connection per call."""

    def __init__(self, url: str, name: str) -> None:
        self.url = url
        self.prefix = prefix(name)
        self.where = f"Redis ({self.prefix}keys at {_shown(url)})"

    def stamp(self) -> object | None:
        version = self._call(lambda r: r.get(self.prefix + "keys:version"))
        return None if version is None else int(version)

    def read(self) -> list[KeyRecord]:
        data = self._call(lambda r: r.get(self.prefix + "keys"))
        return [] if data is None else decode_keys(data if isinstance(data, bytes) else data.encode(), self.where)

    def write(self, records: list[KeyRecord], stamp: object | None) -> None:
        self._call(lambda r: self._write(r, records, stamp))

    def _write(self, client: Any, records: list[KeyRecord], stamp: object | None) -> None:
        redis = _redis()

        version = self.prefix + "keys:version"
        changed = KeyStoreError(f"the keys in {self.where} changed meanwhile; run the command again")
        with client.pipeline() as pipe:
            try:
                pipe.watch(version)
                now = pipe.get(version)
                if (None if now is None else int(now)) != stamp:
                    raise changed
                pipe.multi()
                pipe.set(self.prefix + "keys", encode_keys(records))
                pipe.incr(version)
                pipe.publish(self.prefix + "bus", _encode(Message("keys")))
                pipe.execute()
            except redis.WatchError:
                raise changed from None

    def _call(self, fn: Callable[[Any], Any]) -> Any:
        redis = _redis()

        try:
            with redis.Redis.from_url(self.url, socket_timeout=5, socket_connect_timeout=5) as client:
                return fn(client)
        except redis.RedisError as exc:
            raise KeyStoreError(f"cannot reach the cluster's Redis ({_shown(self.url)}): {exc}") from None


def shared_secret(url: str, name: str) -> bytes | None:
    """The dashboard's session secret of the whole fleet (made by the first replica to ask), so a
    login through one replica holds on all; None when Redis cannot be reached now."""
    redis = _redis()

    key = prefix(name) + "session_secret"
    try:
        with redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5) as client:
            client.set(key, secrets.token_hex(32), nx=True)
            found = client.get(key)
    except redis.RedisError as exc:
        logger.warning("the fleet's session secret is not in reach ({}): this replica uses its own", exc)
        return None
    return None if found is None else bytes(found)


def redis_key_store(url: str, name: str) -> KeyStore:
    """The cluster's key store, for the CLI."""
    source = RedisKeys(url, name)
    return KeyStore(source.where, source=source)


class RedisShared:
    """The fleet's `Shared` in Redis. Owns: this replica's leases in Redis, its locks (leader,
    wakes, drains), the mirror of the others' leases (`Host.others`), deadlines, drains,
    protection and emergency, the key cache, and the budget's shared counters. Calls: the fleet
    (dispatch, notify, settle), the lifecycle (following other replicas' wakes and pauses),
    the bus (other replicas' events)."""

    alone = False

    def __init__(
        self,
        config: Config,
        url: str,
        fleet: Fleet,
        lifecycle: Lifecycle,
        bus: Bus,
        budget: Budget,
        keys: KeyStore,
        cache: CachedKeys,
        *,
        client: Any = None,
    ) -> None:
        self.config, self.cluster = config, config.cluster
        self.fleet, self.lifecycle, self.bus, self.budget = fleet, lifecycle, bus, budget
        self.keys, self.cache = keys, cache
        self.redis = client if client is not None else connect(url)
        self.url = url
        self.replica = replica_name()
        self.p = prefix(self.cluster.name)
        self.ttl_ms = int(self.cluster.lease_ttl_seconds * 1000)
        self._take = self.redis.register_script(TAKE)
        self._release = self.redis.register_script(RELEASE)
        self._touch = self.redis.register_script(TOUCH)
        self._sync = self.redis.register_script(SYNC)
        self._claim = self.redis.register_script(CLAIM)
        self._unlock = self.redis.register_script(UNLOCK)
        self._seen = self.redis.register_script(SEEN)
        self._members: dict[Lease, str] = {}  # this replica's leases that hold a slot in Redis
        self._takes: list[_Take] = []  # slots asked for, sent together by the taker
        self._take_now = anyio.Event()
        self._serial = 0
        self._locks: dict[str, str] = {}  # lock key -> token, renewed every round while held
        self._outbox: list[tuple[str, tuple[Any, ...]]] = []  # sent in one pipeline by the sender
        self._wake_outbox = anyio.Event()
        self.connected = True
        self.leading = False
        # The replicas seen at the last contact, kept in the state folder: one that starts while
        # Redis is unreachable takes only its share of each host too.
        self._replicas_file = Path(config.paths.state_dir) / REPLICAS_FILE
        self.replicas = 1
        self._told_replicas = False
        with contextlib.suppress(OSError, ValueError):
            self.replicas = max(1, int(self._replicas_file.read_text()))
        self._lost_at = -math.inf  # when Redis was last found unreachable (monotonic)
        self._told_at = -math.inf
        self._resync = anyio.Event()
        self._emergency_told = -math.inf
        self.sessions: Sessions | None = None  # the dashboard's, told of logouts elsewhere
        budget.pending = {}
        fleet.shared = self
        fleet.billing.attributes = lambda: self.leader
        bus.relay = self._relay
        bus.dedupe_seconds = 5.0

    # -- Shared ------------------------------------------------------------------------------------

    @property
    def leader(self) -> bool:
        return self.leading and self.connected

    def wakes_refused(self) -> str:
        if self.connected:
            return ""
        return "the replicas' shared state (Redis) is unreachable: no host is woken until it is back; try again soon"

    async def take(self, lease: Lease) -> bool:
        host = lease.host
        if not self.connected:
            return self._within_share(host)
        self._serial += 1
        member = f"{self.replica}:{self._serial}"
        asked = _Take(host, member)
        self._takes.append(asked)
        self._take_now.set()
        try:
            await asked.done.wait()
        except BaseException:  # the request is gone: a slot taken meanwhile is given back
            asked.abandoned = True
            raise
        if asked.error is not None:
            self._lost(asked.error)
            return self._within_share(host)
        taken, count = asked.reply
        if taken == 1 and lease.released:  # the request left while its slot was being taken
            self._send("release", host, member)
            return False
        if taken == 1:
            self._members[lease] = member
            self._set_others(host, count)
            return True
        self._set_others(host, count)
        if taken == -1 and host.pausing is None:
            host.draining = True  # another replica drains it for a pause
        return False

    async def _taker(self) -> None:
        """Send the takes asked meanwhile in one pipeline: under load, one round trip for many."""
        while True:
            await self._take_now.wait()
            self._take_now = anyio.Event()
            batch, self._takes = self._takes, []
            if not batch:
                continue
            try:
                async with self.redis.pipeline(transaction=False) as pipe:
                    for asked in batch:
                        host = asked.host
                        keys = [self._k("slots", host), self._k("drain", host)]
                        await self._take(keys=keys, args=[asked.member, host.slots, self.ttl_ms], client=pipe)
                    replies = await pipe.execute()
            except Exception as exc:
                for asked in batch:
                    asked.error = exc
            else:
                for asked, reply in zip(batch, replies, strict=True):
                    asked.reply = (int(reply[0]), int(reply[1]))
                    if asked.abandoned and asked.reply[0] == 1:
                        self._send("release", asked.host, asked.member)
            for asked in batch:
                asked.done.set()

    def released(self, lease: Lease) -> None:
        member = self._members.pop(lease, None)
        if member is not None:
            self._send("release", lease.host, member)

    def touched(self, host: Host, key: str | None, window: float) -> None:
        self._send("touch", host, int(window * 1000), key or "")

    async def claim_wake(self, host: Host) -> bool:
        try:
            return await self._hold(self._k("wake", host))
        except Exception as exc:
            self._lost(exc)
            raise WakeFailed(self.wakes_refused() or f"the replicas' Redis failed: {exc}") from None

    def wake_over(self, host: Host) -> None:
        self._let_go(self._k("wake", host))

    async def drain(self, host: Host) -> None:
        """Mark `host` drained (no replica's take passes the mark), then count its leases: a slot
        taken elsewhere just before the mark is seen now, not a round later."""
        try:
            await self._hold(self._k("drain", host))
            mine = [member for lease, member in self._members.items() if lease.host is host]
            keys = [self._k("slots", host), self._k("host", host), self._k("drain", host)]
            reply = await self._sync(keys=keys, args=[self.ttl_ms, *mine])
        except Exception as exc:
            self._lost(exc)
            return
        self._set_others(host, int(reply[0]))

    def drained(self, host: Host) -> None:
        self._let_go(self._k("drain", host))

    def protected(self, host: Host, protected: bool) -> None:
        self._send("hset", host, "protected", "1" if protected else "0")

    def job_started(self, job_id: str, key: str, host: Host) -> None:
        self._send("job", host, job_id, key)
        self._locks[f"{self.p}watch:{job_id}"] = f"{self.replica}:{secrets.token_hex(4)}"
        self._resync.set()  # the lock is taken by a round at once, before the job reaches the ledger

    async def adopt_job(self, job_id: str) -> bool:
        try:
            return await self._hold(f"{self.p}watch:{job_id}")
        except Exception as exc:
            self._lost(exc)
            return False

    def job_ended(self, job_id: str) -> None:
        self._let_go(f"{self.p}watch:{job_id}")

    def session_ended(self, nonce: str, expiry: float) -> None:
        """A dashboard logout through this replica: every replica ends the session."""
        self._outbox.append(("logout", (nonce, expiry)))
        self._wake_outbox.set()

    async def job_owner(self, job_id: str) -> tuple[str, str] | None:
        if not self.connected:
            return None
        try:
            found = await self.redis.get(f"{self.p}job:{job_id}")
        except Exception as exc:
            self._lost(exc)
            return None
        if found is None:
            return None
        key, _, host = found.decode().partition("\t")
        return key, host

    # -- locks -------------------------------------------------------------------------------------

    async def _hold(self, key: str) -> bool:
        token = self._locks.get(key) or f"{self.replica}:{secrets.token_hex(4)}"
        if await self._claim(keys=[key], args=[token, self.ttl_ms]):
            self._locks[key] = token
            return True
        return False

    def _let_go(self, key: str) -> None:
        token = self._locks.pop(key, None)
        if token is not None:
            self._outbox.append(("unlock", (key, token)))
            self._wake_outbox.set()

    # -- the outbox: writes that need no answer, sent in batches -----------------------------------

    def _k(self, kind: str, host: Host) -> str:
        return f"{self.p}{kind}:{host.name}"

    def _send(self, op: str, host: Host, *args: Any) -> None:
        self._outbox.append((op, (host, *args)))
        self._wake_outbox.set()

    def _relay(self, envelope: Envelope) -> None:
        if envelope.type == "emergency":  # the shared flag follows; the rounds leave it alone meanwhile
            self._emergency_told = anyio.current_time()
        self._outbox.append(("event", (envelope,)))
        self._wake_outbox.set()

    async def _sender(self) -> None:
        while True:
            await self._wake_outbox.wait()
            self._wake_outbox = anyio.Event()
            batch, self._outbox = self._outbox, []
            if not batch or not self.connected:
                continue  # lost with Redis: leases expire there, and events are this replica's own
            try:
                await self._flush(batch)
            except Exception as exc:
                self._lost(exc)

    async def _flush(self, batch: list[tuple[str, tuple[Any, ...]]]) -> None:
        """One pipeline for what piled up: one release script and one touch per host, one message
        for all the events."""
        channel = self.p + "bus"
        released: dict[Host, list[str]] = {}
        touched: dict[Host, tuple[int, str]] = {}
        events: list[Relayed] = []
        async with self.redis.pipeline(transaction=False) as pipe:
            for op, args in batch:
                if op == "release":
                    host, member = args
                    released.setdefault(host, []).append(member)
                elif op == "touch":
                    host, window, key = args
                    before = touched.get(host)
                    touched[host] = (max(window, before[0]) if before else window, key or (before[1] if before else ""))
                elif op == "event":
                    (envelope,) = args
                    events.append(Relayed(envelope.type, envelope.time, msgspec.Raw(envelope.data)))
                    if envelope.type == "emergency":
                        if msgspec.json.decode(envelope.data).get("on"):
                            pipe.set(self.p + "emergency", "1")
                        else:
                            pipe.delete(self.p + "emergency")
                elif op == "job":
                    host, job_id, key = args
                    pipe.set(f"{self.p}job:{job_id}", f"{key}\t{host.name}", ex=JOB_SECONDS)
                elif op == "logout":
                    nonce, expiry = args
                    pipe.zadd(self.p + "sessions_ended", {nonce: expiry})
                    pipe.publish(channel, _encode(Message("logout", self.replica, type=nonce, time=expiry)))
                elif op == "hset":
                    host, field, value = args
                    pipe.hset(self._k("host", host), field, value)
                elif op == "unlock":
                    key, token = args
                    await self._unlock(keys=[key], args=[token], client=pipe)
            for host, members in released.items():
                # The script appends the count left and the closing brace.
                head = b'{"kind":"slots","replica":%s,"host":%s,"count":' % (
                    msgspec.json.encode(self.replica),
                    msgspec.json.encode(host.name),
                )
                await self._release(keys=[self._k("slots", host)], args=[channel, head, *members], client=pipe)
            for host, (window, key) in touched.items():
                await self._touch(keys=[self._k("host", host)], args=[window, key], client=pipe)
            if events:
                pipe.publish(channel, _encode(Message("events", self.replica, events=events)))
            await pipe.execute()

    # -- running -----------------------------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Read the shared state once (keys, emergency, counters), then keep it in step until cancelled."""
        try:
            await self._seed_spend()
            await self._round()
        except Exception as exc:
            self._lost(exc)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._sender)
                tg.start_soon(self._taker)
                tg.start_soon(self._listen)
                tg.start_soon(self._rounds)
                task_status.started()
        finally:
            await self.close()

    async def close(self) -> None:
        """Give back this replica's leases and locks (a clean shutdown: the others need not wait)."""
        with anyio.move_on_after(2, shield=True):
            try:
                async with self.redis.pipeline(transaction=False) as pipe:
                    for lease, member in self._members.items():
                        pipe.zrem(self._k("slots", lease.host), member)
                    for key, token in self._locks.items():
                        await self._unlock(keys=[key], args=[token], client=pipe)
                    pipe.zrem(self.p + "replicas", self.replica)
                    await pipe.execute()
            except Exception as exc:
                logger.warning("could not give back this replica's slots in Redis: {}", exc)
            await self.redis.aclose()

    async def _rounds(self) -> None:
        while True:
            with anyio.move_on_after(self.cluster.retry_seconds):
                await self._resync.wait()
            self._resync = anyio.Event()
            try:
                await self._round()
            except Exception as exc:
                self._lost(exc)

    async def _round(self) -> None:
        """One reading of the shared state, with this replica's renewals and counters."""
        hosts = list(self.fleet.hosts.values())
        # Jobs and admins' operations hold no slot: the host's shared deadline keeps it awake meanwhile.
        holding = [h for h in hosts if any(not lease.counted for lease in self.fleet.leases_of(h))]
        window = int(self.config.timing.reservation_minutes * 60_000)
        locks = list(self._locks.items())
        mine: dict[Host, list[str]] = {}
        for lease, member in self._members.items():
            mine.setdefault(lease.host, []).append(member)
        day, month = periods = self.budget.periods()
        pending, self.budget.pending = self.budget.pending or {}, {}
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                await self._claim(keys=[self.p + "leader"], args=[self.replica, self.ttl_ms], client=pipe)
                await self._seen(keys=[self.p + "replicas"], args=[self.replica, self.ttl_ms], client=pipe)
                for key, token in locks:
                    await self._claim(keys=[key], args=[token, self.ttl_ms], client=pipe)
                for host in hosts:
                    keys = [self._k("slots", host), self._k("host", host), self._k("drain", host)]
                    await self._sync(keys=keys, args=[self.ttl_ms, *mine.get(host, [])], client=pipe)
                for host in holding:
                    await self._touch(keys=[self._k("host", host)], args=[window, ""], client=pipe)
                at_emergency = len(pipe)
                pipe.get(self.p + "emergency")
                pipe.get(self.p + "keys:version")
                pipe.zremrangebyscore(self.p + "sessions_ended", "-inf", time.time())
                pipe.zrange(self.p + "sessions_ended", 0, -1, withscores=True)
                day_key, month_key = f"{self.p}spend:day:{day:.0f}", f"{self.p}spend:month:{month:.0f}"
                for key, (tokens, micro) in pending.items():
                    if tokens:
                        pipe.hincrby(day_key, key + ":t", tokens)
                    if micro:
                        pipe.hincrby(day_key, key + ":m", micro)
                        pipe.hincrby(month_key, key, micro)
                pipe.expire(day_key, SPEND_DAYS * 86400)
                pipe.expire(month_key, SPEND_DAYS * 86400 * 2)
                pipe.hgetall(day_key)
                pipe.hgetall(month_key)
                replies = await pipe.execute()
        except Exception:
            for key, (tokens, micro) in pending.items():  # counted again at the next round
                self.budget.add_pending(key, tokens, micro)
            raise
        self._back()
        self._set_leading(bool(replies[0]))
        self._seen_replicas(max(1, int(replies[1])))
        at = 2
        for key, ok in zip([k for k, _ in locks], replies[at : at + len(locks)], strict=True):
            if not ok and key in self._locks:  # it expired while this replica stalled: another may hold it
                del self._locks[key]
        at += len(locks)
        for host, reply in zip(hosts, replies[at : at + len(hosts)], strict=True):
            self._mirror(host, reply)
        at = at_emergency
        if anyio.current_time() - self._emergency_told > 2 * self.cluster.retry_seconds:
            self._mirror_emergency(replies[at] is not None)
        if self.sessions is not None:
            for nonce, expiry in replies[at + 3]:
                self.sessions.ended(nonce.decode(), float(expiry))
        await self._read_keys(replies[at + 1])
        self.budget.shared_totals(periods, *_spend(replies[-2], replies[-1]))
        self.fleet.dispatch()  # waiters retry every round too: the channel drops messages while it reconnects

    def _mirror(self, host: Host, reply: list[Any]) -> None:
        count, now, deadline, reserved, protected, draining = reply
        self._set_others(host, int(count))
        left = (int(deadline) - int(now)) / 1000  # the shared deadline, as seconds from now
        if int(deadline) and left > host.idle_deadline - self.fleet.clock():
            host.idle_deadline = self.fleet.clock() + left
            if reserved:
                host.reserved_key = reserved.decode()
            self.fleet.billing.settle(host)
            self.fleet.notify()
        if protected and (protected == b"1") != host.protected:
            self.fleet.protect(host, protected == b"1", share=False)
        if host.pausing is None and host.draining != bool(draining):
            host.draining = bool(draining)
            self.fleet.dispatch()

    def _set_others(self, host: Host, count: int) -> None:
        others = max(0, count - sum(1 for lease in self._members if lease.host is host))
        if others != host.others:
            host.others = others
            self.fleet.billing.settle(host)
            self.fleet.dispatch()
            if not others:
                self.fleet.notify()

    def _seen_replicas(self, count: int) -> None:
        if count != self.replicas or not self._told_replicas:
            self._told_replicas = True
            logger.info("replicas of this fleet seen: {}", count)
            self.replicas = count
            try:
                self._replicas_file.parent.mkdir(parents=True, exist_ok=True)
                self._replicas_file.write_text(f"{count}\n")
            except OSError as exc:
                logger.warning("cannot note the replicas seen in {}: {}", self._replicas_file, exc)

    def _set_leading(self, leading: bool) -> None:
        if leading != self.leading:
            self.leading = leading
            logger.info("this replica ({}) {} the leader", self.replica, "is now" if leading else "is no longer")
            self.fleet.notify()  # the idle loop looks again

    def _share(self, host: Host) -> int:
        return host.slots // self.replicas

    def _within_share(self, host: Host) -> bool:
        """Without Redis: whether this replica's leases of `host` stay within its share (the
        others' part of the slots counted as taken, so admission sees it too)."""
        share = self._share(host)
        if host.others < host.slots - share:
            host.others = host.slots - share
            self.fleet.billing.settle(host)
        return host.leases <= share

    # -- losing and finding Redis ------------------------------------------------------------------

    def _lost(self, exc: BaseException) -> None:
        now = anyio.current_time()
        if self.connected:
            self.connected = False
            self._lost_at = now
            for host in self.fleet.hosts.values():  # this replica's share of each host, no more
                host.others = max(0, host.slots - self._share(host))
                self.fleet.billing.settle(host)
            self.fleet.notify()
        if now - self._told_at >= LOUD_EVERY:
            self._told_at = now
            logger.error(
                "Redis ({}) is unreachable: {}. Serving awake hosts within this replica's share of their "
                "slots (1/{}), waking and pausing nothing, until it is back",
                _shown(self.url),
                exc,
                self.replicas,
            )

    def _back(self) -> None:
        if not self.connected:
            self.connected = True
            self._told_at = -math.inf
            logger.warning(
                "Redis ({}) answers again after {:.0f}s: back to normal",
                _shown(self.url),
                anyio.current_time() - self._lost_at,
            )
            self.fleet.dispatch()

    # -- other replicas' messages ------------------------------------------------------------------

    async def _listen(self) -> None:
        """Follow the bus channel; reconnect after `retry_seconds` when it drops (the rounds cover
        what was said meanwhile)."""
        while True:
            try:
                async with self.redis.pubsub() as pubsub:
                    await pubsub.subscribe(self.p + "bus")
                    async for item in pubsub.listen():
                        if item.get("type") == "message":
                            self._heard(item["data"])
            except Exception as exc:  # the rounds tell whether Redis is there: this only listens again
                logger.debug("the replicas' channel dropped ({}); listening again", exc)
            await anyio.sleep(self.cluster.retry_seconds)

    def _heard(self, raw: bytes) -> None:
        try:
            message = _decode(raw)
        except msgspec.DecodeError:
            return
        if message.kind == "keys":
            self._resync.set()
            return
        if message.replica == self.replica:
            return
        if message.kind == "logout" and self.sessions is not None:
            self.sessions.ended(message.type, message.time)
        elif message.kind == "slots":
            host = self.fleet.hosts.get(message.host)
            if host is not None:
                self._set_others(host, message.count)
        elif message.kind == "events":
            for event in message.events:
                data = bytes(event.data)
                if self.bus.receive(event.type, event.time, data):
                    self._follow(event.type, data)

    def _follow(self, type: str, data: bytes) -> None:
        """Do locally what another replica's event says happened to the fleet."""
        fields: dict[str, Any] = msgspec.json.decode(data)
        if type == "emergency":
            self._mirror_emergency(bool(fields.get("on")))
            return
        host = self.fleet.hosts.get(fields.get("host") or "")
        if host is None or host.always_on or host.pausing is not None:
            return
        if type == "wake_started" and host.wake is None and host.state in (ST.PAUSED, ST.UNKNOWN):
            self._start_wake(host, fields.get("model"), fields.get("key"))
        elif type == "host_state" and host.wake is None:
            new = fields.get("new")
            if new in ("pausing", "paused"):
                _apply(host, EV.PAUSE)
            if new == "paused":
                _apply(host, EV.CLOUD_PAUSED)
                host.reserved_key, host.ready_since, host.draining = None, None, False
                host.recent_keys.clear()
                self.fleet.dispatch()
            elif new == "ready" and host.state in (ST.PAUSED, ST.UNKNOWN):
                _apply(host, EV.CLOUD_RUNNING)
                self._start_wake(host, None, None)  # found running: probed, then ready here too

    def _start_wake(self, host: Host, model: str | None, key: str | None) -> None:
        with contextlib.suppress(Conflict):  # emergency-off is on here: this replica wakes nothing
            self.lifecycle.start_wake(host, model, by=key)

    def _mirror_emergency(self, on: bool) -> None:
        fleet = self.fleet
        if on == fleet.emergency:
            return
        fleet.emergency = on
        logger.warning("emergency-{} through another replica", "off" if on else "on")
        if on:
            for host in list(fleet.hosts.values()):
                if host.always_on:
                    continue
                self.lifecycle.stop_wake(host, "emergency-off through another replica")
                for lease in list(fleet.leases_of(host)):
                    lease.abort(f"host {host.name} was paused by an administrator (emergency-off)")
        fleet.dispatch()

    # -- keys and counters -------------------------------------------------------------------------

    async def _read_keys(self, version: bytes | None) -> None:
        stamp = None if version is None else int(version)
        if stamp == self.cache.version:
            return
        data = await self.redis.get(self.p + "keys")
        try:
            records = [] if data is None else decode_keys(data, self.cache.where)
        except KeyStoreError as exc:
            logger.error("{}; keeping the keys loaded before", exc)
            return
        self.cache.update(records, stamp)
        self.keys.reload()

    async def _seed_spend(self) -> None:
        """The first replica of a day puts what the ledger says of it in the shared counters."""
        day, month = self.budget.periods()
        day_key, month_key = f"{self.p}spend:day:{day:.0f}", f"{self.p}spend:month:{month:.0f}"
        seeded = await self.redis.set(f"{self.p}spend:seeded:{day:.0f}", self.replica, nx=True, ex=SPEND_DAYS * 86400)
        if not seeded:
            return
        month_seeded = await self.redis.set(
            f"{self.p}spend:seeded:m{month:.0f}", self.replica, nx=True, ex=SPEND_DAYS * 86400 * 2
        )
        async with self.redis.pipeline(transaction=False) as pipe:
            for key, (tokens, micro_day, micro_month) in self.budget.seeded().items():
                pipe.hincrby(day_key, key + ":t", tokens)
                pipe.hincrby(day_key, key + ":m", micro_day)
                if month_seeded:
                    pipe.hincrby(month_key, key, micro_month)
            await pipe.execute()


def _spend(day: dict[bytes, bytes], month: dict[bytes, bytes]) -> tuple[dict[str, tuple[int, int]], dict[str, int]]:
    today: dict[str, list[int]] = {}
    for field, value in day.items():
        key, _, kind = field.decode().rpartition(":")
        today.setdefault(key, [0, 0])[0 if kind == "t" else 1] = int(value)
    return {k: (t, m) for k, (t, m) in today.items()}, {k.decode(): int(v) for k, v in month.items()}


def _apply(host: Host, event: HostEvent) -> None:
    if (host.state, event) in TRANSITIONS and TRANSITIONS[(host.state, event)] is not host.state:
        host.apply(event)


def _shown(url: str) -> str:
    """The URL without its password."""
    return re.sub(r"//([^:@/]*):[^@/]*@", r"//\1:***@", url)
