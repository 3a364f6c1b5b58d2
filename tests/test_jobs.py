"""RunPod's serverless job API through gpumanager, driven by the real `runpod` SDK and by plain httpx.

The fake RunPod (tests/fakes/runpod.py) runs each job on its endpoint's workers, scripted by the
job's input (`seconds`, `fail`, `stream`); gpumanager is the real server on loopback in front of it.
"""

from __future__ import annotations

import contextlib
import re
import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from anyio.from_thread import BlockingPortal, start_blocking_portal

from gpumanager.app import build_app
from gpumanager.config import load
from gpumanager.hosts import HostState
from gpumanager.keys import KeyStore, Limits
from gpumanager.runtime import Runtime
from gpumanager.sim import running_server
from tests.fakes.runpod import FakeRunPod, runpod_sdk

ENDPOINT = "gpu-jobs"
PRICE = 3600.0  # dollars an hour: a dollar a second, so costs are easy to read
WINDOW = 0.6  # the reservation window, seconds


def config_text(fake: FakeRunPod, *, window: float = WINDOW, per_host: bool = False, extra: str = "") -> str:
    """With `per_host`, jobs are asked for on the endpoint's own `[[hosts]]` entry, else on the provider."""
    jobs = f'[[hosts]]\nname = "{ENDPOINT}"\njobs = true' if per_host else ""
    return f"""
[timing]
reservation_minutes = {window / 60}
fallback_reservation_minutes = {window / 60}
startup_timeout_seconds = 5
ollama_readiness_wait_seconds = 0.05
reconcile_interval_seconds = 0.3
probe_timeout_seconds = 1
shutdown_grace_seconds = 1
job_poll_seconds = 0.2
{extra}

[[providers]]
type = "runpod"
name = "runpod"
api_url = "{fake.api_url}"
serverless_url = "{fake.serverless_url}"
name_filter = "gpu-"
poll_seconds = 0.05
retry_seconds = 0.05
api_timeout_seconds = 5
cost_per_hour = {PRICE}
jobs = {str(not per_host).lower()}

{jobs}
"""


@dataclass
class Jobs:
    """gpumanager in front of a fake RunPod with one cold job endpoint."""

    portal: BlockingPortal
    fake: FakeRunPod
    endpoint_id: str
    url: str
    runtime: Runtime
    keys: KeyStore
    admin_key: str
    user_key: str
    other_key: str

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        async def run() -> Any:
            return fn(*args)

        return self.portal.call(run)

    @property
    def host(self) -> Any:
        return self.runtime.fleet.hosts[ENDPOINT]

    def headers(self, key: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {key or self.user_key}"}

    def job(self, job_id: str) -> dict[str, Any]:
        return next(j for j in self.call(self.fake.jobs_of, ENDPOINT) if j["id"] == job_id)

    def endpoint(self, key: str | None = None, ident: str = ENDPOINT) -> Any:
        """The SDK's endpoint, as its user writes it: the URL base and the key are all that change."""
        runpod = runpod_sdk()
        runpod.api_key = key or self.user_key
        runpod.endpoint_url_base = self.url + "/v2"
        return runpod.Endpoint(ident)

    def ledger(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        conn = sqlite3.connect(self.runtime.ledger.path)
        try:
            return conn.execute(sql, params).fetchall()
        finally:
            conn.close()


def until(check: Callable[[], Any], timeout: float = 10.0, what: str = "") -> Any:
    """Wait for a condition (polling; bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or check}")
        time.sleep(0.02)


@contextlib.contextmanager
def serving(portal: BlockingPortal, config_path: Path, environ: dict[str, str]) -> Iterator[tuple[str, Runtime]]:
    app = build_app(load(config_path), environ=environ)
    with portal.wrap_async_context_manager(running_server(app, lifespan="on", timeout_graceful_shutdown=1)) as server:
        yield server.url, app.state.runtime


@contextlib.contextmanager
def running_jobs(tmp_path: Path, *, window: float = WINDOW, extra: str = "") -> Iterator[Jobs]:
    with start_blocking_portal() as portal, running_fake(portal) as fake:
        endpoint_id = portal.call(_add, fake)
        config_path = tmp_path / "config.toml"
        config_path.write_text(config_text(fake, window=window, extra=extra))
        keys = KeyStore(load(config_path).paths.api_keys_file)
        admin_key = keys.generate("admin", "admin@example.org", admin=True)[1]
        user_key = keys.generate("user", "user@example.org")[1]
        other_key = keys.generate("other", "other@example.org")[1]
        with serving(portal, config_path, {"RUNPOD_API_KEY": fake.api_key}) as (url, runtime):
            yield Jobs(portal, fake, endpoint_id, url, runtime, keys, admin_key, user_key, other_key)


def running_fake(portal: BlockingPortal) -> contextlib.AbstractContextManager[FakeRunPod]:
    return portal.wrap_async_context_manager(FakeRunPod(boot_seconds=0.1, stop_seconds=0.05, queue_timeout=2))


async def _add(fake: FakeRunPod) -> str:
    return fake.add_endpoint(ENDPOINT, workers_min=0, idle_timeout=0.1)


@pytest.fixture
def jobs(tmp_path: Path) -> Iterator[Jobs]:
    with running_jobs(tmp_path) as running:
        yield running


def metric(text: str, name: str, **labels: str) -> float:
    """One series of a Prometheus text page (0 when absent)."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and line.split(" ")[0] != name:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line.split(" ")[0]))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


# -- the SDK -----------------------------------------------------------------------------------------


def test_the_runpod_sdk_runs_jobs_through_gpumanager(jobs: Jobs) -> None:
    assert jobs.host.state is HostState.PAUSED  # workers off: an idle endpoint costs nothing
    endpoint = jobs.endpoint()
    started = time.monotonic()
    assert endpoint.run_sync({"prompt": "hi"}, timeout=30) == {"echo": {"prompt": "hi"}}
    assert time.monotonic() - started < 10
    assert ("warm", ENDPOINT) in jobs.fake.calls  # the first job warmed the endpoint
    seen = jobs.fake.upstream_headers[ENDPOINT]
    assert seen["authorization"] == f"Bearer {jobs.fake.api_key}"  # RunPod's key, never the user's
    assert jobs.user_key not in str(seen)

    job = endpoint.run({"seconds": 1.5, "n": 1})
    assert job.status() in ("IN_QUEUE", "IN_PROGRESS")
    assert job.output(timeout=20) == {"echo": {"seconds": 1.5, "n": 1}}
    assert job.status() == "COMPLETED"

    streamed = endpoint.run({"stream": ["a", "b", "c"], "seconds": 0.3})
    assert list(streamed.stream()) == ["a", "b", "c"]

    long = endpoint.run({"seconds": 30})
    assert long.cancel()["status"] == "CANCELLED"
    assert jobs.job(long.job_id)["status"] == "CANCELLED"

    health = jobs.endpoint(ident=jobs.endpoint_id).health()  # the RunPod id names it too
    assert health["jobs"]["completed"] >= 3 and "workers" in health
    ops = [op for op, name, _ in jobs.fake.job_calls if name == ENDPOINT]
    assert {"runsync", "run", "status", "stream", "cancel"} <= set(ops)


def test_refusals_are_runpod_shaped_and_never_retried_for_hours(jobs: Jobs) -> None:
    unknown = httpx.post(f"{jobs.url}/v2/gpu-nothing/run", headers=jobs.headers(), json={"input": {}}, timeout=10)
    assert unknown.status_code == 404 and "no RunPod job endpoint 'gpu-nothing'" in unknown.json()["error"]
    assert "gpu-jobs" in unknown.json()["error"]
    with pytest.raises(RuntimeError, match="Unauthorized"):  # the SDK's own words for a 401
        jobs.endpoint(key="not-a-key").run_sync({"x": 1})
    purge = httpx.post(f"{jobs.url}/v2/{ENDPOINT}/purge-queue", headers=jobs.headers(), timeout=10)
    assert purge.status_code == 403 and "admin" in purge.json()["error"]
    assert httpx.post(f"{jobs.url}/v2/{ENDPOINT}/purge-queue", headers=jobs.headers(jobs.admin_key)).json() == {
        "removed": 0,
        "status": "completed",
    }
    bad_wait = httpx.post(
        f"{jobs.url}/v2/{ENDPOINT}/runsync?wait=soon", headers=jobs.headers(), json={"input": {}}, timeout=10
    )
    assert bad_wait.status_code == 400 and "wait" in bad_wait.json()["error"]
    wrong = httpx.get(f"{jobs.url}/v2/{ENDPOINT}/run", headers=jobs.headers(), timeout=10)
    assert wrong.status_code == 405
    odd = httpx.get(f"{jobs.url}/v2/{ENDPOINT}/status/.x", headers=jobs.headers(jobs.admin_key), timeout=10)
    assert odd.status_code == 404 and "not found on gpu-jobs" in odd.json()["error"]  # never sent to RunPod
    assert not [call for call in jobs.fake.job_calls if call[2] == ".x"]
    # A submission RunPod refuses is answered as RunPod answered it, and is a request row all the same.
    refused = httpx.post(f"{jobs.url}/v2/{ENDPOINT}/run", headers=jobs.headers(), json={"nope": 1}, timeout=10)
    assert refused.status_code == 400 and "input" in refused.json()["error"]
    user = jobs.keys.authenticate(jobs.user_key)
    assert user is not None
    until(
        lambda: ("/v2/run", 400) in jobs.ledger("SELECT route, status FROM requests WHERE key_id = ?", user.id),
        what="the refused submission's row",
    )
    assert jobs.call(lambda: jobs.runtime.fleet.lease_count()) == 0  # its lease ended


# -- plain HTTP, as the first users did it ---------------------------------------------------------


def test_plain_httpx_runsync_then_status(jobs: Jobs) -> None:
    endpoint_url = f"{jobs.url}/v2/{jobs.endpoint_id}"
    with httpx.Client(headers=jobs.headers(), timeout=30) as client:
        answer = client.post(f"{endpoint_url}/runsync?wait=1000", json={"input": {"seconds": 3}})
        assert answer.status_code == 200
        body = answer.json()
        assert body["status"] in ("IN_QUEUE", "IN_PROGRESS") and body["id"].startswith("sync-")
        assert ("runsync", ENDPOINT, "") in jobs.fake.job_calls
        # `?wait=` is the one query string passed on: RunPod gave up waiting after a second
        status = until(
            lambda: (s := client.get(f"{endpoint_url}/status/{body['id']}").json())["status"] == "COMPLETED" and s,
            what="the job to complete",
        )
        assert status["output"] == {"echo": {"seconds": 3}}
        assert status["executionTime"] >= 3000 and status["delayTime"] >= 0
    # A bare key in Authorization, as RunPod's docs show it.
    bare = httpx.get(f"{endpoint_url}/status/{body['id']}", headers={"Authorization": jobs.user_key}, timeout=10)
    assert bare.status_code == 200 and bare.json()["status"] == "COMPLETED"


def test_another_keys_job_is_not_found_and_retry_follows_the_new_id(jobs: Jobs) -> None:
    base = f"{jobs.url}/v2/{ENDPOINT}"
    with httpx.Client(timeout=30) as client:
        failed = client.post(f"{base}/runsync", headers=jobs.headers(), json={"input": {"fail": "boom"}}).json()
        assert failed["status"] == "FAILED" and failed["error"] == "boom"
        job_id = failed["id"]
        for method, op in (("GET", "status"), ("GET", "stream"), ("POST", "cancel"), ("POST", "retry")):
            other = client.request(method, f"{base}/{op}/{job_id}", headers=jobs.headers(jobs.other_key))
            assert other.status_code == 404, op
            assert other.json()["error"] == f"job {job_id} not found on {ENDPOINT}"
        assert client.get(f"{base}/status/{job_id}", headers=jobs.headers(jobs.admin_key)).status_code == 200
        assert ("retry", ENDPOINT, job_id) not in jobs.fake.job_calls  # refused before RunPod heard of it

        retried = client.post(f"{base}/retry/{job_id}", headers=jobs.headers())
        assert retried.status_code == 200
        new_id = retried.json()["id"]
        assert new_id == f"{job_id}-u1"
        assert client.get(f"{base}/status/{new_id}", headers=jobs.headers(jobs.other_key)).status_code == 404
        again = until(
            lambda: (
                (s := client.get(f"{base}/status/{new_id}", headers=jobs.headers()).json())["status"] == "FAILED" and s
            ),
            what="the retried job to end",
        )
        assert again["error"] == "boom"
        done = client.post(f"{base}/runsync", headers=jobs.headers(), json={"input": {}}).json()
        not_retryable = client.post(f"{base}/retry/{done['id']}", headers=jobs.headers())
        assert not_retryable.status_code == 400  # RunPod's answer, passed on unchanged
    owners = dict(jobs.call(lambda: {i: j.key for i, j in jobs.runtime.jobs.jobs.items()}))
    user = jobs.keys.authenticate(jobs.user_key)
    assert user is not None and owners[job_id] == owners[new_id] == user.id


# -- keys' limits ----------------------------------------------------------------------------------


def test_budgets_and_limits_answer_402_and_403_never_429(jobs: Jobs) -> None:
    spender = jobs.keys.generate("spender", "s@example.org", limits=Limits(dollars_per_day=0.5))[1]
    hasty = jobs.keys.generate("hasty", "h@example.org", limits=Limits(requests_per_minute=1))[1]
    elsewhere = jobs.keys.generate("elsewhere", "e@example.org", limits=Limits(models=["llama*"]))[1]
    single = jobs.keys.generate("single", "o@example.org", limits=Limits(max_concurrent=1))[1]
    jobs.call(jobs.runtime.keys.reload)
    base = f"{jobs.url}/v2/{ENDPOINT}"
    with httpx.Client(timeout=30) as client:
        spent = client.post(f"{base}/runsync", headers=jobs.headers(spender), json={"input": {"seconds": 1}})
        assert spent.json()["status"] == "COMPLETED"  # a dollar a second: this spent the budget
        refused = client.post(f"{base}/run", headers=jobs.headers(spender), json={"input": {}})
        assert refused.status_code == 402 and "budget" in refused.json()["error"]
        assert "retry-after" not in refused.headers

        assert client.post(f"{base}/run", headers=jobs.headers(hasty), json={"input": {}}).status_code == 200
        limited = client.post(f"{base}/run", headers=jobs.headers(hasty), json={"input": {}})
        assert limited.status_code == 403 and "requests a minute" in limited.json()["error"]

        assert (
            client.post(f"{base}/run", headers=jobs.headers(single), json={"input": {"seconds": 5}}).status_code == 200
        )
        second = client.post(f"{base}/run", headers=jobs.headers(single), json={"input": {}})
        assert second.status_code == 403 and "1 jobs queued or running" in second.json()["error"]

        excluded = client.post(f"{base}/run", headers=jobs.headers(elsewhere), json={"input": {}})
        assert excluded.status_code == 403 and "may not use the RunPod endpoint 'gpu-jobs'" in excluded.json()["error"]
    started = time.monotonic()
    with pytest.raises(Exception, match="402"):  # the SDK raises at once: nothing to retry
        jobs.endpoint(key=spender).run({"x": 1})
    assert time.monotonic() - started < 5


def test_at_the_fleets_spend_cap_jobs_are_refused_with_402(tmp_path: Path) -> None:
    with running_jobs(tmp_path, extra="\n[budget]\ndaily_dollars = 1") as jobs:
        base = f"{jobs.url}/v2/{ENDPOINT}"
        done = httpx.post(f"{base}/runsync", headers=jobs.headers(), json={"input": {"seconds": 1.2}}, timeout=30)
        assert done.json()["status"] == "COMPLETED"  # a dollar a second: the day's dollar is spent
        until(lambda: jobs.call(lambda: jobs.runtime.fleet.capped is not None), what="the cap")
        refused = httpx.post(f"{base}/run", headers=jobs.headers(), json={"input": {}}, timeout=10)
        assert refused.status_code == 402 and "daily GPU budget" in refused.json()["error"]
        until(lambda: ("cold", ENDPOINT) in jobs.fake.calls, what="the endpoint to be cooled at the cap")


# -- wake, idle, accounting --------------------------------------------------------------------------


def test_warmed_by_the_first_job_kept_while_jobs_run_cooled_after_the_window(jobs: Jobs) -> None:
    assert ("warm", ENDPOINT) not in jobs.fake.calls
    job = httpx.post(
        f"{jobs.url}/v2/{ENDPOINT}/run", headers=jobs.headers(), json={"input": {"seconds": 2.5}}, timeout=10
    ).json()
    assert ("warm", ENDPOINT) in jobs.fake.calls
    submitted = time.monotonic()
    # No client polls; the job runs four reservation windows long and the endpoint stays warm.
    cold_before_the_end = until(
        lambda: jobs.job(job["id"])["status"] == "COMPLETED" and [("cold", ENDPOINT) in jobs.fake.calls],
        what="the job to run to its end",
    )
    assert cold_before_the_end == [False]
    until(lambda: ("cold", ENDPOINT) in jobs.fake.calls, what="the endpoint to be cooled")
    assert time.monotonic() - submitted >= 2.5 + WINDOW
    until(lambda: jobs.host.state is HostState.PAUSED, what="the pause to end")

    # gpumanager polled the job itself: the ledger has it, with RunPod's times and its cost.
    user = jobs.keys.authenticate(jobs.user_key)
    assert user is not None
    rows = until(
        lambda: jobs.ledger(
            "SELECT key_id, host, endpoint, status, delay_ms, execution_ms, gpu_seconds, cost_micro FROM jobs "
            "WHERE id = ? AND ended IS NOT NULL",
            job["id"],
        ),
        what="the job's row",
    )
    key_id, host, endpoint_id, status, delay_ms, execution_ms, gpu_seconds, cost_micro = rows[0]
    assert (key_id, host, endpoint_id, status) == (user.id, ENDPOINT, jobs.endpoint_id, "COMPLETED")
    assert execution_ms >= 2500 and delay_ms is not None
    assert gpu_seconds >= 2.5 and cost_micro == pytest.approx(gpu_seconds * 1_000_000, rel=0.01)
    requests = until(
        lambda: jobs.ledger("SELECT route, model, status, cost_micro FROM requests WHERE key_id = ?", user.id)
    )
    assert requests == [("/v2/run", ENDPOINT, 200, cost_micro)]

    # Every billed second has one owner: the key's share (its job and its reservation) and nobody's add up.
    page = httpx.get(f"{jobs.url}/metrics", headers=jobs.headers(jobs.admin_key), timeout=10).text
    host_cost = metric(page, "gpumanager_host_cost_dollars_total", host=ENDPOINT)
    by_key = metric(page, "gpumanager_cost_dollars_total")
    assert host_cost > 2.5 and by_key == pytest.approx(host_cost, abs=0.01)
    assert metric(page, "gpumanager_cost_dollars_total", key=user.id) >= gpu_seconds
    assert metric(page, "gpumanager_jobs_total", host=ENDPOINT, status="COMPLETED") == 1
    assert metric(page, "gpumanager_job_seconds_total", host=ENDPOINT, phase="execution") >= 2.5


def test_emergency_off_stops_the_workers_and_cancels_the_jobs(jobs: Jobs) -> None:
    job = httpx.post(
        f"{jobs.url}/v2/{ENDPOINT}/run", headers=jobs.headers(), json={"input": {"seconds": 30}}, timeout=10
    ).json()
    until(lambda: jobs.job(job["id"])["status"] == "IN_PROGRESS", what="the job to start")
    status = httpx.get(f"{jobs.url}/gpu/{ENDPOINT}/status", headers=jobs.headers(jobs.admin_key), timeout=10)
    assert status.json()["jobs"] == 1
    off = httpx.post(f"{jobs.url}/gpu/emergency-off", headers=jobs.headers(jobs.admin_key), timeout=10)
    assert off.status_code == 202
    until(lambda: ("cold", ENDPOINT) in jobs.fake.calls, what="the workers to be set to 0")
    until(lambda: jobs.job(job["id"])["status"] == "CANCELLED", what="the job to be cancelled")
    until(lambda: jobs.host.state is HostState.PAUSED, what="the endpoint to be paused")
    refused = httpx.post(f"{jobs.url}/v2/{ENDPOINT}/run", headers=jobs.headers(), json={"input": {}}, timeout=10)
    assert refused.status_code == 503 and "emergency-off" in refused.json()["error"]


def test_a_job_watched_across_a_restart(tmp_path: Path) -> None:
    with start_blocking_portal() as portal, running_fake(portal) as fake:
        portal.call(_add, fake)
        config_path = tmp_path / "config.toml"
        config_path.write_text(config_text(fake, per_host=True))
        keys = KeyStore(load(config_path).paths.api_keys_file)
        user_key = keys.generate("user", "user@example.org")[1]
        other_key = keys.generate("other", "other@example.org")[1]
        environ = {"RUNPOD_API_KEY": fake.api_key}
        headers = {"Authorization": f"Bearer {user_key}"}
        with serving(portal, config_path, environ) as (url, runtime):
            job = httpx.post(
                f"{url}/v2/{ENDPOINT}/run", headers=headers, json={"input": {"seconds": 4}}, timeout=10
            ).json()
            path = runtime.ledger.path
            sql = "SELECT gpu_seconds FROM jobs WHERE id = ? AND gpu_seconds > 0.5"
            until(lambda: _rows(path, sql, job["id"]), what="the job's row with its GPU time so far")
        assert fake.jobs_of(ENDPOINT)[0]["status"] != "COMPLETED"  # it runs on while gpumanager restarts
        (before,) = _rows(path, "SELECT gpu_seconds FROM jobs WHERE id = ?", job["id"])[0]
        with serving(portal, config_path, environ) as (url, runtime):
            other = httpx.get(f"{url}/v2/{ENDPOINT}/status/{job['id']}", headers={"Authorization": other_key})
            assert other.status_code == 404
            # Nobody polls: the restarted gpumanager watches the job to its end on its own.
            ended = until(
                lambda: [r for r in _rows(path, "SELECT status, execution_ms, gpu_seconds FROM jobs WHERE id = ?",
                                          job["id"]) if r[0] == "COMPLETED"],
                what="the job's end in the ledger",
            )  # fmt: skip
            _, execution_ms, gpu_seconds = ended[0]
            assert execution_ms >= 4000
            assert gpu_seconds > before + 0.5  # its time before the restart carried on, and more since
            mine = httpx.get(f"{url}/v2/{ENDPOINT}/status/{job['id']}", headers=headers, timeout=10)
            assert mine.status_code == 200 and mine.json()["output"] == {"echo": {"seconds": 4}}


def _rows(path: Path, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()
