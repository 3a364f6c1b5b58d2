"""`gpumanager server` as a process: it serves, logs a line per request, and shuts down gracefully."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from anyio.from_thread import start_blocking_portal

from gpumanager.keys import KeyStore
from gpumanager.sim import SimOllama, expected_text, running_server
from tests.harness import wait_until


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def host_url() -> Iterator[str]:
    with (
        start_blocking_portal() as portal,
        portal.wrap_async_context_manager(running_server(SimOllama(token_delay=0.05))) as server,
    ):
        yield server.url


def start_server(
    tmp_path: Path,
    host_url: str,
    grace: float,
    *,
    server: str = "",
    open_files: int | None = None,
    host: str = "",
) -> tuple[subprocess.Popen[str], str, str]:
    """`gpumanager server` in `tmp_path` in front of one static host (`host`: more settings of
    it), and a new user key (the key file is kept across restarts)."""
    port = free_port()
    (tmp_path / "config.toml").write_text(
        f'[server]\nhost = "127.0.0.1"\nport = {port}\n{server}[timing]\nshutdown_grace_seconds = {grace}\n'
        f'[[hosts]]\nname = "box"\nurl = "{host_url}"\n{host}'
    )
    key = KeyStore(tmp_path / "api_keys.json").generate("cli", "cli@example.org")[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUMANAGER_")}

    def limit_open_files() -> None:
        if open_files is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (open_files, open_files))

    process = subprocess.Popen(
        [sys.executable, "-m", "gpumanager", "--config", str(tmp_path / "config.toml")],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        preexec_fn=limit_open_files,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return process, url, key
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline or process.poll() is not None:
            process.kill()
            raise AssertionError(f"the server did not start: {process.communicate()[0]}")
        time.sleep(0.05)


def test_the_server_lets_running_streams_finish_on_shutdown(tmp_path: Path, host_url: str) -> None:
    process, url, key = start_server(tmp_path, host_url, grace=5)
    try:
        body = {"model": "llama3.2", "prompt": "x", "options": {"num_predict": 30}}  # about 1.5 s
        with httpx.stream(
            "POST", url + "/api/generate", json=body, timeout=30, headers={"Authorization": f"Bearer {key}"}
        ) as response:
            lines = response.iter_lines()
            first = next(lines)
            process.send_signal(signal.SIGTERM)  # Ctrl-C, `docker stop`
            rest = list(lines)
        text = "".join(line.split('"response":"')[1].split('"')[0] for line in [first, *rest[:-1]])
        assert text == expected_text(30) and '"done":true' in rest[-1]
        assert process.wait(timeout=10) in (0, -signal.SIGTERM)  # uvicorn ends by re-raising the signal
    finally:
        if process.poll() is None:
            process.kill()
    output = process.communicate()[0]
    assert "POST /api/generate key=" in output and " status=200 " in output
    assert key not in output and key not in (tmp_path / "logs" / "app.log").read_text()
    assert (tmp_path / "logs" / "app.log").stat().st_mode & 0o777 == 0o600  # the log may name keys' ids


def test_the_ledger_survives_a_killed_server_losing_at_most_the_last_second(tmp_path: Path, host_url: str) -> None:
    """SIGKILL (an out-of-memory kill, a pulled plug of the VM): what was flushed stays, and the
    billed interval still open is on disk up to about a second before the kill."""
    priced = "cost_per_hour = 3600.0\n"  # a static host's showback: a dollar a second
    process, url, key = start_server(tmp_path, host_url, grace=5, host=priced)
    database = tmp_path / "state" / "usage.db"
    try:
        for _ in range(3):
            body = {"model": "llama3.2", "prompt": "x", "stream": False, "options": {"num_predict": 2}}
            answer = httpx.post(url + "/api/generate", json=body, headers={"Authorization": f"Bearer {key}"})
            assert answer.status_code == 200
        wait_until(lambda: ledger_counts(database)[0] == 3, timeout=10)
        time.sleep(2.5)  # the reservation after the last request goes on: its interval grows on disk
        killed = time.time()
        process.send_signal(signal.SIGKILL)
        assert process.wait(timeout=10) == -signal.SIGKILL
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate()
    requests, last_end = ledger_counts(database)
    assert requests == 3 and killed - 2.0 < last_end <= killed  # flushed every second (a busy machine: late)
    process, url, key = start_server(tmp_path, host_url, grace=5, host=priced)  # and it opens again
    try:
        body = {"model": "llama3.2", "prompt": "x", "stream": False, "options": {"num_predict": 2}}
        answer = httpx.post(url + "/api/generate", json=body, headers={"Authorization": f"Bearer {key}"})
        assert answer.status_code == 200
        wait_until(lambda: ledger_counts(database)[0] == 4, timeout=10)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=10)
        process.communicate()


def ledger_counts(database: Path) -> tuple[int, float]:
    """Request rows in the ledger, and the latest end of an interval, read as another process would."""
    if not database.exists():
        return 0, 0.0
    with contextlib.closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as conn:
        requests = conn.execute("SELECT count(*) FROM requests").fetchone()[0]
        last_end = conn.execute('SELECT coalesce(max("end"), 0) FROM intervals').fetchone()[0]
    return int(requests), float(last_end)


def test_a_short_grace_ends_streams_that_outlive_it(tmp_path: Path, host_url: str) -> None:
    process, url, key = start_server(tmp_path, host_url, grace=0.5)
    try:
        body = {"model": "llama3.2", "prompt": "x", "options": {"num_predict": 400}}  # about 20 s
        started = time.monotonic()
        with httpx.stream(
            "POST", url + "/api/generate", json=body, timeout=30, headers={"Authorization": f"Bearer {key}"}
        ) as response:
            lines = response.iter_lines()
            next(lines)
            process.send_signal(signal.SIGTERM)
            health = httpx.get(url + "/health", timeout=5)  # still listening, and says why it refuses
            refused = httpx.post(url + "/api/generate", json=body, headers={"Authorization": f"Bearer {key}"})
            rest = list(lines)
        # The stream is told why it ends, in its own dialect, instead of being cut.
        assert json.loads(rest[-1]) == {"error": "gpumanager is shutting down"}
        assert health.json()["status"] == "draining"
        assert refused.status_code == 503 and "retry-after" in refused.headers
        assert process.wait(timeout=10) == 0 and time.monotonic() - started < 10
        output = process.communicate()[0]
        assert "Traceback" not in output and "ERROR" not in output, output
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()


def test_a_second_signal_exits_at_once(tmp_path: Path, host_url: str) -> None:
    process, url, key = start_server(tmp_path, host_url, grace=60)
    try:
        body = {"model": "llama3.2", "prompt": "x", "options": {"num_predict": 400}}  # about 20 s
        with httpx.stream(
            "POST", url + "/api/generate", json=body, timeout=30, headers={"Authorization": f"Bearer {key}"}
        ) as response:
            lines = response.iter_lines()  # kept: a dropped iterator closes the stream
            next(lines)
            process.send_signal(signal.SIGINT)
            wait_for_status(url, "draining")
            started = time.monotonic()
            process.send_signal(signal.SIGINT)
            assert process.wait(timeout=10) == 0 and time.monotonic() - started < 5
            assert json.loads(list(lines)[-1]) == {"error": "gpumanager is shutting down"}
        assert "Traceback" not in process.communicate()[0]
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()


def test_a_busy_port_is_one_clear_line_and_exit_status_1(tmp_path: Path, host_url: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        (tmp_path / "config.toml").write_text(
            f'[server]\nhost = "127.0.0.1"\nport = {port}\n[[hosts]]\nname = "box"\nurl = "{host_url}"\n'
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("GPUMANAGER_")}
        command = [sys.executable, "-m", "gpumanager", "--config", str(tmp_path / "config.toml")]
        result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 1
    assert result.stderr.strip() == f"gpumanager: error: cannot listen on 127.0.0.1:{port}: Address already in use"
    assert "is ready" not in result.stdout + result.stderr


def wait_for_status(url: str, status: str) -> None:
    deadline = time.monotonic() + 10
    while httpx.get(url + "/health", timeout=5).json()["status"] != status:
        assert time.monotonic() < deadline, f"/health never said {status}"
        time.sleep(0.02)


def test_the_env_file_beside_the_config_provides_the_secrets(tmp_path: Path) -> None:
    port = free_port()
    (tmp_path / "config.toml").write_text(
        f'[server]\nhost = "127.0.0.1"\nport = {port}\n[cloud_api]\nbase_url = "http://127.0.0.1:9/v1"\n'
        "[timing]\nshutdown_grace_seconds = 0.2\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GPUMANAGER_", "CLOUD_"))}
    command = [sys.executable, "-m", "gpumanager", "server", "--config", str(tmp_path / "config.toml")]
    refused = subprocess.run(command, capture_output=True, text=True, env=env, timeout=60)
    assert refused.returncode == 2
    assert refused.stderr.strip() == (
        "gpumanager: error: CLOUD_API_TOKEN is not set: put it in .env or the "
        "environment (needed by the SURF provider 'surf')"
    )
    (tmp_path / ".env").write_text("CLOUD_API_TOKEN=from-the-env-file\n")
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline and process.poll() is None, "the server did not start"
            time.sleep(0.05)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=10)
        output = process.communicate()[0]
    assert "listing the hosts of surf failed" in output  # it ran, with the token, and told why SURF is unreachable
    assert "from-the-env-file" not in output


def test_max_connections_caps_open_connections_and_a_low_file_limit_is_told(tmp_path: Path, host_url: str) -> None:
    process, url, _ = start_server(tmp_path, host_url, grace=0.2, server="max_connections = 40\n", open_files=64)
    try:
        address = (httpx.URL(url).host, httpx.URL(url).port)
        with contextlib.ExitStack() as held:
            for _ in range(38):  # idle connections count too; with the probe's own, 39 are open
                held.enter_context(socket.create_connection(address, timeout=10))
            assert httpx.get(url + "/health", timeout=10).status_code == 200
            held.enter_context(socket.create_connection(address, timeout=10))
            refused = httpx.get(url + "/health", timeout=10)
            assert refused.status_code == 503  # uvicorn's own answer past limit_concurrency
        wait_until_ok = time.monotonic() + 10
        while httpx.get(url + "/health", timeout=10).status_code != 200:  # the connections closed: served again
            assert time.monotonic() < wait_until_ok
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        output = process.communicate(timeout=30)[0]
        assert "the open-file limit is 64 but max_connections = 40 needs 80" in output
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()


def test_the_listening_socket_says_tcp_so_answers_are_not_held_by_nagle() -> None:
    from gpumanager.sockets import bind_socket

    with bind_socket("127.0.0.1", 0) as sock:
        assert sock.proto == socket.IPPROTO_TCP  # asyncio sets TCP_NODELAY on accepted sockets only then
        with socket.create_connection(sock.getsockname()[:2]):
            accepted, _ = sock.accept()
            with accepted:
                assert accepted.proto == socket.IPPROTO_TCP
