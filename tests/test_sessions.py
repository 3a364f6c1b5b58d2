"""Dashboard sessions: signed cookies that hold a key's id, and their secret."""

from __future__ import annotations

import base64
import json
import stat
from pathlib import Path

import pytest

from gpumanager.errors import ConfigError
from gpumanager.keys import KeyStore
from gpumanager.sessions import LIFETIME, LINK_SECONDS, Sessions, cookie_value, load_secret, same_origin


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def keys(tmp_path: Path) -> KeyStore:
    return KeyStore(tmp_path / "api_keys.json")


def test_a_session_names_its_key_until_it_expires(keys: KeyStore) -> None:
    record, key = keys.generate("ada", "ada@example.org")
    clock = Clock()
    sessions = Sessions(b"s" * 32, keys, clock=clock)
    cookie = sessions.issue(record.id)
    assert key not in cookie and record.id not in cookie.split(".")[1]
    who = sessions.identity(cookie)
    assert who is not None and who.id == record.id and who.name == "ada"
    clock.now += LIFETIME - 1
    assert sessions.identity(cookie) is not None
    clock.now += 2
    assert sessions.identity(cookie) is None


def test_forged_altered_or_foreign_cookies_are_refused(keys: KeyStore) -> None:
    user, _ = keys.generate("user", "u@example.org")
    admin, _ = keys.generate("root", "r@example.org", admin=True)
    sessions = Sessions(b"s" * 32, keys)
    body, _, signature = sessions.issue(user.id).partition(".")
    payload = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    payload["k"] = admin.id  # become the admin
    forged = base64.urlsafe_b64encode(json.dumps(payload).encode()).decode().rstrip("=")
    assert sessions.identity(f"{forged}.{signature}") is None
    assert sessions.identity(body + "." + signature[:-2] + "AA") is None
    assert sessions.identity("garbage") is None and sessions.identity("") is None
    other = Sessions(b"t" * 32, keys)  # another server's secret
    assert other.identity(sessions.issue(user.id)) is None


def test_logout_and_revocation_end_a_session(keys: KeyStore) -> None:
    record, _ = keys.generate("ada", "ada@example.org")
    sessions = Sessions(b"s" * 32, keys)
    first, second = sessions.issue(record.id), sessions.issue(record.id)
    sessions.end(first)
    assert sessions.identity(first) is None and sessions.identity(second) is not None
    keys.revoke(record.id)
    assert sessions.identity(second) is None


def test_a_logout_outlives_a_restart(keys: KeyStore, tmp_path: Path) -> None:
    record, _ = keys.generate("ada", "ada@example.org")
    secret = load_secret({}, tmp_path)
    sessions = Sessions(secret, keys, state_dir=tmp_path)
    gone, kept = sessions.issue(record.id), sessions.issue(record.id)
    sessions.end(gone)
    restarted = Sessions(load_secret({}, tmp_path), keys, state_dir=tmp_path)
    assert restarted.identity(gone) is None and restarted.identity(kept) is not None


def test_a_secret_file_too_short_is_made_again(tmp_path: Path) -> None:
    path = tmp_path / "session_secret"
    path.write_bytes(b"")  # a write cut short
    secret = load_secret({}, tmp_path)
    assert len(secret) == 64 and path.read_bytes().strip() == secret
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["session_secret"]  # no temporary file left


def test_one_time_links(keys: KeyStore) -> None:
    record, _ = keys.generate("ada", "ada@example.org")
    clock = Clock()
    sessions = Sessions(b"s" * 32, keys, clock=clock)
    token = sessions.link(record.id)
    assert sessions.redeem(token) == record.id
    assert sessions.redeem(token) is None  # spent
    late = sessions.link(record.id)
    clock.now += LINK_SECONDS + 1
    assert sessions.redeem(late) is None


def test_the_secret_comes_from_the_environment_or_is_made_once_private(tmp_path: Path) -> None:
    assert load_secret({"GPUMANAGER_SESSION_SECRET": "x" * 32}, tmp_path) == b"x" * 32
    with pytest.raises(ConfigError, match="too short"):
        load_secret({"GPUMANAGER_SESSION_SECRET": "short"}, tmp_path)
    made = load_secret({}, tmp_path / "state")
    path = tmp_path / "state" / "session_secret"
    assert len(made) == 64 and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_secret({}, tmp_path / "state") == made  # the same after a restart


def test_cookie_and_origin_reading() -> None:
    headers = [(b"cookie", b"a=1; gm_session=abc.def; b=2"), (b"host", b"127.0.0.1:8000")]
    assert cookie_value(headers) == "abc.def"
    assert cookie_value([(b"cookie", b"a=1")]) is None
    scope = {"scheme": "http", "headers": [*headers, (b"origin", b"http://127.0.0.1:8000")]}
    assert same_origin(scope, "")
    assert not same_origin({**scope, "headers": [*headers, (b"origin", b"http://127.0.0.1:8001")]}, "")
    assert not same_origin({**scope, "headers": headers}, "")  # no Origin: refused
    behind = {"scheme": "http", "headers": [(b"host", b"10.0.0.2:8000"), (b"origin", b"https://gpu.example.org")]}
    assert same_origin(behind, "https://gpu.example.org/") and not same_origin(behind, "")
