"""Property-based fuzzing of every route of DESIGN.md §2 through the real server.

Generated bodies, headers, paths and query strings, with a user key and an admin key (leaving out
`pause` and `emergency-off`, which are meant to act). gpumanager must never answer 500 nor log a
traceback; 502-504 come only with their documented meaning; a host's own 5xx is told apart by its
`X-GPUManager-Host` header; and afterwards every slot is free and a normal request is served.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from loguru import logger

from gpumanager.sim import expected_text
from tests.harness import FAST_TIMING, SimHost, Stack, running_stack, wait_until

MODELS = ["llama3.2", "llama3.2:latest", "all-minilm", "nope", "org/Model-7B", ""]
MODEL_ROUTES = [
    "/api/chat",
    "/api/generate",
    "/api/embed",
    "/api/embeddings",
    "/api/show",
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
]
LOCAL_ROUTES = ["/", "/health", "/api/version", "/api/tags", "/api/ps", "/v1/models", "/v1/models/llama3.2"]
HOST_ROUTES = [("POST", "/api/pull"), ("POST", "/api/push"), ("POST", "/api/create"), ("POST", "/api/copy")]
HOST_ROUTES += [("DELETE", "/api/delete")]
ADMIN_ROUTES = [
    ("GET", "/gpu/discover"),
    ("GET", "/gpu/{id}/status"),
    ("POST", "/gpu/{id}/resume"),
    ("POST", "/gpu/{id}/protect"),
    ("DELETE", "/gpu/{id}/protect"),
    ("POST", "/gpu/emergency-on"),
]

EXAMPLES = 400


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    hosts = [
        SimHost("gpu", models=("llama3.2:latest", "all-minilm:latest"), slots=4),
        SimHost("scratch", models=("scratch-model:latest",), slots=2),  # model management lands here
    ]
    extra = FAST_TIMING + "[server]\nmax_body_mb = 1\nclient_timeout_seconds = 5\n"
    with running_stack(tmp_path_factory.mktemp("fuzz"), hosts, extra=extra) as s:
        yield s


@pytest.fixture
def logged(stack: Stack) -> Iterator[list[str]]:
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(str(m)), level="WARNING", format="{level} {message}\n{exception}")
    yield lines
    logger.remove(sink)


text = st.text(max_size=40)
scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | text
json_values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=4)
)


@st.composite
def bodies(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["fields", "fields", "fields", "json", "bytes", "deep"]))
    if kind == "bytes":
        return draw(st.binary(max_size=200))
    if kind == "json":
        return json.dumps(draw(json_values)).encode()
    if kind == "deep":
        depth = draw(st.integers(200, 3000))
        return b'{"model": "llama3.2", "x": ' + b"[" * depth + b"]" * depth + b"}"
    body: dict[str, Any] = {"model": draw(st.sampled_from(MODELS) | text)}
    for field, values in (
        ("stream", st.booleans() | scalars),
        ("options", st.fixed_dictionaries({"num_predict": st.integers(0, 3)}) | json_values),
        ("messages", st.just([{"role": "user", "content": "hi"}]) | json_values),
        ("prompt", text),
        ("input", text | st.lists(text, max_size=3)),
        ("name", text),
        ("verbose", st.booleans() | scalars),
        ("stream_options", json_values),
    ):
        if draw(st.booleans()):
            body[field] = draw(values)
    return json.dumps(body).encode()


header_names = st.sampled_from(
    ["content-type", "accept", "x-api-key", "origin", "x-stainless-os", "content-encoding", "user-agent", "expect"]
)
header_values = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40).map(str.strip)


@st.composite
def requests(draw: st.DrawFn) -> tuple[str, str, bytes, dict[str, str], bool]:
    admin = draw(st.booleans())
    kind = draw(st.sampled_from(["model"] * 6 + ["local", "host", "admin", "random"]))
    if kind == "model":
        method, path = draw(st.sampled_from(["POST", "POST", "POST", "GET"])), draw(st.sampled_from(MODEL_ROUTES))
    elif kind == "local":
        method, path = draw(st.sampled_from(["GET", "HEAD", "POST"])), draw(st.sampled_from(LOCAL_ROUTES))
    elif kind == "host":
        method, path = draw(st.sampled_from(HOST_ROUTES))
        path += draw(st.sampled_from(["?host=scratch", "?host=nope", "", "?host="]))
    elif kind == "admin":
        method, path = draw(st.sampled_from(ADMIN_ROUTES))
        path = path.replace("{id}", draw(st.sampled_from(["gpu", "scratch", "nope", "%2e%2e"])))
    else:
        method = draw(st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH"]))
        path = "/" + draw(
            st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters="?#%"), max_size=30)
        )
    if kind in ("model", "local") and draw(st.integers(0, 4)) == 0:
        path += "?" + draw(st.sampled_from(["key=gm_secret", "stream=true", "host=gpu", "a=%00"]))
    if kind in ("model", "local") and draw(st.integers(0, 9)) == 0:
        path += "/"
    headers = draw(st.dictionaries(header_names, header_values, max_size=3))
    return method, path, draw(bodies()), headers, admin


def check(response: httpx.Response, path: str) -> None:
    status = response.status_code
    if status < 500 or "x-gpumanager-host" in response.headers:  # a host's own 5xx is passed on, labelled
        return
    assert status != 500, f"500 from gpumanager on {path}: {response.text[:300]}"
    payload = response.json()
    assert payload.get("src") == "gpumanager", payload
    error = payload["error"]
    message = error["message"] if isinstance(error, dict) else error
    if status == 502:
        assert "host" in message, message
    elif status == 503:
        assert "retry-after" in response.headers, response.headers
    elif status == 504:
        assert "did not become ready" in message, message
    else:
        raise AssertionError(f"unexpected {status} on {path}: {message}")


def test_fuzzed_requests_never_get_a_500_and_leave_nothing_behind(stack: Stack, logged: list[str]) -> None:
    seen: Counter[int] = Counter()

    @settings(
        derandomize=True,
        database=None,
        deadline=None,
        max_examples=EXAMPLES,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(request=requests())
    def one(request: tuple[str, str, bytes, dict[str, str], bool]) -> None:
        method, path, body, headers, admin = request
        key = stack.admin_key if admin else stack.user_key
        with httpx.Client(base_url=stack.url, timeout=30) as client:
            response = client.request(method, path, content=body, headers={**headers, "authorization": f"Bearer {key}"})
        seen[response.status_code] += 1
        check(response, path)

    one()
    print(f"fuzz: {sum(seen.values())} requests, statuses {dict(sorted(seen.items()))}")
    assert sum(seen.values()) >= EXAMPLES and seen[200] > 0 and seen[400] > 0
    fleet = stack.runtime.fleet
    wait_until(lambda: stack.call(lambda: (fleet.lease_count(), len(fleet.queue))) == (0, 0), timeout=10)
    answer = httpx.post(
        stack.url + "/api/chat",
        json={
            "model": "llama3.2",
            "messages": [{"role": "user", "content": "x"}],
            "stream": False,
            "options": {"num_predict": 3},
        },
        headers=stack.headers(),
        timeout=30,
    )
    assert answer.status_code == 200 and answer.json()["message"]["content"] == expected_text(3)
    assert not [line for line in logged if "Traceback" in line or line.startswith("ERROR")], logged[:5]
