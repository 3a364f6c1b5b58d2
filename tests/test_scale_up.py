"""Cost-aware scale-up through the real server and the simulated cloud: a burst that the
queue-depth rule answers with a second machine is served by the awake one alone when its answers
are short, and gets a second machine when the wait would be longer than a cold start."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.clouds import Machine
from tests.harness import running_cloud_stack, wait_until

TIMING = """
[timing]
startup_timeout_seconds = 20   # a cold start is estimated at 5 s before any was measured
ollama_readiness_wait_seconds = 0.05
probe_timeout_seconds = 1
reconcile_interval_seconds = 0.3
wake_keepalive_seconds = 0.5
queue_timeout_seconds = 30
shutdown_grace_seconds = 1
[scheduler]
scale_up_queue_depth = 3
scale_up = "{rule}"
"""


@pytest.mark.parametrize(
    ("rule", "tokens", "woken"),
    [
        # 12 at once on one slot: up to 11 queued, past the depth of 3
        ("queue_depth", 4, True),
        # answers of ~40 ms: at most (11 + 1) x 0.04 s = 0.5 s of waiting, well below the 5 s of a cold
        # start (a tenth of it: a loaded machine that answers slower still does not wake one)
        ("expected_wait", 4, False),
        # answers of ~0.6 s: (11 + 1) x 0.6 s = 7.2 s of waiting, more than a cold start
        ("expected_wait", 60, True),
    ],
)
def test_a_burst_wakes_a_second_machine_only_when_waiting_costs_more_than_waking(
    tmp_path: Path, rule: str, tokens: int, woken: bool
) -> None:
    machines = [Machine("gpu-1", running=True, slots=1, token_delay=0.01), Machine("gpu-2", slots=1)]
    with running_cloud_stack(tmp_path, "simulated", machines, extra=TIMING.format(rule=rule)) as (stack, cloud):
        wait_until(lambda: stack.call(lambda: str(stack.runtime.fleet.hosts["gpu-1"].state)) == "ready", timeout=10)
        body = {"model": "llama3.2", "prompt": "x", "stream": False, "options": {"num_predict": tokens}}

        def ask() -> int:
            return httpx.post(stack.url + "/api/generate", json=body, headers=stack.headers(), timeout=60).status_code

        assert ask() == 200  # the model's service time is measured
        with ThreadPoolExecutor(12) as pool:
            assert list(pool.map(lambda _: ask(), range(12))) == [200] * 12
        assert (cloud.resumes("gpu-2") == 1) is woken
