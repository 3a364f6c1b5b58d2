"""One error tree for gpumanager.

    GpuManagerError
    ├── ConfigError             the config file is wrong: names the file, the key and the problem
    ├── KeyStoreError           the API key file cannot be read or written, or a key id is unknown
    ├── LedgerError             the usage ledger cannot be opened (none yet, a newer schema, an unknown URL);
    │                               defined in ledger/schema.py, beside what raises it
    ├── InvalidTransition       a bug: a host state change that the transition table does not allow
    ├── ProbeFailed             a host's Ollama did not answer a probe as it should (not ready, not healthy)
    ├── NoGpuMetrics            a host's door gave no GPU metrics (no exporter there): it is not shown
    ├── ConnectFailed           a host could not be reached; nothing went to the client, so another may be tried
    ├── ClientGone              the client disconnected before its request was read or answered
    ├── ClientError             a request is refused; carries the HTTP status the client gets
    │   ├── BadRequest              400 malformed body, missing or mistyped field, missing ?host=
    │   ├── Unauthorized            401 missing, unknown or revoked key
    │   ├── Forbidden               403 a user key on an admin route
    │   ├── NotFound                404 unknown model, host or path
    │   ├── MethodNotAllowed        405
    │   ├── Conflict                409 an admin action the host's state does not allow
    │   ├── PayloadTooLarge         413 body over [server] max_body_mb
    │   ├── RequestTimeout          408 the request body stalled past [server] client_timeout_seconds
    │   ├── TooManyRequests         429 queue full, one key over max_per_key or requests_per_minute
    │   │   └── BudgetSpent             ...a key's token or dollar budget is used up (final: not retried)
    │   ├── InternalError           500 a bug in gpumanager (logged once, with its traceback)
    │   ├── UpstreamFailed          502 the host failed before any byte reached the client
    │   │   └── UpstreamSilent          ...or sent nothing for [timing] upstream_idle_seconds mid-answer
    │   ├── NoCapacity              503 no host can serve now, or the queue wait timed out (Retry-After)
    │   │   └── FleetBudgetSpent        ...the fleet's daily or monthly spend cap is reached (final)
    │   └── WakeTimeout             504 the host woken for this request did not become ready
    └── ProviderError           a cloud call failed: says which provider, host and action
        ├── ProviderTimeout         no answer within the call's timeout (retried)
        ├── ProviderUnavailable     5xx or connection failure after the retries ran out
        ├── ProviderRejected        4xx: bad token, unknown host, action not allowed (never retried)
        │   └── HostNotFound            the cloud does not know this host
        ├── CapacityError           the cloud has no GPU capacity for this host now
        └── WakeFailed              the host did not become ready (resume failed or timed out)

Errors raised by httpx, botocore or a cloud's JSON are translated at the boundary with
`raise ProviderError(...) from exc`, so callers only ever handle this tree. Cancellation and
errors no one foresaw (bugs) are the only exceptions from outside it.
"""

from __future__ import annotations


class GpuManagerError(Exception):
    """Base of every error gpumanager raises on purpose."""


class ConfigError(GpuManagerError):
    """The config file is invalid. `str()` is one line: file, key, problem."""

    def __init__(self, path: str, key: str, problem: str) -> None:
        self.path, self.key, self.problem = path, key, problem
        super().__init__(": ".join(part for part in (path, key, problem) if part))


class KeyStoreError(GpuManagerError):
    """The API key file cannot be used, or a key named on the command line does not exist."""


class InvalidTransition(GpuManagerError):
    """A host state change the transition table does not allow: a bug in whoever asked for it."""

    def __init__(self, state: str, event: str) -> None:
        super().__init__(f"no transition from {state} on {event}")
        self.state, self.event = state, event


class ProbeFailed(GpuManagerError):
    """A host's Ollama (or OpenAI-compatible server) did not answer a probe or answered wrongly."""


class NoGpuMetrics(GpuManagerError):
    """A host gave no GPU metrics: no answer, an answer other than 200, or text that is not
    Prometheus text."""


class ConnectFailed(GpuManagerError):
    """A host could not be reached. Nothing was sent to the client, so another host may be tried."""


class ClientGone(GpuManagerError):
    """The client disconnected before its request was read, or while it waited."""


class ClientError(GpuManagerError):
    """A request that gpumanager refuses, with the status code and the message the client sees."""

    status = 400
    kind = "invalid_request_error"  # the OpenAI error `type`
    code: str | None = None  # the OpenAI error `code`
    # Final: asking again soon cannot succeed (a spent budget). The answer says `x-should-retry:
    # false`, which the openai client honours, and its `Retry-After` may be hours.
    final = False

    def __init__(self, message: str, *, retry_after: float | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after
        if code is not None:
            self.code = code


class BadRequest(ClientError):
    status = 400


class Unauthorized(ClientError):
    status = 401
    kind = "authentication_error"
    code = "invalid_api_key"


class Forbidden(ClientError):
    status = 403
    kind = "permission_error"


class NotFound(ClientError):
    status = 404
    kind = "not_found_error"


class ModelNotFound(NotFound):
    code = "model_not_found"


class MethodNotAllowed(ClientError):
    status = 405


class Conflict(ClientError):
    status = 409


class PayloadTooLarge(ClientError):
    status = 413


class RequestTimeout(ClientError):
    status = 408


class InternalError(ClientError):
    status = 500
    kind = "server_error"

    def __init__(self, message: str = "internal error in gpumanager; see its log") -> None:
        super().__init__(message)


class TooManyRequests(ClientError):
    status = 429
    kind = "rate_limit_error"
    code = "rate_limit_exceeded"


class BudgetSpent(TooManyRequests):
    code = "budget_exceeded"
    final = True


class UpstreamFailed(ClientError):
    status = 502
    kind = "api_error"


class UpstreamSilent(UpstreamFailed):
    """The host stopped sending mid-answer: the stream is ended and the host skipped until it answers."""


class NoCapacity(ClientError):
    status = 503
    kind = "server_error"


class FleetBudgetSpent(NoCapacity):
    final = True


class WakeTimeout(ClientError):
    status = 504
    kind = "server_error"


class ProviderError(GpuManagerError):
    """A cloud call failed. Carries the provider, the host (if any) and the action."""

    def __init__(self, message: str, *, provider: str = "", host: str = "", action: str = "") -> None:
        self.provider, self.host, self.action = provider, host, action
        context = " ".join(
            p
            for p in (
                f"provider={provider}" if provider else "",
                f"host={host}" if host else "",
                f"action={action}" if action else "",
            )
            if p
        )
        super().__init__(f"{message} ({context})" if context else message)
        self.message = message


class ProviderTimeout(ProviderError):
    pass


class ProviderUnavailable(ProviderError):
    pass


class ProviderRejected(ProviderError):
    pass


class HostNotFound(ProviderRejected):
    pass


class CapacityError(ProviderError):
    pass


class WakeFailed(ProviderError):
    pass
