"""The dialects a client may speak: Ollama (`/api/*`), OpenAI (`/v1/*`) and RunPod's job API (`/v2/*`).

Parsing of the few fields routing needs, error bodies, in-band stream errors and wait heartbeats,
each in the shape the client's own library understands.
"""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import msgspec

from gpumanager.errors import BadRequest, ClientError


class Dialect(StrEnum):
    OLLAMA = "ollama"
    OPENAI = "openai"
    RUNPOD = "runpod"  # RunPod's job API (`/v2/...`): errors are `{"error": "..."}` as RunPod's are


def dialect_for(path: str) -> Dialect:
    if path.startswith("/v1/") or path == "/v1":
        return Dialect.OPENAI
    return Dialect.RUNPOD if path.startswith("/v2/") else Dialect.OLLAMA


class Options(msgspec.Struct):
    num_ctx: int | None = None


class RouteFields(msgspec.Struct):
    """Only what routing needs; the body itself is forwarded byte for byte, so unknown fields survive."""

    model: str = ""
    stream: bool | None = None
    options: Options | None = None
    name: str = ""  # the legacy name of `model` (older Open WebUI sends it to /api/show)


MAX_MODEL_NAME = 256
_control = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


_fields_decoder = msgspec.json.Decoder(RouteFields)
_encoder = msgspec.json.Encoder()
_at = re.compile(r" - at `\$\.?(.*)`$")


def parse_fields(body: bytes, *, legacy_name: bool = False) -> RouteFields:
    """Decode the routing fields of a request body, or raise `BadRequest` saying what is wrong.
    With `legacy_name`, a body without `model` may name it in `name`, as Ollama accepts there."""
    if not body.strip():
        raise BadRequest("missing request body")
    try:
        fields = _fields_decoder.decode(body)
    except msgspec.ValidationError as exc:
        raise BadRequest(_explain(str(exc))) from None
    except msgspec.DecodeError:
        raise BadRequest("request body is not valid JSON") from None
    except RecursionError:  # msgspec's answer to JSON nested a thousand levels deep, anywhere in the body
        raise BadRequest("request body is nested too deeply") from None
    if not fields.model and legacy_name and fields.name:
        fields.model = fields.name
    if not fields.model.strip():
        raise BadRequest("model is required")
    if len(fields.model) > MAX_MODEL_NAME:
        raise BadRequest(f"model name is longer than {MAX_MODEL_NAME} characters")
    if _control.search(fields.model):
        raise BadRequest("model name contains control characters")
    return fields


def _explain(message: str) -> str:
    where = _at.search(message)
    field = where[1] if where else ""
    message = _at.sub("", message)
    if message.startswith("Expected `object`") and not field:
        return "request body must be a JSON object"
    if found := re.match(r"Object missing required field `(.+)`", message):
        return f"{found[1]} is required"
    if found := re.match(r"Expected `(.+?)`, got `(.+?)`", message):
        wanted = {"str": "a string", "bool": "a boolean", "int": "an integer", "object": "an object"}
        wanted_type = found[1].split(" | ")[0]
        return f"`{field}` must be {wanted.get(wanted_type, wanted_type)}, not {found[2]}"
    return f"invalid field `{field}`: {message}" if field else message


# -- errors ----------------------------------------------------------------------------------------


def error_payload(
    dialect: Dialect, message: str, *, kind: str = "api_error", code: str | None = None, param: str | None = None
) -> dict[str, Any]:
    if dialect is Dialect.OPENAI:
        return {"error": {"message": message, "type": kind, "param": param, "code": code}, "src": "gpumanager"}
    return {"error": message, "src": "gpumanager"}


def error_body(dialect: Dialect, exc: ClientError) -> bytes:
    return _encoder.encode(error_payload(dialect, exc.message, kind=exc.kind, code=exc.code))


def error_headers(exc: ClientError) -> list[tuple[bytes, bytes]]:
    headers = [(b"content-type", b"application/json")]
    if exc.final:  # the true wait, however long, and no retry by clients that listen
        if exc.retry_after is not None:
            headers.append((b"retry-after", str(max(1, math.ceil(exc.retry_after))).encode()))
        headers.append((b"x-should-retry", b"false"))
    elif exc.retry_after is not None:
        headers.append((b"retry-after", str(max(1, min(60, round(exc.retry_after)))).encode()))
    return headers


def inband_error(dialect: Dialect, message: str) -> bytes:
    """The last piece of a stream that failed after its first byte: both client libraries raise on it."""
    if dialect is Dialect.OPENAI:
        payload = _encoder.encode({"error": {"message": message, "type": "server_error", "param": None, "code": None}})
        return b"data: " + payload + b"\n\n"
    return _encoder.encode({"error": message}) + b"\n"


# -- waiting ---------------------------------------------------------------------------------------

STREAM_CONTENT_TYPE = {Dialect.OLLAMA: b"application/x-ndjson", Dialect.OPENAI: b"text/event-stream"}


def heartbeat(dialect: Dialect, route: str, model: str, host: str) -> bytes:
    """A protocol-correct chunk that carries nothing, sent while a streaming request waits.

    OpenAI clients skip SSE comment lines; Ollama clients get a frame with empty content and
    `done: false`, which adds nothing to the answer they assemble.
    """
    if dialect is Dialect.OPENAI:
        return b": waiting for " + host.encode() + b"\n\n"
    frame: dict[str, Any] = {"model": model, "created_at": datetime.now(UTC).isoformat()}
    if route == "chat":
        frame["message"] = {"role": "assistant", "content": ""}
    else:
        frame["response"] = ""
    frame["done"] = False
    return _encoder.encode(frame) + b"\n"
