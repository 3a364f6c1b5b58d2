"""The real `openai` and `ollama` clients against a running gpumanager with two simulated hosts."""

from __future__ import annotations

from collections.abc import Iterator

import anyio
import httpx
import ollama
import openai
import pytest

from gpumanager.sim import expected_text
from tests.harness import SimHost, Stack, running_stack

HOSTS = [
    SimHost("gpu-a", models=("llama3.2:latest", "all-minilm:latest"), slots=2, token_delay=0.002),
    SimHost("gpu-b", models=("qwen2.5:7b",), slots=2, token_delay=0.002),
]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running_stack(tmp_path_factory.mktemp("clients"), HOSTS) as s:
        yield s


@pytest.fixture
def oai(stack: Stack) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=stack.v1, api_key=stack.user_key, max_retries=0) as client:
        yield client


@pytest.fixture
def oll(stack: Stack) -> Iterator[ollama.Client]:
    with ollama.Client(host=stack.url, headers=stack.headers()) as client:
        yield client


def test_openai_chat_non_streaming(stack: Stack, oai: openai.OpenAI) -> None:
    answer = oai.chat.completions.create(model="llama3.2", messages=[{"role": "user", "content": "hi"}], max_tokens=7)
    assert answer.choices[0].message.content == expected_text(7)
    assert answer.usage is not None and answer.usage.completion_tokens == 7


def test_openai_chat_streams_in_chunks(stack: Stack, oai: openai.OpenAI) -> None:
    stream = oai.chat.completions.create(
        model="qwen2.5:7b",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=12,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces = [c.choices[0].delta.content for c in stream if c.choices and c.choices[0].delta.content]
    assert len(pieces) == 12
    assert "".join(pieces) == expected_text(12)


def test_openai_raw_response_names_the_host(stack: Stack, oai: openai.OpenAI) -> None:
    raw = oai.chat.completions.with_raw_response.create(
        model="qwen2.5:7b", max_tokens=2, messages=[{"role": "user", "content": "hi"}]
    )
    assert raw.headers["x-gpumanager-host"] == "gpu-b"
    assert int(raw.headers["x-gpumanager-wait-ms"]) >= 0


def test_openai_completions_and_embeddings(stack: Stack, oai: openai.OpenAI) -> None:
    completion = oai.completions.create(model="llama3.2", prompt="once upon", max_tokens=4)
    assert completion.choices[0].text == expected_text(4)
    embedding = oai.embeddings.create(model="all-minilm", input=["a", "b"])
    assert len(embedding.data) == 2 and len(embedding.data[0].embedding) > 0


def test_openai_models_list_every_model_of_the_fleet(stack: Stack, oai: openai.OpenAI) -> None:
    ids = {m.id for m in oai.models.list()}
    assert ids == {"llama3.2:latest", "all-minilm:latest", "qwen2.5:7b"}
    assert oai.models.retrieve("llama3.2").id == "llama3.2"  # as asked, as Ollama answers
    assert oai.models.retrieve("llama3.2:latest").id == "llama3.2:latest"
    with pytest.raises(openai.NotFoundError):
        oai.models.retrieve("nope")


def test_openai_async_client_streams(stack: Stack) -> None:
    async def main() -> tuple[str, int]:
        async with openai.AsyncOpenAI(base_url=stack.v1, api_key=stack.user_key, max_retries=0) as client:
            answer = await client.chat.completions.create(
                model="llama3.2", messages=[{"role": "user", "content": "hi"}], max_tokens=3
            )
            assert answer.choices[0].message.content == expected_text(3)
            stream = await client.chat.completions.create(
                model="llama3.2", messages=[{"role": "user", "content": "hi"}], max_tokens=9, stream=True
            )
            pieces = [c.choices[0].delta.content async for c in stream if c.choices and c.choices[0].delta.content]
            return "".join(pieces), len(pieces)

    text, chunks = anyio.run(main)
    assert (text, chunks) == (expected_text(9), 9)


def test_ollama_chat_streaming_and_not(stack: Stack, oll: ollama.Client) -> None:
    messages = [{"role": "user", "content": "hello there"}]
    answer = oll.chat(model="llama3.2", messages=messages, options={"num_predict": 5})
    assert answer.message.content == expected_text(5)
    chunks = list(oll.chat(model="llama3.2", messages=messages, stream=True, options={"num_predict": 8}))
    content = [c.message.content for c in chunks if c.message.content]
    assert len(content) == 8 and "".join(content) == expected_text(8)
    assert chunks[-1].done and chunks[-1].eval_count == 8


def test_ollama_generate(stack: Stack, oll: ollama.Client) -> None:
    assert oll.generate(model="qwen2.5:7b", prompt="hi", options={"num_predict": 4}).response == expected_text(4)
    parts = [c.response for c in oll.generate(model="qwen2.5:7b", prompt="hi", stream=True, options={"num_predict": 6})]
    assert "".join(parts) == expected_text(6)


def test_ollama_list_ps_show_embed(stack: Stack, oll: ollama.Client) -> None:
    names = {m.model for m in oll.list().models}
    assert names == {"llama3.2:latest", "all-minilm:latest", "qwen2.5:7b"}
    oll.chat(model="qwen2.5:7b", messages=[{"role": "user", "content": "x"}], options={"num_predict": 1})
    stack.portal.call(stack.runtime.reconciler.refresh, stack.runtime.fleet.hosts["gpu-b"])
    assert "qwen2.5:7b" in {m.model for m in oll.ps().models}
    shown = oll.show("llama3.2")
    assert shown.details is not None and shown.details.family
    assert len(oll.embed(model="all-minilm", input=["one", "two"]).embeddings) == 2


def test_show_is_answered_from_the_cache_once_seen(stack: Stack, oll: ollama.Client) -> None:
    oll.show("qwen2.5:7b")
    before = stack.sims["gpu-b"].requests["/api/show"]
    again = httpx.post(stack.url + "/api/show", json={"model": "qwen2.5:7b"}, headers=stack.headers())
    assert again.status_code == 200 and again.headers["x-gpumanager-host"] == "cache"
    assert stack.sims["gpu-b"].requests["/api/show"] == before


def test_requests_go_to_the_host_that_has_the_model(stack: Stack, oll: ollama.Client) -> None:
    a, b = stack.sims["gpu-a"], stack.sims["gpu-b"]
    a_before, b_before = a.requests["/api/generate"], b.requests["/api/generate"]
    for _ in range(3):
        oll.generate(model="qwen2.5:7b", prompt="x", options={"num_predict": 1})
    oll.generate(model="llama3.2", prompt="x", options={"num_predict": 1})
    assert b.requests["/api/generate"] - b_before == 3
    assert a.requests["/api/generate"] - a_before == 1


def test_bad_key_gets_401_in_each_dialect(stack: Stack) -> None:
    with (
        openai.OpenAI(base_url=stack.v1, api_key="gm_not-a-key", max_retries=0) as client,
        pytest.raises(openai.AuthenticationError) as oai_error,
    ):
        client.models.list()
    assert oai_error.value.status_code == 401 and oai_error.value.code == "invalid_api_key"
    with (
        ollama.Client(host=stack.url, headers={"Authorization": "Bearer nope"}) as client,
        pytest.raises(ollama.ResponseError) as oll_error,
    ):
        client.list()
    assert oll_error.value.status_code == 401 and "API key" in oll_error.value.error
    assert httpx.post(stack.url + "/api/chat", json={"model": "llama3.2"}).status_code == 401
    assert httpx.get(stack.url + "/api/tags", headers={"X-API-Key": stack.user_key}).status_code == 200


def test_unknown_model_gets_404_in_each_dialect(stack: Stack, oai: openai.OpenAI, oll: ollama.Client) -> None:
    with pytest.raises(openai.NotFoundError) as oai_error:
        oai.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "x"}])
    assert "gpt-9" in oai_error.value.message
    with pytest.raises(ollama.ResponseError) as oll_error:
        oll.chat(model="gpt-9", messages=[{"role": "user", "content": "x"}])
    assert oll_error.value.status_code == 404


def test_the_client_key_never_reaches_the_host(stack: Stack, oll: ollama.Client) -> None:
    oll.generate(model="llama3.2", prompt="x", options={"num_predict": 1})
    seen = stack.sims["gpu-a"].last_headers
    assert "authorization" not in seen and "x-api-key" not in seen
    assert seen["host"] == stack.servers["gpu-a"].url.removeprefix("http://")


def test_request_bodies_are_forwarded_byte_for_byte(stack: Stack) -> None:
    body = (
        b'{"model": "llama3.2",  "prompt": "x\\u00e9",\n "stream": false, "options": {"num_predict": 2},'
        b' "x-extra": [1, 2.50]}'
    )
    answer = httpx.post(stack.url + "/api/generate", content=body, headers=stack.headers())
    assert answer.status_code == 200 and answer.json()["response"] == expected_text(2)
    assert stack.sims["gpu-a"].last_body == body  # spacing, escapes and unknown fields intact


def test_root_and_version_answer_like_ollama(stack: Stack) -> None:
    assert httpx.get(stack.url + "/").text == "Ollama is running"
    version = httpx.get(stack.url + "/api/version", headers=stack.headers()).json()["version"]
    assert version == stack.sims["gpu-a"].version
    assert httpx.get(stack.url + "/health").json()["status"] == "ok"
