"""`gpumanager usage`: the ledger as a table, CSV or JSON, by key, model, host, day or hour."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest

from gpumanager.cli import main
from gpumanager.config import loads
from gpumanager.ledger import reader
from gpumanager.ledger.reader import Report
from gpumanager.ledger.report import host_prices, parse_when
from tests.test_ledger import FIXTURE_INTERVALS, FIXTURE_PRICES, FIXTURE_REQUESTS, T0, H, write_rows

PERIOD = ["--since", "2026-05-01", "--until", "2026-05-03"]
CONFIG = """
[[hosts]]
name = "h1"
url = "http://127.0.0.1:9"
cost_per_hour = 1.0

[[hosts]]
name = "h2"
url = "http://127.0.0.1:9"
cost_per_hour = 0.5

[[hosts]]
name = "h3"
url = "http://127.0.0.1:9"
cost_per_hour = 2.0
"""
KEYS = {"keys": [{"id": "a", "name": "Ada", "email": "ada@x.org"}, {"id": "b", "name": "Bo", "email": "bo@x.org"}]}


@pytest.fixture
def site(tmp_path: Path) -> Path:
    """A config, its key file and a ledger with the fixture's rows, where the server would keep them."""
    config = tmp_path / "config.toml"
    config.write_text(CONFIG)
    (tmp_path / "api_keys.json").write_text(json.dumps(KEYS))
    write_rows(tmp_path / "state" / "usage.db", [*FIXTURE_REQUESTS, *FIXTURE_INTERVALS])
    return config


def usage(capsys: pytest.CaptureFixture[str], config: Path, *args: str) -> tuple[int, str, str]:
    code = main(["usage", "--config", str(config), *args])
    out, err = capsys.readouterr()
    return code, out, err


def cells(out: str, first: str) -> list[str]:
    """The cells of the table line starting with `first` (cells are split at runs of 2+ spaces)."""
    line = next(line for line in out.splitlines() if line.startswith(first + " "))
    return [cell for cell in line.split("  ") if cell.strip()]


def test_table_by_key_shows_names_totals_unknown_counts_and_savings(
    site: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = usage(capsys, site, *PERIOD)
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert lines[0] == "usage 2026-05-01 00:00 to 2026-05-03 00:00 UTC (48 h), by key"
    assert lines[2].split() == [
        "KEY", "NAME", "REQUESTS", "PROMPT", "TOKENS", "COMPLETION", "TOKENS", "NO", "COUNTS", "GPU-SECONDS",
        "SERVING", "NOT", "SERVING", "TOTAL", "NOT", "SERVING", "BY",
    ]  # fmt: skip
    assert [c.strip() for c in cells(out, "b")] == [
        "b",
        "Bo",
        "2",
        "50",
        "7",
        "1",
        "810.0",
        "$0.31",
        "$0.06",
        "$0.37",
        "drain $0.06",
    ]
    assert [c.strip() for c in cells(out, "a")][:4] == ["a", "Ada", "3", "10"]
    assert [c.strip() for c in cells(out, "unattributed")] == [
        "unattributed", "0", "0", "0", "0", "4,200.0", "$0.00", "$0.42", "$0.42", "found $0.06, protected $0.36",
    ]  # fmt: skip
    assert [c.strip() for c in cells(out, "TOTAL")] == [
        "TOTAL", "5", "60", "12", "3", "6,060.0", "$0.46", "$0.57", "$1.03",
        "drain $0.06, found $0.06, protected $0.36, reserve $0.06, wake $0.03",
    ]  # fmt: skip
    assert "NO COUNTS: requests whose host sent no token counts" in out
    assert "savings against always-on for these 48 h:" in out
    assert [c.strip() for c in cells(out, "h1")] == ["h1", "$1.00", "$48.00", "$0.31", "$47.69", "$0.25", "$0.06"]
    assert [c.strip() for c in cells(out, "h2")] == ["h2", "$0.50", "$24.00", "$0.72", "$23.28", "-", "-"]
    assert [c.strip() for c in cells(out, "h3")] == ["h3", "$2.00", "$96.00", "$0.00", "$96.00", "-", "-"]
    assert "no savings line" not in out


@pytest.mark.parametrize(
    ("by", "groups"),
    [
        ("key", ["b", "a", "unattributed"]),
        ("model", ["m1", "m2", "(not serving)"]),
        ("host", ["h2", "h1", "(no host)"]),
        ("day", ["2026-05-01", "2026-05-02"]),
        ("hour", ["2026-05-01 00:00", "2026-05-01 01:00", "2026-05-01 02:00", "2026-05-01 23:00",
                  "2026-05-02 00:00", "2026-05-02 01:00", "2026-05-02 02:00"]),
    ],
)  # fmt: skip
def test_every_by_in_every_format(site: Path, capsys: pytest.CaptureFixture[str], by: str, groups: list[str]) -> None:
    expected = reader.usage(site.parent / "state" / "usage.db", T0, T0 + 48 * H, by, prices=FIXTURE_PRICES)  # type: ignore[arg-type]
    expected = expected.with_names({"a": "Ada", "b": "Bo"})

    code, out, _ = usage(capsys, site, *PERIOD, "--by", by)
    assert code == 0 and out.splitlines()[0].endswith(f", by {by}")
    body = out.splitlines()[3 : 3 + len(groups)]
    assert [line.split("  ")[0].strip() for line in body] == groups
    assert [c.strip() for c in cells(out, "TOTAL")][8] == "$1.03"

    code, out, _ = usage(capsys, site, *PERIOD, "--by", by, "--format", "json")
    assert code == 0 and msgspec.json.decode(out, type=Report) == expected

    code, out, _ = usage(capsys, site, *PERIOD, "--by", by, "--format", "csv")
    table, savings = out.split("\n\n")
    rows = list(csv.DictReader(io.StringIO(table)))
    assert [row[by] for row in rows] == [*groups, "TOTAL"]
    for row, group in zip(rows, expected.groups, strict=False):
        assert int(row["requests"]) == group.totals.requests and row["name"] == group.name
        assert round(float(row["cost"]) * 1_000_000) == group.totals.cost_micro
    assert rows[-1]["cost"] == "1.030000" and rows[-1]["requests_without_counts"] == "3"
    assert rows[-1]["cost_protected"] == "0.360000" and rows[-1]["prompt_tokens"] == "60"
    assert list(csv.reader(io.StringIO(savings))) == [
        ["host", "price_per_hour", "always_on", "billed", "saved", "oracle"],
        # h1's oracle: a 300 s cold start (its one wake), 3 s of answers, two gaps billed 300 s each
        ["h1", "1", "48.000000", "0.310000", "47.690000", "0.250002"],
        ["h2", "0.5", "24.000000", "0.720000", "23.280000", ""],  # never woken: no cold start to price
        ["h3", "2", "96.000000", "0.000000", "96.000000", ""],
    ]


def test_one_key_by_id_or_name(site: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, by_id, _ = usage(capsys, site, *PERIOD, "--key", "a", "--by", "model")
    assert code == 0 and "by model for key a" in by_id
    assert [c.strip() for c in cells(by_id, "TOTAL")][1:] == [
        "3", "10", "5", "2", "1,050.0", "$0.15", "$0.09", "$0.24", "reserve $0.06, wake $0.03",
    ]  # fmt: skip
    assert "savings" not in by_id and "unattributed" not in by_id
    assert usage(capsys, site, *PERIOD, "--key", "Ada", "--by", "model")[1] == by_id


def test_the_ledger_named_by_database_url_relative_to_the_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "conf").mkdir()
    config = tmp_path / "conf" / "config.toml"
    config.write_text(CONFIG + '\n[usage]\ndatabase_url = "sqlite:///ledger/u.db"\n')
    write_rows(tmp_path / "conf" / "ledger" / "u.db", [*FIXTURE_REQUESTS, *FIXTURE_INTERVALS])
    monkeypatch.chdir(tmp_path)
    code, out, _ = usage(capsys, config, *PERIOD, "--format", "json")
    assert code == 0 and json.loads(out)["total"]["cost_micro"] == 1_030_000


def test_hosts_without_a_price_get_no_savings_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "config.toml"
    config.write_text('[[hosts]]\nname = "h1"\nurl = "http://127.0.0.1:9"\ncost_per_hour = 1.0\n')
    write_rows(tmp_path / "state" / "usage.db", [*FIXTURE_REQUESTS, *FIXTURE_INTERVALS])
    code, out, _ = usage(capsys, config, *PERIOD, "--by", "host")
    assert code == 0 and "no savings line for h2: no cost_per_hour for them in the config" in out
    savings = out.split("savings against always-on")[1]
    assert [c.strip() for c in cells(savings, "h1")] == ["h1", "$1.00", "$48.00", "$0.31", "$47.69", "$0.25", "$0.06"]
    assert "TOTAL" not in savings  # one host: no total line


def test_prices_from_the_config_as_far_as_it_tells() -> None:
    one_cloud = loads(
        """
        [[providers]]
        name = "aws"
        type = "ec2"
        tag_filter = { gpumanager = "true" }
        cost_per_hour = 3.0

        [[providers]]
        name = "sim"
        type = "simulated"
        hosts = [{ name = "sim-a", cost_per_hour = 1.5 }]

        [[hosts]]
        name = "big"
        cost_per_hour = 9.0

        [[hosts]]
        name = "lab"
        url = "http://10.0.0.5:11434"
        """
    )
    assert host_prices(one_cloud, ["i-0abc", "big", "sim-a"]) == {
        "i-0abc": 3.0,  # found by the one cloud provider
        "big": 9.0,
        "sim-a": 1.5,
        "lab": 0.0,  # a static host without a price
    }
    two_clouds = loads(
        '[[providers]]\nname = "a"\ntype = "ec2"\ninstance_ids = ["i-1"]\ncost_per_hour = 1.0\n'
        '[[providers]]\nname = "b"\ntype = "ec2"\ninstance_ids = ["i-2"]\ncost_per_hour = 2.0\n'
    )
    assert host_prices(two_clouds, ["i-1"]) == {"i-1": 0.0}


def test_times() -> None:
    now = T0 + 10 * H
    assert parse_when("24h", now) == now - 24 * H
    assert parse_when("7d", now) == now - 7 * 24 * H
    assert parse_when("90m", now) == now - 90 * 60
    assert parse_when("now", now) == now
    assert parse_when("2026-05-01", now) == T0
    assert parse_when("2026-05-01T02:30", now) == T0 + 2.5 * H
    assert parse_when("2026-05-01T02:30+02:00", now) == T0 + 0.5 * H
    with pytest.raises(ValueError, match="bad time '3x'"):
        parse_when("3x", now)


def test_clear_errors(tmp_path: Path, site: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "elsewhere" / "config.toml"
    empty.parent.mkdir()
    empty.write_text("")
    code, out, err = usage(capsys, empty)
    path = tmp_path / "elsewhere" / "state" / "usage.db"
    assert code == 2 and out == ""
    assert err == f"gpumanager: error: no usage recorded yet at {path}: the server writes it\n"

    with pytest.raises(SystemExit) as done:
        usage(capsys, site, "--since", "yesterday")
    assert done.value.code == 2
    err = capsys.readouterr().err
    assert "argument --since: bad time 'yesterday': use a span back from now (90m, 24h, 7d, 2w)" in err

    code, _, err = usage(capsys, site, "--since", "2026-05-03", "--until", "2026-05-01")
    assert code == 2 and "--since must be before --until" in err


def test_help_explains_the_options_with_examples(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["usage", "--help"])
    out = capsys.readouterr().out
    assert done.value.code == 0
    for text in (
        "--since TIME",
        "--until TIME",
        "--by {key,model,host,day,hour}",
        "--key ID",
        "--format {table,csv,json}",
    ):
        assert text in out
    assert "examples:" in out and "gpumanager usage --since 7d --by day" in out and "unattributed" in out
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "usage" in capsys.readouterr().out


def test_as_a_command(site: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "gpumanager", "usage", "--config", str(site), *PERIOD, "--by", "day"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert [c.strip() for c in cells(done.stdout, "2026-05-02")][:4] == ["2026-05-02", "2", "30", "0"]
    assert "savings against always-on for these 48 h:" in done.stdout
