"""Token counts read from answers as they pass, without buffering or re-encoding them (DESIGN §2.6).

A `Meter` sees each upstream chunk on its way to the client. It keeps references to the last few
chunks (no copies) and, once the answer ended, reads the counts from its end: Ollama's final frame
(`prompt_eval_count`, `eval_count`), or OpenAI's `usage` (a whole body, or a stream's usage event).
A non-streamed body is kept whole until it ended, since its counts may sit anywhere in it.

An OpenAI stream whose client did not ask for usage is sent upstream with
`stream_options.include_usage = true` (`with_usage`), and the usage-only event that this adds
(`"choices": []` with `usage`) is dropped from what that client receives: that one mode holds back
a partial SSE event between chunks, nothing more. A host that sends no counts leaves them unknown
(None), never guessed.
"""

from __future__ import annotations

from collections import deque

import msgspec

_SSE_END = b"\n\n"


class _Counts(msgspec.Struct):
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


class _Answer(msgspec.Struct):
    """The fields of an Ollama final frame or an OpenAI body/event that carry counts."""

    prompt_eval_count: int | None = None
    eval_count: int | None = None
    usage: _Counts | None = None


class _StreamOptions(msgspec.Struct):
    stream_options: dict[str, object] | None = None


_answer = msgspec.json.Decoder(_Answer)
_options = msgspec.json.Decoder(_StreamOptions)
_any = msgspec.json.Decoder()
_encode = msgspec.json.Encoder().encode


def asks_for_usage(body: bytes) -> bool:
    """Whether an OpenAI request body already asks for the stream's usage event."""
    try:
        options = _options.decode(body).stream_options
    except (msgspec.DecodeError, msgspec.ValidationError):
        return False
    return isinstance(options, dict) and options.get("include_usage") is True


def with_usage(body: bytes) -> bytes:
    """`body` asking upstream for the stream's usage event (the one change made to a client's body)."""
    request = _any.decode(body)
    options = request.get("stream_options")
    request["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
    return _encode(request)


def without_stream_options(body: bytes) -> bytes:
    """`body` without `stream_options`, for a host that refuses it."""
    request = _any.decode(body)
    request.pop("stream_options", None)
    return _encode(request)


class Meter:
    """Watches one answer's chunks and reads its token counts once it ended.

    `feed(chunk)` returns what to pass on: the chunk itself, except in `drop_usage` mode (an OpenAI
    stream whose usage event the client did not ask for), where whole SSE events are passed on and
    the usage-only one is dropped. Runs on the request's own task.
    """

    __slots__ = ("_events", "_kept", "_pending", "_tail", "completion", "drop_usage", "prompt", "streaming")

    def __init__(self, *, streaming: bool, drop_usage: bool = False) -> None:
        self.streaming, self.drop_usage = streaming, drop_usage
        self._tail: deque[bytes] = deque(maxlen=4)  # the last chunks, by reference
        self._kept: list[bytes] = []  # a whole non-streamed body
        self._pending = b""  # drop_usage mode: the start of an SSE event not complete yet
        self._events: list[bytes] = []
        self.prompt: int | None = None
        self.completion: int | None = None

    def feed(self, chunk: bytes) -> bytes:
        if self.drop_usage:
            return self._filter(chunk)
        if self.streaming:
            self._tail.append(chunk)
        else:
            self._kept.append(chunk)
        return chunk

    def finish(self) -> bytes:
        """Read the counts once the answer ended; returns any held-back bytes still to pass on."""
        rest = b""
        if self.drop_usage and self._pending:
            rest, self._pending = self._filter_event(self._pending), b""
        elif self.streaming and not self.drop_usage:
            self._read_stream(b"".join(self._tail))
        elif not self.drop_usage:
            self._read(b"".join(self._kept))
        return rest

    # -- reading -------------------------------------------------------------------------------------

    def _read(self, data: bytes) -> None:
        try:
            answer = _answer.decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
            return
        if answer.usage is not None:
            self.prompt, self.completion = answer.usage.prompt_tokens, answer.usage.completion_tokens
        elif answer.prompt_eval_count is not None or answer.eval_count is not None:
            self.prompt, self.completion = answer.prompt_eval_count, answer.eval_count

    def _read_stream(self, tail: bytes) -> None:
        """The counts from the end of a stream: the last NDJSON line or SSE event that has them."""
        for piece in reversed(tail.replace(b"\r\n", b"\n").split(b"\n")):
            piece = piece.strip()
            if piece.startswith(b"data:"):
                piece = piece[5:].strip()
            if not piece.startswith(b"{") or (b"usage" not in piece and b"eval_count" not in piece):
                continue
            self._read(piece)
            if self.prompt is not None or self.completion is not None:
                return

    # -- drop_usage mode -----------------------------------------------------------------------------

    def _filter(self, chunk: bytes) -> bytes:
        data = self._pending + chunk if self._pending else chunk
        end = data.rfind(_SSE_END)
        if end < 0:
            self._pending = data
            return b""
        complete, self._pending = data[: end + 2], data[end + 2 :]
        if b'"choices":[]' not in complete and b'"choices": []' not in complete:
            return complete  # the usual chunk: no usage event in it, passed on as it came
        return b"".join(self._filter_event(event + _SSE_END) for event in complete[:-2].split(_SSE_END))

    def _filter_event(self, event: bytes) -> bytes:
        if b'"usage"' not in event or (b'"choices":[]' not in event and b'"choices": []' not in event):
            return event
        before = (self.prompt, self.completion)
        self._read_stream(event)
        return b"" if (self.prompt, self.completion) != before else event
