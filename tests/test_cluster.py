"""Several replicas, one fleet (DESIGN.md §12): three gpumanager processes sharing a real Redis and
a real PostgreSQL, over one fake SURF cloud, driven at once by the real ollama and openai clients.

The servers are shared by the module's tests; each test has a fleet (a Redis namespace, a cloud,
three replicas) of its own.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import ollama
import openai
import psycopg
import pytest

from tests.clouds import Machine
from tests.harness import wait_until
from tests.postgres import Postgres, running_postgres
from tests.redis_server import Redis, running_redis
from tests.replicas import Replica, Replicas, running_replicas
from tests.test_webhooks import receiving, webhook

MODEL = "llama3.2"
PACE = 0.25  # seconds between one user's requests in the budget test


@pytest.fixture(scope="module")
def redis() -> Iterator[Redis]:
    with running_redis() as server:
        yield server


@pytest.fixture(scope="module")
def pg() -> Iterator[Postgres]:
    with running_postgres() as server:
        yield server


def database(pg: Postgres, tmp_path: Path) -> str:
    return pg.new_database(tmp_path.name[-40:].lower())


def leader(fleet: Replicas) -> Replica:
    """The replica that says it leads (the newest to say so)."""
    wait_until(lambda: any(r.says("is now the leader") for r in fleet.replicas if r.proc), timeout=10)
    leading = [r for r in fleet.replicas if r.proc and r.says("is now the leader")]
    return max(leading, key=lambda r: r.tail(10**7).rfind("is now the leader"))


def seen(replica: Replica) -> int:
    """The replicas this one said it saw last."""
    counts = re.findall(r"replicas of this fleet seen: (\d+)", replica.tail(10**7))
    return int(counts[-1]) if counts else 0


def generate(url: str, key: str, model: str = MODEL) -> str:
    with ollama.Client(host=url, headers={"Authorization": f"Bearer {key}"}, timeout=30) as client:
        return str(client.generate(model, "hi", options={"num_predict": 2})["response"])


async def stream(url: str, key: str, prompt: str = "hi", tokens: int = 10) -> str:
    async with ollama.AsyncClient(host=url, headers={"Authorization": f"Bearer {key}"}, timeout=60) as client:
        parts = []
        async for chunk in await client.generate(MODEL, prompt, stream=True, options={"num_predict": tokens}):
            parts.append(chunk["response"])
        return "".join(parts)


def test_streams_over_three_replicas_never_exceed_a_host_slots(tmp_path: Path, redis: Redis, pg: Postgres) -> None:
    machines = [Machine("gpu-1", slots=3, running=True, token_delay=0.01), Machine("gpu-2", slots=2, running=True)]
    with running_replicas(tmp_path, machines, redis.url, database(pg, tmp_path)) as fleet:

        async def drive() -> list[str]:
            jobs = [stream(fleet.replicas[i % 3].url, fleet.key, tokens=8) for i in range(200)]
            return await asyncio.gather(*jobs)

        answers = asyncio.run(drive())
        assert all(answer.strip() for answer in answers), fleet.logs()
        sims = [fleet.cloud.sims["gpu-1"], fleet.cloud.sims["gpu-2"]]
        assert sims[0].max_in_flight <= 3 and sims[1].max_in_flight <= 2, fleet.logs()
        assert sims[0].max_in_flight == 3  # the slots were used, not just respected
        assert sum(s.requests["/api/generate"] for s in sims) == 200
        # Every replica served its share, and every request is in the shared ledger in PostgreSQL.
        key_id = fleet.keys().authenticate(fleet.key).id

        def rows() -> list[tuple[str, int]]:
            with psycopg.connect(pg.url_for(database_name(fleet))) as conn:
                found = conn.execute(
                    "SELECT host, count(*) FROM requests WHERE key_id = %s AND status = 200 "
                    "GROUP BY host ORDER BY host",
                    (key_id,),
                ).fetchall()
            return [(str(h), int(n)) for h, n in found]

        wait_until(lambda: sum(n for _, n in rows()) == 200, timeout=10)
        served = dict(rows())
        assert served["gpu-1"] == sims[0].requests["/api/generate"]
        assert served["gpu-2"] == sims[1].requests["/api/generate"]


def database_name(fleet: Replicas) -> str:
    text = fleet.replicas[0].config.read_text()
    url = text.split('database_url = "', 1)[1].split('"', 1)[0]
    return url.rsplit("/", 1)[1]


def test_fifty_requests_during_one_wake_make_one_resume(tmp_path: Path, redis: Redis, pg: Postgres) -> None:
    with running_replicas(
        tmp_path, [Machine("gpu-1", slots=4)], redis.url, database(pg, tmp_path), boot_seconds=1.0
    ) as fleet:

        async def drive() -> list[str]:
            clients = [openai.AsyncOpenAI(base_url=r.url + "/v1", api_key=fleet.key) for r in fleet.replicas]

            async def ask(i: int) -> str:
                answer = await clients[i % 3].chat.completions.create(
                    model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4
                )
                return answer.choices[0].message.content or ""

            try:
                return await asyncio.gather(*(ask(i) for i in range(50)))
            finally:
                for client in clients:
                    await client.close()

        answers = asyncio.run(drive())
        assert len(answers) == 50 and all(answers)
        assert fleet.resumes("gpu-1") == 1, fleet.logs()
        assert sum(r.says("resuming gpu-1") for r in fleet.replicas) == 1  # the others watched it
        assert fleet.cloud.sims["gpu-1"].max_in_flight <= 4


def test_a_host_streaming_through_one_replica_is_not_paused_by_the_leader(
    tmp_path: Path, redis: Redis, pg: Postgres
) -> None:
    machine = Machine("gpu-1", slots=2, token_delay=0.1)  # paused: the stream wakes it
    with running_replicas(tmp_path, [machine], redis.url, database(pg, tmp_path), reservation_seconds=0.6) as fleet:
        boss = leader(fleet)
        other = next(r for r in fleet.replicas if r is not boss)
        started = time.monotonic()
        text = asyncio.run(stream(other.url, fleet.key, tokens=40))  # 4 s: more than six windows
        took = time.monotonic() - started
        assert took > 3.5 and len(text.split()) == 40
        assert fleet.resumes("gpu-1") == 1
        assert fleet.pauses("gpu-1") == 0, fleet.logs()  # never while it streamed
        wait_until(lambda: fleet.pauses("gpu-1") == 1, timeout=5)  # once it ended and its window passed
        assert boss.says("pausing gpu-1 (idle")


def test_the_leader_killed_mid_stream(tmp_path: Path, redis: Redis, pg: Postgres) -> None:
    """Its streams end; its leases expire within lease_ttl_seconds; the requests waiting on the other
    replicas are served; another replica leads and pauses the host after its window."""
    machine = Machine("gpu-1", slots=2, token_delay=0.2)  # paused: the leader's streams wake it
    reservation, ttl = 1.0, 2.0
    with running_replicas(
        tmp_path, [machine], redis.url, database(pg, tmp_path), reservation_seconds=reservation, lease_ttl=ttl
    ) as fleet:
        boss = leader(fleet)
        others = [r for r in fleet.replicas if r is not boss]

        async def drive() -> tuple[list[BaseException | str], float, float]:
            doomed = [asyncio.create_task(stream(boss.url, fleet.key, tokens=100)) for _ in range(2)]
            sim = fleet.cloud.sims["gpu-1"]
            while sim.active < 2:  # both slots held by the leader's streams
                await asyncio.sleep(0.02)
            waiting = [asyncio.create_task(stream(r.url, fleet.key, tokens=3)) for r in others]
            await asyncio.sleep(0.3)
            assert not any(t.done() for t in waiting)  # no slot for them yet
            boss.kill()
            killed = time.monotonic()
            served = await asyncio.gather(*waiting, return_exceptions=True)
            await asyncio.gather(*doomed, return_exceptions=True)
            return served, killed, time.monotonic()

        served, killed, done = asyncio.run(drive())
        assert all(isinstance(s, str) and s for s in served), (served, fleet.logs())
        assert done - killed < ttl + 3  # its leases expired
        wait_until(lambda: any(r.says("is now the leader") for r in others), timeout=ttl + 2)
        # The host is paused by the new leader: no later than its window after the last request,
        # plus lease_ttl_seconds for the leadership to move (and the cloud's pause call).
        wait_until(lambda: fleet.pauses("gpu-1") == 1, timeout=reservation + ttl + 3)
        assert time.monotonic() - done < reservation + ttl + 3


def test_emergency_off_through_one_replica_stops_wakes_on_all(tmp_path: Path, redis: Redis, pg: Postgres) -> None:
    with running_replicas(tmp_path, [Machine("gpu-1")], redis.url, database(pg, tmp_path)) as fleet:
        first, *rest = fleet.replicas
        answer = httpx.post(first.url + "/gpu/emergency-off", headers=fleet.headers(fleet.admin_key), timeout=10)
        assert answer.status_code == 202, answer.text
        turned = time.monotonic()
        for replica in rest:

            def refused(url: str = replica.url) -> bool:
                try:
                    generate(url, fleet.key)
                except ollama.ResponseError as exc:
                    return exc.status_code == 503 and "emergency-off" in str(exc)
                return False

            wait_until(refused, timeout=1.0)
        assert time.monotonic() - turned < 1.5
        assert fleet.resumes("gpu-1") == 0
        answer = httpx.post(rest[0].url + "/gpu/emergency-on", headers=fleet.headers(fleet.admin_key), timeout=10)
        assert answer.status_code in (200, 202), answer.text

        def served() -> bool:
            try:
                return bool(generate(rest[1].url, fleet.key))
            except ollama.ResponseError:
                return False

        wait_until(served, timeout=5)  # emergency-on through another replica reached this one
        assert fleet.resumes("gpu-1") == 1


def test_a_key_revoked_through_one_is_refused_by_all_within_a_second(
    tmp_path: Path, redis: Redis, pg: Postgres
) -> None:
    with running_replicas(tmp_path, [Machine("gpu-1", running=True)], redis.url, database(pg, tmp_path)) as fleet:
        for replica in fleet.replicas:
            assert httpx.get(replica.url + "/api/tags", headers=fleet.headers(), timeout=5).status_code == 200
        key_id = fleet.keys().authenticate(fleet.key).id
        env = {**os.environ, "GPUMANAGER_REDIS_URL": fleet.redis_url}
        config = fleet.replicas[0].config
        revoke = [sys.executable, "-m", "gpumanager", "revoke-key", key_id, "--config", str(config)]
        done = subprocess.run(revoke, env=env, capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr
        revoked = time.monotonic()
        assert "revoked key" in done.stdout
        for replica in fleet.replicas:
            wait_until(
                lambda r=replica: httpx.get(r.url + "/api/tags", headers=fleet.headers(), timeout=5).status_code == 401,
                timeout=1.0,
            )
        assert time.monotonic() - revoked < 1.0


def test_a_daily_budget_holds_across_replicas(tmp_path: Path, redis: Redis, pg: Postgres) -> None:
    machine = Machine("gpu-1", slots=4, running=True, cost=3600.0, token_delay=0.02)  # $1 a second
    with running_replicas(tmp_path, [machine], redis.url, database(pg, tmp_path)) as fleet:
        store = fleet.keys()
        record, key = store.generate("capped", "capped@example.org")
        store.set_limits(record.id, {"dollars_per_day": 1.0})

        def usage(replica: Replica) -> dict[str, object]:
            """The key's limits and its use of them, as this replica counts them."""
            answer = httpx.get(replica.url + "/usage/me", headers=fleet.headers(key), timeout=5)
            return answer.json()["limits"] if answer.status_code == 200 else {}  # type: ignore[no-any-return]

        for replica in fleet.replicas:  # every replica has the new key and its limit
            wait_until(lambda r=replica: usage(r).get("limits") == {"dollars_per_day": 1.0}, timeout=2)
        statuses: list[int] = []
        for i in range(40):
            replica = fleet.replicas[i % 3]
            answer = httpx.post(
                replica.url + "/api/generate",
                json={"model": MODEL, "prompt": "hi", "stream": False, "options": {"num_predict": 5}},
                headers=fleet.headers(key),
                timeout=30,
            )
            statuses.append(answer.status_code)
            if answer.status_code == 429:
                break
            time.sleep(PACE)  # a user's pace: a few requests a second, spread over the replicas
        assert statuses[-1] == 429, statuses
        served = statuses.count(200)
        assert 1 <= served < 39  # how many depends on how long each takes at $1 a second
        for replica in fleet.replicas:  # refused by every replica, not just the one that saw it
            wait_until(lambda r=replica: float(usage(r)["dollars_today"]) >= 1.0, timeout=1)  # type: ignore[arg-type]
            answer = httpx.post(
                replica.url + "/api/generate",
                json={"model": MODEL, "prompt": "hi", "stream": False},
                headers=fleet.headers(key),
                timeout=30,
            )
            assert answer.status_code == 429 and "budget" in answer.text, answer.text

        # The replica that refused had itself served requests worth far less than the limit: it
        # refused on the other replicas' spend, which one process alone would not have known.
        def costs() -> list[int]:
            with psycopg.connect(pg.url_for(database_name(fleet))) as conn:
                found = conn.execute(
                    "SELECT cost_micro FROM requests WHERE key_id = %s AND status = 200 ORDER BY ts", (record.id,)
                )
                return [int(c) for (c,) in found.fetchall()]

        wait_until(lambda: len(costs()) == served, timeout=5)
        refused_by = (len(statuses) - 1) % 3
        own = sum(c for i, c in enumerate(costs()) if i % 3 == refused_by) / 1e6
        assert own < 1.0, (own, costs())


def test_redis_stopped_and_started_again(tmp_path: Path, pg: Postgres) -> None:
    """Without Redis a replica serves awake hosts within its share of their slots, wakes nothing
    (503, saying why), pauses nothing and says so; once Redis is back all is as before."""
    machines = [
        Machine("gpu-1", models=("llama3.2:latest",), slots=3, running=True),
        Machine("gpu-2", models=("qwen2.5:7b",), slots=3),
    ]
    with (
        running_redis() as redis,
        running_replicas(tmp_path, machines, redis.url, database(pg, tmp_path), reservation_seconds=1) as fleet,
    ):
        url = fleet.replicas[1].url
        wait_until(lambda: all(seen(r) == 3 for r in fleet.replicas))  # each one's share will be a third
        assert generate(url, fleet.key)  # gpu-1 is kept a window (1 s) from now
        redis.stop()
        wait_until(lambda: all(r.says("is unreachable") for r in fleet.replicas), timeout=5)
        paused_before = fleet.pauses("gpu-1")
        for replica in fleet.replicas:  # the awake host serves
            assert generate(replica.url, fleet.key)
        sim = fleet.cloud.sims["gpu-1"]
        fleet.call(sim.reset_stats)

        async def three() -> list[str]:
            return await asyncio.gather(*(stream(url, fleet.key, tokens=5) for _ in range(3)))

        assert all(asyncio.run(three()))  # one replica, three at once: they take turns on its one slot
        assert sim.max_in_flight == 1, fleet.logs()  # its share: 3 slots / 3 replicas seen
        restarted = fleet.replicas[2]  # a replica (re)started while Redis is gone knows the keys and its share
        restarted.stop()
        restarted.start()
        restarted.wait_ready()
        assert generate(restarted.url, fleet.key)
        with pytest.raises(ollama.ResponseError) as refused:
            generate(url, fleet.key, "qwen2.5:7b")
        assert refused.value.status_code == 503 and "Redis" in str(refused.value)
        assert fleet.resumes("gpu-2") == 0
        time.sleep(1.5)  # past gpu-1's window with no request: still nobody pauses it
        assert fleet.pauses("gpu-1") == paused_before
        redis.start()
        wait_until(lambda: all(r.says("answers again") for r in fleet.replicas), timeout=10)
        assert generate(url, fleet.key, "qwen2.5:7b")
        assert fleet.resumes("gpu-2") == 1
        wait_until(lambda: fleet.pauses("gpu-1") == paused_before + 1, timeout=10)  # idle pauses again


def test_a_job_submitted_through_one_replica_is_its_key_own_on_all(tmp_path: Path, redis: Redis, pg: Postgres) -> None:
    """RunPod jobs behind a load balancer: status and cancel reach any replica; another key's is 404."""
    with running_replicas(
        tmp_path, [], redis.url, database(pg, tmp_path), count=2, job_endpoint="gpu-jobs", boot_seconds=0.1
    ) as fleet:
        first, second = fleet.replicas
        store = fleet.keys()
        other = store.generate("other", "other@example.org")[1]
        with httpx.Client(timeout=30) as client:
            submitted = client.post(
                f"{first.url}/v2/gpu-jobs/run", headers=fleet.headers(), json={"input": {"seconds": 0.3}}
            )
            assert submitted.status_code == 200, submitted.text
            job_id = submitted.json()["id"]

            def status(url: str, key: str) -> httpx.Response:
                return client.get(f"{url}/v2/gpu-jobs/status/{job_id}", headers=fleet.headers(key))

            wait_until(lambda: status(second.url, fleet.key).status_code == 200, timeout=2)
            assert status(second.url, other).status_code == 404  # another key's job, on any replica
            wait_until(lambda: status(second.url, fleet.key).json()["status"] == "COMPLETED", timeout=10)
        key_id = store.authenticate(fleet.key).id  # type: ignore[union-attr]

        def recorded() -> list[tuple[str, str]]:
            with psycopg.connect(pg.url_for(database_name(fleet))) as conn:
                found = conn.execute("SELECT key_id, status FROM jobs WHERE id = %s", (job_id,)).fetchall()
            return [(str(k), str(s)) for k, s in found]

        wait_until(lambda: recorded() == [(key_id, "COMPLETED")], timeout=10)  # one row: its replica's


def test_a_dashboard_session_holds_on_every_replica_and_its_logout_too(
    tmp_path: Path, redis: Redis, pg: Postgres
) -> None:
    with running_replicas(
        tmp_path, [Machine("gpu-1", running=True)], redis.url, database(pg, tmp_path), count=2
    ) as fleet:
        first, second = fleet.replicas
        login = httpx.post(f"{first.url}/dashboard/login", headers={"origin": first.url}, data={"key": fleet.admin_key})
        assert login.status_code == 303 and login.headers["location"] == "/dashboard"
        cookies = {"gm_session": login.cookies["gm_session"]}
        # Signed with the fleet's one secret: the other replica takes it (a balancer may send it there).
        assert httpx.get(f"{second.url}/dashboard/api/state", cookies=cookies).status_code == 200
        out = httpx.post(f"{second.url}/dashboard/logout", headers={"origin": second.url}, cookies=cookies)
        assert out.status_code == 303
        wait_until(lambda: httpx.get(f"{first.url}/dashboard/api/state", cookies=cookies).status_code == 401, 1.0)


def test_every_replica_sees_every_event_once_and_webhooks_go_out_once(
    tmp_path: Path, redis: Redis, pg: Postgres
) -> None:
    with receiving() as receiver:
        hook = webhook(receiver.hook_url("fleet"), events=["request", "wake_started", "host_state"])
        with running_replicas(
            tmp_path, [Machine("gpu-1")], redis.url, database(pg, tmp_path), extra=hook, reservation_seconds=30
        ) as fleet:
            for replica in fleet.replicas:  # the first wakes gpu-1; one request through each replica
                assert generate(replica.url, fleet.key)

            def posted(kind: str) -> list[dict[str, object]]:
                return [p.json() for p in receiver.to("fleet") if p.json()["type"] == kind]

            wait_until(lambda: len(posted("request")) == 3, timeout=5)
            assert len(posted("wake_started")) == 1
            states = [(e["old"], e["new"], e["reason"]) for e in posted("host_state")]
            assert [(e["old"], e["new"]) for e in posted("host_state")] == [
                ("unknown", "paused"),  # found by all three at start-up: one event
                ("paused", "resuming"),
                ("resuming", "starting"),
                ("starting", "ready"),
            ], states
            for replica in fleet.replicas:  # each replica's bus: its own events and the others', once
                answer = httpx.get(
                    replica.url + "/events",
                    params={"follow": "false", "type": "request,wake_started"},
                    headers=fleet.headers(fleet.admin_key),
                    timeout=10,
                )
                lines = answer.text.splitlines()
                kinds = [
                    line.split(": ", 1)[1] for line in lines if line.startswith("event: ") and "snapshot" not in line
                ]
                assert sorted(kinds) == ["request", "request", "request", "wake_started"], (replica.name, kinds)
            assert len(posted("request")) == 3  # and never a second time, from another replica


def test_a_wake_whose_replica_dies_is_taken_over_without_a_second_resume(
    tmp_path: Path, redis: Redis, pg: Postgres
) -> None:
    with running_replicas(
        tmp_path, [Machine("gpu-1")], redis.url, database(pg, tmp_path), boot_seconds=4.0, lease_ttl=1.0
    ) as fleet:
        others: list[Replica] = []

        async def drive() -> list[BaseException | str]:
            first = asyncio.create_task(stream(fleet.replicas[0].url, fleet.key, tokens=3))
            while fleet.resumes("gpu-1") < 1:  # one replica holds the wake and asked the cloud
                await asyncio.sleep(0.02)
            holder = next(r for r in fleet.replicas if r.says("resuming gpu-1"))  # whichever won the lock
            others.extend(r for r in fleet.replicas if r is not holder)
            waiting = [asyncio.create_task(stream(r.url, fleet.key, tokens=3)) for r in others]
            await asyncio.sleep(0.3)
            holder.kill()  # mid-wake: the host is still booting
            served = await asyncio.gather(*waiting, return_exceptions=True)
            await asyncio.gather(first, return_exceptions=True)
            return served

        served = asyncio.run(drive())
        assert all(isinstance(s, str) and s for s in served), (served, fleet.logs())
        assert any(r.says("taking over the wake of gpu-1") for r in others), fleet.logs()
        assert any(r.says("no resume call") for r in others)  # the cloud said it was resuming already
        assert fleet.resumes("gpu-1") == 1


def test_a_job_whose_replica_dies_is_watched_to_its_end_by_the_leader(
    tmp_path: Path, redis: Redis, pg: Postgres
) -> None:
    with running_replicas(
        tmp_path, [], redis.url, database(pg, tmp_path), count=2, job_endpoint="gpu-jobs", boot_seconds=0.1
    ) as fleet:
        taker, other = fleet.replicas
        submitted = httpx.post(
            f"{taker.url}/v2/gpu-jobs/run", headers=fleet.headers(), json={"input": {"seconds": 3}}, timeout=30
        )
        assert submitted.status_code == 200, submitted.text
        job_id = submitted.json()["id"]

        def rows(sql: str) -> list[tuple[object, ...]]:
            with psycopg.connect(pg.url_for(database_name(fleet))) as conn:
                return conn.execute(sql, (job_id,)).fetchall()  # type: ignore[arg-type]

        wait_until(lambda: rows("SELECT status FROM jobs WHERE id = %s") == [("IN_PROGRESS",)], timeout=5)
        taker.kill()  # mid-job: nobody asks about it, and the replica that watched it is gone
        wait_until(lambda: rows("SELECT status FROM jobs WHERE id = %s") == [("COMPLETED",)], timeout=15)
        assert other.says("watching 1 RunPod jobs")
        key_id = fleet.keys().authenticate(fleet.key).id  # type: ignore[union-attr]
        with psycopg.connect(pg.url_for(database_name(fleet))) as conn:
            found = conn.execute(
                "SELECT count(*) FROM requests WHERE key_id = %s AND route = '/v2/run' AND status = 200", (key_id,)
            ).fetchone()
        assert found == (1,)  # its end is recorded once, by the replica that adopted it
