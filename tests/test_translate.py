"""The Ollama-to-OpenAI translation for hosts that speak only OpenAI, as pure functions."""

from __future__ import annotations

import json

import pytest

from gpumanager.errors import BadRequest
from gpumanager.proxy.translate import Answer, openai_request


def test_chat_becomes_a_streaming_chat_completion_with_usage() -> None:
    path, body, stream = openai_request(
        "chat",
        {
            "model": "meta-llama/Llama-3.1-8B-Instruct",
            "messages": [{"role": "user", "content": "hi"}],
            "options": {"temperature": 0.2, "num_predict": 64, "num_ctx": 8192, "stop": ["\n"]},
            "format": "json",
        },
    )
    assert path == "/v1/chat/completions" and stream
    assert body == {
        "model": "meta-llama/Llama-3.1-8B-Instruct",
        "stream": True,
        "stream_options": {"include_usage": True},
        "messages": [{"role": "user", "content": "hi"}],
        "temperature": 0.2,
        "max_tokens": 64,
        "stop": ["\n"],
        "response_format": {"type": "json_object"},
    }


def test_generate_becomes_a_completion_with_the_system_prompt_first() -> None:
    path, body, stream = openai_request(
        "generate",
        {"model": "m", "prompt": "Hello", "system": "Be brief.", "stream": False, "format": {"type": "object"}},
    )
    assert (path, stream) == ("/v1/completions", False)
    assert body["prompt"] == "Be brief.\n\nHello" and body["response_format"]["type"] == "json_schema"


@pytest.mark.parametrize(
    ("route", "request_body", "field"),
    [
        ("generate", {"model": "m", "prompt": "x", "raw": True}, "raw"),
        ("generate", {"model": "m", "prompt": "x", "context": [1, 2]}, "context"),
        ("generate", {"model": "m", "prompt": "x", "images": ["aGk="]}, "images"),
        ("chat", {"model": "m", "messages": [{"role": "user", "content": "x", "images": ["aGk="]}]}, "images"),
        ("chat", {"model": "m", "messages": [], "tools": [{"type": "function"}]}, "tools"),
        ("show", {"model": "m"}, "/api/show"),
    ],
)
def test_what_cannot_be_translated_is_refused_by_name(route: str, request_body: dict[str, object], field: str) -> None:
    with pytest.raises(BadRequest, match=field.replace("/", "/")):
        openai_request(route, request_body)


def test_embeddings_both_ways() -> None:
    assert openai_request("embed", {"model": "e", "input": ["a", "b"]}) == (
        "/v1/embeddings",
        {"model": "e", "input": ["a", "b"]},
        False,
    )
    assert openai_request("embeddings", {"model": "e", "prompt": "a"})[1] == {"model": "e", "input": "a"}
    answer = {"data": [{"embedding": [0.1, 0.2]}, {"embedding": [0.3, 0.4]}], "usage": {"prompt_tokens": 3}}
    embed = json.loads(Answer("embed", "e").embeddings(answer))
    assert embed["embeddings"] == [[0.1, 0.2], [0.3, 0.4]] and embed["prompt_eval_count"] == 3
    assert json.loads(Answer("embeddings", "e").embeddings(answer)) == {"embedding": [0.1, 0.2]}


def test_chunks_become_ollama_frames_and_the_last_carries_the_counts() -> None:
    answer = Answer("chat", "m")
    assert answer.take({"choices": [{"delta": {"role": "assistant"}}]}) == ""
    text = answer.take({"choices": [{"delta": {"content": "Hel"}}]})
    frame = json.loads(answer.frame(text, done=False))
    assert frame["message"] == {"role": "assistant", "content": "Hel"} and frame["done"] is False
    answer.take({"choices": [{"delta": {}, "finish_reason": "length"}]})
    answer.take({"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 7}})
    last = json.loads(answer.frame("", done=True))
    assert (last["done"], last["done_reason"], last["prompt_eval_count"], last["eval_count"]) == (True, "length", 5, 7)
    generate = Answer("generate", "m")
    assert json.loads(generate.frame(generate.take({"choices": [{"text": "abc"}]}), done=False))["response"] == "abc"
