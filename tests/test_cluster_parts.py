"""The pieces of several replicas against a real Redis: the slot and lock scripts, the key store in
Redis and `gpumanager keys import`, and the `[cluster]` config."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from gpumanager.cluster import CLAIM, TAKE, UNLOCK, RedisKeys, prefix, redis_key_store
from gpumanager.config import loads, redis_url
from gpumanager.errors import ConfigError, KeyStoreError
from gpumanager.keys import KeyRecord, KeyStore
from tests.harness import wait_until
from tests.redis_server import Redis, running_redis


@pytest.fixture(scope="module")
def server() -> Iterator[Redis]:
    with running_redis() as running:
        yield running


@pytest.fixture
def client(server: Redis) -> Iterator[redis.Redis]:
    with redis.Redis.from_url(server.url) as connection:
        yield connection


def test_a_host_slots_are_never_exceeded_and_a_dead_replica_lease_expires(client: redis.Redis) -> None:
    take = client.register_script(TAKE)
    keys = ["gm:{t}:slots:gpu-1", "gm:{t}:drain:gpu-1"]
    assert take(keys=keys, args=["a:1", 2, 60_000]) == [1, 1]
    assert take(keys=keys, args=["b:1", 2, 300]) == [1, 2]  # replica b's lease: 0.3 s unless refreshed
    assert take(keys=keys, args=["c:1", 2, 60_000]) == [0, 2]  # full, whichever replica asks
    wait_until(lambda: take(keys=keys, args=["c:1", 2, 60_000]) == [1, 2], timeout=3)  # b's expired
    client.set(keys[1], "a-token")  # a replica drains the host for a pause: nobody takes a slot
    client.zrem(keys[0], "c:1")
    assert take(keys=keys, args=["c:2", 2, 60_000]) == [-1, 1]


def test_a_lock_is_its_holder_own(client: redis.Redis) -> None:
    claim, unlock = client.register_script(CLAIM), client.register_script(UNLOCK)
    key = "gm:{t}:wake:gpu-1"
    assert claim(keys=[key], args=["a", 60_000]) == 1
    assert claim(keys=[key], args=["b", 60_000]) == 0  # one resume per wake
    assert claim(keys=[key], args=["a", 60_000]) == 1  # renewed by its holder
    assert unlock(keys=[key], args=["b"]) == 0  # another's token frees nothing
    assert unlock(keys=[key], args=["a"]) == 1
    assert claim(keys=[key], args=["b", 200]) == 1
    wait_until(lambda: claim(keys=[key], args=["a", 60_000]) == 1, timeout=3)  # a dead holder's lock expires


def test_keys_in_redis_and_keys_import(tmp_path: Path, server: Redis) -> None:
    file_store = KeyStore(tmp_path / "api_keys.json")
    record, key = file_store.generate("ana", "ana@example.org")
    file_store.revoke(file_store.generate("bob", "bob@example.org")[0].id)
    config = tmp_path / "config.toml"
    config.write_text(f'[cluster]\nredis_url = "{server.url}"\nname = "import-test"\n')
    env = {**os.environ}
    env.pop("GPUMANAGER_REDIS_URL", None)

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "gpumanager", *args, "--config", str(config)]
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)

    done = cli("keys", "import", str(tmp_path / "api_keys.json"))
    assert done.returncode == 0, done.stderr
    assert "imported 2 keys" in done.stdout
    store = redis_key_store(server.url, "import-test")
    identity = store.authenticate(key)
    assert identity is not None and identity.id == record.id
    assert [r.name for r in store.records() if r.revoked] == ["bob"]
    again = cli("keys", "import", str(tmp_path / "api_keys.json"))
    assert again.returncode == 2 and "--replace" in again.stderr
    assert cli("keys", "import", str(tmp_path / "api_keys.json"), "--replace").returncode == 0
    # The key commands work on Redis now: generate, list, limits, revoke.
    made = cli("generate-key", "--name", "cy", "--email", "cy@example.org", "--quiet")
    assert made.returncode == 0, made.stderr
    assert store.authenticate(made.stdout.strip()) is not None
    listed = cli("list-keys")
    assert listed.returncode == 0 and "cy@example.org" in listed.stdout and "Redis" not in listed.stderr
    assert cli("set-limits", record.id, "--dollars-per-day", "2").returncode == 0
    store.reload()  # (a store reads Redis again on its own every half second)
    assert store.identity(record.id).limits.dollars_per_day == 2  # type: ignore[union-attr]
    assert cli("revoke-key", record.id).returncode == 0
    store.reload()
    assert store.authenticate(key) is None
    raw = json.loads(redis.Redis.from_url(server.url).get(prefix("import-test") + "keys") or b"{}")
    assert all("key_hash" in r and "key" not in r for r in raw["keys"])  # hashes only, as in the file


def test_two_writers_never_lose_a_change(server: Redis) -> None:
    class Racing(RedisKeys):
        """Another admin's command writes between this one's read and its write."""

        def write(self, records: list[KeyRecord], stamp: object | None) -> None:
            redis_key_store(server.url, "race").generate("two", "two@example.org")
            super().write(records, stamp)

    redis_key_store(server.url, "race").generate("one", "one@example.org")
    source = Racing(server.url, "race")
    with pytest.raises(KeyStoreError, match="changed meanwhile"):
        KeyStore(source.where, source=source).generate("three", "three@example.org")
    assert [r.name for r in redis_key_store(server.url, "race").records()] == ["one", "two"]


def test_an_unreachable_redis_is_a_clear_error_for_the_cli(tmp_path: Path) -> None:
    with pytest.raises(KeyStoreError, match="cannot reach the cluster's Redis"):
        redis_key_store("redis://127.0.0.1:9/0", "nowhere").records()


def test_cluster_config() -> None:
    config = loads(b'[cluster]\nredis_url = "redis://:secret@10.0.0.5:6379/2"\nlease_ttl_seconds = 5\n')
    assert config.cluster.lease_ttl_seconds == 5 and config.cluster.name == "gpumanager"
    assert redis_url(config, {}) == "redis://:secret@10.0.0.5:6379/2"
    assert redis_url(config, {"GPUMANAGER_REDIS_URL": "redis://other:6379"}) == "redis://other:6379"
    assert redis_url(loads(b""), {}) == ""  # one process
    with pytest.raises(ConfigError, match=r"cluster\.redis_url"):
        loads(b'[cluster]\nredis_url = "localhost:6379"\n')
    with pytest.raises(ConfigError, match=r"cluster\.name"):
        loads(b'[cluster]\nname = "a b"\n')
    with pytest.raises(ConfigError, match=r"cluster\.lease_ttl_seconds"):
        loads(b"[cluster]\nlease_ttl_seconds = 0\n")
