"""The ledger through the real server: every request becomes a row with its tokens and its share of
the GPU; `/usage` shows admins everyone's, `/usage/me` each key its own; rows survive a restart."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx

from tests.harness import FAST_TIMING, SimHost, Stack, running_stack, wait_until

HOSTS = [SimHost("gpu", token_delay=0.01, cost_per_hour=36.0)]  # 10,000 micro-dollars a second


def chat(stack: Stack, key: str, tokens: int) -> None:
    body = {"model": "llama3.2", "messages": [{"role": "user", "content": "a b"}], "stream": False}
    answer = httpx.post(
        stack.url + "/api/chat",
        json={**body, "options": {"num_predict": tokens}},
        headers=stack.headers(key),
        timeout=30,
    )
    assert answer.status_code == 200


def get(stack: Stack, path: str, key: str) -> Any:
    answer = httpx.get(stack.url + path, headers=stack.headers(key), timeout=10)
    assert answer.status_code == 200, answer.text
    return answer.json()


def requests_written(stack: Stack) -> int:
    """The requests in the ledger's file (its intervals aside)."""
    return int(get(stack, "/usage?since=1h&by=key", stack.admin_key)["total"]["requests"])


def test_requests_are_in_the_ledger_and_each_key_sees_its_own(tmp_path: Path) -> None:
    with running_stack(tmp_path, HOSTS, extra=FAST_TIMING) as stack:
        other = stack.new_key("other")
        chat(stack, stack.user_key, 5)
        chat(stack, stack.user_key, 3)
        chat(stack, other, 2)
        wait_until(lambda: requests_written(stack) == 3, timeout=10)
        mine = get(stack, "/usage/me", stack.user_key)
        today = mine["today"]["totals"]
        assert today["requests"] == 2 and today["completion_tokens"] == 8 and today["prompt_tokens"] == 4
        assert today["gpu_seconds"] > 0 and today["cost_micro"] > 0
        theirs = get(stack, "/usage/me", other)["today"]["totals"]
        assert theirs["requests"] == 1 and theirs["completion_tokens"] == 2
        report = get(stack, "/usage?since=1h&by=key", stack.admin_key)
        by_key = {g["group"]: g["totals"] for g in report["groups"]}
        assert sum(t["requests"] for t in by_key.values()) == 3 and len(by_key) == 3
        # The static host is billed while gpumanager runs (showback): its idle time is nobody's.
        assert by_key["unattributed"]["requests"] == 0 and by_key["unattributed"]["cost_micro"] > 0
        refused = httpx.get(stack.url + "/usage", headers=stack.headers(), timeout=10)
        assert refused.status_code == 403
        bad = httpx.get(stack.url + "/usage?since=yesterday-ish", headers=stack.headers(stack.admin_key))
        assert bad.status_code == 400 and "since" in bad.json()["error"]
    with running_stack(tmp_path, HOSTS, extra=FAST_TIMING) as again:  # a restart loses nothing flushed
        report = get(again, "/usage?since=1h&by=model", again.admin_key)
        assert report["total"]["requests"] == 3 and report["total"]["completion_tokens"] == 10
