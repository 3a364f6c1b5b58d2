"""`gpumanager simulate`: a hand-made trace whose cost can be worked out on paper, the CLI on a
trace and on the ledger, and the replay taking the same decisions as the live server."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest

from gpumanager.cli import main
from gpumanager.simulate import HostSpec, Request, Setting, TraceError, always_on, read_trace, replay
from tests.clouds import Machine
from tests.harness import running_cloud_stack, wait_until

# One host of one slot at a dollar a second, waking in 10 s; three answers of 5 s.
HOST = HostSpec(name="gpu", slots=1, price=3600.0, cold_start=10.0)
TRACE = [Request(0.0, "llama3.2", 5.0), Request(30.0, "llama3.2", 5.0), Request(200.0, "llama3.2", 5.0)]


def test_a_short_window_pauses_between_bursts_and_a_long_one_does_not() -> None:
    # 1 min: woken at 0, ready at 10, answers 10-15 and 30-35, paused at 35 + 60 = 95; woken at
    # 200, ready at 210, answers 210-215, paused at 275. Billed 95 + 75 = 170 s.
    short = replay(TRACE, [HOST], Setting(reservation_minutes=1, scale_up="queue_depth", fallback_minutes=0))
    assert (short.gpu_hours * 3600, short.dollars, short.wakes) == (pytest.approx(170), pytest.approx(170), 2)
    assert (short.cold_starts, short.wait_p50, short.wait_p95, short.queue_p95) == (2, 10.0, 10.0, 10.0)
    # The oracle of the same placement: a cold start, 5 s, a 15 s gap billed 10 s, 5 s, a 175 s gap
    # billed 10 s, 5 s.
    assert short.oracle_dollars == pytest.approx(10 + 5 + 10 + 5 + 10 + 5)
    # 3 min: the host is still reserved at 200 (until 35 + 180 = 215): one wake, billed 0-385.
    long = replay(TRACE, [HOST], Setting(reservation_minutes=3, scale_up="queue_depth", fallback_minutes=0))
    assert (long.dollars, long.wakes, long.cold_starts) == (pytest.approx(385), 1, 1)
    assert always_on([HOST], 0.0, 385.0).dollars == pytest.approx(385)


def test_the_second_host_is_woken_only_when_the_wait_is_worth_a_cold_start() -> None:
    hosts = [HOST, HostSpec(name="gpu-2", slots=1, price=3600.0, cold_start=10.0)]
    warm_up = [Request(0.0, "m", 1.0)]  # measures the model's service time (and wakes gpu)
    burst = [Request(20.0 + i * 0.01, "m", 2.0) for i in range(4)]  # 4 at once on one slot
    waits = replay(warm_up + burst, hosts, Setting(reservation_minutes=5, scale_up="expected_wait"))
    assert waits.wakes == 1  # queued 3 x 1 s of mean service: under 10 s of cold start
    long_burst = [Request(20.0 + i * 0.01, "m", 30.0) for i in range(4)]
    wakes = replay(
        [Request(0.0, "m", 30.0), *long_burst], hosts, Setting(reservation_minutes=5, scale_up="expected_wait")
    )
    assert wakes.wakes == 2  # 30 s answers: the wait is worth waking gpu-2


def test_simulate_prints_a_table_of_every_setting_for_a_trace(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trace = tmp_path / "trace.csv"
    trace.write_text("# a comment\ntime,model,duration_s\n0,llama3.2,5\n30,llama3.2,5\n200,llama3.2,5\n")
    config = tmp_path / "config.toml"
    config.write_text("[timing]\nfallback_reservation_minutes = 0\n")
    args = ["simulate", "--config", str(config), "--trace", str(trace), "--hosts", "1", "--slots", "1"]
    code = main(
        [*args, "--price", "3600", "--cold-start", "10", "--reservation-minutes", "1,3", "--scale-up", "queue_depth"]
    )
    out = capsys.readouterr().out
    assert code == 0 and "replay of 3 requests" in out
    rows = {line.split()[1] + line.split()[2]: line for line in out.splitlines() if line.startswith("queue_depth")}
    assert "$170.00" in rows["1min"] and "$385.00" in rows["3min"]
    always = next(line for line in out.splitlines() if line.startswith("always on"))
    assert "$385.00" in always and "56% saved" in rows["1min"]  # on from 0 until the latest billed moment
    code = main([*args, "--price", "3600", "--cold-start", "10", "--format", "json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and len(report["outcomes"]) == 6 and report["requests"] == 3
    trace.write_text("0,llama3.2,five\n")
    assert main(["simulate", "--config", str(config), "--trace", str(trace)]) == 2
    assert "trace.csv:1: duration_s 'five' is not a number of seconds" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: a usage line and exit status 2
        main(["simulate", "--config", str(config), "--reservation-minutes", "x"])
    assert "expected numbers separated by commas" in capsys.readouterr().err


def test_a_trace_takes_seconds_or_iso_times(tmp_path: Path) -> None:
    trace = tmp_path / "t.csv"
    trace.write_text("2026-05-04T09:00:00+00:00,llama3.2,2\n2026-05-04T09:00:30+00:00,qwen2.5:7b,3.5\n")
    first, second = read_trace(trace)
    assert second.arrival - first.arrival == 30 and second.duration == 3.5 and second.model == "qwen2.5:7b"
    trace.write_text("")
    with pytest.raises(TraceError, match="no requests"):
        read_trace(trace)


LIFE = """
[timing]
reservation_minutes = {window}
fallback_reservation_minutes = 0
startup_timeout_seconds = 10
ollama_readiness_wait_seconds = 0.02
probe_timeout_seconds = 1
reconcile_interval_seconds = 0.2
shutdown_grace_seconds = 1
"""


@pytest.mark.parametrize("window_minutes", [0.02, 0.1])  # 1.2 s: a pause between the bursts; 6 s: none
def test_the_replay_and_the_live_server_wake_and_pause_alike(
    tmp_path: Path, window_minutes: float, capsys: pytest.CaptureFixture[str]
) -> None:
    gaps = [0.0, 0.3, 3.0]  # seconds between requests: two close, then one after a gap of 3 s
    machine = Machine("gpu-1", slots=1, token_delay=0.02)
    with running_cloud_stack(tmp_path, "simulated", [machine], extra=LIFE.format(window=window_minutes)) as (
        stack,
        cloud,
    ):
        body = {"model": "llama3.2", "prompt": "x", "stream": False, "options": {"num_predict": 5}}
        for gap in gaps:
            time.sleep(gap)
            answer = httpx.post(stack.url + "/api/generate", json=body, headers=stack.headers(), timeout=30)
            assert answer.status_code == 200
        wait_until(lambda: cloud.pauses("gpu-1") == cloud.resumes("gpu-1"), timeout=15)
        live_wakes = cloud.resumes("gpu-1")
        wait_until(lambda: stack.call(lambda: stack.runtime.ledger.statistics().buffered) == 0, timeout=5)
        code = main(["simulate", "--config", str(stack.config_path), "--since", "1h", "--format", "json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["requests"] == 3
    replayed = {(o["setting"]["reservation_minutes"], o["setting"]["scale_up"]): o for o in report["outcomes"]}
    assert live_wakes == (2 if window_minutes < 0.05 else 1)
    # The ledger's own window is not among the defaults: replay it as the server ran.
    code = main(["simulate", "--config", str(stack.config_path), "--since", "1h", "--format", "json",
                 "--reservation-minutes", str(window_minutes)])  # fmt: skip
    same = json.loads(capsys.readouterr().out)["outcomes"]
    assert code == 0 and all(o["wakes"] == live_wakes for o in same) and replayed


def test_a_static_hosts_showback_does_not_grow_with_the_window() -> None:
    hosts = [
        HostSpec(name="box", slots=1, price=3600.0, cold_start=0.0, always_on=True),  # a dollar a second
        HostSpec(name="cloud", slots=1, price=0.0, cold_start=10.0),  # free: only the box costs
    ]
    trace = [Request(0.0, "m", 50.0), Request(1.0, "m", 50.0), Request(100.0, "m", 5.0)]
    short, long = (replay(trace, hosts, Setting(reservation_minutes=m, scale_up="queue_depth")) for m in (1, 60))
    assert short.dollars == long.dollars == pytest.approx(105)  # from the first arrival to the last answer
