"""Ollama requests for a host that speaks only OpenAI (a RunPod serverless endpoint, vLLM, llama-server...), translated.

`/api/chat` becomes a chat completion, `/api/generate` a completion, `/api/embed` and
`/api/embeddings` embeddings; the answer comes back in Ollama's shape, streamed as NDJSON frame by
frame as the SSE events arrive. What has no OpenAI equivalent (`raw`, `context`, `template`,
images, tools) is refused with a 400 that names it, before anything is sent upstream.

The answer is counted and timed as a direct one is (`forward.forward`): its token counts are the
host's own (`usage`; for a stream, the usage event asked for with `stream_options.include_usage`
unless the host does not take it), None when it sends none; `Exchange.sent`, `first_byte` (the
first byte of the Ollama answer to the client) and `upstream_done` are marked for the request's
record and its wake's last phase.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

import anyio
import httpx
import msgspec

from gpumanager.errors import BadRequest, UpstreamFailed
from gpumanager.fleet import Lease
from gpumanager.models import listed_name
from gpumanager.proxy.dialects import STREAM_CONTENT_TYPE, Dialect
from gpumanager.proxy.forward import (
    Exchange,
    Upstream,
    mid_answer,
    refused,
    refuses_usage,
    routing_headers,
    send_upstream,
    stop_asking_usage,
)

PATHS = {
    "chat": "/v1/chat/completions",
    "generate": "/v1/completions",
    "embed": "/v1/embeddings",
    "embeddings": "/v1/embeddings",
}
OPTIONS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "num_predict": "max_tokens",
    "stop": "stop",
    "seed": "seed",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
}
UNTRANSLATABLE = {"generate": ("raw", "context", "template", "images"), "chat": ("tools",)}

_decode = msgspec.json.Decoder()
_encode = msgspec.json.Encoder()


def with_listed_model(body: bytes, models: frozenset[str], model: str) -> bytes:
    """`body` with `model` replaced by the host's own name for it; unchanged (byte for byte) if equal."""
    name = listed_name(models, model)
    if name == model:
        return body
    request = _decode.decode(body)
    request["model"] = name
    return _encode.encode(request)


def openai_request(route: str, request: dict[str, Any]) -> tuple[str, dict[str, Any], bool]:
    """(path, body, stream) of the OpenAI request that stands for this Ollama one; BadRequest if none."""
    if route not in PATHS:
        raise BadRequest(f"/api/{route} has no equivalent on an OpenAI-compatible host")
    for field in UNTRANSLATABLE.get(route, ()):
        if request.get(field) not in (None, False, "", [], {}):
            raise BadRequest(f"`{field}` cannot be translated for an OpenAI-compatible host")
    model = request["model"]
    if route in ("embed", "embeddings"):
        text = request.get("input") if route == "embed" else request.get("prompt")
        body: dict[str, Any] = {"model": model, "input": text if text is not None else ""}
        if request.get("dimensions"):
            body["dimensions"] = request["dimensions"]
        return PATHS[route], body, False
    stream = request.get("stream") is not False
    body = {"model": model, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    if route == "chat":
        body["messages"] = [_message(m) for m in request.get("messages") or []]
    else:
        system, prompt = request.get("system"), str(request.get("prompt") or "")
        body["prompt"] = f"{system}\n\n{prompt}" if system else prompt
        if request.get("suffix"):
            body["suffix"] = request["suffix"]
    for name, value in (request.get("options") or {}).items():
        if name in OPTIONS and value is not None:
            body[OPTIONS[name]] = value
    if request.get("format") == "json":
        body["response_format"] = {"type": "json_object"}
    elif isinstance(request.get("format"), dict):
        body["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": "answer", "schema": request["format"]},
        }
    return PATHS[route], body, stream


def _message(message: Any) -> dict[str, Any]:
    if not isinstance(message, dict):
        raise BadRequest("each of `messages` must be an object")
    if message.get("images"):
        raise BadRequest("`images` cannot be translated for an OpenAI-compatible host")
    return {"role": message.get("role", "user"), "content": message.get("content") or ""}


def _count(value: Any) -> int | None:
    """A token count as the host sent it; None if it sent none (or something that is not one)."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


class Answer:
    """Builds Ollama frames from OpenAI chunks, keeping what the final frame needs."""

    def __init__(self, route: str, model: str) -> None:
        self.route, self.model = route, model
        self.started = time.perf_counter_ns()
        self.finish = "stop"
        self.prompt_tokens: int | None = None  # the host's own counts (None: it sent none)
        self.completion_tokens: int | None = None

    def frame(self, text: str, *, done: bool) -> bytes:
        frame: dict[str, Any] = {"model": self.model, "created_at": datetime.now(UTC).isoformat()}
        if self.route == "chat":
            frame["message"] = {"role": "assistant", "content": text}
        else:
            frame["response"] = text
        frame["done"] = done
        if done:
            frame.update(done_reason=self.finish, total_duration=time.perf_counter_ns() - self.started)
            if self.prompt_tokens is not None or self.completion_tokens is not None:
                frame.update(prompt_eval_count=self.prompt_tokens or 0, eval_count=self.completion_tokens or 0)
        return _encode.encode(frame) + b"\n"

    def take(self, chunk: dict[str, Any]) -> str:
        """The text of one OpenAI chunk or answer; remembers finish reason and usage."""
        self.count(chunk.get("usage"))
        text = ""
        for choice in chunk.get("choices") or []:
            if choice.get("finish_reason"):
                self.finish = str(choice["finish_reason"])
            part = choice.get("delta") or choice.get("message") or {}
            text += str(part.get("content") or "") if self.route == "chat" else str(choice.get("text") or "")
        return text

    def count(self, usage: Any) -> None:
        """Remember an OpenAI `usage` object's counts; the last one that has any wins (a stream's
        final usage event carries the totals)."""
        if not isinstance(usage, dict):
            return
        prompt, completion = _count(usage.get("prompt_tokens")), _count(usage.get("completion_tokens"))
        if prompt is not None or completion is not None:
            self.prompt_tokens, self.completion_tokens = prompt, completion

    def embeddings(self, answer: dict[str, Any]) -> bytes:
        self.count(answer.get("usage"))
        vectors = [item.get("embedding") for item in answer.get("data") or []]
        if self.route == "embeddings":
            return _encode.encode({"embedding": vectors[0] if vectors else []})
        return _encode.encode(
            {
                "model": self.model,
                "embeddings": vectors,
                "total_duration": time.perf_counter_ns() - self.started,
                "prompt_eval_count": self.prompt_tokens or 0,
            }
        )


async def forward(
    upstream: Upstream,
    ex: Exchange,
    lease: Lease,
    route: str,
    model: str,
    headers: list[tuple[bytes, bytes]],
    body: bytes,
) -> None:
    """Send the translated request to the lease's host and answer the client in Ollama's shape.

    A stream asks the host for its usage event, unless the host does not take `stream_options`
    (`Host.stream_usage`); a host that refuses it is asked again without, and not asked again.
    """
    request = _decode.decode(body)
    path, translated, stream = openai_request(route, request)
    host = lease.host
    translated["model"] = listed_name(host.models, model)
    if not host.stream_usage:
        translated.pop("stream_options", None)  # its streams go uncounted
    ex.host, ex.lease = host.name, lease
    headers = [(k, v) for k, v in headers if k != b"content-type"] + [(b"content-type", b"application/json")]
    answer = Answer(route, request.get("model", model))
    response = await _send(upstream, ex, lease, path, headers, translated)
    try:
        if await _refuses_usage(response, translated):
            await _close(response)
            stop_asking_usage(host)
            del translated["stream_options"]
            response = await _send(upstream, ex, lease, path, headers, translated)
        if response.status_code != 200:
            await _error(ex, response, lease)
        elif stream:
            await _stream(ex, response, answer, lease)
        else:
            await _whole(ex, response, answer, route, lease)
    except httpx.HTTPError as exc:
        raise mid_answer(host, exc) from None
    finally:
        await _close(response)


async def _send(
    upstream: Upstream,
    ex: Exchange,
    lease: Lease,
    path: str,
    headers: list[tuple[bytes, bytes]],
    translated: dict[str, Any],
) -> httpx.Response:
    body = _encode.encode(translated)
    ex.sent = time.perf_counter()
    return await send_upstream(upstream, lease.host, "POST", path, headers, body)


async def _close(response: httpx.Response) -> None:
    with anyio.CancelScope(shield=True):
        await response.aclose()


async def _refuses_usage(response: httpx.Response, translated: dict[str, Any]) -> bool:
    """Whether the host refused the `stream_options` it was sent (an older Ollama's OpenAI API does)."""
    if response.status_code != 400 or "stream_options" not in translated:
        return False
    return refuses_usage(await response.aread())  # read once: `_error` gets it again if not


async def _error(ex: Exchange, response: httpx.Response, lease: Lease) -> None:
    detail = await response.aread()
    ex.upstream_done = time.perf_counter()
    if response.status_code in (401, 403):
        raise refused(response, lease.host, detail)
    try:
        error = _decode.decode(detail).get("error")
        message = error.get("message") if isinstance(error, dict) else error
    except (msgspec.DecodeError, AttributeError):  # not JSON, or JSON without an error object
        message = detail[:200].decode("utf-8", "replace")
    if ex.started:
        raise UpstreamFailed(f"host {lease.host.name} answered {response.status_code}: {message}")
    await ex.start(response.status_code, [(b"content-type", b"application/json"), *routing_headers(ex)])
    await ex.finish(_encode.encode({"error": str(message or f"HTTP {response.status_code}")}))
    ex.mark_first_byte()


def _json(data: bytes, lease: Lease) -> Any:
    try:
        return _decode.decode(data)
    except msgspec.DecodeError:
        raise UpstreamFailed(f"host {lease.host.name} answered something that is not JSON") from None


async def _whole(ex: Exchange, response: httpx.Response, answer: Answer, route: str, lease: Lease) -> None:
    data = _json(await response.aread(), lease)
    ex.upstream_done = time.perf_counter()
    if not isinstance(data, dict):
        raise UpstreamFailed(f"host {lease.host.name} answered something that is not an OpenAI answer")
    if route in ("embed", "embeddings"):
        payload = answer.embeddings(data)
    else:
        payload = answer.frame(answer.take(data), done=True).rstrip(b"\n")
    ex.prompt_tokens, ex.completion_tokens = answer.prompt_tokens, answer.completion_tokens
    if not ex.started:
        await ex.start(200, [(b"content-type", b"application/json; charset=utf-8"), *routing_headers(ex)])
    await ex.finish(payload)
    ex.mark_first_byte()


async def _stream(ex: Exchange, response: httpx.Response, answer: Answer, lease: Lease) -> None:
    """SSE events in, NDJSON frames out, one for one as they arrive."""
    if not ex.started:
        await ex.start(200, [(b"content-type", STREAM_CONTENT_TYPE[Dialect.OLLAMA]), *routing_headers(ex)])
    pending = b""
    async for chunk in response.aiter_raw():
        if not ex.last_read and ex.silence is not None:  # the host's first byte: watch for its silence
            ex.silence.start()
        ex.last_read = anyio.current_time()
        pending += chunk.replace(b"\r\n", b"\n")
        *events, pending = pending.split(b"\n\n")
        out = b"".join(_frames(events, answer, lease))
        if out:
            await ex.write(out)
            ex.mark_first_byte()
    ex.upstream_done = time.perf_counter()
    ex.prompt_tokens, ex.completion_tokens = answer.prompt_tokens, answer.completion_tokens
    await ex.finish(answer.frame("", done=True))
    ex.mark_first_byte()


def _frames(events: list[bytes], answer: Answer, lease: Lease) -> list[bytes]:
    frames = []
    for event in events:
        data = b"\n".join(line[5:].strip() for line in event.split(b"\n") if line.startswith(b"data:"))
        if not data or data == b"[DONE]":
            continue
        chunk = _json(data, lease)
        if not isinstance(chunk, dict):
            continue
        if chunk.get("error"):
            error = chunk["error"]
            raise UpstreamFailed(
                f"host {lease.host.name} failed mid-answer: "
                f"{error.get('message') if isinstance(error, dict) else error}"
            )
        text = answer.take(chunk)
        if text:
            frames.append(answer.frame(text, done=False))
    return frames
