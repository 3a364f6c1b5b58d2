"""The simulator's low-level pieces: ASGI types, request/response helpers and model facts.

Everything here is shared by the native routes (`gpumanager.sim.ollama`), the model
management routes (`gpumanager.sim.manage`) and the OpenAI-compatible routes
(`gpumanager.sim.openai_routes`). The encoder and decoder are module-level and reused, as
msgspec's perf tips advise, because the benchmark measures through this code.
"""

from __future__ import annotations

import functools
import hashlib
import math
import re
import struct
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from datetime import UTC, datetime
from typing import Any, Protocol

import msgspec

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

_decode = msgspec.json.Decoder().decode
encode = msgspec.json.Encoder().encode

JSON = b"application/json; charset=utf-8"
NDJSON = b"application/x-ndjson"
SSE = b"text/event-stream"
TEXT = b"text/plain; charset=utf-8"


class SimCrash(RuntimeError):
    """Raised out of the app on purpose: uvicorn then drops the connection mid-stream."""


class HTTPError(Exception):
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


def rfc3339(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


def word_count(texts: Iterable[Any]) -> int:
    return max(1, sum(len(t.split()) for t in texts if isinstance(t, str)))


def positive(value: Any, default: int) -> int:
    ok = isinstance(value, int) and not isinstance(value, bool) and value > 0
    return value if ok else default


def model_digest(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


def model_details(name: str) -> dict[str, Any]:
    base = name.rsplit("/", 1)[-1].split(":")[0]
    family = "bert" if is_embedding_model(name) else m.group() if (m := re.match(r"[a-z]+", base)) else "llama"
    size = re.search(r"(\d+(?:\.\d+)?)b\b", name.split(":")[-1])
    return {
        "parent_model": "",
        "format": "gguf",
        "family": family,
        "families": [family],
        "parameter_size": f"{size.group(1)}B" if size else "3.2B",
        "quantization_level": "Q4_K_M",
    }


def model_size(name: str) -> int:
    base = 45_000_000 if is_embedding_model(name) else 2_000_000_000
    return base + int(model_digest(name)[:6], 16)


async def read_body(receive: Receive) -> bytes:
    """A request's whole body (what came before a disconnect)."""
    chunks: list[bytes] = []
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            break
        chunks.append(msg.get("body", b""))
        if not msg.get("more_body"):
            break
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def respond(send: Send, status: int, body: bytes, content_type: bytes | None = JSON) -> None:
    headers = [(b"content-length", str(len(body)).encode())]
    if content_type is not None:
        headers.append((b"content-type", content_type))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def respond_json(send: Send, obj: Any, status: int = 200) -> None:
    await respond(send, status, encode(obj))


class BodyLog(Protocol):
    """What a `Request` uses of the server that made it: where the last request body is kept."""

    last_body: bytes


class Request:
    """One HTTP exchange; the body is read only by the handlers that need it."""

    __slots__ = ("path", "receive", "send", "sim")

    def __init__(self, path: str, receive: Receive, send: Send, sim: BodyLog) -> None:
        self.path, self.receive, self.send, self.sim = path, receive, send, sim

    async def json(self) -> dict[str, Any]:
        body = await read_body(self.receive)
        self.sim.last_body = body
        if not body:
            raise HTTPError(400, "missing request body")
        try:
            data = _decode(body)
        except msgspec.DecodeError as exc:
            raise HTTPError(400, f"invalid JSON: {exc}") from None
        except RecursionError:  # as Ollama's own decoder refuses it
            raise HTTPError(400, "invalid JSON: nested too deeply") from None
        if not isinstance(data, dict):
            raise HTTPError(400, "request body must be a JSON object")
        return data


Handler = Callable[[Request], Awaitable[None]]
