"""The simulator's OpenAI-compatible ``/v1`` routes, as a mixin of `SimOllama`.

They share the native routes' slots, model loading and token pacing, which live on
`SimOllama`; the declarations under ``TYPE_CHECKING`` name exactly what this mixin
uses of it, so mypy checks the seam without any runtime indirection.
"""

from __future__ import annotations

import base64
import struct
import time
from typing import TYPE_CHECKING, Any

from gpumanager.sim.wire import (
    SSE,
    HTTPError,
    Request,
    embedding_for,
    encode,
    normalise_model,
    positive,
    respond_json,
    word_count,
)

if TYPE_CHECKING:
    import itertools
    from collections.abc import Callable, Iterator
    from contextlib import AbstractAsyncContextManager


def openai_error(status: int, message: str) -> dict[str, Any]:
    kind = {400: "invalid_request_error", 404: "not_found_error"}.get(status, "api_error")
    return {"error": {"message": message, "type": kind, "param": None, "code": None}}


class OpenAIRoutes:
    """``/v1/chat/completions``, ``/v1/completions``, ``/v1/embeddings`` and ``/v1/models``."""

    if TYPE_CHECKING:
        default_tokens: int
        embedding_dim: int
        _models: dict[str, float]
        _ids: itertools.count[int]

        def token(self, i: int) -> str: ...
        def text(self, n: int) -> str: ...
        def _model_for(self, body: dict[str, Any], action: str | None = None) -> str: ...
        def _slot(self) -> AbstractAsyncContextManager[None]: ...
        async def _load(self, model: str) -> int: ...
        async def _sleep_tokens(self, req: Request, n: int) -> bool: ...
        async def _stream(
            self, req: Request, content_type: bytes, frames: Iterator[bytes], tail: Callable[[], bytes]
        ) -> None: ...

    async def _oa_chat(self, req: Request) -> None:
        body = await req.json()
        model = self._model_for(body, "chat")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise HTTPError(400, "[] is too short - 'messages'")
        words = word_count(m.get("content") for m in messages if isinstance(m, dict))
        await self._openai(req, body, model, words, chat=True)

    async def _oa_completions(self, req: Request) -> None:
        body = await req.json()
        model = self._model_for(body, "generate")
        prompt = body.get("prompt")
        words = word_count(prompt if isinstance(prompt, list) else [prompt])
        await self._openai(req, body, model, words, chat=False)

    async def _openai(self, req: Request, body: dict[str, Any], model: str, words: int, chat: bool) -> None:
        n = positive(body.get("max_tokens") or body.get("max_completion_tokens"), self.default_tokens)
        obj = "chat.completion" if chat else "text_completion"
        head = {
            "id": f"{'chatcmpl' if chat else 'cmpl'}-{next(self._ids) % 999}",
            "object": obj,
            "created": int(time.time()),
            "model": body["model"],
            "system_fingerprint": "fp_ollama",
        }
        usage = {"prompt_tokens": words, "completion_tokens": n, "total_tokens": words + n}
        async with self._slot():
            await self._load(model)
            if body.get("stream") is not True:
                if await self._sleep_tokens(req, n):
                    choice = _oa_choice(chat, self.text(n), "stop", None)
                    await respond_json(req.send, {**head, "choices": [choice], "usage": usage})
                return
            if chat:
                head["object"] = "chat.completion.chunk"
            options = body.get("stream_options")
            with_usage = isinstance(options, dict) and options.get("include_usage") is True
            frames = (_sse({**head, "choices": [_oa_choice(chat, self.token(i), None, i == 0)]}) for i in range(n))
            tail = _sse({**head, "choices": [_oa_choice(chat, None, "stop", False)]})
            if with_usage:
                tail += _sse({**head, "choices": [], "usage": usage})
            await self._stream(req, SSE, frames, lambda: tail + b"data: [DONE]\n\n")

    async def _oa_embeddings(self, req: Request) -> None:
        body = await req.json()
        model = self._model_for(body)
        raw = body.get("input")
        inputs = [raw] if isinstance(raw, str) else [str(t) for t in raw] if isinstance(raw, list) else []
        if not inputs:
            raise HTTPError(400, "invalid input")
        dim = min(positive(body.get("dimensions"), self.embedding_dim), self.embedding_dim)
        as_base64 = body.get("encoding_format") == "base64"
        async with self._slot():
            await self._load(model)
            vectors = [embedding_for(t, dim) for t in inputs]
        data = [
            {"object": "embedding", "embedding": _b64(v) if as_base64 else v, "index": i} for i, v in enumerate(vectors)
        ]
        words = word_count(inputs)
        await respond_json(
            req.send,
            {
                "object": "list",
                "data": data,
                "model": body["model"],
                "usage": {"prompt_tokens": words, "total_tokens": words},
            },
        )

    def _oa_entry(self, name: str, shown_as: str) -> dict[str, Any]:
        parts = name.split(":")[0].split("/")
        return {
            "id": shown_as,
            "object": "model",
            "created": int(self._models[name]),
            "owned_by": parts[-2] if len(parts) > 1 else "library",
        }

    async def _oa_models(self, req: Request) -> None:
        # Real Ollama sends "data": null with no models; clients and proxies prefer [].
        await respond_json(req.send, {"object": "list", "data": [self._oa_entry(m, m) for m in self._models]})

    async def _oa_model(self, req: Request) -> None:
        raw = req.path.removeprefix("/v1/models/")
        name = normalise_model(raw)
        if not raw or name not in self._models:
            raise HTTPError(404, f"model '{raw}' not found")
        await respond_json(req.send, self._oa_entry(name, raw))


def _oa_choice(chat: bool, text: str | None, finish: str | None, first: bool | None) -> dict[str, Any]:
    """A choice for a whole answer (``first is None``), a streamed chunk, or the final chunk (``text is None``)."""
    if not chat:
        return {"text": text or "", "index": 0, "finish_reason": finish}
    if first is None:
        return {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
    delta: dict[str, str] = (
        {} if text is None else {"role": "assistant", "content": text} if first else {"content": text}
    )
    return {"index": 0, "delta": delta, "finish_reason": finish}


def _sse(obj: Any) -> bytes:
    return b"data: " + encode(obj) + b"\n\n"


def _b64(vector: list[float]) -> str:
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
