"""A fast, deterministic stand-in for an Ollama server, as a raw ASGI 3 app.

Tests, the demo and the benchmark put `SimOllama` behind the proxy. It speaks the
native Ollama API and the OpenAI-compatible ``/v1`` routes with the wire shapes of
REFERENCE.md section 1, answers with predictable text (`expected_text`), runs at
most ``slots`` generations at once like Ollama's parallel slots, and exposes plain
counters plus failure knobs that a test may change while the server runs.

There is deliberately no Starlette here: a routing dict, one module-level msgspec
encoder/decoder and hand-built ASGI messages keep the per-request cost low enough
for the benchmark to measure the proxy rather than the upstream.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import itertools
import math
import re
import struct
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Iterator, MutableMapping
from datetime import datetime, timezone
from typing import Any

import anyio
import anyio.lowlevel
import msgspec

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

_decode = msgspec.json.Decoder().decode
_encode = msgspec.json.Encoder().encode

JSON = b"application/json; charset=utf-8"
NDJSON = b"application/x-ndjson"
SSE = b"text/event-stream"
TEXT = b"text/plain; charset=utf-8"
KEEP_ALIVE_S = 300.0  # Ollama's default keep_alive: how long /api/ps lists a model after use


class SimCrash(RuntimeError):
    """Raised out of the app on purpose: uvicorn then drops the connection mid-stream."""


class _HTTPError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@functools.lru_cache(maxsize=64)
def expected_text(n: int) -> str:
    """The exact answer for ``n`` tokens: token ``i`` (0-based) is ``f"tok{i} "``."""
    return "".join(f"tok{i} " for i in range(n))


def normalise_model(name: str) -> str:
    """Add Ollama's default ``:latest`` tag; a colon before the last ``/`` is a registry port."""
    return name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"


def is_embedding_model(name: str) -> bool:
    return "embed" in name or "minilm" in name


def embedding_for(text: str, dim: int) -> list[float]:
    """A unit vector derived from a hash of ``text``, so equal inputs embed equally."""
    raw = hashlib.shake_256(text.encode()).digest(2 * dim)
    vec = [v / 32767.5 - 1.0 for v in struct.unpack(f"<{dim}H", raw)]
    norm = math.sqrt(sum(v * v for v in vec)) or 1.0
    return [v / norm for v in vec]


def _rfc3339(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat().replace("+00:00", "Z")


def _words(texts: Iterable[Any]) -> int:
    return max(1, sum(len(t.split()) for t in texts if isinstance(t, str)))


def _positive(value: Any, default: int) -> int:
    ok = isinstance(value, int) and not isinstance(value, bool) and value > 0
    return value if ok else default


def _digest(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


def _details(name: str) -> dict[str, Any]:
    base = name.rsplit("/", 1)[-1].split(":")[0]
    family = "bert" if is_embedding_model(name) else m.group() if (m := re.match(r"[a-z]+", base)) else "llama"
    size = re.search(r"(\d+(?:\.\d+)?)b\b", name.split(":")[-1])
    return {"parent_model": "", "format": "gguf", "family": family, "families": [family],
            "parameter_size": f"{size.group(1)}B" if size else "3.2B", "quantization_level": "Q4_K_M"}


def _size(name: str) -> int:
    base = 45_000_000 if is_embedding_model(name) else 2_000_000_000
    return base + int(_digest(name)[:6], 16)


def _openai_error(status: int, message: str) -> dict[str, Any]:
    kind = {400: "invalid_request_error", 404: "not_found_error"}.get(status, "api_error")
    return {"error": {"message": message, "type": kind, "param": None, "code": None}}


async def _read_body(receive: Receive) -> bytes:
    chunks: list[bytes] = []
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            break
        chunks.append(msg.get("body", b""))
        if not msg.get("more_body"):
            break
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def _respond(send: Send, status: int, body: bytes, content_type: bytes | None = JSON) -> None:
    headers = [(b"content-length", str(len(body)).encode())]
    if content_type is not None:
        headers.append((b"content-type", content_type))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _respond_json(send: Send, obj: Any, status: int = 200) -> None:
    await _respond(send, status, _encode(obj))


class _Request:
    """One HTTP exchange; the body is read only by the handlers that need it."""

    __slots__ = ("path", "receive", "send", "sim")

    def __init__(self, path: str, receive: Receive, send: Send, sim: SimOllama) -> None:
        self.path, self.receive, self.send, self.sim = path, receive, send, sim

    async def json(self) -> dict[str, Any]:
        body = await _read_body(self.receive)
        self.sim.last_body = body
        if not body:
            raise _HTTPError(400, "missing request body")
        try:
            data = _decode(body)
        except msgspec.DecodeError as exc:
            raise _HTTPError(400, f"invalid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise _HTTPError(400, "request body must be a JSON object")
        return data


class _Metrics:
    """Timing of one generation, reported in nanoseconds like Ollama."""

    __slots__ = ("eval_count", "eval_start", "load_ns", "prompt_count", "start")

    def __init__(self, start: int, load_ns: int, prompt_count: int, eval_count: int) -> None:
        self.start, self.load_ns = start, load_ns
        self.prompt_count, self.eval_count = prompt_count, eval_count
        self.eval_start = time.perf_counter_ns()

    def native(self) -> dict[str, int]:
        now = time.perf_counter_ns()
        return {"total_duration": max(1, now - self.start), "load_duration": self.load_ns,
                "prompt_eval_count": self.prompt_count, "prompt_eval_duration": self.prompt_count * 50_000,
                "eval_count": self.eval_count, "eval_duration": max(1, now - self.eval_start)}


class _DisconnectWatch:
    """Listens on ``receive()`` during a stream so a vanished client stops the generation."""

    __slots__ = ("finishing", "gone")

    def __init__(self) -> None:
        self.finishing = False
        self.gone = False

    async def run(self, receive: Receive, scope: anyio.CancelScope) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        # Once the last frame is on its way, uvicorn reports a disconnect too; that one is benign.
        if not self.finishing:
            self.gone = True
            scope.cancel()


class _Slot:
    """Holds one of the sim's parallel slots; a class because it is cheaper than a generator CM."""

    __slots__ = ("sim",)

    def __init__(self, sim: SimOllama) -> None:
        self.sim = sim

    async def __aenter__(self) -> None:
        sim = self.sim
        await sim._slots.acquire()  # anyio's semaphore queues waiters FIFO, like Ollama's queue
        sim.active += 1
        if sim.active > sim.max_active:
            sim.max_active = sim.active

    async def __aexit__(self, *exc_info: object) -> None:
        self.sim.active -= 1
        self.sim._slots.release()


Handler = Callable[[_Request], Awaitable[None]]


class SimOllama:
    """A simulated Ollama server. Statistics and failure knobs are plain attributes.

    ``slots`` is fixed at construction. A client that disconnects stops its generation
    (streaming, or the token wait of a non-streaming answer) and frees its slot; one
    still queued for a slot is only noticed once it gets one.
    """

    def __init__(self, *, name: str = "sim", models: Iterable[str] = ("llama3.2:latest",), slots: int = 4,
                 token_delay: float = 0.0, default_tokens: int = 20, version: str = "0.12.6",
                 load_delay: float = 0.0, embedding_dim: int = 8, context_length: int = 4096) -> None:
        self.name, self.slots, self.version = name, slots, version
        self.token_delay, self.default_tokens, self.load_delay = token_delay, default_tokens, load_delay
        self.embedding_dim, self.context_length = embedding_dim, context_length
        self.fail_after_tokens: int | None = None
        self.words: tuple[str, ...] = ()  # the demo's readable answers; tests use the default `tok{i}`
        self._models: dict[str, float] = {}
        self._loaded: dict[str, float] = {}  # model -> wall-clock expiry
        self._loading: dict[str, anyio.Event] = {}
        self._slots = anyio.Semaphore(slots, fast_acquire=True)
        self._ids = itertools.count(1)
        self.set_models(models)
        self.requests: Counter[str] = Counter()
        self.active = self.max_active = self.cancelled = 0
        self.last_headers: dict[str, str] = {}
        self.last_body = b""  # the bytes of the most recent request body, as received
        self._routes = self._route_table()

    # -- public knobs -----------------------------------------------------------------

    def token(self, i: int) -> str:
        """Token `i` of every answer: `tok{i} `, or the i-th of `words` (cycling) when they are set."""
        return f"{self.words[i % len(self.words)]} " if self.words else f"tok{i} "

    def text(self, n: int) -> str:
        return "".join(self.token(i) for i in range(n))

    @property
    def models(self) -> list[str]:
        return list(self._models)

    @models.setter
    def models(self, names: Iterable[str]) -> None:
        self.set_models(names)

    def set_models(self, names: Iterable[str]) -> None:
        """Replace the pulled models; loaded models that disappear are unloaded."""
        now, known = time.time(), self._models
        self._models = {name: known.get(name, now) for name in map(normalise_model, names)}
        self._loaded = {m: exp for m, exp in self._loaded.items() if m in self._models}

    def reset_stats(self) -> None:
        self.requests = Counter()
        self.max_active = self.active
        self.cancelled = 0
        self.last_headers = {}

    # -- ASGI entry -------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            return await _lifespan(receive, send)
        path: str = scope["path"]
        self.requests[path] += 1
        self.last_headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        req = _Request(path, receive, send, self)
        methods = self._routes.get(path)
        if methods is None and path.startswith("/v1/models/"):
            methods = {"GET": self._oa_model}
        if methods is None:
            return await _respond_json(send, {"error": f"path {path} not found"}, 404)
        handler = methods.get(scope["method"])
        if handler is None:
            return await _respond_json(send, {"error": "method not allowed"}, 405)
        try:
            await handler(req)
        except _HTTPError as exc:
            body = _openai_error(exc.status, exc.message) if path.startswith("/v1/") else {"error": exc.message}
            await _respond_json(send, body, exc.status)

    def _route_table(self) -> dict[str, dict[str, Handler]]:
        def get(handler: Handler) -> dict[str, Handler]:
            return {"GET": handler, "HEAD": handler}  # Ollama answers HEAD on these too

        return {
            "/": get(self._root), "/api/version": get(self._version), "/api/tags": get(self._tags),
            "/api/ps": {"GET": self._ps}, "/api/show": {"POST": self._show},
            "/api/chat": {"POST": self._chat}, "/api/generate": {"POST": self._generate},
            "/api/embed": {"POST": self._embed}, "/api/embeddings": {"POST": self._embeddings},
            "/api/pull": {"POST": self._pull}, "/api/push": {"POST": self._push},
            "/api/create": {"POST": self._create}, "/api/copy": {"POST": self._copy},
            "/api/delete": {"DELETE": self._delete},
            "/v1/chat/completions": {"POST": self._oa_chat}, "/v1/completions": {"POST": self._oa_completions},
            "/v1/embeddings": {"POST": self._oa_embeddings}, "/v1/models": {"GET": self._oa_models},
        }

    # -- shared machinery ---------------------------------------------------------------

    def _model_for(self, body: dict[str, Any], action: str | None = None) -> str:
        raw = body.get("model") or body.get("name")
        if not isinstance(raw, str) or not raw:
            raise _HTTPError(400, "model is required")
        name = normalise_model(raw)
        if name not in self._models:
            raise _HTTPError(404, f"model '{raw}' not found")
        if action is not None and is_embedding_model(name):
            raise _HTTPError(400, f'"{raw}" does not support {action}')
        body["model"] = raw  # answers echo the name as sent, also when it came as legacy "name"
        return name

    def _slot(self) -> _Slot:
        return _Slot(self)

    async def _load(self, model: str) -> int:
        """Make ``model`` resident and return the wait in ns; concurrent first uses share one load."""
        start = time.perf_counter_ns()
        if model not in self._loaded and self.load_delay > 0:
            pending = self._loading.get(model)
            if pending is not None:
                await pending.wait()
            else:
                self._loading[model] = pending = anyio.Event()
                try:
                    await anyio.sleep(self.load_delay)
                finally:
                    del self._loading[model]
                    pending.set()
        self._loaded[model] = time.time() + KEEP_ALIVE_S
        return max(1, time.perf_counter_ns() - start)

    async def _sleep_tokens(self, req: _Request, n: int) -> bool:
        """Spend the time of ``n`` tokens; False (and counted) if the client left meanwhile."""
        if self.token_delay <= 0:
            return True
        watch = _DisconnectWatch()
        async with anyio.create_task_group() as tg:
            tg.start_soon(watch.run, req.receive, tg.cancel_scope)
            await anyio.sleep(self.token_delay * n)
            watch.finishing = True
            tg.cancel_scope.cancel()
        if watch.gone:
            self.cancelled += 1
        return not watch.gone

    async def _stream(self, req: _Request, content_type: bytes, frames: Iterator[bytes],
                      tail: Callable[[], bytes]) -> None:
        """Send one body message per token, then ``tail()``; stop early if the client leaves."""
        await req.send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", content_type)]})
        watch, crash_at, completed = _DisconnectWatch(), self.fail_after_tokens, True
        async with anyio.create_task_group() as tg:
            tg.start_soon(watch.run, req.receive, tg.cancel_scope)
            completed = await self._send_tokens(req.send, frames, crash_at)
            if completed:
                watch.finishing = True
                await req.send({"type": "http.response.body", "body": tail(), "more_body": False})
            tg.cancel_scope.cancel()
        if watch.gone:
            self.cancelled += 1
        elif not completed:
            raise SimCrash(f"simulated crash of {self.name} after {crash_at} tokens")

    async def _send_tokens(self, send: Send, frames: Iterator[bytes], crash_at: int | None) -> bool:
        sent = 0
        for frame in frames:
            if sent == crash_at:
                return False
            if self.token_delay > 0:
                await anyio.sleep(self.token_delay)
            else:  # still let the disconnect watcher run between tokens
                await anyio.lowlevel.checkpoint()
            await send({"type": "http.response.body", "body": frame, "more_body": True})
            sent += 1
        return sent != crash_at

    # -- native generation ----------------------------------------------------------------

    async def _chat(self, req: _Request) -> None:
        body = await req.json()
        model = self._model_for(body, "chat")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return await self._load_answer(req, body, model, chat=True)
        words = _words(m.get("content") for m in messages if isinstance(m, dict))
        await self._native(req, body, model, words, chat=True)

    async def _generate(self, req: _Request) -> None:
        body = await req.json()
        model = self._model_for(body, "generate")
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            return await self._load_answer(req, body, model, chat=False)
        await self._native(req, body, model, _words([prompt]), chat=False)

    def _frame(self, body: dict[str, Any], text: str, chat: bool, done: bool) -> dict[str, Any]:
        frame: dict[str, Any] = {"model": body["model"], "created_at": _rfc3339(time.time())}
        if chat:
            frame["message"] = {"role": "assistant", "content": text}
        else:
            frame["response"] = text
        frame["done"] = done
        return frame

    async def _load_answer(self, req: _Request, body: dict[str, Any], model: str, chat: bool) -> None:
        """An empty prompt loads (or, with keep_alive 0, unloads) the model; always one JSON object."""
        if body.get("keep_alive") in (0, "0", "0s", "0m"):
            self._loaded.pop(model, None)
            reason = "unload"
        else:
            await self._load(model)
            reason = "load"
        await _respond_json(req.send, {**self._frame(body, "", chat, True), "done_reason": reason})

    async def _native(self, req: _Request, body: dict[str, Any], model: str, words: int, chat: bool) -> None:
        options = body.get("options")
        n = _positive(options.get("num_predict") if isinstance(options, dict) else None, self.default_tokens)
        start = time.perf_counter_ns()
        async with self._slot():
            metrics = _Metrics(start, await self._load(model), words, n)

            def final(text: str) -> dict[str, Any]:
                return {**self._frame(body, text, chat, True), "done_reason": "stop", **metrics.native()}

            if body.get("stream") is False:
                if await self._sleep_tokens(req, n):
                    await _respond_json(req.send, final(self.text(n)))
                return
            frames = (_encode(self._frame(body, self.token(i), chat, False)) + b"\n" for i in range(n))
            await self._stream(req, NDJSON, frames, lambda: _encode(final("")) + b"\n")

    # -- native embeddings ------------------------------------------------------------------

    async def _embed(self, req: _Request) -> None:
        body = await req.json()
        model = self._model_for(body)
        raw = body.get("input")
        inputs = [raw] if isinstance(raw, str) else [str(t) for t in raw] if isinstance(raw, list) else []
        dim = min(_positive(body.get("dimensions"), self.embedding_dim), self.embedding_dim)
        start = time.perf_counter_ns()
        async with self._slot():
            load_ns = await self._load(model)
            vectors = [embedding_for(t, dim) for t in inputs]
        await _respond_json(req.send, {
            "model": body["model"], "embeddings": vectors, "total_duration": time.perf_counter_ns() - start,
            "load_duration": load_ns, "prompt_eval_count": _words(inputs)})

    async def _embeddings(self, req: _Request) -> None:
        body = await req.json()
        model = self._model_for(body)
        prompt = body.get("prompt")
        async with self._slot():
            await self._load(model)
        vector = embedding_for(prompt, self.embedding_dim) if isinstance(prompt, str) and prompt else []
        await _respond_json(req.send, {"embedding": vector})

    # -- model management ---------------------------------------------------------------------

    async def _root(self, req: _Request) -> None:
        await _respond(req.send, 200, b"Ollama is running", TEXT)

    async def _version(self, req: _Request) -> None:
        await _respond_json(req.send, {"version": self.version})

    def _entry(self, name: str) -> dict[str, Any]:
        return {"name": name, "model": name, "modified_at": _rfc3339(self._models[name]), "size": _size(name),
                "digest": _digest(name), "details": _details(name)}

    async def _tags(self, req: _Request) -> None:
        await _respond_json(req.send, {"models": [self._entry(m) for m in self._models]})

    async def _ps(self, req: _Request) -> None:
        now = time.time()
        self._loaded = {m: exp for m, exp in self._loaded.items() if exp > now}
        models = [{"name": m, "model": m, "size": _size(m), "digest": _digest(m), "details": _details(m),
                   "expires_at": _rfc3339(exp), "size_vram": _size(m), "context_length": self.context_length}
                  for m, exp in sorted(self._loaded.items(), key=lambda item: -item[1])]
        await _respond_json(req.send, {"models": models})

    async def _show(self, req: _Request) -> None:
        name = self._model_for(await req.json())
        embedding = is_embedding_model(name)
        info: dict[str, Any] = {"general.architecture": "llama", "general.parameter_count": _size(name) // 2,
                                "llama.context_length": self.context_length}
        if embedding:
            info["llama.embedding_length"] = self.embedding_dim
        await _respond_json(req.send, {
            "modelfile": f"# Modelfile generated by the gpumanager simulator\nFROM {name}\n",
            "parameters": 'stop "<|eot_id|>"', "template": "{{ .Prompt }}", "details": _details(name),
            "model_info": info, "capabilities": ["embedding"] if embedding else ["completion"],
            "modified_at": _rfc3339(self._models[name])})

    async def _progress(self, req: _Request, body: dict[str, Any], statuses: list[dict[str, Any]]) -> None:
        """Pull/push/create answer: NDJSON status lines, or only the last one when stream is false."""
        if body.get("stream") is False:
            return await _respond_json(req.send, statuses[-1])
        await req.send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", NDJSON)]})
        for i, status in enumerate(statuses, 1):
            more = i < len(statuses)
            await req.send({"type": "http.response.body", "body": _encode(status) + b"\n", "more_body": more})

    def _name(self, body: dict[str, Any], key: str = "model") -> str:
        raw = body.get(key) or (body.get("name") if key == "model" else None)
        if not isinstance(raw, str) or not raw:
            raise _HTTPError(400, f"{key} is required")
        return normalise_model(raw)

    def _add_model(self, name: str) -> None:
        self._models[name] = time.time()

    async def _pull(self, req: _Request) -> None:
        body = await req.json()
        name = self._name(body)
        digest, total = f"sha256:{_digest(name)}", _size(name)
        layer = {"status": f"pulling {_digest(name)[:12]}", "digest": digest, "total": total}
        self._add_model(name)
        await self._progress(req, body, [
            {"status": "pulling manifest"}, {**layer, "completed": 0}, {**layer, "completed": total},
            {"status": "verifying sha256 digest"}, {"status": "writing manifest"}, {"status": "success"}])

    async def _push(self, req: _Request) -> None:
        body = await req.json()
        name = self._model_for(body)
        digest, total = f"sha256:{_digest(name)}", _size(name)
        await self._progress(req, body, [
            {"status": "retrieving manifest"},
            {"status": "pushing", "digest": digest, "total": total, "completed": total},
            {"status": "pushing manifest"}, {"status": "success"}])

    async def _create(self, req: _Request) -> None:
        body = await req.json()
        name = self._name(body)
        self._add_model(name)
        await self._progress(req, body, [
            {"status": f"using existing layer sha256:{_digest(name)}"},
            {"status": "writing manifest"}, {"status": "success"}])

    async def _copy(self, req: _Request) -> None:
        body = await req.json()
        source, destination = self._name(body, "source"), self._name(body, "destination")
        if source not in self._models:
            raise _HTTPError(404, f"model '{body['source']}' not found")
        self._add_model(destination)
        await _respond(req.send, 200, b"", None)

    async def _delete(self, req: _Request) -> None:
        name = self._model_for(await req.json())
        del self._models[name]
        self._loaded.pop(name, None)
        await _respond(req.send, 200, b"", None)

    # -- OpenAI-compatible routes -------------------------------------------------------------

    async def _oa_chat(self, req: _Request) -> None:
        body = await req.json()
        model = self._model_for(body, "chat")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise _HTTPError(400, "[] is too short - 'messages'")
        await self._openai(req, body, model, _words(m.get("content") for m in messages if isinstance(m, dict)),
                           chat=True)

    async def _oa_completions(self, req: _Request) -> None:
        body = await req.json()
        model = self._model_for(body, "generate")
        prompt = body.get("prompt")
        await self._openai(req, body, model, _words(prompt if isinstance(prompt, list) else [prompt]), chat=False)

    async def _openai(self, req: _Request, body: dict[str, Any], model: str, words: int, chat: bool) -> None:
        n = _positive(body.get("max_tokens") or body.get("max_completion_tokens"), self.default_tokens)
        obj = "chat.completion" if chat else "text_completion"
        head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{next(self._ids) % 999}", "object": obj,
                "created": int(time.time()), "model": body["model"], "system_fingerprint": "fp_ollama"}
        usage = {"prompt_tokens": words, "completion_tokens": n, "total_tokens": words + n}
        async with self._slot():
            await self._load(model)
            if body.get("stream") is not True:
                if await self._sleep_tokens(req, n):
                    choice = _oa_choice(chat, self.text(n), "stop", None)
                    await _respond_json(req.send, {**head, "choices": [choice], "usage": usage})
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

    async def _oa_embeddings(self, req: _Request) -> None:
        body = await req.json()
        model = self._model_for(body)
        raw = body.get("input")
        inputs = [raw] if isinstance(raw, str) else [str(t) for t in raw] if isinstance(raw, list) else []
        if not inputs:
            raise _HTTPError(400, "invalid input")
        dim = min(_positive(body.get("dimensions"), self.embedding_dim), self.embedding_dim)
        as_base64 = body.get("encoding_format") == "base64"
        async with self._slot():
            await self._load(model)
            vectors = [embedding_for(t, dim) for t in inputs]
        data = [{"object": "embedding", "embedding": _b64(v) if as_base64 else v, "index": i}
                for i, v in enumerate(vectors)]
        words = _words(inputs)
        await _respond_json(req.send, {"object": "list", "data": data, "model": body["model"],
                                       "usage": {"prompt_tokens": words, "total_tokens": words}})

    def _oa_entry(self, name: str, shown_as: str) -> dict[str, Any]:
        parts = name.split(":")[0].split("/")
        return {"id": shown_as, "object": "model", "created": int(self._models[name]),
                "owned_by": parts[-2] if len(parts) > 1 else "library"}

    async def _oa_models(self, req: _Request) -> None:
        # Real Ollama sends "data": null with no models; clients and proxies prefer [].
        await _respond_json(req.send, {"object": "list", "data": [self._oa_entry(m, m) for m in self._models]})

    async def _oa_model(self, req: _Request) -> None:
        raw = req.path.removeprefix("/v1/models/")
        name = normalise_model(raw)
        if not raw or name not in self._models:
            raise _HTTPError(404, f"model '{raw}' not found")
        await _respond_json(req.send, self._oa_entry(name, raw))


def _oa_choice(chat: bool, text: str | None, finish: str | None, first: bool | None) -> dict[str, Any]:
    """A choice for a whole answer (``first is None``), a streamed chunk, or the final chunk (``text is None``)."""
    if not chat:
        return {"text": text or "", "index": 0, "finish_reason": finish}
    if first is None:
        return {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
    delta: dict[str, str] = {} if text is None else {"role": "assistant", "content": text} if first else {
        "content": text}
    return {"index": 0, "delta": delta, "finish_reason": finish}


def _sse(obj: Any) -> bytes:
    return b"data: " + _encode(obj) + b"\n\n"


def _b64(vector: list[float]) -> str:
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()


async def _lifespan(receive: Receive, send: Send) -> None:
    """Accept lifespan events, so ``uvicorn --lifespan on`` works without complaint."""
    while True:
        kind = (await receive())["type"]
        await send({"type": f"{kind}.complete"})
        if kind == "lifespan.shutdown":
            return
