"""Bad input gets a clear 4xx in the route's dialect, never a 500 or a traceback."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from loguru import logger

from tests.harness import FAST_TIMING, SimHost, Stack, running_stack


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    extra = FAST_TIMING + "[server]\nmax_body_mb = 1\n"
    with running_stack(tmp_path_factory.mktemp("bad"), [SimHost("gpu")], extra=extra) as s:
        yield s


@pytest.fixture
def client(stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack.url, headers=stack.headers(), timeout=30) as c:
        yield c


def ollama_error(response: httpx.Response) -> str:
    body = response.json()
    assert isinstance(body["error"], str), body
    return body["error"]


def openai_error(response: httpx.Response) -> dict[str, object]:
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "param", "code"}, error
    return error


@pytest.mark.parametrize(
    ("body", "says"),
    [
        (b"{not json", "not valid JSON"),
        (b"", "missing request body"),
        (b"[1, 2]", "must be a JSON object"),
        (b'"text"', "must be a JSON object"),
        (b'{"messages": []}', "model is required"),
        (b'{"model": ""}', "model is required"),
        (b'{"model": 42}', "`model` must be a string"),
        (b'{"model": "llama3.2", "stream": "yes"}', "`stream` must be a boolean"),
        (b'{"model": "llama3.2", "options": {"num_ctx": "big"}}', "`options.num_ctx` must be an integer"),
        (b'{"model": "llama3.2", "options": [1]}', "`options` must be an object"),
    ],
)
def test_malformed_bodies_get_400_in_both_dialects(client: httpx.Client, body: bytes, says: str) -> None:
    answer = client.post("/api/chat", content=body)
    assert answer.status_code == 400 and says in ollama_error(answer)
    answer = client.post("/v1/chat/completions", content=body)
    assert answer.status_code == 400
    error = openai_error(answer)
    assert error["type"] == "invalid_request_error" and says in str(error["message"])


def test_a_50_mb_body_gets_413(client: httpx.Client, stack: Stack) -> None:
    big = b'{"model": "llama3.2", "prompt": "' + b"x" * (50 * 2**20) + b'"}'
    try:
        answer = client.post("/api/generate", content=big)
    except (httpx.WriteError, httpx.RemoteProtocolError):
        pytest.fail("the proxy dropped the connection instead of answering 413")
    assert answer.status_code == 413 and "max_body_mb" in ollama_error(answer)


def test_a_chunked_body_over_the_limit_gets_413(client: httpx.Client) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"model": "llama3.2", "prompt": "'
        for _ in range(40):
            yield b"y" * 65536
        yield b'"}'

    answer = client.post("/v1/completions", content=chunks())
    assert answer.status_code == 413 and "max_body_mb" in str(openai_error(answer)["message"])


@pytest.mark.parametrize("path", ["/api/nothing", "/v1/nothing", "/admin", "/api/chat/extra", "/v2/chat/completions"])
def test_unknown_paths_get_404(client: httpx.Client, path: str) -> None:
    answer = client.post(path, json={"model": "llama3.2"})
    assert answer.status_code == 404
    if path.startswith("/v1/"):
        assert openai_error(answer)["type"] == "not_found_error"
    elif path.startswith("/v2/"):  # RunPod's job API: its shape, and which endpoints serve jobs
        assert "no RunPod job endpoint 'chat'" in ollama_error(answer)
    else:
        assert "no route" in ollama_error(answer)


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/api/chat"),
        ("PUT", "/api/generate"),
        ("GET", "/v1/chat/completions"),
        ("POST", "/api/tags"),
        ("DELETE", "/v1/models"),
        ("GET", "/api/delete"),
    ],
)
def test_wrong_methods_get_405(client: httpx.Client, method: str, path: str) -> None:
    answer = client.request(method, path)
    assert answer.status_code == 405
    message = openai_error(answer)["message"] if path.startswith("/v1/") else ollama_error(answer)
    assert method in str(message)


def test_model_management_needs_an_admin_key_and_a_host(client: httpx.Client, stack: Stack) -> None:
    answer = client.post("/api/pull", json={"model": "phi3"})
    assert answer.status_code == 403 and "admin" in ollama_error(answer)
    admin = stack.headers(stack.admin_key)
    answer = client.post("/api/pull", json={"model": "phi3"}, headers=admin)
    assert answer.status_code == 400 and "?host=NAME" in ollama_error(answer)
    answer = client.post("/api/pull?host=nowhere", json={"model": "phi3"}, headers=admin)
    assert answer.status_code == 404


def test_an_admin_pulls_a_model_onto_one_host(client: httpx.Client, stack: Stack) -> None:
    admin = stack.headers(stack.admin_key)
    lines = client.post("/api/pull?host=gpu", json={"model": "phi3"}, headers=admin).text.splitlines()
    assert lines[-1] == '{"status":"success"}'
    models = {m["name"] for m in client.get("/api/tags").json()["models"]}
    assert "phi3:latest" in models  # the inventory was read again after the pull
    assert client.request("DELETE", "/api/delete?host=gpu", json={"model": "phi3"}, headers=admin).status_code == 200
    assert "phi3:latest" not in {m["name"] for m in client.get("/api/tags").json()["models"]}


def test_no_key_no_service_even_on_unknown_paths(stack: Stack) -> None:
    assert httpx.post(stack.url + "/api/nothing").status_code == 401


def test_logs_never_carry_keys_or_bodies(stack: Stack, client: httpx.Client) -> None:
    lines: list[str] = []
    sink = logger.add(lines.append, level="DEBUG", format="{level} {message} {extra}")
    try:
        client.post("/api/generate", json={"model": "llama3.2", "prompt": "secret-prompt-words", "stream": False})
        httpx.post(stack.url + "/api/chat", headers={"Authorization": "Bearer gm_wrong-secret-key"}, json={})
        client.post("/api/chat", content=b'{"model": 7, "prompt": "secret-prompt-words"}')
    finally:
        logger.remove(sink)
    text = "".join(lines)
    assert "POST /api/generate" in text  # the request line is there...
    for secret in ("secret-prompt-words", stack.user_key, "gm_wrong-secret-key"):
        assert secret not in text  # ...and nothing that must not be
