"""`gpumanager demo` shows the whole cycle on its own, and `gpumanager hosts` reads a running fleet."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gpumanager.cli import main
from tests.clouds import Machine
from tests.harness import running_cloud_stack


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_the_demo_shows_wake_answer_idle_and_pause_in_under_a_minute(tmp_path: Path) -> None:
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "gpumanager", "demo", "--once", "--port", str(free_port()), "--dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=90,
    )
    elapsed = time.monotonic() - started
    assert done.returncode == 0, done.stderr
    out = done.stdout
    for step in (
        "gpu-a: paused -> resuming",
        "-> ready",
        "First token after",
        "A GPU that sleeps costs nothing",
        "gpu-a: ready -> pausing",
        "pausing -> paused",
        "The whole cycle is done",
    ):
        assert step in out, f"{step!r} missing from:\n{out}"
    key = next(line.split()[-1] for line in out.splitlines() if "Admin API key" in line)
    assert key.startswith("gm_") and f"Bearer {key}" in out  # copy-paste examples carry the key
    assert elapsed < 60
    assert "Traceback" not in done.stderr and (tmp_path / "gpumanager.log").exists()


def test_the_demo_refuses_a_busy_port_clearly(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "gpumanager", "demo", "--once", "--port", str(port), "--dir", str(tmp_path)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip() == (
        f"gpumanager: error: cannot listen on 127.0.0.1:{port}: Address already in use; "
        "try `gpumanager demo --port 8001`"
    )


def test_ctrl_c_during_the_demos_wake_ends_it_cleanly(tmp_path: Path) -> None:
    """Ctrl-C while the narrated request waits for its host: the request is told, nothing is a traceback."""
    demo = subprocess.Popen(
        [sys.executable, "-u", "-m", "gpumanager", "demo", "--port", str(free_port()), "--dir", str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert demo.stdout is not None
        seen = []
        for line in demo.stdout:
            seen.append(line)
            if "paused -> resuming" in line:
                break
        demo.send_signal(signal.SIGINT)
        out, err = demo.communicate(timeout=30)
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.communicate()
    assert demo.returncode == 0, err
    assert "Traceback" not in out + err and "ExceptionGroup" not in out + err
    assert "bye: the demo's files stay in" in out
    log = (tmp_path / "gpumanager.log").read_text()
    assert "SIGINT: draining" in log and "Traceback" not in log


def test_hosts_prints_the_fleet_of_a_running_server(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    with running_cloud_stack(tmp_path, "simulated", [Machine("gpu-1"), Machine("gpu-2", running=True)]) as (stack, _):
        monkeypatch.setenv("GPUMANAGER_API_KEY", stack.admin_key)
        assert main(["hosts", "--url", stack.url]) == 0
        out = capsys.readouterr().out
        assert "gpu-1" in out and "paused" in out and "gpu-2" in out and "llama3.2:latest" in out
        assert main(["hosts", "--url", stack.url, "--key", stack.user_key]) == 2
        assert "403" in capsys.readouterr().err
