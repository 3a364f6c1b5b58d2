"""`gpumanager init` through the real CLI: the files it writes load, pass check-config, keep their
comments and keep secrets private; and `check-config` showing what static hosts really serve."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import tomlkit
from anyio.from_thread import start_blocking_portal
from dotenv import dotenv_values

from gpumanager.cli import main
from gpumanager.config import Ec2ProviderConfig, RunpodProviderConfig, SurfProviderConfig, load
from gpumanager.sim import SimOllama, running_server

BASE_SECRETS = ["GPUMANAGER_UPSTREAM_TOKEN", "GPUMANAGER_API_KEY"]
SURF_SECRETS = ["CLOUD_API_TOKEN", "CLOUD_CSRF_TOKEN"]
EC2_SECRETS = ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"]
RUNPOD_SECRETS = ["RUNPOD_API_KEY"]


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No GPUMANAGER_* variables from outside; and what check-config loads from a .env is undone."""
    saved = dict(os.environ)
    for name in [*BASE_SECRETS, "GPUMANAGER_CONFIG"]:
        monkeypatch.delenv(name, raising=False)
    yield
    os.environ.clear()
    os.environ.update(saved)


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def closed_port_url() -> str:
    """The URL of a loopback port nothing listens on: a host that is down."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    return f"http://127.0.0.1:{port}"


def row_of(out: str, name: str) -> str:
    return next(line for line in out.splitlines() if line.split(" ")[0] == name)


SOURCES: dict[str, tuple[list[str], list[str]]] = {
    "none": ([], BASE_SECRETS),
    "ollama": (["--ollama", "http://127.0.0.1:9"], BASE_SECRETS),
    "surf": (["--surf", "gpu-"], BASE_SECRETS + SURF_SECRETS),
    "ec2": (["--ec2-tag", "gpumanager=true"], BASE_SECRETS + EC2_SECRETS),
    "runpod": (["--runpod-endpoint", "i02xupws21hp6i"], BASE_SECRETS + RUNPOD_SECRETS),
    "all": (
        [
            "--ollama",
            "http://127.0.0.1:9",
            "--ollama",
            "http://gpu1.lab.example.org:11434/",
            "--surf",
            "gpu-",
            "--ec2-tag",
            "gpumanager=true",
            "--ec2-tag",
            "team=ml",
            "--runpod-endpoint",
            "i02xupws21hp6i",
            "--runpod-endpoint",
            "abc123",
        ],
        BASE_SECRETS + SURF_SECRETS + EC2_SECRETS + RUNPOD_SECRETS,
    ),
}


@pytest.mark.parametrize("source", list(SOURCES))
def test_init_writes_a_config_that_loads_and_passes_check_config(
    source: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    options, secrets = SOURCES[source]
    path = tmp_path / "config.toml"
    code, out, err = cli(capsys, "init", "--config", str(path), *options)
    assert code == 0, err
    assert f"Wrote {path}" in out and f"Wrote {tmp_path / '.env'} (mode 0600)" in out
    assert "gpumanager generate-key --config" in out and f"gpumanager server --config {path}" in out

    config = load(path)
    static = {host.name: host.url or "" for host in config.hosts}
    providers = {p.name: p for p in config.providers}
    if source == "none":
        assert static == {"local": "http://127.0.0.1:11434"} and not providers
        assert "No source option was given" in out and "an Ollama on this machine" in out
    if source == "ollama":
        assert static == {"local": "http://127.0.0.1:9"} and not providers
    if source in ("surf", "all"):
        surf = providers["surf"]
        assert isinstance(surf, SurfProviderConfig) and surf.machine_name_filter == "gpu-"
        assert surf.startup_timeout_seconds == 900
    if source in ("ec2", "all"):
        ec2 = providers["aws"]
        assert isinstance(ec2, Ec2ProviderConfig) and ec2.tag_filter["gpumanager"] == "true"
        assert not ec2.hibernate
    if source in ("runpod", "all"):
        runpod = providers["runpod"]
        assert isinstance(runpod, RunpodProviderConfig) and "i02xupws21hp6i" in runpod.endpoints
    if source == "all":
        assert static == {"local": "http://127.0.0.1:9", "gpu1": "http://gpu1.lab.example.org:11434"}
        ec2, runpod = providers["aws"], providers["runpod"]
        assert isinstance(ec2, Ec2ProviderConfig) and ec2.tag_filter == {"gpumanager": "true", "team": "ml"}
        assert isinstance(runpod, RunpodProviderConfig) and runpod.endpoints == ["i02xupws21hp6i", "abc123"]
        assert "Fill in CLOUD_API_TOKEN, AWS_DEFAULT_REGION, RUNPOD_API_KEY there" in out
    if source in ("none", "ollama"):
        assert not config.all_providers()

    env = tmp_path / ".env"
    assert stat.S_IMODE(env.stat().st_mode) == 0o600
    assert dotenv_values(env) == dict.fromkeys(secrets, "")
    assert [line.split("=")[0] for line in env.read_text().splitlines() if line and not line.startswith("#")] == (
        secrets
    )

    code, out, err = cli(capsys, "check-config", "--config", str(path))
    assert code == 0, err
    assert out.startswith(f"{path}: ok\n")
    for name, url in static.items():
        assert url in row_of(out, name)
    for name in providers:
        assert f"(hosts found by {name})" in out


def test_the_written_config_explains_itself_and_its_comments_survive_editing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "config.toml"
    assert cli(capsys, "init", "--config", str(path), "--ollama", "http://10.0.0.5:11434", "--surf", "gpu-")[0] == 0
    text = path.read_text()
    for expected in (
        "# gpumanager configuration, written by `gpumanager init`",
        "GPUMANAGER_UPSTREAM_TOKEN there is sent to every host as `Authorization: Bearer ...`",
        "[server]\n# Where clients",
        "[timing]\n# How long woken cloud hosts stay up",
        "[paths]\n# Files gpumanager writes, relative to the folder of this file.",
        "[scheduler]\n# Slots: how many requests a host runs at once.",
        "# Providers: clouds whose GPU hosts gpumanager resumes",
        "# Static hosts: Ollama servers that are always on and never paused.",
        "# SURF Research Cloud: workspaces whose name contains machine_name_filter.",
    ):
        assert expected in text
    commented = {line.split("=")[0].strip() for line in text.splitlines() if "=" in line and " # " in line}
    assert {
        "host",
        "port",
        "reservation_minutes",
        "fallback_reservation_minutes",
        "startup_timeout_seconds",
        "queue_timeout_seconds",
        "wake_keepalive_seconds",
        "api_keys_file",
        "state_dir",
        "log_file",
        "default_slots",
        "slots",
        "models",
        "machine_name_filter",
    } <= commented

    document = tomlkit.parse(text)  # what a user does with an editor, done by a program
    document["server"]["port"] = 9001
    document["hosts"][0]["models"] = ["llama3.1:8b"]
    edited = tomlkit.dumps(document)
    path.write_text(edited)
    assert "# Where clients" in edited and edited.count("#") == text.count("#")
    config = load(path)
    assert config.server.port == 9001 and config.hosts[0].models == ["llama3.1:8b"]
    assert config.hosts[0].name == "10.0.0.5"


def test_init_refuses_to_overwrite_without_force(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "config.toml"
    assert cli(capsys, "init", "--config", str(path), "--ollama", "http://10.0.0.5:11434")[0] == 0
    before = path.read_text()
    (tmp_path / ".env").write_text("GPUMANAGER_UPSTREAM_TOKEN=kept\n")

    code, out, err = cli(capsys, "init", "--config", str(path), "--surf", "gpu-")
    assert code == 2 and out == ""
    assert err == f"gpumanager: error: {path}: already exists; pass --force to overwrite it\n"
    assert path.read_text() == before and (tmp_path / ".env").read_text() == "GPUMANAGER_UPSTREAM_TOKEN=kept\n"

    path.unlink()  # only the .env is left: that is refused too, and no config appears
    code, out, err = cli(capsys, "init", "--config", str(path))
    assert (
        code == 2 and err == f"gpumanager: error: {tmp_path / '.env'}: already exists; pass --force to overwrite it\n"
    )
    assert not path.exists()

    (tmp_path / ".env").chmod(0o644)
    path.write_text(before)
    code, out, err = cli(capsys, "init", "--config", str(path), "--surf", "gpu-", "--force")
    assert code == 0, err
    assert "surf" in path.read_text() and "10.0.0.5" not in path.read_text()
    assert dotenv_values(tmp_path / ".env") == dict.fromkeys(BASE_SECRETS + SURF_SECRETS, "")
    assert stat.S_IMODE((tmp_path / ".env").stat().st_mode) == 0o600


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--ollama", "10.0.0.5:11434"], "--ollama: must start with http:// or https://, got '10.0.0.5:11434'"),
        (["--ollama", "ftp://10.0.0.5"], "--ollama: must start with http:// or https://, got 'ftp://10.0.0.5'"),
        (["--ollama", "http://"], "--ollama: no host in 'http://'"),
        (["--ollama", "http://box:port"], "--ollama: bad port in 'http://box:port'"),
        (["--ec2-tag", "gpumanager"], "--ec2-tag: expected KEY=VALUE (e.g. gpumanager=true), got 'gpumanager'"),
        (["--ec2-tag", "=true"], "--ec2-tag: both the key and the value must be given (KEY=VALUE), got '=true'"),
        (["--ec2-tag", "a=1", "--ec2-tag", "a=2"], "--ec2-tag: tag 'a' given twice with different values"),
        (["--surf", " "], "--surf: the filter must not be empty"),
        (["--runpod-endpoint", "https://api.runpod.ai/v2/abc/"], "--runpod-endpoint: expected an endpoint id"),
    ],
)
def test_bad_input_is_a_clear_error_and_writes_nothing(
    options: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = cli(capsys, "init", "--config", str(tmp_path / "config.toml"), *options)
    assert code == 2 and out == ""
    assert err.startswith(f"gpumanager: error: {message}") and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def test_hosts_get_unique_names_from_their_urls(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "config.toml"
    urls = [
        "http://127.0.0.1:11434",
        "http://localhost:11435",
        "https://GPU1.lab.example.org:11434",
        "http://gpu1.other.example.org:11434",
        "http://10.0.0.5:11434",
        "http://10.0.0.5:11434/",  # the same host again: written once
    ]
    code, _, err = cli(capsys, "init", "--config", str(path), *[arg for url in urls for arg in ("--ollama", url)])
    assert code == 0, err
    assert [(h.name, h.url) for h in load(path).hosts] == [
        ("local", "http://127.0.0.1:11434"),
        ("local-11435", "http://localhost:11435"),
        ("gpu1", "https://GPU1.lab.example.org:11434"),
        ("gpu1-11434", "http://gpu1.other.example.org:11434"),
        ("10.0.0.5", "http://10.0.0.5:11434"),
    ]


def test_init_writes_where_gpumanager_config_points_or_here(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    code, out, _ = cli(capsys, "init")
    assert code == 0 and (tmp_path / "config.toml").exists() and (tmp_path / ".env").exists()
    assert "  gpumanager server\n" in out and "--config" not in out  # the next commands find it themselves

    target = tmp_path / "data" / "gpumanager.toml"
    monkeypatch.setenv("GPUMANAGER_CONFIG", str(target))
    code, out, _ = cli(capsys, "init", "--ollama", "http://10.0.0.5:11434")
    assert code == 0 and load(target).hosts[0].url == "http://10.0.0.5:11434"
    assert (tmp_path / "data" / ".env").exists() and "--config" not in out


def test_init_help_explains_every_option(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["init", "--help"])
    out = capsys.readouterr().out
    assert done.value.code == 0
    for option in ("--config PATH", "--ollama URL", "--surf FILTER", "--ec2-tag KEY=VALUE", "--runpod-endpoint ID"):
        assert option in out
    for explained in ("--force", "0600", "http://127.0.0.1:11434", "repeatable", "RUNPOD_API_KEY", "CLOUD_API_TOKEN"):
        assert explained in out
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "init" in capsys.readouterr().out


def test_check_config_shows_what_a_live_host_serves_and_marks_the_config_s_models(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sim = SimOllama(models=["llama3.2:latest", "qwen2.5:7b"])
    down = closed_port_url()
    with start_blocking_portal() as portal, portal.wrap_async_context_manager(running_server(sim)) as server:
        path = tmp_path / "config.toml"
        code, _, err = cli(capsys, "init", "--config", str(path), "--ollama", server.url, "--ollama", down)
        assert code == 0, err
        document = tomlkit.parse(path.read_text())
        for host in document["hosts"]:
            host["models"] = ["llama3.1:8b"]
        path.write_text(tomlkit.dumps(document))
        (tmp_path / ".env").write_text("GPUMANAGER_UPSTREAM_TOKEN=door-token\n")
        live_name, down_name = (host.name for host in load(path).hosts)

        code, out, err = cli(capsys, "check-config", "--config", str(path))
        assert code == 0, err
        assert sim.requests["/api/tags"] == 1
        assert sim.last_headers["authorization"] == "Bearer door-token"
    live, dead = row_of(out, live_name), row_of(out, down_name)
    assert "llama3.2:latest, qwen2.5:7b" in live and "(from config)" not in live and "llama3.1" not in live
    assert "llama3.1:8b (from config)" in dead and down in dead
    assert "MODELS of static hosts: what their /api/tags (OpenAI-only hosts: /v1/models) lists now." in out
    assert f"  {down_name}: {down}/api/tags: not reachable" in out


def test_check_config_stays_fast_when_hosts_never_answer(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    silent = []  # listening sockets that never answer: the connection opens, the request hangs
    try:
        for _ in range(3):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sock.listen(8)
            silent.append(sock)
        blocks = [
            f'[[hosts]]\nname = "mute{i}"\nurl = "http://127.0.0.1:{sock.getsockname()[1]}"\nmodels = ["m{i}"]\n'
            for i, sock in enumerate(silent)
        ]
        ports = [sock.getsockname()[1] for sock in silent]
        (tmp_path / "config.toml").write_text("\n".join(blocks))
        started = time.monotonic()
        code, out, err = cli(capsys, "check-config", "--config", str(tmp_path / "config.toml"))
        elapsed = time.monotonic() - started
    finally:
        for sock in silent:
            sock.close()
    assert code == 0, err
    assert elapsed < 4.5  # all at once: one 2 s timeout, not three
    for i in range(3):
        assert f"m{i} (from config)" in row_of(out, f"mute{i}")
        assert f"  mute{i}: http://127.0.0.1:{ports[i]}/api/tags: no answer within 2 s\n" in out


def test_init_and_check_config_as_commands(tmp_path: Path) -> None:
    gpumanager = Path(sys.executable).with_name("gpumanager")
    assert gpumanager.exists()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GPUMANAGER_", "CLOUD_", "AWS_", "RUNPOD_"))}
    path = tmp_path / "cfg" / "config.toml"
    down = closed_port_url()

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(gpumanager), *args], capture_output=True, text=True, env=env, timeout=60)

    done = run("init", "--config", str(path), "--ollama", down, "--surf", "gpu-", "--ec2-tag", "gpumanager=true")
    assert done.returncode == 0, done.stderr
    assert "Next:" in done.stdout and "gpumanager generate-key" in done.stdout
    assert stat.S_IMODE((path.parent / ".env").stat().st_mode) == 0o600
    done = run("check-config", "--config", str(path))
    assert done.returncode == 0, done.stderr
    assert "none (from config)" in row_of(done.stdout, "local") and "(hosts found by aws)" in done.stdout

    refused = run("init", "--config", str(path))
    assert refused.returncode == 2
    assert refused.stderr == f"gpumanager: error: {path}: already exists; pass --force to overwrite it\n"


async def door_without_token(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """A host behind gpu-node's door, asked without the token it wants."""
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 401, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"unauthorized"})


def test_check_config_says_when_a_host_wants_the_upstream_token(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with (
        start_blocking_portal() as portal,
        portal.wrap_async_context_manager(running_server(door_without_token)) as door,
    ):
        path = tmp_path / "config.toml"
        assert cli(capsys, "init", "--config", str(path), "--ollama", door.url)[0] == 0
        code, out, err = cli(capsys, "check-config", "--config", str(path))
    assert code == 0, err
    assert "none (from config)" in row_of(out, "local")
    assert f"  local: {door.url}/api/tags: HTTP 401 (check GPUMANAGER_UPSTREAM_TOKEN)\n" in out
