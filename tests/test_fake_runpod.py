"""The RunPod fake, checked over real loopback HTTP with httpx and the `openai` client.

Other tests trust `FakeRunPod` to behave like RunPod (REFERENCE.md section 4), so this file pins its
wire formats, the pod and worker timelines, and each failure knob.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx
import openai
import pytest

from gpumanager.sim import expected_text
from tests.fakes.runpod import DEFAULT_MODEL, NO_GPUS, FakeRunPod

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
