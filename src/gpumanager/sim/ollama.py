"""A fast, deterministic stand-in for an Ollama server, as a raw ASGI 3 app.

Tests, the demo and the benchmark put `SimOllama` behind the proxy. It speaks the
native Ollama API and the OpenAI-compatible ``/v1`` routes with the wire shapes of
REFERENCE.md section 1, answers with predictable text (`expected_text`), runs at
most ``slots`` generations at once like Ollama's parallel slots, and exposes plain
counters plus failure knobs that a test may change while the server runs.

There is deliberately no Starlette here: a routing dict, one module-level msgspec
encoder/decoder and hand-built ASGI messages keep the per-request cost low enough
for the benchmark to measure the proxy rather than the upstream.

This module holds the server itself (knobs, statistics, ASGI entry, slots, native
generation and embeddings); the model-management routes are the `ManageRoutes`
mixin (`gpumanager.sim.manage`), the ``/v1`` routes the `OpenAIRoutes` mixin
(`gpumanager.sim.openai_routes`), and the pieces all three share live in `gpumanager.sim.wire`.
"""

from __future__ import annotations

import itertools
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import anyio
import anyio.lowlevel

from gpumanager.sim.manage import ManageRoutes
from gpumanager.sim.openai_routes import OpenAIRoutes, openai_error
from gpumanager.sim.wire import (
    NDJSON,
    Handler,
    HTTPError,
    Receive,
    Request,
    Scope,
    Send,
    SimCrash,
    embedding_for,
    encode,
    expected_text,
    is_embedding_model,
    normalise_model,
    positive,
    respond,
    respond_json,
    rfc3339,
    word_count,
)

# Re-exported: these lived here before the split, and tests and tools import them from here.
__all__ = ["SimCrash", "SimOllama", "embedding_for", "expected_text", "is_embedding_model", "normalise_model"]

KEEP_ALIVE_S = 300.0  # Ollama's default keep_alive: how long /api/ps lists a model after use


class _Metrics:
    """Timing of one generation, reported in nanoseconds like Ollama."""

    __slots__ = ("eval_count", "eval_start", "load_ns", "prompt_count", "start")

    def __init__(self, start: int, load_ns: int, prompt_count: int, eval_count: int) -> None:
        self.start, self.load_ns = start, load_ns
        self.prompt_count, self.eval_count = prompt_count, eval_count
        self.eval_start = time.perf_counter_ns()

    def native(self) -> dict[str, int]:
        now = time.perf_counter_ns()
        return {
            "total_duration": max(1, now - self.start),
            "load_duration": self.load_ns,
            "prompt_eval_count": self.prompt_count,
            "prompt_eval_duration": self.prompt_count * 50_000,
            "eval_count": self.eval_count,
            "eval_duration": max(1, now - self.eval_start),
        }


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
        sim.in_flight += 1  # given to it, queued or running: more than `slots` means the proxy overfilled it
        if sim.in_flight > sim.max_in_flight:
            sim.max_in_flight = sim.in_flight
        try:
            await sim._slots.acquire()  # anyio's semaphore queues waiters FIFO, like Ollama's queue
        except BaseException:
            sim.in_flight -= 1
            raise
        sim.active += 1
        if sim.active > sim.max_active:
            sim.max_active = sim.active

    async def __aexit__(self, *exc_info: object) -> None:
        self.sim.active -= 1
        self.sim.in_flight -= 1
        self.sim._slots.release()


class SimOllama(ManageRoutes, OpenAIRoutes):
    """A simulated Ollama server. Statistics and failure knobs are plain attributes.

    ``slots`` is fixed at construction. A client that disconnects stops its generation
    (streaming, or the token wait of a non-streaming answer) and frees its slot; one
    still queued for a slot is only noticed once it gets one.
    """

    def __init__(
        self,
        *,
        name: str = "sim",
        models: Iterable[str] = ("llama3.2:latest",),
        slots: int = 4,
        token_delay: float = 0.0,
        default_tokens: int = 20,
        version: str = "0.12.6",
        load_delay: float = 0.0,
        embedding_dim: int = 8,
        context_length: int = 4096,
    ) -> None:
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
        self.in_flight = self.max_in_flight = 0
        self.last_headers: dict[str, str] = {}
        self.last_body = b""  # the bytes of the most recent request body, as received
        # A GPU of its own at /gpu-metrics, as a GPU node's door serves dcgm-exporter's series
        # (the demo's hosts show it on the dashboard); its load follows the slots in use.
        self.gpu = ""  # the GPU's model name; "" = no /gpu-metrics
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
        self.max_in_flight = self.in_flight
        self.cancelled = 0
        self.last_headers = {}

    # -- ASGI entry -------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            return await _lifespan(receive, send)
        path: str = scope["path"]
        self.requests[path] += 1
        self.last_headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        req = Request(path, receive, send, self)
        methods = self._routes.get(path)
        if methods is None and path.startswith("/v1/models/"):
            methods = {"GET": self._oa_model}
        if methods is None and path == "/gpu-metrics" and self.gpu:
            methods = {"GET": self._gpu_metrics}
        if methods is None:
            return await respond_json(send, {"error": f"path {path} not found"}, 404)
        handler = methods.get(scope["method"])
        if handler is None:
            return await respond_json(send, {"error": "method not allowed"}, 405)
        try:
            await handler(req)
        except HTTPError as exc:
            body = openai_error(exc.status, exc.message) if path.startswith("/v1/") else {"error": exc.message}
            await respond_json(send, body, exc.status)

    def _route_table(self) -> dict[str, dict[str, Handler]]:
        def get(handler: Handler) -> dict[str, Handler]:
            return {"GET": handler, "HEAD": handler}  # Ollama answers HEAD on these too

        return {
            "/": get(self._root),
            "/api/version": get(self._version),
            "/api/tags": get(self._tags),
            "/api/ps": {"GET": self._ps},
            "/api/show": {"POST": self._show},
            "/api/chat": {"POST": self._chat},
            "/api/generate": {"POST": self._generate},
            "/api/embed": {"POST": self._embed},
            "/api/embeddings": {"POST": self._embeddings},
            "/api/pull": {"POST": self._pull},
            "/api/push": {"POST": self._push},
            "/api/create": {"POST": self._create},
            "/api/copy": {"POST": self._copy},
            "/api/delete": {"DELETE": self._delete},
            "/v1/chat/completions": {"POST": self._oa_chat},
            "/v1/completions": {"POST": self._oa_completions},
            "/v1/embeddings": {"POST": self._oa_embeddings},
            "/v1/models": {"GET": self._oa_models},
        }

    async def _gpu_metrics(self, req: Request) -> None:
        """dcgm-exporter's text for one simulated GPU: busy as the share of slots in use."""
        busy = self.active / self.slots if self.slots else 0.0
        used = 512 + 5120 * len(self._loaded)  # MiB: the driver's own, and each loaded model
        labels = f'gpu="0",UUID="GPU-sim-{self.name}",device="nvidia0",modelName="{self.gpu}",Hostname="{self.name}"'
        values = {
            "DCGM_FI_DEV_GPU_UTIL": round(100 * busy),
            "DCGM_FI_DEV_FB_USED": used,
            "DCGM_FI_DEV_FB_FREE": 40960 - used,
            "DCGM_FI_DEV_GPU_TEMP": round(38 + 40 * busy),
            "DCGM_FI_DEV_POWER_USAGE": round(55 + 250 * busy, 3),
        }
        text = "".join(f"# TYPE {name} gauge\n{name}{{{labels}}} {value}\n" for name, value in values.items())
        await respond(req.send, 200, text.encode(), b"text/plain; version=0.0.4; charset=utf-8")

    # -- shared machinery ---------------------------------------------------------------

    def _model_for(self, body: dict[str, Any], action: str | None = None) -> str:
        raw = body.get("model") or body.get("name")
        if not isinstance(raw, str) or not raw:
            raise HTTPError(400, "model is required")
        name = normalise_model(raw)
        if name not in self._models:
            raise HTTPError(404, f"model '{raw}' not found")
        if action is not None and is_embedding_model(name):
            raise HTTPError(400, f'"{raw}" does not support {action}')
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

    async def _sleep_tokens(self, req: Request, n: int) -> bool:
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

    async def _stream(
        self, req: Request, content_type: bytes, frames: Iterator[bytes], tail: Callable[[], bytes]
    ) -> None:
        """Send one body message per token, then ``tail()``; stop early if the client leaves."""
        await req.send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", content_type)]})
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

    async def _chat(self, req: Request) -> None:
        body = await req.json()
        model = self._model_for(body, "chat")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return await self._load_answer(req, body, model, chat=True)
        words = word_count(m.get("content") for m in messages if isinstance(m, dict))
        await self._native(req, body, model, words, chat=True)

    async def _generate(self, req: Request) -> None:
        body = await req.json()
        model = self._model_for(body, "generate")
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            return await self._load_answer(req, body, model, chat=False)
        await self._native(req, body, model, word_count([prompt]), chat=False)

    def _frame(self, body: dict[str, Any], text: str, chat: bool, done: bool) -> dict[str, Any]:
        frame: dict[str, Any] = {"model": body["model"], "created_at": rfc3339(time.time())}
        if chat:
            frame["message"] = {"role": "assistant", "content": text}
        else:
            frame["response"] = text
        frame["done"] = done
        return frame

    async def _load_answer(self, req: Request, body: dict[str, Any], model: str, chat: bool) -> None:
        """An empty prompt loads (or, with keep_alive 0, unloads) the model; always one JSON object."""
        if body.get("keep_alive") in (0, "0", "0s", "0m"):
            self._loaded.pop(model, None)
            reason = "unload"
        else:
            await self._load(model)
            reason = "load"
        await respond_json(req.send, {**self._frame(body, "", chat, True), "done_reason": reason})

    async def _native(self, req: Request, body: dict[str, Any], model: str, words: int, chat: bool) -> None:
        options = body.get("options")
        n = positive(options.get("num_predict") if isinstance(options, dict) else None, self.default_tokens)
        start = time.perf_counter_ns()
        async with self._slot():
            metrics = _Metrics(start, await self._load(model), words, n)

            def final(text: str) -> dict[str, Any]:
                return {**self._frame(body, text, chat, True), "done_reason": "stop", **metrics.native()}

            if body.get("stream") is False:
                if await self._sleep_tokens(req, n):
                    await respond_json(req.send, final(self.text(n)))
                return
            frames = (encode(self._frame(body, self.token(i), chat, False)) + b"\n" for i in range(n))
            await self._stream(req, NDJSON, frames, lambda: encode(final("")) + b"\n")

    # -- native embeddings ------------------------------------------------------------------

    async def _embed(self, req: Request) -> None:
        body = await req.json()
        model = self._model_for(body)
        raw = body.get("input")
        inputs = [raw] if isinstance(raw, str) else [str(t) for t in raw] if isinstance(raw, list) else []
        dim = min(positive(body.get("dimensions"), self.embedding_dim), self.embedding_dim)
        start = time.perf_counter_ns()
        async with self._slot():
            load_ns = await self._load(model)
            vectors = [embedding_for(t, dim) for t in inputs]
        await respond_json(
            req.send,
            {
                "model": body["model"],
                "embeddings": vectors,
                "total_duration": time.perf_counter_ns() - start,
                "load_duration": load_ns,
                "prompt_eval_count": word_count(inputs),
            },
        )

    async def _embeddings(self, req: Request) -> None:
        body = await req.json()
        model = self._model_for(body)
        prompt = body.get("prompt")
        async with self._slot():
            await self._load(model)
        vector = embedding_for(prompt, self.embedding_dim) if isinstance(prompt, str) and prompt else []
        await respond_json(req.send, {"embedding": vector})


async def _lifespan(receive: Receive, send: Send) -> None:
    """Accept lifespan events, so ``uvicorn --lifespan on`` works without complaint."""
    while True:
        kind = (await receive())["type"]
        await send({"type": f"{kind}.complete"})
        if kind == "lifespan.shutdown":
            return
