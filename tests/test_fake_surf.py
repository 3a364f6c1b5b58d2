"""The SURF Research Cloud fake, checked over real loopback HTTP with httpx.

Other tests trust `FakeSurf` to behave like SURF's workspace API (REFERENCE.md section 3), so this
file pins its wire format, its lifecycle timing and each failure knob.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx
import pytest

from tests.fakes.surf import FakeSurf, free_port_for_all

pytestmark = pytest.mark.anyio

T = 0.05  # transition_seconds: short, so the file runs in a few seconds
SEEN = 0.3  # for a phase a test looks at midway, so a slow machine cannot skip past it
WS = "/workspace/workspaces/"
FILTERS = {"application_type": "Compute", "deleted": "false", "by_owner": "true"}


@asynccontextmanager
async def surf(**options: Any) -> AsyncIterator[tuple[FakeSurf, httpx.AsyncClient]]:
    """A running fake and a client that authenticates as SURF wants: the raw token, no `Bearer`."""
    with anyio.fail_after(10):  # bounds every wait of the test that uses it
        async with (
            FakeSurf(token="tok", transition_seconds=T, **options) as fake,
            httpx.AsyncClient(
                base_url=fake.base_url, headers={"authorization": "tok"}, timeout=5, trust_env=False
            ) as client,
        ):
            yield fake, client


async def post(client: httpx.AsyncClient, ws: dict[str, Any], action: str, **headers: str) -> httpx.Response:
    return await client.post(f"{WS}{ws['id']}/actions/{action}/", json={}, headers=headers)


async def get(client: httpx.AsyncClient, ws: dict[str, Any]) -> dict[str, Any]:
    response = await client.get(f"{WS}{ws['id']}/")
    assert response.status_code == 200
    body: dict[str, Any] = response.json()
    return body


async def ollama_tags(fake: FakeSurf, name: str) -> list[str] | None:
    """The sim's model names, or None when nothing answers on the workspace's Ollama address."""
    async with httpx.AsyncClient(timeout=2, trust_env=False) as client:
        try:
            response = await client.get(fake.ollama_url(name) + "/api/tags")
        except httpx.TransportError:
            return None
    return [m["name"] for m in response.json()["models"]]


def newest(ws: dict[str, Any]) -> dict[str, Any]:
    entry: dict[str, Any] = max(ws["workspace_actions"], key=lambda a: a["time_created"])
    return entry


async def test_auth_takes_the_raw_token_only() -> None:
    async with surf() as (fake, client):
        assert (await client.get(WS, params=FILTERS)).status_code == 200
        missing = await client.get(WS, headers={"authorization": ""})
        assert missing.status_code == 401
        assert missing.json() == {"detail": "Authentication credentials were not provided."}
        for wrong in ("Bearer tok", "tik"):
            refused = await client.get(WS, headers={"authorization": wrong})
            assert (refused.status_code, refused.json()) == (401, {"detail": "Invalid token."})
        ws = fake.add_workspace("gpu-1")
        assert (await post(client, ws, "resume", authorization="Bearer tok")).status_code == 401
        assert fake.calls == []


async def test_csrf_is_required_on_posts_only_when_asked() -> None:
    async with surf(require_csrf="x") as (fake, client):
        ws = fake.add_workspace("gpu-1")
        assert (await client.get(f"{WS}{ws['id']}/")).status_code == 200  # GETs need no CSRF
        missing = await post(client, ws, "resume")
        assert (missing.status_code, missing.json()) == (403, {"detail": "CSRF Failed: CSRF token missing."})
        assert (await post(client, ws, "resume", **{"X-CSRFToken": "y"})).status_code == 403
        accepted = await post(client, ws, "resume", **{"X-CSRFTOKEN": "x"})
        assert accepted.status_code == 202
        assert accepted.json()["action"] == "resume"
        assert fake.calls == [("resume", "gpu-1")]


async def test_list_pages_like_drf() -> None:
    async with surf() as (fake, client):
        names = [fake.add_workspace(f"gpu-{i}")["name"] for i in range(3)]
        first = (await client.get(WS, params={**FILTERS, "limit": 2, "offset": 0})).json()
        assert first["count"] == 3 and first["previous"] is None
        assert [w["name"] for w in first["results"]] == names[:2]
        assert first["next"].startswith(fake.base_url + WS)  # absolute, query included
        second = (await client.get(first["next"])).json()
        assert [w["name"] for w in second["results"]] == names[2:]
        assert second["next"] is None and "offset" not in second["previous"]
        assert [w["name"] for w in (await client.get(second["previous"])).json()["results"]] == names[:2]
        default = (await client.get(WS, params={"limit": "junk"})).json()
        assert default["count"] == 3 and default["next"] is None  # invalid limit: DRF's default


async def test_filters_hide_deleted_and_storage_workspaces() -> None:
    async with surf() as (fake, client):
        fake.add_workspace("gpu-1")
        fake.add_workspace("gpu-old", deleted=True)
        fake.add_workspace("disk", application_type="Storage")
        fake.add_workspace("colleague", owner_id="someone-else")
        filtered = (await client.get(WS, params=FILTERS)).json()
        assert [w["name"] for w in filtered["results"]] == ["gpu-1"]
        everything = (await client.get(WS)).json()
        assert everything["count"] == 4


async def test_workspace_object_and_404() -> None:
    async with surf() as (fake, client):
        ws = fake.add_workspace("GroulsR-gpu-1")
        fake.add_workspace("GroulsR-gpu-2")
        body = await get(client, ws)
        assert body == ws
        assert body["status"] == "paused" and body["active"] is False and "resume" in body["actions"]
        assert body["resource_meta"] == {"ip": "127.0.0.2"}
        assert fake.workspace("GroulsR-gpu-2")["resource_meta"] == {"ip": "127.0.0.3"}
        assert body["meta"]["flavours"][1] == {"name": "A10 - 2 GPU", "category": "size"}
        assert body["meta"]["application_type"] == "Compute"
        assert {"co_id", "wallet_id", "owner_id", "end_time", "time_created"} <= body.keys()
        unknown = await client.get(f"{WS}00000000-0000-0000-0000-000000000000/")
        assert (unknown.status_code, unknown.json()) == (404, {"detail": "Not found."})
        assert (await client.post(f"{WS}nope/actions/resume/", json={})).status_code == 404
        assert (await client.delete(f"{WS}{ws['id']}/")).status_code == 405


async def test_resume_goes_through_resuming_and_starts_the_sim() -> None:
    async with surf() as (fake, client):
        ws = fake.add_workspace("gpu-1", models=["llama3.2:latest", "qwen2.5:7b"], slots=2, resume_seconds=SEEN)
        accepted = await post(client, ws, "resume")
        assert accepted.status_code == 202
        assert accepted.json()["detail"] == "action accepted"
        body = await get(client, ws)
        assert (body["status"], body["active"], body["actions"]) == ("resuming", False, [])
        assert newest(body)["status"] == "running" and newest(body)["reason"] == "API"
        assert await ollama_tags(fake, "gpu-1") is None
        await fake.wait_for("gpu-1", "running")
        assert fake.is_serving("gpu-1")  # the sim starts before the status flips
        assert await ollama_tags(fake, "gpu-1") == ["llama3.2:latest", "qwen2.5:7b"]
        body = await get(client, ws)
        assert body["active"] is True and "pause" in body["actions"]
        assert newest(body)["status"] == "success"
        assert fake.calls == [("resume", "gpu-1")]
        assert fake.sims["gpu-1"].requests["/api/tags"] == 1


async def test_pause_goes_through_pausing_and_stops_the_sim() -> None:
    async with surf() as (fake, client):
        ws = fake.add_workspace("gpu-1", status="running", pause_seconds=SEEN)
        await fake.wait_for("gpu-1", "running", serving=True)
        assert await ollama_tags(fake, "gpu-1") == ["llama3.2:latest"]
        assert (await post(client, ws, "pause")).status_code == 202
        assert (await get(client, ws))["status"] == "pausing"
        assert await ollama_tags(fake, "gpu-1") is not None  # still up while pausing
        await fake.wait_for("gpu-1", "paused", serving=False)
        assert await ollama_tags(fake, "gpu-1") is None
        body = await get(client, ws)
        assert body["active"] is False and newest(body)["type"] == "pause"
        # The sim's counters survive the pause, and it answers again after a resume.
        assert (await post(client, ws, "resume")).status_code == 202
        await fake.wait_for("gpu-1", "running", serving=True)
        assert await ollama_tags(fake, "gpu-1") is not None
        assert fake.sims["gpu-1"].requests["/api/tags"] == 3


async def test_actions_not_allowed_now_get_409() -> None:
    async with surf() as (fake, client):
        ws = fake.add_workspace("gpu-1", status="running", pause_seconds=SEEN)
        conflict = await post(client, ws, "resume")
        assert conflict.status_code == 409
        assert conflict.json() == {"detail": "Action resume is not allowed in state running."}
        assert (await post(client, ws, "pause")).status_code == 202
        again = await post(client, ws, "pause")
        assert again.json() == {"detail": "Action pause is not allowed in state pausing."}
        assert fake.calls == [("pause", "gpu-1")]


async def test_a_failed_resume_drops_back_to_paused_with_the_error_newest() -> None:
    async with surf(history_newest_first=True) as (fake, client):
        ws = fake.add_workspace("gpu-1", status="running")
        assert (await post(client, ws, "pause")).status_code == 202
        await fake.wait_for("gpu-1", "paused")
        fake.fail_next_resume("gpu-1", error="No GPU available.", after=SEEN)
        assert (await post(client, ws, "resume")).status_code == 202
        assert (await get(client, ws))["status"] == "resuming"
        await fake.wait_for("gpu-1", "paused")
        body = await get(client, ws)
        failed = newest(body)
        assert failed["type"] == "resume" and failed["status"] == "failed"
        assert failed["result"] == {"error": "No GPU available."}
        assert body["workspace_actions"][0] == failed  # newest first, as asked
        assert not fake.is_serving("gpu-1")
        # The failure is one-shot: the next resume works.
        assert (await post(client, ws, "resume")).status_code == 202
        await fake.wait_for("gpu-1", "running", serving=True)


async def test_history_is_chronological_by_default() -> None:
    async with surf() as (fake, client):
        ws = fake.add_workspace("gpu-1")
        fake.fail_next_resume("gpu-1")
        await post(client, ws, "resume")
        await fake.wait_for("gpu-1", "paused")
        await post(client, ws, "resume")
        await fake.wait_for("gpu-1", "running")
        history = (await get(client, ws))["workspace_actions"]
        assert [e["status"] for e in history] == ["failed", "success"]
        assert history[0]["result"] == {"error": "Timeout waiting for VM to resume."}
        assert history[0]["time_created"] < history[1]["time_created"]


async def test_a_hung_resume_stays_resuming_until_paused() -> None:
    async with surf() as (fake, client):
        ws = fake.add_workspace("gpu-1")
        fake.hang_next_resume("gpu-1")
        assert (await post(client, ws, "resume")).status_code == 202
        await anyio.sleep(4 * T)
        body = await get(client, ws)
        assert (body["status"], body["actions"]) == ("resuming", ["pause"])
        assert (await post(client, ws, "resume")).status_code == 409
        assert (await post(client, ws, "pause")).status_code == 202
        await fake.wait_for("gpu-1", "paused")
        history = (await get(client, ws))["workspace_actions"]
        assert [(e["type"], e["status"]) for e in history] == [("resume", "failed"), ("pause", "success")]
        assert not fake.is_serving("gpu-1")


async def test_failing_pauses_change_nothing() -> None:
    async with surf() as (fake, client):
        ws = fake.add_workspace("gpu-1", status="running")
        fake.fail_pauses("gpu-1", times=2, status=500)
        for _ in range(2):
            failed = await post(client, ws, "pause")
            assert (failed.status_code, failed.json()) == (500, {"detail": "Internal server error"})
        assert (await get(client, ws))["status"] == "running" and fake.calls == []
        assert (await post(client, ws, "pause")).status_code == 202


async def test_set_status_acts_like_the_portal() -> None:
    async with surf() as (fake, client):
        ws = fake.add_workspace("gpu-1", resume_seconds=SEEN)
        await fake.set_status("gpu-1", "running")
        assert (await get(client, ws))["active"] is True
        assert await ollama_tags(fake, "gpu-1") == ["llama3.2:latest"]
        await fake.set_status("gpu-1", "paused")
        assert await ollama_tags(fake, "gpu-1") is None
        # Paused from outside in the middle of a resume: the resume must not come back to life.
        await post(client, ws, "resume")
        await fake.set_status("gpu-1", "paused")
        await anyio.sleep(SEEN + T)
        body = await get(client, ws)
        assert body["status"] == "paused" and not fake.is_serving("gpu-1")
        assert newest(body)["status"] == "failed"


async def test_a_pause_cuts_open_streams_like_a_vm_going_away() -> None:
    async with surf() as (fake, _), httpx.AsyncClient(timeout=5, trust_env=False) as ollama:
        fake.add_workspace("gpu-1", status="running", token_delay=0.02)
        await fake.wait_for("gpu-1", "running", serving=True)
        body = {"model": "llama3.2", "prompt": "hi", "options": {"num_predict": 500}}
        lines = 0
        with pytest.raises(httpx.RemoteProtocolError):
            async with ollama.stream("POST", fake.ollama_url("gpu-1") + "/api/generate", json=body) as response:
                async for _ in response.aiter_lines():
                    lines += 1
                    if lines == 2:
                        await fake.set_status("gpu-1", "paused")
        assert lines == 2


async def test_reboot_is_a_pause_then_a_resume() -> None:
    async with surf() as (fake, client):
        ws = fake.add_workspace("gpu-1", status="running", pause_seconds=SEEN)
        await fake.wait_for("gpu-1", "running", serving=True)
        assert (await post(client, ws, "reboot")).status_code == 202
        assert (await get(client, ws))["status"] == "rebooting"
        await fake.wait_for("gpu-1", "running", serving=True)
        assert newest(await get(client, ws))["type"] == "reboot"
        assert fake.calls == [("reboot", "gpu-1")]


async def test_ollama_can_lag_behind_the_running_status() -> None:
    async with surf() as (fake, client):
        ws = fake.add_workspace("gpu-1", resume_seconds=0, ollama_delay=SEEN)
        await post(client, ws, "resume")
        await fake.wait_for("gpu-1", "running")
        assert await ollama_tags(fake, "gpu-1") is None  # Docker is still booting
        await fake.wait_for("gpu-1", "running", serving=True)
        assert await ollama_tags(fake, "gpu-1") == ["llama3.2:latest"]


async def test_fail_requests_then_recover_and_everything_is_counted() -> None:
    async with surf() as (fake, client):
        ws = fake.add_workspace("gpu-1")
        fake.fail_requests(times=2, status=503)
        statuses = [(await client.get(WS, params=FILTERS)).status_code for _ in range(3)]
        assert statuses == [503, 503, 200]
        await get(client, ws)
        await post(client, ws, "resume")
        await client.get("/workspace/elsewhere/")
        assert fake.requests == {
            ("GET", "list"): 3,
            ("GET", "workspace"): 1,
            ("POST", "action"): 1,
            ("GET", "unknown"): 1,
        }


async def test_slow_requests_trip_client_timeouts() -> None:
    async with surf() as (fake, client):
        fake.slow_requests(1.0)
        with pytest.raises(httpx.ReadTimeout):
            await client.get(WS, timeout=0.1)
        fake.slow_requests(0)
        assert (await client.get(WS)).status_code == 200
        fake.slow_requests(30)  # still sleeping when the fake exits: the exit must not wait for it
        async with anyio.create_task_group() as tg:
            tg.start_soon(client.get, WS)
            await anyio.sleep(0.1)
            tg.cancel_scope.cancel()


async def test_exit_stops_every_sim() -> None:
    port = free_port_for_all(2)
    async with surf(ollama_port=port) as (fake, _):
        for name in ("a", "b"):
            fake.add_workspace(name, status="running")
            await fake.wait_for(name, "running", serving=True)
        assert fake.ollama_port == port and fake.ollama_url("b") == f"http://127.0.0.3:{port}"
        assert await ollama_tags(fake, "b") == ["llama3.2:latest"]
    assert await ollama_tags(fake, "a") is None and await ollama_tags(fake, "b") is None
