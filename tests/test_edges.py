"""Edges a careless client or an attacker reaches: deep JSON, odd model names, bugs, slashes, query
strings, legacy fields, browsers (CORS), stalled bodies, silent hosts, and what the messages say."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from loguru import logger
from starlette.routing import Route

from gpumanager.sim import expected_text
from tests.harness import FAST_TIMING, SimHost, Stack, running_stack, wait_until

EDGE_TIMING = FAST_TIMING + "upstream_idle_seconds = 1\n[server]\nclient_timeout_seconds = 1\n"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    hosts = [SimHost("gpu", models=("llama3.2:latest",), token_delay=0.01), SimHost("spare", models=("phi3:latest",))]
    with running_stack(tmp_path_factory.mktemp("edges"), hosts, extra=EDGE_TIMING) as s:
        yield s


@pytest.fixture
def client(stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack.url, headers=stack.headers(), timeout=30) as c:
        yield c


@pytest.fixture
def logged() -> Iterator[list[str]]:
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(str(m)), level="DEBUG", format="{level} {name} {message}\n{exception}")
    yield lines
    logger.remove(sink)


def chat(n: int = 2, **extra: Any) -> dict[str, Any]:
    return {"model": "llama3.2", "messages": [{"role": "user", "content": "x"}], "options": {"num_predict": n}, **extra}


# -- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize("nest", [b"[" * 1500 + b"]" * 1500, b'{"a":' * 1500 + b"1" + b"}" * 1500])
def test_json_nested_a_thousand_levels_deep_is_a_400_in_each_dialect(client: httpx.Client, nest: bytes) -> None:
    body = b'{"model": "llama3.2", "messages": ' + nest + b"}"
    answer = client.post("/api/chat", content=body)
    assert answer.status_code == 400 and answer.json()["error"] == "request body is nested too deeply"
    answer = client.post("/v1/chat/completions", content=body)
    assert answer.status_code == 400
    assert answer.json()["error"]["message"] == "request body is nested too deeply"


@pytest.mark.parametrize(
    ("model", "says"),
    [("x" * 257, "longer than 256"), ("llama3.2\nINFO forged line", "control characters"), ("a\x1b[31m", "control")],
)
def test_long_or_control_character_model_names_are_refused(client: httpx.Client, model: str, says: str) -> None:
    answer = client.post("/api/chat", json={**chat(), "model": model})
    assert answer.status_code == 400 and says in answer.json()["error"]


def test_a_bug_answers_500_in_the_routes_dialect_and_is_logged_once(stack: Stack, logged: list[str]) -> None:
    async def boom(request: object) -> None:
        raise RuntimeError("a bug")

    app = stack.app
    app.router.routes.extend([Route("/v1/boom", boom), Route("/api/boom", boom)])
    try:
        with httpx.Client(base_url=stack.url, headers=stack.headers(), timeout=10) as c:
            answer = c.get("/v1/boom")
            assert answer.status_code == 500 and answer.json()["error"]["type"] == "server_error"
            answer = c.get("/api/boom")
            assert answer.status_code == 500 and "see its log" in answer.json()["error"]
    finally:
        del app.router.routes[-2:]
    errors = [line for line in logged if line.startswith("ERROR")]
    assert len(errors) == 2 and all("RuntimeError: a bug" in line for line in errors)
    assert not [line for line in logged if "Exception in ASGI application" in line]


# -- paths, query strings, legacy fields ---------------------------------------------------------


@pytest.mark.parametrize("path", ["/api/tags/", "/v1/models/", "/api/chat/", "/v1/chat/completions/"])
def test_a_trailing_slash_is_never_a_redirect(client: httpx.Client, path: str) -> None:
    method = "GET" if "tags" in path or path == "/v1/models/" else "POST"
    answer = client.request(method, path, headers={"host": "evil.example"}, json=chat())
    if path == "/v1/models/":  # the model route takes the empty id
        assert answer.status_code in (200, 404) and "location" not in answer.headers
        return
    assert answer.status_code == 404 and "location" not in answer.headers
    assert "evil.example" not in answer.text
    error = answer.json()["error"]
    assert isinstance(error, dict) if path.startswith("/v1/") else isinstance(error, str)


def test_query_strings_never_go_upstream(stack: Stack, client: httpx.Client) -> None:
    seen: list[str] = []
    sim = stack.sims["gpu"]

    async def recorder(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            seen.append(scope["raw_path"].decode() + "?" + scope["query_string"].decode())
        await sim(scope, receive, send)

    door = stack.serve(recorder)
    host = stack.runtime.fleet.hosts["gpu"]
    original = host.url
    stack.call(setattr, host, "url", door.url)
    try:
        assert client.post("/api/chat?key=secret&x=1", json=chat(1, stream=False)).status_code == 200
        admin = {"Authorization": f"Bearer {stack.admin_key}"}
        pulled = client.post("/api/pull?host=gpu&token=secret", json={"model": "phi3"}, headers=admin)
        assert pulled.status_code == 200
    finally:
        stack.call(setattr, host, "url", original)
    assert "/api/chat?" in seen and "/api/pull?" in seen
    assert not [target for target in seen if "secret" in target]


def test_show_takes_the_legacy_name_field(client: httpx.Client) -> None:
    answer = client.post("/api/show", json={"name": "llama3.2"})
    assert answer.status_code == 200 and "details" in answer.json()


# -- browsers ------------------------------------------------------------------------------------


def test_cors_allows_local_origins_without_a_key_and_never_credentials(client: httpx.Client) -> None:
    preflight = httpx.options(
        client.base_url.join("/v1/chat/completions"),
        headers={
            "origin": "http://localhost:5173",
            "access-control-request-method": "POST",
            "access-control-request-headers": "authorization, content-type, x-stainless-os, x-stainless-lang",
        },
    )
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == "http://localhost:5173"
    allowed = preflight.headers["access-control-allow-headers"].lower()
    assert "x-stainless-os" in allowed and "authorization" in allowed
    assert "access-control-allow-credentials" not in preflight.headers
    for origin in ("app://obsidian.md", "tauri://localhost", "http://127.0.0.1:8080"):
        assert (
            httpx.options(
                client.base_url.join("/api/chat"), headers={"origin": origin, "access-control-request-method": "POST"}
            ).status_code
            == 200
        ), origin
    refused = httpx.options(
        client.base_url.join("/api/chat"),
        headers={"origin": "https://evil.example", "access-control-request-method": "POST"},
    )
    assert refused.status_code == 400 and "access-control-allow-origin" not in refused.headers
    sneaky = httpx.options(
        client.base_url.join("/api/chat"),
        headers={"origin": "http://localhost:1.evil.example", "access-control-request-method": "POST"},
    )
    assert sneaky.status_code == 400
    real = client.get("/api/tags", headers={"origin": "http://localhost:3000"})
    assert real.headers["access-control-allow-origin"] == "http://localhost:3000"
    assert (
        "access-control-allow-origin" not in client.get("/api/tags", headers={"origin": "https://evil.example"}).headers
    )


def test_cors_origins_star_allows_any_origin(tmp_path: Path) -> None:
    with running_stack(tmp_path, [SimHost("gpu")], extra=FAST_TIMING + '[server]\ncors_origins = ["*"]\n') as s:
        answer = httpx.get(s.url + "/api/tags", headers={**s.headers(), "origin": "https://anywhere.example"})
        assert answer.headers["access-control-allow-origin"] == "*"


# -- slow and silent peers -----------------------------------------------------------------------


def test_a_stalled_request_body_is_answered_408_and_holds_nothing(stack: Stack, client: httpx.Client) -> None:
    host, port = httpx.URL(stack.url).host, httpx.URL(stack.url).port
    with socket.create_connection((host, port), timeout=10) as sock:
        head = (
            f"POST /api/chat HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {stack.user_key}\r\n"
            "content-type: application/json\r\ncontent-length: 200\r\n\r\n"
        )
        sock.sendall(head.encode() + b'{"model": "llama3.2", ')  # ...and nothing more
        started = time.monotonic()
        received = b""
        while b"client_timeout_seconds" not in received:  # the head and the body may come apart
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
        answer = received.decode()
        assert answer.startswith("HTTP/1.1 408") and "client_timeout_seconds" in answer
        assert 0.9 < time.monotonic() - started < 10
    assert client.post("/api/chat", json=chat(2, stream=False)).status_code == 200


async def frozen(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """A host that answers one chunk, then never sends again (a hung GPU)."""
    if scope["type"] != "http":
        return
    if scope["path"] in ("/api/version", "/api/tags", "/api/ps"):
        body = {"/api/version": {"version": "0.32.0"}, "/api/tags": {"models": [{"name": "llama3.2:latest"}]}}
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": json.dumps(body.get(scope["path"], {"models": []})).encode()})
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/x-ndjson")]})
    frame = {"model": "llama3.2", "message": {"role": "assistant", "content": "tok0 "}, "done": False}
    await send({"type": "http.response.body", "body": json.dumps(frame).encode() + b"\n", "more_body": True})
    await anyio.sleep_forever()


def test_a_silent_host_ends_its_stream_frees_the_slot_and_is_skipped(tmp_path: Path) -> None:
    hosts = [SimHost("hung", slots=1), SimHost("good", slots=1)]
    with running_stack(tmp_path, hosts, extra=EDGE_TIMING) as stack:
        door = stack.serve(frozen)
        hung = stack.runtime.fleet.hosts["hung"]
        good = stack.runtime.fleet.hosts["good"]
        stack.call(setattr, hung, "url", door.url)
        stack.call(setattr, good, "cost_per_hour", 9.0)  # the frozen host is chosen first
        with httpx.Client(base_url=stack.url, headers=stack.headers(), timeout=30) as client:
            with client.stream("POST", "/api/chat", json=chat(5)) as response:
                lines = [json.loads(line) for line in response.iter_lines()]
            assert response.status_code == 200 and lines[0]["message"]["content"] == "tok0 "
            assert lines[-1] == {"error": "host hung sent nothing for 1s mid-answer"}
            assert stack.call(lambda: (hung.leases, hung.healthy)) == (0, False)
            answer = client.post("/api/chat", json=chat(2, stream=False))  # goes to the other host at once
            assert answer.status_code == 200 and answer.headers["x-gpumanager-host"] == "good"
            assert answer.json()["message"]["content"] == expected_text(2)


# -- what the messages say -----------------------------------------------------------------------


def test_a_host_that_drops_the_stream_is_named_without_library_internals(stack: Stack, client: httpx.Client) -> None:
    sim = stack.sims["gpu"]
    stack.call(setattr, sim, "fail_after_tokens", 2)
    try:
        with client.stream("POST", "/api/chat", json=chat(10)) as response:
            lines = [json.loads(line) for line in response.iter_lines()]
        assert lines[-1] == {"error": "host gpu closed the connection mid-answer"}
        with client.stream("POST", "/v1/chat/completions", json={**chat(10), "stream": True}) as response:
            events = [line for line in response.iter_lines() if line.startswith("data: {")]
        assert json.loads(events[-1][6:])["error"]["message"] == "host gpu closed the connection mid-answer"
    finally:
        stack.call(setattr, sim, "fail_after_tokens", None)


def test_a_host_that_is_not_listening_is_a_502_saying_so(tmp_path: Path) -> None:
    with running_stack(tmp_path, [SimHost("away")], extra=EDGE_TIMING) as stack:
        with socket.socket() as closed:
            closed.bind(("127.0.0.1", 0))
            dead = f"http://127.0.0.1:{closed.getsockname()[1]}"
        stack.call(setattr, stack.runtime.fleet.hosts["away"], "url", dead)
        answer = httpx.post(stack.url + "/api/chat", json=chat(1, stream=False), headers=stack.headers(), timeout=10)
        assert answer.status_code == 502 and answer.json()["error"] == "cannot connect to host away"
        wait_until(lambda: not stack.call(lambda: stack.runtime.fleet.hosts["away"].healthy), timeout=5)
