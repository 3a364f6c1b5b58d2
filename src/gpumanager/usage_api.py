"""`GET /usage` (admins) and `GET /usage/me` (any key): the ledger, over the API.

Both read the ledger file read-only in a worker thread, so a long report never holds the event
loop. Parameters are those of `gpumanager usage`: `since` and `until` (`24h`, `7d`, a date or an
ISO time, `now`), `by` (key, model, host, day, hour) and, for admins, `key`. `/usage/me` also gives
the key's limits and its use of them today and this month (from the budget's counters).
"""

from __future__ import annotations

import time
from typing import get_args

import anyio.to_thread
import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gpumanager.auth import require_admin
from gpumanager.budget import Budget
from gpumanager.config import Config
from gpumanager.errors import BadRequest
from gpumanager.keys import KeyStore
from gpumanager.ledger import reader, report
from gpumanager.ledger.schema import LedgerError, Location

_encode = msgspec.json.Encoder().encode


def usage_routes(config: Config, keys: KeyStore, db_path: Location, budget: Budget) -> list[Route]:
    def when(request: Request, name: str, default: str, now: float) -> float:
        text = request.query_params.get(name, default)
        try:
            return report.parse_when(text, now)
        except ValueError as exc:
            raise BadRequest(f"`{name}`: {exc}") from None

    def period(request: Request) -> tuple[float, float]:
        now = time.time()
        since, until = when(request, "since", "24h", now), when(request, "until", "now", now)
        if since >= until:
            raise BadRequest("`since` must be before `until`")
        return since, until

    async def usage(request: Request) -> Response:
        require_admin(request.scope)
        since, until = period(request)
        asked = request.query_params.get("by", "key")
        by = next((choice for choice in get_args(reader.By) if choice == asked), None)
        if by is None:
            raise BadRequest(f"`by` must be one of {', '.join(get_args(reader.By))}")
        key = request.query_params.get("key") or None

        def read() -> reader.Report:
            prices = report.host_prices(config, reader.hosts(db_path, since, until))
            names = {r.id: r.name for r in keys.records()}
            return reader.usage(db_path, since, until, by, key, prices=prices).with_names(names)

        try:
            result = await anyio.to_thread.run_sync(read)
        except LedgerError as exc:
            return Response(_encode({"error": str(exc), "groups": []}), status_code=404, media_type="application/json")
        return Response(_encode(result), media_type="application/json")

    async def mine(request: Request) -> Response:
        identity = request.scope["auth"]
        since, _ = period(request)

        def read() -> reader.MyUsage:
            return reader.me(db_path, identity.id, time.time(), since=since)

        limits = budget.usage_of(identity)
        try:
            result = await anyio.to_thread.run_sync(read)
        except LedgerError:  # nothing recorded yet: nothing used
            answer = {"key_id": identity.id, "today": None, "month": None, "limits": limits}
            return Response(_encode(answer), media_type="application/json")
        return Response(_encode({**msgspec.to_builtins(result), "limits": limits}), media_type="application/json")

    return [Route("/usage", usage, methods=["GET"]), Route("/usage/me", mine, methods=["GET"])]
