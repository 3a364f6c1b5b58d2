"""config.toml: the example loads, defaults hold, and a bad file fails with one clear line."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from gpumanager.config import Config, load, loads
from gpumanager.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def test_the_example_documents_every_key_and_loads() -> None:
    config = load(ROOT / "config.toml.example")
    text = (ROOT / "config.toml.example").read_text()
    for section in (
        config.server,
        config.timing,
        config.paths,
        config.scheduler,
        config.usage,
        config.budget,
        config.events,
        config.cluster,
    ):
        for key in section.__struct_fields__:
            assert f"\n{key} = " in text or f"\n# {key} = " in text, f"{key} is not documented"
    assert config.hosts[0].name == "lab-box"


def test_an_empty_file_is_all_defaults() -> None:
    config = loads(b"", "/srv/gm/config.toml")
    assert config.server.port == 8000 and config.scheduler.default_slots == 4
    assert config.paths.api_keys_file == "/srv/gm/api_keys.json"  # relative to the config's folder
    assert config.all_providers() == []


def test_one_host_is_a_valid_file(tmp_path: Path) -> None:
    (tmp_path / "c.toml").write_text('[[hosts]]\nname = "x"\nurl = "http://127.0.0.1:11434"\n')
    assert load(tmp_path / "c.toml").hosts[0].url == "http://127.0.0.1:11434"


def test_durations_accept_fractions_and_integers() -> None:
    config = loads(b"[timing]\nqueue_timeout_seconds = 0.25\nreservation_minutes = 2\n")
    assert config.timing.queue_timeout_seconds == 0.25 and config.timing.reservation_minutes == 2.0


def test_the_seed_cloud_api_section_is_a_surf_provider() -> None:
    config = loads(b'[cloud_api]\nmachine_name_filter = "Lab"\n')
    (provider,) = config.all_providers()
    assert (provider.name, provider.machine_name_filter) == ("surf", "Lab")  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[server]\nbogus = 1\n", "c.toml: server.bogus: unknown key"),
        ('[server]\nport = "eighty"\n', "c.toml: server.port: wrong type: expected int, got str"),
        ("[server]\nport = 70000\n", "c.toml: server.port: expected `int` <= 65535"),
        ('[[hosts]]\nurl = "http://x"\n', "c.toml: hosts[0].name: missing value"),
        ("[timing]\nqueue_timeout_seconds = -1\n", "c.toml: timing.queue_timeout_seconds: expected `float` > 0"),
        ("[scheduler]\ndefault_slots = 0\n", "c.toml: scheduler.default_slots: expected `int` >= 1"),
        ('[[hosts]]\nname = "a"\nurl = "ftp://x"\n', "c.toml: hosts[0].url: must start with http:// or https://"),
        ('[[hosts]]\nname = "a"\n[[hosts]]\nname = "a"\n', "c.toml: hosts[1].name: duplicate host name 'a'"),
        ('[[hosts]]\nname = "a"\nprovider = "aws"\n', "c.toml: hosts[0].provider: no provider named 'aws'"),
        ('[[providers]]\ntype = "azure"\nname = "x"\n', "c.toml: providers[0].type: invalid value 'azure'"),
        ("[server\nport = 1\n", "c.toml: not valid TOML"),
        ("nonsense = true\n", "c.toml: nonsense: unknown key"),
        ('[[providers]]\ntype = "surf"\nname = "s"\n', "c.toml: providers[0].machine_name_filter: must not be empty"),
        ('[[providers]]\ntype = "runpod"\nname = "r"\n', "c.toml: providers[0]: a runpod provider needs"),
        ('[[providers]]\ntype = "ec2"\nname = "e"\n', "c.toml: providers[0]: an ec2 provider needs"),
        (
            '[[hosts]]\nname = "a"\nurl = "http://x"\njobs = true\n',
            "c.toml: hosts[0].jobs: only a RunPod serverless endpoint serves jobs, not a static one",
        ),
        (
            '[[hosts]]\nname = "a"\njobs = true\n',
            'hosts[0].jobs: only a RunPod serverless endpoint serves jobs: name a `type = "runpod"`',
        ),
        (
            '[[providers]]\ntype = "surf"\nname = "s"\nmachine_name_filter = "x"\n'
            '[[hosts]]\nname = "a"\nprovider = "s"\njobs = true\n',
            "c.toml: hosts[0].jobs: only a RunPod serverless endpoint serves jobs",
        ),
    ],
)
def test_a_bad_file_fails_with_the_file_the_key_and_the_problem(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "c.toml").write_text(text)
    with pytest.raises(ConfigError) as error:
        load(tmp_path / "c.toml")
    line = str(error.value)
    assert "\n" not in line and message in line.replace(str(tmp_path) + "/", "")


def test_a_missing_file_says_so(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found"):
        load(tmp_path / "nope.toml")


def test_the_server_refuses_a_bad_file_in_one_line_without_a_traceback(tmp_path: Path) -> None:
    (tmp_path / "config.toml").write_text("[server]\nport = 'x'\n")
    done = subprocess.run(
        [sys.executable, "-m", "gpumanager", "server", "--config", str(tmp_path / "config.toml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"gpumanager: error: {tmp_path / 'config.toml'}: server.port: wrong type: expected int, got str"
    ]


def test_config_structs_are_frozen() -> None:
    config = Config()
    with pytest.raises(AttributeError):
        config.server.port = 1  # type: ignore[misc]


def test_the_commented_provider_blocks_of_the_example_load_once_uncommented() -> None:
    lines = (ROOT / "config.toml.example").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("# [[providers]]"))
    end = next(i for i, line in enumerate(lines) if line.startswith("# Overrides for a host"))
    toml_line = re.compile(r"^# (\[\[?[\w.]+\]\]?|\w+ = )")
    block = "\n".join(line[2:] for line in lines[start:end] if toml_line.match(line))
    config = loads(block)
    kinds = [type(p).__name__ for p in config.providers]
    assert kinds == ["SurfProviderConfig", "Ec2ProviderConfig", "RunpodProviderConfig", "SimulatedProviderConfig"]
    documented = block + (ROOT / "config.toml.example").read_text()
    for provider in config.providers:
        for key in provider.__struct_fields__:
            assert f"{key} = " in documented or key in ("name",), f"{key} of {type(provider).__name__} is undocumented"
