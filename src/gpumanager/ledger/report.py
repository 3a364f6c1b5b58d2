"""A usage `Report` for people and programs: times as typed on a command line or in a query, host
prices from the config, and the report as a table, CSV or JSON."""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime

import msgspec

from gpumanager.config import Config, SimulatedProviderConfig
from gpumanager.ledger.reader import Report, Totals
from gpumanager.ledger.rows import MICRO, Reason

_UNITS = {"s": 1, "m": 60, "h": 3_600, "d": 86_400, "w": 604_800}
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw])$")
WHEN_HELP = "a span back from now (90m, 24h, 7d, 2w), a UTC date (2026-05-01) or time (2026-05-01T13:30), or now"
_HEADINGS = {"key": "KEY", "model": "MODEL", "host": "HOST", "day": "DAY (UTC)", "hour": "HOUR (UTC)"}


def parse_when(text: str, now: float) -> float:
    """Unix seconds for `text`: "now", a span back from `now` ("24h", "7d", "90m", "2w", "30s"),
    or an ISO date or time, UTC unless it names its offset. Raises `ValueError` saying what is
    accepted."""
    value = text.strip().lower()
    if value == "now":
        return now
    if found := _DURATION.match(value):
        return now - float(found[1]) * _UNITS[found[2]]
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"bad time {text!r}: use {WHEN_HELP}") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def host_prices(config: Config, hosts: Iterable[str] = ()) -> dict[str, float]:
    """Dollars per hour of the config's hosts and of `hosts` (names found in the ledger), as far as
    the config tells: a `[[hosts]]` entry's `cost_per_hour`, a simulated host's own, else its
    provider's. A host the config does not name takes the price of the config's one cloud provider
    when there is exactly one, else 0 (no savings line)."""
    providers = {p.name: p for p in config.all_providers()}
    prices: dict[str, float] = {}
    for provider in providers.values():
        if isinstance(provider, SimulatedProviderConfig):
            prices.update({h.name: h.cost_per_hour for h in provider.hosts})
    clouds = [p for p in providers.values() if not isinstance(p, SimulatedProviderConfig)]
    sole = clouds[0].cost_per_hour if len(clouds) == 1 else 0.0
    for name in hosts:
        prices.setdefault(name, sole)
    for host in config.hosts:
        if host.cost_per_hour is not None:
            prices[host.name] = host.cost_per_hour
        elif host.url is not None:
            prices[host.name] = 0.0
        elif host.provider in providers and host.name not in prices:
            prices[host.name] = providers[host.provider].cost_per_hour
        else:
            prices.setdefault(host.name, sole)
    return prices


def dollars(micro: int | float) -> str:
    return f"${micro / MICRO:,.2f}"


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M")


def _span(seconds: float) -> str:
    if seconds >= 3 * 86_400:
        return f"{seconds / 86_400:g} d"
    if seconds >= 3_600:
        return f"{seconds / 3_600:g} h"
    return f"{seconds / 60:g} min"


def _reasons(totals: Totals) -> str:
    return ", ".join(f"{reason} {dollars(cost)}" for reason, cost in totals.interval_cost_by_reason.items())


def render_table(report: Report) -> str:
    """The report as aligned columns, with totals, a note on requests without token counts, and
    the savings of each priced host."""
    span = report.until - report.since
    scope = f" for key {report.key}" if report.key else ""
    lines = [f"usage {_when(report.since)} to {_when(report.until)} UTC ({_span(span)}), by {report.by}{scope}", ""]
    lines += _group_lines(report) if report.groups else ["nothing recorded in this period"]
    if report.total.without_counts:
        lines += ["", "NO COUNTS: requests whose host sent no token counts; the TOKENS columns sum the others."]
    if report.savings:
        lines += ["", f"savings against always-on for these {_span(span)}:", *_savings_lines(report)]
    if report.unpriced_hosts:
        hosts = ", ".join(report.unpriced_hosts)
        lines += ["", f"no savings line for {hosts}: no cost_per_hour for them in the config"]
    return "\n".join(lines)


def _group_lines(report: Report) -> list[str]:
    named = report.by == "key"
    counts = report.total.without_counts > 0
    heading = [_HEADINGS[report.by], *(["NAME"] if named else []), "REQUESTS", "PROMPT TOKENS", "COMPLETION TOKENS"]
    heading += [*(["NO COUNTS"] if counts else []), "GPU-SECONDS", "SERVING", "NOT SERVING", "TOTAL", "NOT SERVING BY"]

    def row(label: str, name: str, t: Totals) -> list[str]:
        cells = [label, *([name] if named else []), f"{t.requests:,}", f"{t.prompt_tokens:,}"]
        cells += [f"{t.completion_tokens:,}", *([f"{t.without_counts:,}"] if counts else [])]
        cells += [f"{t.gpu_seconds:,.1f}", dollars(t.serving_cost_micro), dollars(t.interval_cost_micro)]
        return [*cells, dollars(t.cost_micro), _reasons(t)]

    rows = [heading, *(row(g.group, g.name, g.totals) for g in report.groups), row("TOTAL", "", report.total)]
    left = {0, 1} if named else {0}
    return _columns(rows, left | {len(heading) - 1})


def _savings_lines(report: Report) -> list[str]:
    rows = [["HOST", "PRICE/HOUR", "ALWAYS-ON", "BILLED", "SAVED", "ORACLE", "ABOVE ORACLE"]]
    for s in report.savings:
        price = dollars(s.price_per_hour * MICRO)
        oracle = (
            ["-", "-"]
            if s.oracle_micro is None
            else [dollars(s.oracle_micro), dollars(s.billed_micro - s.oracle_micro)]
        )
        rows.append(
            [s.host, price, dollars(s.always_on_micro), dollars(s.billed_micro), dollars(s.saved_micro), *oracle]
        )
    if len(report.savings) > 1:
        fields = ("always_on_micro", "billed_micro", "saved_micro")
        rows.append(["TOTAL", "", *(dollars(sum(getattr(s, f) for s in report.savings)) for f in fields), "", ""])
    return _columns(rows, {0})


def _columns(rows: Sequence[Sequence[str]], left: set[int]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(
            c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
        ).rstrip()
        for r in rows
    ]


def _micro_dollars(micro: int) -> str:
    return f"{micro / MICRO:.6f}"


def render_csv(report: Report) -> str:
    """One row per group and a TOTAL row (dollars to the micro-dollar); then, after a blank line,
    the savings table when there is one."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    reasons = [str(r) for r in Reason]
    writer.writerow(
        [report.by, "name", "requests", "prompt_tokens", "completion_tokens", "requests_without_counts"]
        + ["gpu_seconds", "serving_gpu_seconds", "serving_cost", "interval_gpu_seconds", "interval_cost", "cost"]
        + [f"cost_{r}" for r in reasons]
    )
    for label, name, t in [*((g.group, g.name, g.totals) for g in report.groups), ("TOTAL", "", report.total)]:
        writer.writerow(
            [label, name, t.requests, t.prompt_tokens, t.completion_tokens, t.without_counts]
            + [f"{t.gpu_seconds:.3f}", f"{t.serving_gpu_seconds:.3f}", _micro_dollars(t.serving_cost_micro)]
            + [f"{t.interval_gpu_seconds:.3f}", _micro_dollars(t.interval_cost_micro), _micro_dollars(t.cost_micro)]
            + [_micro_dollars(t.interval_cost_by_reason.get(r, 0)) for r in reasons]
        )
    if report.savings:
        writer.writerow([])
        writer.writerow(["host", "price_per_hour", "always_on", "billed", "saved", "oracle"])
        for s in report.savings:
            writer.writerow(
                [s.host, f"{s.price_per_hour:g}"]
                + [_micro_dollars(v) for v in (s.always_on_micro, s.billed_micro, s.saved_micro)]
                + ["" if s.oracle_micro is None else _micro_dollars(s.oracle_micro)]
            )
    return out.getvalue().rstrip("\n")


def render_json(report: Report) -> str:
    """The `Report` itself (times in Unix seconds, money in integer micro-dollars)."""
    return msgspec.json.format(msgspec.json.encode(report), indent=2).decode()
