"""API keys on disk and the CLI that manages them, including a running server picking up changes."""

from __future__ import annotations

import json
import socket
import stat
from pathlib import Path

import httpx
import pytest

from gpumanager.cli import main
from gpumanager.errors import KeyStoreError
from gpumanager.keys import KeyStore, hash_key
from tests.harness import SimHost, running_stack, wait_until


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_key_quiet_prints_only_the_key_and_stores_only_its_hash(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "config.toml"
    config.write_text("")
    code, out, _ = cli(capsys, "generate-key", "--config", str(config), "--name", "Ada", "--email", "ada@x.org", "-q")
    key = out.strip()
    assert code == 0 and out == key + "\n" and key.startswith("gm_") and len(key) > 40
    path = tmp_path / "api_keys.json"
    text = path.read_text()
    assert key not in text and hash_key(key) in text
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["config.toml", "api_keys.json"] or sorted(
        p.name for p in tmp_path.iterdir()
    ) == ["api_keys.json", "config.toml"]  # no temp file left
    record = json.loads(text)["keys"][0]
    assert record["name"] == "Ada" and record["key_hash"].startswith("sha256:") and not record.get("admin")


def test_generate_key_without_quiet_explains(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # no config.toml here: the defaults apply
    code, out, _ = cli(capsys, "generate-key", "--name", "Bo", "--email", "bo@x.org", "--admin")
    assert code == 0 and "admin key" in out and "shown only this once" in out
    assert (tmp_path / "api_keys.json").exists()


def test_list_keys_never_shows_keys_or_hashes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = KeyStore(tmp_path / "api_keys.json")
    record, key = store.generate("Cy", "cy@x.org")
    (tmp_path / "config.toml").write_text("")
    code, out, _ = cli(capsys, "list-keys", "--config", str(tmp_path / "config.toml"))
    assert code == 0 and "Cy" in out and record.id in out and record.prefix in out
    assert key not in out and hash_key(key) not in out


def test_revoke_by_id_or_prefix(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = KeyStore(tmp_path / "api_keys.json")
    first, first_key = store.generate("a", "a@x")
    _second, second_key = store.generate("b", "b@x")
    (tmp_path / "config.toml").write_text("")
    code, out, _ = cli(capsys, "revoke-key", "--config", str(tmp_path / "config.toml"), first.id)
    assert code == 0 and first.id in out
    code, _, err = cli(capsys, "revoke-key", "--config", str(tmp_path / "config.toml"), "gm_")
    assert code == 2 and "matches several keys" in err
    assert cli(capsys, "revoke-key", "--config", str(tmp_path / "config.toml"), second_key)[0] == 0
    fresh = KeyStore(tmp_path / "api_keys.json")
    assert fresh.authenticate(first_key) is None and fresh.authenticate(second_key) is None
    with pytest.raises(KeyStoreError, match="no key"):
        fresh.revoke("nothing-like-it")


def test_authenticate(tmp_path: Path) -> None:
    store = KeyStore(tmp_path / "k.json")
    record, key = store.generate("a", "a@x", admin=True)
    identity = store.authenticate(key)
    assert identity is not None and (identity.id, identity.admin) == (record.id, True)
    assert store.authenticate(key + "x") is None and store.authenticate("") is None


def test_hand_written_plaintext_keys_work_with_a_warning(tmp_path: Path) -> None:
    path = tmp_path / "k.json"
    path.write_text(json.dumps({"keys": [{"id": "hand", "name": "old", "key": "a" * 64}]}))
    identity = KeyStore(path).authenticate("a" * 64)
    assert identity is not None and identity.id == "hand"


def test_a_broken_key_file_fails_clearly(tmp_path: Path) -> None:
    (tmp_path / "k.json").write_text("{not json")
    with pytest.raises(KeyStoreError, match="not a valid key file"):
        KeyStore(tmp_path / "k.json")


def test_a_running_server_picks_up_new_and_revoked_keys(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with running_stack(tmp_path, [SimHost("h")]) as stack:
        _, out, _ = cli(
            capsys, "generate-key", "--config", str(stack.config_path), "--name", "n", "--email", "n@x", "--quiet"
        )
        key = out.strip()
        headers = {"Authorization": f"Bearer {key}"}
        assert httpx.get(stack.url + "/api/tags", headers=headers).status_code == 200  # at once, no restart
        assert cli(capsys, "revoke-key", "--config", str(stack.config_path), key[:12])[0] == 0
        wait_until(lambda: httpx.get(stack.url + "/api/tags", headers=headers).status_code == 401, timeout=3)


def test_help_explains_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    out = capsys.readouterr().out
    assert done.value.code == 0
    for command in ("server", "demo", "generate-key", "list-keys", "revoke-key", "check-config", "hosts"):
        assert command in out


def test_check_config_prints_the_hosts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as sock:  # a loopback port nothing listens on: the host is down
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    (tmp_path / "config.toml").write_text(f'[[hosts]]\nname = "box"\nurl = "{url}"\nslots = 3\nmodels = ["llama3.2"]\n')
    code, out, _ = cli(capsys, "check-config", "--config", str(tmp_path / "config.toml"))
    assert code == 0 and "box" in out and url in out and "llama3.2 (from config)" in out


def test_check_config_reports_a_bad_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "config.toml").write_text("[scheduler]\nmax_queue = 'lots'\n")
    code, _, err = cli(capsys, "check-config", "--config", str(tmp_path / "config.toml"))
    assert code == 2 and "scheduler.max_queue: wrong type" in err


def test_limits_are_set_at_generation_changed_cleared_and_listed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "config.toml"
    config.write_text("")
    code, out, _ = cli(
        capsys, "generate-key", "--config", str(config), "--name", "Ada", "--email", "a@x.org",
        "--dollars-per-day", "5", "--requests-per-minute", "30", "--models", "llama3*,qwen2.5:*",
    )  # fmt: skip
    assert code == 0 and "Limits: $5.00/day; 30/min; models llama3*,qwen2.5:*" in out
    key_id = json.loads((tmp_path / "api_keys.json").read_text())["keys"][0]["id"]
    code, out, _ = cli(capsys, "set-limits", "--config", str(config), key_id, "--tokens-per-day", "1000",
                       "--clear", "models", "--clear", "requests-per-minute")  # fmt: skip
    assert code == 0 and out.strip().endswith("1,000 tokens/day; $5.00/day")
    stored = json.loads((tmp_path / "api_keys.json").read_text())["keys"][0]["limits"]
    assert stored == {"tokens_per_day": 1000, "dollars_per_day": 5.0}
    assert stat.S_IMODE((tmp_path / "api_keys.json").stat().st_mode) == 0o600
    code, out, _ = cli(capsys, "list-keys", "--config", str(config))
    assert code == 0 and "1,000 tokens/day (used 0); $5.00/day (used $0.00)" in out and "0 tokens, $0.00" in out
    code, _, err = cli(capsys, "set-limits", "--config", str(config), key_id, "--dollars-per-day", "-1")
    assert code == 2 and "dollars_per_day" in err and "> 0" in err
    code, _, err = cli(capsys, "set-limits", "--config", str(config), key_id)
    assert code == 2 and "nothing to change" in err
    code, _, err = cli(capsys, "set-limits", "--config", str(config), "nobody", "--max-concurrent", "2")
    assert code == 2 and "no key with id or prefix 'nobody'" in err
