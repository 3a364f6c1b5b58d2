"""The RunPod fake, checked over real loopback HTTP with httpx, the `openai` client and the `runpod` SDK.

Other tests trust `FakeRunPod` to behave like RunPod (REFERENCE.md section 4), so this file pins its
wire formats, the pod and worker timelines, and each failure knob.
"""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import anyio
import httpx
import openai
import pytest

from gpumanager.sim import expected_text
from tests.fakes.runpod import DEFAULT_MODEL, NO_GPUS, FakeRunPod, runpod_sdk

pytestmark = pytest.mark.anyio

KEY, READ_ONLY = "rp-test", "rp-ro"
T = 0.05  # boot_seconds and stop_seconds: short, so the file runs in a few seconds
SEEN = 0.2  # for a phase a test looks at midway, so a slow machine cannot skip past it
Q = 0.1  # queue_timeout: how long a request waits when no worker can come

MYSELF = (
    "query { myself { endpoints { id name gpuIds idleTimeout scalerType scalerValue templateId workersMin "
    "workersMax workersStandby pods { desiredStatus } } pods { id name desiredStatus costPerHr runtime { "
    "uptimeInSeconds ports { ip isIpPublic privatePort publicPort type } } } } }"
)
POD = (
    'query {{ pod(input: {{podId: "{}"}}) {{ id name desiredStatus lastStatusChange uptimeSeconds costPerHr '
    "runtime {{ uptimeInSeconds ports {{ ip isIpPublic privatePort publicPort type }} "
    "gpus {{ id gpuUtilPercent memoryUtilPercent }} }} }} }}"
)
RESUME = 'mutation {{ podResume(input: {{podId: "{}", gpuCount: 1}}) {{ id desiredStatus }} }}'
STOP = 'mutation {{ podStop(input: {{podId: "{}"}}) {{ id desiredStatus }} }}'
CHAT = {"model": DEFAULT_MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
FINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT")
NO_JOBS = {"completed": 0, "failed": 0, "inProgress": 0, "inQueue": 0, "retried": 0}


@asynccontextmanager
async def runpod(boot: float = T, **options: Any) -> AsyncIterator[tuple[FakeRunPod, httpx.AsyncClient]]:
    """A running fake and a management-API client holding the full key."""
    with anyio.fail_after(10):  # bounds every wait of the test that uses it
        async with (
            FakeRunPod(
                api_key=KEY, read_only_key=READ_ONLY, boot_seconds=boot, stop_seconds=T, queue_timeout=Q, **options
            ) as fake,
            httpx.AsyncClient(
                base_url=fake.api_url, headers={"authorization": f"Bearer {KEY}"}, timeout=5, trust_env=False
            ) as api,
        ):
            yield fake, api


@asynccontextmanager
async def serverless(fake: FakeRunPod, key: str = KEY) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        base_url=fake.serverless_url, headers={"authorization": f"Bearer {key}"}, timeout=5, trust_env=False
    ) as client:
        yield client


@asynccontextmanager
async def oai(fake: FakeRunPod, eid: str) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(
        base_url=f"{fake.serverless_url}/{eid}/openai/v1", api_key=KEY, max_retries=0
    ) as client:
        yield client


async def gql(api: httpx.AsyncClient, query: str, **options: Any) -> dict[str, Any]:
    """The data of a query that must succeed."""
    response = await api.post("/graphql", json={"query": query}, **options)
    assert response.status_code == 200 and "errors" not in response.json(), response.text
    data: dict[str, Any] = response.json()["data"]
    return data


async def pod(api: httpx.AsyncClient, pid: str) -> dict[str, Any]:
    found: dict[str, Any] = (await gql(api, POD.format(pid)))["pod"]
    return found


async def health(fake: FakeRunPod, eid: str) -> dict[str, Any]:
    async with serverless(fake) as client:
        response = await client.get(f"/{eid}/health")
    assert response.status_code == 200
    body: dict[str, Any] = response.json()
    return body


async def submit(client: httpx.AsyncClient, eid: str, job_input: Any, op: str = "run", **params: str) -> dict[str, Any]:
    """The answer to a ``run`` (or ``runsync``) that must be accepted."""
    response = await client.post(f"/{eid}/{op}", json={"input": job_input}, params=params)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def job_status(client: httpx.AsyncClient, eid: str, job_id: str, until: str) -> dict[str, Any]:
    """The job's first status object showing ``until``; it must not end in another state first."""
    with anyio.fail_after(5):
        while True:
            response = await client.get(f"/{eid}/status/{job_id}")
            assert response.status_code == 200, response.text
            body: dict[str, Any] = response.json()
            if body["status"] == until:
                return body
            assert body["status"] not in FINAL, body
            await anyio.sleep(0.005)


async def patch(api: httpx.AsyncClient, eid: str, body: Any, key: str = KEY) -> httpx.Response:
    return await api.patch(f"/v2/serverless/{eid}", json=body, headers={"authorization": f"Bearer {key}"})


async def ollama_tags(port: int) -> list[str] | None:
    """The model names a pod's Ollama lists, or None when nothing answers on the port."""
    async with httpx.AsyncClient(timeout=2, trust_env=False) as client:
        try:
            response = await client.get(f"http://127.0.0.1:{port}/api/tags")
        except httpx.TransportError:
            return None
    return [m["name"] for m in response.json()["models"]]


async def test_management_auth_and_the_read_only_key() -> None:
    async with runpod() as (fake, api):
        pid, eid = fake.add_pod("gpu-pod"), fake.add_endpoint("gpu-ep")
        for headers in ({"authorization": ""}, {"authorization": "Bearer nope"}, {"authorization": KEY}):
            refused = await api.post("/graphql", json={"query": MYSELF}, headers=headers)
            assert refused.status_code == 401 and refused.json()["errors"][0]["message"] == "Unauthorized"
            assert (await api.get(f"/v2/pods/{pid}", headers=headers)).status_code == 401
        await gql(api, MYSELF, params={"api_key": KEY}, headers={"authorization": ""})  # the docs' way
        assert (
            await api.get(f"/v2/pods/{pid}", params={"api_key": KEY}, headers={"authorization": ""})
        ).status_code == 401  # REST takes the header only
        ro = {"authorization": f"Bearer {READ_ONLY}"}
        await gql(api, MYSELF, headers=ro)
        denied = await api.post("/graphql", json={"query": RESUME.format(pid)}, headers=ro)
        assert denied.status_code == 403 and denied.json()["data"] == {"podResume": None}
        save = (
            f'mutation {{ saveEndpoint(input: {{id: "{eid}", gpuIds: "AMPERE_24", name: "gpu-ep", '
            f'templateId: "t", workersMin: 1}}) {{ id }} }}'
        )
        assert (await api.post("/graphql", json={"query": save}, headers=ro)).status_code == 403
        assert (await api.get(f"/v2/serverless/{eid}", headers=ro)).status_code == 200
        assert (await patch(api, eid, {"workers": {"min": 1}}, key=READ_ONLY)).status_code == 403
        action = await api.post(f"/v2/pods/{pid}/action", json={"action": "start"}, headers=ro)
        assert (action.status_code, action.json()["status"]) == (403, 403)
        # Refused requests are recorded, but nothing changed.
        assert fake.calls == [("start", "gpu-pod"), ("warm", "gpu-ep"), ("warm", "gpu-ep"), ("start", "gpu-pod")]
        assert (await pod(api, pid))["desiredStatus"] == "EXITED"
        assert not fake.is_serving("gpu-ep")


async def test_myself_lists_every_endpoint_and_pod_in_full() -> None:
    async with runpod() as (fake, api):
        eid = fake.add_endpoint("gpu-ep", workers_min=0, workers_max=3, idle_timeout=5)
        pid = fake.add_pod("gpu-pod", cost_per_hour=0.44)
        assert len(eid) == len(pid) == 14 and eid.isalnum() and eid == eid.lower()
        me = (await gql(api, MYSELF))["myself"]
        [ep] = me["endpoints"]
        template = ep.pop("templateId")
        assert isinstance(template, str) and template
        assert ep == {
            "id": eid,
            "name": "gpu-ep",
            "gpuIds": "AMPERE_24",
            "gpuCount": 1,
            "idleTimeout": 5,
            "scalerType": "QUEUE_DELAY",
            "scalerValue": 4,
            "workersMin": 0,
            "workersMax": 3,
            "workersStandby": 0,
            "pods": [],
        }
        [found] = me["pods"]
        assert {k: found[k] for k in ("id", "name", "desiredStatus", "costPerHr", "runtime")} == {
            "id": pid,
            "name": "gpu-pod",
            "desiredStatus": "EXITED",
            "costPerHr": 0.44,
            "runtime": None,
        }
        assert found["lastStatusChange"].startswith("Created by User: ")


async def test_pod_resume_and_stop_over_graphql() -> None:
    async with runpod(boot=SEEN) as (fake, api):
        pid = fake.add_pod("gpu-pod", models=["llama3.2:latest", "qwen2.5:7b"])
        resumed = (await gql(api, RESUME.format(pid)))["podResume"]
        assert (resumed["id"], resumed["desiredStatus"]) == (pid, "RUNNING")
        booting = await pod(api, pid)
        assert booting["runtime"] is None and booting["lastStatusChange"].startswith("Rented by User: ")
        await fake.wait_for("gpu-pod")
        up = await pod(api, pid)
        [port] = up["runtime"]["ports"]
        assert port == {
            "ip": "127.0.0.1",
            "isIpPublic": True,
            "privatePort": 11434,
            "publicPort": port["publicPort"],
            "type": "tcp",
        }
        assert len(up["runtime"]["gpus"]) == 1 and isinstance(up["uptimeSeconds"], int)
        assert await ollama_tags(port["publicPort"]) == ["llama3.2:latest", "qwen2.5:7b"]
        stopped = (await gql(api, STOP.format(pid)))["podStop"]
        assert stopped["desiredStatus"] == "EXITED"
        await fake.wait_for("gpu-pod", serving=False)
        down = await pod(api, pid)
        assert down["runtime"] is None and down["uptimeSeconds"] == 0
        assert await ollama_tags(port["publicPort"]) is None
        # A restart gets the same public port while it is free, and the sim's counters survive.
        await gql(api, RESUME.format(pid))
        await fake.wait_for("gpu-pod")
        assert (await pod(api, pid))["runtime"]["ports"][0]["publicPort"] == port["publicPort"]
        assert await ollama_tags(port["publicPort"]) is not None
        assert fake.sims["gpu-pod"].requests["/api/tags"] == 2
        assert fake.calls == [("start", "gpu-pod"), ("stop", "gpu-pod"), ("start", "gpu-pod")]


async def test_graphql_answers_unknowns_with_errors_and_takes_variables() -> None:
    async with runpod() as (fake, api):
        pid = fake.add_pod("gpu-pod")
        unknown = await api.post("/graphql", json={"query": "query { gpuTypes { id } }"})
        assert unknown.status_code == 200 and unknown.json()["errors"][0]["message"]
        missing = await api.post("/graphql", json={"query": POD.format("nope")})
        assert missing.status_code == 200 and missing.json()["data"] == {"pod": None}
        assert (await api.post("/graphql", json={"query": RESUME.format("nope")})).json()["errors"]
        assert (await api.post("/graphql", content=b"{")).status_code == 400
        query = "query Pod($input: PodFilter) { pod(input: $input) { id desiredStatus } }"
        by_variables = await api.post("/graphql", json={"query": query, "variables": {"input": {"podId": pid}}})
        assert by_variables.json()["data"]["pod"]["id"] == pid
        assert fake.calls == []


async def test_save_endpoint_needs_the_repeated_fields_and_warms_and_cools() -> None:
    async with runpod(boot=SEEN) as (fake, api):
        eid = fake.add_endpoint("gpu-ep", idle_timeout=T)

        def save(fields: str) -> str:
            return f'mutation {{ saveEndpoint(input: {{id: "{eid}", {fields}}}) {{ id workersMin }} }}'

        template = (await api.get(f"/v2/serverless/{eid}")).json()["templateId"]
        partial = await api.post("/graphql", json={"query": save("workersMin: 1")})
        assert partial.status_code == 200 and "templateId" in partial.json()["errors"][0]["message"]
        full = f'gpuIds: "AMPERE_24", name: "renamed", templateId: "{template}", flashBootType: FLASHBOOT'
        too_many = await api.post("/graphql", json={"query": save(f"{full}, workersMin: 4, workersMax: 3")})
        assert "workersMin" in too_many.json()["errors"][0]["message"]
        saved = (await gql(api, save(f"{full}, workersMin: 1, workersMax: 2, idleTimeout: 0.2")))["saveEndpoint"]
        assert (saved["workersMin"], saved["workersMax"], saved["idleTimeout"], saved["name"]) == (1, 2, 0.2, "renamed")
        assert saved["pods"] == [{"desiredStatus": "RUNNING"}]
        assert (await health(fake, eid))["workers"] == {"idle": 0, "running": 0, "initializing": 1}
        await fake.wait_for("gpu-ep")
        assert (await health(fake, eid))["workers"] == {"idle": 1, "running": 0}
        await gql(api, save(f"{full}, workersMin: 0"))
        assert fake.is_serving("gpu-ep")  # a demoted worker still gets its idle timeout
        await fake.wait_for("gpu-ep", serving=False)
        creating = await api.post("/graphql", json={"query": 'mutation { saveEndpoint(input: {name: "x"}) { id } }'})
        assert creating.json()["data"] == {"saveEndpoint": None}
        assert fake.calls == [("warm", "gpu-ep"), ("warm", "gpu-ep"), ("warm", "gpu-ep"), ("cold", "gpu-ep")]


async def test_rest_patch_validates_and_answers_the_endpoint() -> None:
    async with runpod() as (fake, api):
        eid = fake.add_endpoint("gpu-ep", gpu_ids="AMPERE_24,ADA_24")
        for bad in (
            {"workers": {"idleTimeout": 0}},
            {"workers": {"idleTimeout": 3601}},
            {"workers": {"idleTimeout": 2.5}},
            {"workers": {"idleTimeout": "5"}},
            {"workers": {"min": -1}},
            {"workers": {"min": 4}},
            {"workers": "x"},
            {"scaling": {"type": "FASTEST"}},
            [1],
        ):
            refused = await patch(api, eid, bad)
            assert (refused.status_code, refused.json()["status"]) == (400, 400), bad
        changed = await patch(
            api, eid, {"workers": {"max": 2, "idleTimeout": 60}, "scaling": {"type": "REQUEST_COUNT", "value": 2}}
        )
        assert changed.status_code == 200
        body = changed.json()
        assert body["workers"] == {"min": 0, "max": 2, "idleTimeout": 60, "standby": 0}
        assert body["scaling"] == {"type": "REQUEST_COUNT", "value": 2}
        assert (body["id"], body["name"], body["gpuIds"]) == (eid, "gpu-ep", ["AMPERE_24", "ADA_24"])
        assert (await api.get(f"/v2/serverless/{eid}")).json() == body
        assert (await api.get(f"/v2/serverless/{eid}/workers")).json() == []
        assert (await patch(api, eid, {"workers": {"min": 1}})).json()["workers"]["min"] == 1
        [worker] = (await api.get(f"/v2/serverless/{eid}/workers")).json()
        assert (worker["status"], worker["type"]) == ("INITIALIZING", "ACTIVE")
        assert (await api.get("/v2/serverless/nope")).status_code == 404
        assert (await api.get(f"/v2/pods/{eid}")).status_code == 404  # an endpoint id is not a pod
        assert (await api.delete(f"/v2/serverless/{eid}")).status_code == 405
        assert fake.calls == [("warm", "gpu-ep"), ("warm", "gpu-ep")]  # the refused min -1 is no direction


async def test_rest_pod_actions() -> None:
    async with runpod() as (fake, api):
        pid = fake.add_pod("gpu-pod")

        async def act(action: str) -> httpx.Response:
            return await api.post(f"/v2/pods/{pid}/action", json={"action": action})

        assert (await act("reboot")).status_code == 400
        started = await act("start")
        assert started.status_code == 200
        assert started.json()["desiredStatus"] == "RUNNING" and started.json()["portMappings"] is None
        await fake.wait_for("gpu-pod")
        body = (await api.get(f"/v2/pods/{pid}")).json()
        assert body["publicIp"] == "127.0.0.1" and await ollama_tags(body["portMappings"]["11434"]) is not None
        assert (await act("stop")).json()["desiredStatus"] == "EXITED"
        await fake.wait_for("gpu-pod", serving=False)
        assert (await act("restart")).json()["desiredStatus"] == "RUNNING"
        await fake.wait_for("gpu-pod")
        assert (await act("terminate")).json()["desiredStatus"] == "TERMINATED"
        assert not fake.is_serving("gpu-pod")
        assert (await api.get(f"/v2/pods/{pid}")).status_code == 404
        assert (await gql(api, MYSELF))["myself"]["pods"] == []
        assert fake.calls == [
            ("start", "gpu-pod"),
            ("stop", "gpu-pod"),
            ("restart", "gpu-pod"),
            ("terminate", "gpu-pod"),
        ]


async def test_a_warm_endpoint_serves_the_openai_routes() -> None:
    async with runpod(boot=SEEN) as (fake, api):
        eid = fake.add_endpoint("gpu-ep", idle_timeout=5)
        assert (await patch(api, eid, {"workers": {"min": 1}})).status_code == 200
        assert (await health(fake, eid))["workers"]["initializing"] == 1
        await fake.wait_for("gpu-ep")
        assert (await health(fake, eid))["workers"] == {"idle": 1, "running": 0}
        async with oai(fake, eid) as client:
            reply = await client.chat.completions.create(
                model=DEFAULT_MODEL, max_tokens=3, messages=[{"role": "user", "content": "hi"}]
            )
            assert reply.choices[0].message.content == expected_text(3) and reply.model == DEFAULT_MODEL
            stream = await client.chat.completions.create(
                model=DEFAULT_MODEL, max_tokens=4, stream=True, messages=[{"role": "user", "content": "hi"}]
            )
            pieces = [chunk.choices[0].delta.content async for chunk in stream if chunk.choices]
            assert "".join(p or "" for p in pieces) == expected_text(4)
            assert (await client.completions.create(model=DEFAULT_MODEL, prompt="hi", max_tokens=2)).choices[
                0
            ].text == expected_text(2)
            embedded = await client.embeddings.create(model=DEFAULT_MODEL, input="hi")
            assert len(embedded.data[0].embedding) == 8
            [listed] = (await client.models.list()).data
            assert (listed.id, listed.owned_by) == (DEFAULT_MODEL, "vllm")
        assert fake.upstream_headers["gpu-ep"]["authorization"] == f"Bearer {KEY}"
        assert fake.sims["gpu-ep"].requests["/v1/chat/completions"] == 2
        report = await health(fake, eid)
        assert report["jobs"] == {"completed": 5, "failed": 0, "inProgress": 0, "inQueue": 0, "retried": 0}
        assert fake.calls == [("warm", "gpu-ep")]


async def test_streams_pass_through_chunk_by_chunk_and_count_as_running() -> None:
    async with runpod() as (fake, _), serverless(fake) as client:
        eid = fake.add_endpoint("gpu-ep", workers_min=1, token_delay=0.03)
        assert fake.is_serving("gpu-ep")  # created warm
        start, first, seen = time.monotonic(), 0.0, None
        body = {**CHAT, "max_tokens": 10, "stream": True}
        async with client.stream("POST", f"/{eid}/openai/v1/chat/completions", json=body) as response:
            assert response.headers["content-type"] == "text/event-stream"
            async for _ in response.aiter_raw():
                if not first:
                    first = time.monotonic() - start
                    seen = await health(fake, eid)
        total = time.monotonic() - start
        assert first < total / 2 and total >= 0.3  # the first token left long before the last one
        assert seen is not None and seen["workers"] == {"idle": 0, "running": 1}
        assert seen["jobs"]["inProgress"] == 1
        assert (await health(fake, eid))["workers"] == {"idle": 1, "running": 0}


async def test_a_request_to_a_cold_endpoint_cold_starts_a_flex_worker() -> None:
    async with runpod(boot=SEEN) as (fake, api), serverless(fake) as client:
        eid = fake.add_endpoint("gpu-ep", idle_timeout=SEEN)
        start = time.monotonic()
        answered = await client.post(f"/{eid}/openai/v1/chat/completions", json=CHAT)
        assert answered.status_code == 200 and time.monotonic() - start >= SEEN
        assert (await health(fake, eid))["workers"] == {"idle": 1, "running": 0}
        [worker] = (await api.get(f"/v2/serverless/{eid}/workers")).json()
        assert (worker["status"], worker["type"]) == ("IDLE", "FLEX")
        await fake.wait_for("gpu-ep", serving=False, timeout=2 * SEEN + 1)
        assert time.monotonic() - start >= 2 * SEEN  # stopped idle_timeout after the request
        assert fake.calls == []
        # /models is a job like any other: on a cold endpoint it waits for a worker too.
        start = time.monotonic()
        models = await client.get(f"/{eid}/openai/v1/models")
        assert models.json()["data"][0]["id"] == DEFAULT_MODEL and time.monotonic() - start >= SEEN


async def test_max_workers_zero_answers_no_workers_available() -> None:
    async with runpod() as (fake, api), serverless(fake) as client:
        eid = fake.add_endpoint("gpu-ep")
        fake.set_max_workers("gpu-ep", 0)
        assert (await gql(api, MYSELF))["myself"]["endpoints"][0]["workersMax"] == 0
        start = time.monotonic()
        refused = await client.post(f"/{eid}/openai/v1/chat/completions", json=CHAT)
        assert (refused.status_code, refused.json()) == (503, {"error": "no workers available"})
        assert Q <= time.monotonic() - start < Q + 1
        assert (await health(fake, eid))["jobs"]["failed"] == 1
        assert fake.sims["gpu-ep"].requests["/v1/chat/completions"] == 0


async def test_only_the_exact_model_id_is_served() -> None:
    async with runpod() as (fake, _):
        eid = fake.add_endpoint("gpu-ep", workers_min=1)
        async with oai(fake, eid) as client:
            for wrong in (f"{DEFAULT_MODEL}:latest", "llama3.2"):
                with pytest.raises(openai.NotFoundError) as error:
                    await client.chat.completions.create(model=wrong, messages=[{"role": "user", "content": "x"}])
                assert error.value.type == "NotFoundError" and wrong in error.value.message


async def test_serverless_auth() -> None:
    async with runpod() as (fake, _):
        eid = fake.add_endpoint("gpu-ep", workers_min=1)
        chat = f"/{eid}/openai/v1/chat/completions"
        async with serverless(fake, key="nope") as wrong:
            assert (await wrong.get(f"/{eid}/health")).status_code == 401
            assert (await wrong.post(chat, json=CHAT, headers={"authorization": ""})).status_code == 401
            assert (await wrong.get(f"/{eid}/health", headers={"authorization": KEY})).status_code == 200  # bare
        async with serverless(fake, key=READ_ONLY) as ro:
            assert (await ro.get(f"/{eid}/health")).status_code == 200
            assert (await ro.post(chat, json=CHAT)).status_code == 403
        async with serverless(fake) as client:
            assert (await client.get("/nope/health")).status_code == 404
            assert (await client.get(chat)).status_code == 405
            assert (await client.post(chat, json=CHAT)).status_code == 200
        assert fake.upstream_headers["gpu-ep"]["authorization"] == f"Bearer {KEY}"


async def test_a_failed_warm_up_shows_unhealthy_and_never_serves() -> None:
    async with runpod() as (fake, api), serverless(fake) as client:
        eid = fake.add_endpoint("gpu-ep", idle_timeout=T)
        fake.fail_next_start("gpu-ep")
        assert (await patch(api, eid, {"workers": {"min": 1}})).status_code == 200  # the warm-up is accepted
        await anyio.sleep(2 * T)
        assert (await health(fake, eid))["workers"] == {"idle": 0, "running": 0, "unhealthy": 1}
        refused = await client.post(f"/{eid}/openai/v1/chat/completions", json=CHAT)
        assert refused.status_code == 503 and not fake.is_serving("gpu-ep")
        assert fake.billed_seconds("gpu-ep") == 0  # unhealthy workers are not billed
        # Cooling drops it after the idle timeout; the knob was one-shot, so the next warm-up works.
        await patch(api, eid, {"workers": {"min": 0}})
        await anyio.sleep(2 * T)
        assert (await health(fake, eid))["workers"] == {"idle": 0, "running": 0}
        await patch(api, eid, {"workers": {"min": 1}})
        await fake.wait_for("gpu-ep")


async def test_a_hung_warm_up_shows_throttled_until_it_is_replaced() -> None:
    async with runpod() as (fake, _), serverless(fake) as client:
        eid = fake.add_endpoint("gpu-ep", idle_timeout=SEEN)
        fake.hang_next_start("gpu-ep")
        refused = await client.post(f"/{eid}/openai/v1/chat/completions", json=CHAT)  # a cold start that hangs
        assert refused.status_code == 503
        assert (await health(fake, eid))["workers"] == {"idle": 0, "running": 0, "throttled": 1}
        # Once the stuck flex worker idles out, the next request gets a healthy one.
        await anyio.sleep(SEEN)
        assert (await client.post(f"/{eid}/openai/v1/chat/completions", json=CHAT)).status_code == 200


async def test_pod_start_failures() -> None:
    async with runpod() as (fake, api):
        pid = fake.add_pod("gpu-pod")
        fake.fail_next_start("gpu-pod")
        refused = await api.post("/graphql", json={"query": RESUME.format(pid)})
        assert refused.status_code == 200
        assert refused.json() == {"errors": [{"message": NO_GPUS, "path": ["podResume"]}], "data": {"podResume": None}}
        assert (await pod(api, pid))["desiredStatus"] == "EXITED"
        fake.fail_next_start("gpu-pod")
        rest = await api.post(f"/v2/pods/{pid}/action", json={"action": "start"})
        assert (rest.status_code, rest.json()["error"]) == (500, NO_GPUS)
        fake.hang_next_start("gpu-pod")
        assert (await gql(api, RESUME.format(pid)))["podResume"]["desiredStatus"] == "RUNNING"
        await anyio.sleep(4 * T)
        assert (await pod(api, pid))["runtime"] is None and not fake.is_serving("gpu-pod")
        await gql(api, STOP.format(pid))  # a stop ends the hung start
        fake.fail_next_start("gpu-pod", zero_gpus=True)
        await gql(api, RESUME.format(pid))
        await fake.wait_for("gpu-pod")
        assert (await pod(api, pid))["runtime"]["gpus"] == []
        assert [c for c, _ in fake.calls] == ["start", "start", "start", "stop", "start"]


async def test_failing_stops_change_nothing() -> None:
    async with runpod() as (fake, api):
        pid = fake.add_pod("gpu-pod", running=True)
        eid = fake.add_endpoint("gpu-ep", workers_min=1)
        await fake.wait_for("gpu-pod")
        fake.fail_stops("gpu-pod", times=2, status=500)
        failed = await api.post("/graphql", json={"query": STOP.format(pid)})
        assert failed.status_code == 500 and failed.json()["data"] == {"podStop": None}
        assert (await api.post(f"/v2/pods/{pid}/action", json={"action": "stop"})).status_code == 500
        assert (await pod(api, pid))["desiredStatus"] == "RUNNING"
        assert (await gql(api, STOP.format(pid)))["podStop"]["desiredStatus"] == "EXITED"
        fake.fail_stops("gpu-ep", status=503)
        assert (await patch(api, eid, {"workers": {"min": 0}})).status_code == 503
        assert (await api.get(f"/v2/serverless/{eid}")).json()["workers"]["min"] == 1
        assert fake.calls == [("stop", "gpu-pod")] * 3 + [("cold", "gpu-ep")]


async def test_set_running_is_the_console() -> None:
    async with runpod(boot=SEEN) as (fake, api), serverless(fake) as client:
        pid, eid = fake.add_pod("gpu-pod"), fake.add_endpoint("gpu-ep", token_delay=0.02)
        await fake.set_running("gpu-pod", True)
        assert fake.is_serving("gpu-pod") and (await pod(api, pid))["runtime"] is not None
        await fake.set_running("gpu-ep", True)
        assert fake.is_serving("gpu-ep")
        assert (await api.get(f"/v2/serverless/{eid}")).json()["workers"]["min"] == 1
        await fake.set_running("gpu-pod", False)
        assert not fake.is_serving("gpu-pod") and (await pod(api, pid))["desiredStatus"] == "EXITED"
        # Cooled from the console mid-stream: the stream still finishes, then the worker is gone.
        body = {**CHAT, "max_tokens": 5, "stream": True}
        async with client.stream("POST", f"/{eid}/openai/v1/chat/completions", json=body) as response:
            await fake.set_running("gpu-ep", False)
            assert expected_text(5).split()[-1] in (await response.aread()).decode()
        assert not fake.is_serving("gpu-ep")
        assert (await health(fake, eid))["workers"] == {"idle": 0, "running": 0}
        assert fake.calls == []


async def test_billing_counts_running_time() -> None:
    async with runpod() as (fake, api):
        pid = fake.add_pod("gpu-pod")
        fake.add_endpoint("gpu-ep", workers_min=1)
        await gql(api, RESUME.format(pid))
        await anyio.sleep(SEEN)
        await gql(api, STOP.format(pid))
        billed = fake.billed_seconds("gpu-pod")
        assert SEEN <= billed < SEEN + 0.5
        await anyio.sleep(T)
        assert fake.billed_seconds("gpu-pod") == billed  # a stopped pod's GPU is not billed
        assert fake.billed_seconds("gpu-ep") >= SEEN + T  # an active worker is billed while idle


async def test_exit_stops_every_pod() -> None:
    async with runpod() as (fake, api):
        pid = fake.add_pod("gpu-pod", running=True)
        await fake.wait_for("gpu-pod")
        port = (await pod(api, pid))["runtime"]["ports"][0]["publicPort"]
        assert await ollama_tags(port) is not None
    assert await ollama_tags(port) is None


# -- the job API of queue-based endpoints ----------------------------------------------------------


async def test_a_job_cold_starts_a_worker_and_goes_from_in_queue_to_completed() -> None:
    async with runpod(boot=SEEN) as (fake, api), serverless(fake) as client:
        eid = fake.add_endpoint("gpu-ep", idle_timeout=SEEN)
        job_input = {"prompt": "hi", "seconds": SEEN}
        queued = await submit(client, eid, job_input)
        job_id = queued["id"]
        assert queued == {"id": job_id, "status": "IN_QUEUE"} and re.fullmatch(r"[0-9a-f-]{36}-e1", job_id)
        assert (await job_status(client, eid, job_id, "IN_QUEUE")) == queued
        assert await health(fake, eid) == {
            "jobs": NO_JOBS | {"inQueue": 1},
            "workers": {"idle": 0, "running": 0, "initializing": 1},
        }
        running = await job_status(client, eid, job_id, "IN_PROGRESS")
        assert running.keys() == {"id", "status", "delayTime", "workerId"} and running["delayTime"] >= SEEN * 1000
        [worker] = (await api.get(f"/v2/serverless/{eid}/workers")).json()
        assert worker == {"id": running["workerId"], "status": "RUNNING", "type": "FLEX"}
        assert await health(fake, eid) == {"jobs": NO_JOBS | {"inProgress": 1}, "workers": {"idle": 0, "running": 1}}
        done = await job_status(client, eid, job_id, "COMPLETED")
        assert done == running | {
            "status": "COMPLETED",
            "executionTime": done["executionTime"],
            "output": {"echo": job_input},
        }
        assert SEEN * 1000 <= done["executionTime"] < SEEN * 1000 + 500
        assert await health(fake, eid) == {"jobs": NO_JOBS | {"completed": 1}, "workers": {"idle": 1, "running": 0}}
        assert fake.jobs_of("gpu-ep") == [done | {"input": job_input}]
        # The flex worker idles out; it was billed from being asked for: boot, the job, the idle timeout.
        await fake.wait_for("gpu-ep", serving=False)
        billed = fake.billed_seconds("gpu-ep")
        assert 3 * SEEN <= billed < 3 * SEEN + 0.5 and fake.billed_seconds("gpu-ep") == billed
        assert fake.job_calls[0] == ("run", "gpu-ep", "")
        assert set(fake.job_calls[1:]) == {("status", "gpu-ep", job_id)}
        assert fake.calls == []


async def test_runsync_waits_for_the_job_or_for_its_wait() -> None:
    async with runpod() as (fake, _), serverless(fake) as client:
        eid = fake.add_endpoint("gpu-ep", workers_min=1)
        answers: list[dict[str, Any]] = []

        async def short_wait() -> None:
            start = time.monotonic()
            answers.append(await submit(client, eid, {"seconds": 1.1}, "runsync", wait="1000"))
            assert time.monotonic() - start >= 1

        async with anyio.create_task_group() as tg:
            tg.start_soon(short_wait)  # RunPod's shortest wait is 1 s: the rest is checked meanwhile
            done = await submit(client, eid, {"n": 1}, "runsync")
            assert re.fullmatch(r"sync-[0-9a-f-]{36}-e1", done["id"])
            assert done.keys() == {"id", "status", "delayTime", "workerId", "executionTime", "output"}
            assert (done["status"], done["output"]) == ("COMPLETED", {"echo": {"n": 1}})
            assert (await submit(client, eid, {}, "runsync", wait="300000"))["status"] == "COMPLETED"
            for bad in ("999", "300001", "1.5", "-1000", "soon", ""):
                refused = await client.post(f"/{eid}/runsync", params={"wait": bad}, json={"input": {}})
                assert refused.status_code == 400 and "wait" in refused.json()["error"], bad
        # The wait ended first: the answer is the job as it was then, and it runs on.
        [waited] = answers
        assert waited.keys() == {"id", "status", "delayTime", "workerId"} and waited["status"] == "IN_PROGRESS"
        assert (await job_status(client, eid, waited["id"], "COMPLETED"))["executionTime"] >= 1100


async def test_failed_and_timed_out_jobs_and_their_retries() -> None:
    async with runpod() as (fake, _), serverless(fake) as client:
        eid = fake.add_endpoint("gpu-ep", workers_min=1)
        job_input = {"fail": "CUDA out of memory", "seconds": 0.01}
        failed = await submit(client, eid, job_input, "runsync")
        assert failed.keys() == {"id", "status", "delayTime", "workerId", "executionTime", "error"}
        assert (failed["status"], failed["error"]) == ("FAILED", "CUDA out of memory")
        start = time.monotonic()
        timed_out = await submit(client, eid, {"seconds": 5, "timeout": T}, "runsync")
        assert timed_out.keys() == {"id", "status", "delayTime", "workerId", "executionTime"}
        assert timed_out["status"] == "TIMED_OUT" and T * 1000 <= timed_out["executionTime"] < 1000
        assert time.monotonic() - start < 1
        crashed = await submit(client, eid, {"seconds": "soon"}, "runsync")
        assert (crashed["status"], crashed["error"]) == ("FAILED", "handler: seconds must be a number >= 0")
        assert (await health(fake, eid))["jobs"] == NO_JOBS | {"failed": 3}
        # A retry is a new job with the same input, named after the original.
        first, second = f"{failed['id']}-u1", f"{failed['id']}-u2"
        retried = await client.post(f"/{eid}/retry/{failed['id']}")
        assert (retried.status_code, retried.json()) == (200, {"id": first, "status": "IN_QUEUE"})
        assert (await job_status(client, eid, first, "FAILED"))["error"] == "CUDA out of memory"  # the same fate
        assert (await client.post(f"/{eid}/retry/{first}")).json() == {"id": second, "status": "IN_QUEUE"}
        again = await client.post(f"/{eid}/retry/{timed_out['id']}")
        assert again.json() == {"id": f"{timed_out['id']}-u1", "status": "IN_QUEUE"}
        done = (await submit(client, eid, {}, "runsync"))["id"]
        refused = await client.post(f"/{eid}/retry/{done}")
        message = f"job {done} is COMPLETED: only FAILED or TIMED_OUT jobs can be retried"
        assert (refused.status_code, refused.json()) == (400, {"error": message})
        assert (await client.post(f"/{eid}/retry/nope")).status_code == 404
        assert (await health(fake, eid))["jobs"]["retried"] == 3
        jobs = {j["id"]: j for j in fake.jobs_of("gpu-ep")}
        assert list(jobs) == [failed["id"], timed_out["id"], crashed["id"], first, second, again.json()["id"], done]
        assert jobs[failed["id"]]["status"] == "FAILED" and jobs[second]["input"] == job_input
        # No worker can come: the job fails after queue_timeout without having run.
        nowhere = fake.add_endpoint("no-workers", workers_max=0)
        unserved = await submit(client, nowhere, {}, "runsync")
        assert unserved == {
            "id": unserved["id"],
            "status": "FAILED",
            "executionTime": 0,
            "error": "no workers available",
        }


async def test_cancel_and_purge_queue() -> None:
    async with runpod(boot=SEEN) as (fake, _), serverless(fake) as client:
        eid = fake.add_endpoint("gpu-ep")
        queued = (await submit(client, eid, {"seconds": 5}))["id"]
        cancelled = await client.post(f"/{eid}/cancel/{queued}")
        assert (cancelled.status_code, cancelled.json()) == (200, {"id": queued, "status": "CANCELLED"})
        assert await job_status(client, eid, queued, "CANCELLED") == {
            "id": queued,
            "status": "CANCELLED",
            "executionTime": 0,
        }
        assert (await health(fake, eid))["jobs"] == NO_JOBS  # a cancelled job counts nowhere
        await fake.wait_for("gpu-ep")  # the worker it asked for still comes up
        running = (await submit(client, eid, {"seconds": 5}))["id"]
        await job_status(client, eid, running, "IN_PROGRESS")
        assert (await health(fake, eid))["workers"] == {"idle": 0, "running": 1}
        assert (await client.post(f"/{eid}/cancel/{running}")).json() == {"id": running, "status": "CANCELLED"}
        assert await health(fake, eid) == {"jobs": NO_JOBS, "workers": {"idle": 1, "running": 0}}  # released
        stopped = await job_status(client, eid, running, "CANCELLED")
        assert stopped.keys() == {"id", "status", "delayTime", "workerId", "executionTime"}
        assert stopped["executionTime"] < 1000
        # A final job keeps its state.
        assert (await client.post(f"/{eid}/cancel/{running}")).json() == {"id": running, "status": "CANCELLED"}
        done = (await submit(client, eid, {}, "runsync"))["id"]
        assert (await client.post(f"/{eid}/cancel/{done}")).json() == {"id": done, "status": "COMPLETED"}
        unknown = await client.post(f"/{eid}/cancel/nope")
        assert (unknown.status_code, unknown.json()) == (404, {"error": "request does not exist"})
        # purge-queue cancels the queued jobs, and only those.
        cold = fake.add_endpoint("cold-ep")
        for i in range(3):
            await submit(client, cold, {"i": i})
        assert (await health(fake, cold))["jobs"] == NO_JOBS | {"inQueue": 3}
        purged = await client.post(f"/{cold}/purge-queue")
        assert (purged.status_code, purged.json()) == (200, {"removed": 3, "status": "completed"})
        assert [j["status"] for j in fake.jobs_of("cold-ep")] == ["CANCELLED"] * 3
        assert (await health(fake, cold))["jobs"] == NO_JOBS
        running = (await submit(client, eid, {"seconds": 5}))["id"]
        await job_status(client, eid, running, "IN_PROGRESS")
        assert (await client.post(f"/{eid}/purge-queue")).json() == {"removed": 0, "status": "completed"}
        assert (await job_status(client, eid, running, "IN_PROGRESS"))["id"] == running


async def test_stream_hands_out_each_chunk_once() -> None:
    async with runpod() as (fake, _), serverless(fake) as client:
        eid = fake.add_endpoint("gpu-ep", workers_min=1)
        chunks = ["The", " quick", {"token": "brown"}, 4]
        job_id = (await submit(client, eid, {"stream": chunks, "seconds": SEEN}))["id"]
        polls: list[dict[str, Any]] = []
        with anyio.fail_after(5):
            while not polls or polls[-1]["status"] != "COMPLETED":
                response = await client.get(f"/{eid}/stream/{job_id}")
                assert response.status_code == 200
                polls.append(response.json())
                await anyio.sleep(0.01)
        assert all(p.keys() == {"id", "status", "stream"} and p["id"] == job_id for p in polls)
        assert [c["output"] for p in polls for c in p["stream"]] == chunks
        assert any(p["stream"] and p["status"] == "IN_PROGRESS" for p in polls)  # handed out as they came
        after = await client.get(f"/{eid}/stream/{job_id}")
        assert after.json() == {"id": job_id, "status": "COMPLETED", "stream": []}
        assert (await job_status(client, eid, job_id, "COMPLETED"))["output"] == chunks
        plain = (await submit(client, eid, {}, "runsync"))["id"]
        assert (await client.get(f"/{eid}/stream/{plain}")).json()["stream"] == []  # its result is in status
        assert (await client.get(f"/{eid}/stream/nope")).status_code == 404


async def test_job_api_auth_and_bad_requests() -> None:
    async with runpod() as (fake, _):
        eid = fake.add_endpoint("gpu-ep", workers_min=1)
        async with serverless(fake) as client:
            job = (await submit(client, eid, {}, "runsync"))["id"]
        async with serverless(fake, key="nope") as wrong:
            assert (await wrong.post(f"/{eid}/run", json={"input": {}})).status_code == 401
            assert (await wrong.get(f"/{eid}/status/{job}")).status_code == 401
            bare = await wrong.post(f"/{eid}/run", json={"input": {}}, headers={"authorization": KEY})
            assert bare.status_code == 200
        async with serverless(fake, key=READ_ONLY) as ro:
            for path in ("run", "runsync", f"cancel/{job}", f"retry/{job}", "purge-queue"):
                refused = await ro.post(f"/{eid}/{path}", json={"input": {}})
                assert refused.status_code == 403 and refused.json()["error"], path
            for path in (f"status/{job}", f"stream/{job}", "health"):
                assert (await ro.get(f"/{eid}/{path}")).status_code == 200, path
        assert fake.upstream_headers["gpu-ep"]["authorization"] == f"Bearer {READ_ONLY}"  # the last allowed call
        assert len(fake.jobs_of("gpu-ep")) == 2  # the runsync and the bare run: nothing refused ran
        async with serverless(fake) as client:
            for body in (b"{", b"[]", b'{"inputs": {}}', b'{"input": "hi"}'):
                refused = await client.post(f"/{eid}/run", content=body)
                assert refused.status_code == 400 and "input" in refused.json()["error"], body
            assert (await client.get(f"/{eid}/run")).status_code == 405
            assert (await client.get(f"/{eid}/status")).status_code == 404  # no job id
            assert (await client.post(f"/{eid}/run/{job}", json={"input": {}})).status_code == 404
            other = fake.add_endpoint("other-ep")
            elsewhere = await client.get(f"/{other}/status/{job}")
            assert (elsewhere.status_code, elsewhere.json()) == (404, {"error": "request does not exist"})
        assert fake.job_calls == [
            ("runsync", "gpu-ep", ""),
            ("run", "gpu-ep", ""),
            ("run", "gpu-ep", ""),
            ("runsync", "gpu-ep", ""),
            ("cancel", "gpu-ep", job),
            ("retry", "gpu-ep", job),
            ("purge-queue", "gpu-ep", ""),
            ("status", "gpu-ep", job),
            ("stream", "gpu-ep", job),
            *[("run", "gpu-ep", "")] * 4,
            ("status", "other-ep", job),
        ]
        assert fake.calls == []


async def test_the_runpod_sdk_drives_the_job_api(monkeypatch: pytest.MonkeyPatch) -> None:
    sdk = runpod_sdk()

    async def call(function: Callable[[], Any]) -> Any:
        return await anyio.to_thread.run_sync(function)  # the SDK is synchronous (requests)

    async with runpod() as (fake, _):
        eid = fake.add_endpoint("gpu-ep", workers_min=1)
        monkeypatch.setattr(sdk, "api_key", KEY)
        monkeypatch.setattr(sdk, "endpoint_url_base", fake.serverless_url)
        endpoint = sdk.Endpoint(eid)
        assert await call(partial(endpoint.run_sync, {"prompt": "hi"})) == {"echo": {"prompt": "hi"}}
        failed = await call(partial(endpoint.run_sync, {"fail": "boom", "seconds": 0}))
        assert failed is None  # run_sync answers a FAILED job's output, dropping its error
        chunks = ["a", "b", "c"]
        streaming = await call(partial(endpoint.run, {"stream": chunks, "seconds": SEEN}))
        plain = await call(partial(endpoint.run, {"seconds": 0.5}))  # done before the SDK's second look
        assert await call(plain.status) in ("IN_QUEUE", "IN_PROGRESS")
        # Both poll once a second: side by side, not one after the other.
        results: dict[str, Any] = {}

        async def collect(name: str, function: Callable[[], Any]) -> None:
            results[name] = await call(function)

        async with anyio.create_task_group() as tg:
            tg.start_soon(collect, "stream", lambda: list(streaming.stream()))
            tg.start_soon(collect, "output", partial(plain.output, timeout=5))
        assert results == {"stream": chunks, "output": {"echo": {"seconds": 0.5}}}
        assert await call(streaming.output) == chunks
        slow = await call(partial(endpoint.run, {"seconds": 5}))
        assert await call(slow.cancel) == {"id": slow.job_id, "status": "CANCELLED"}
        assert await call(slow.status) == "CANCELLED"
        assert await call(endpoint.purge_queue) == {"removed": 0, "status": "completed"}
        report = await call(endpoint.health)
        assert report == {"jobs": NO_JOBS | {"completed": 3, "failed": 1}, "workers": {"idle": 1, "running": 0}}
        assert fake.upstream_headers["gpu-ep"]["authorization"] == f"Bearer {KEY}"
        assert {op for op, _, _ in fake.job_calls} == {"runsync", "run", "status", "stream", "cancel", "purge-queue"}
        with pytest.raises(RuntimeError, match="401 Unauthorized"):
            await call(sdk.Endpoint(eid, api_key="nope").health)
