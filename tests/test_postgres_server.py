"""tests/postgres.py: a real PostgreSQL server (Debian's package) that tests share, one fresh
database each, stopped by its pid when they are done."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator

import psycopg
import pytest

from tests.postgres import Postgres, running_postgres


@pytest.fixture(scope="module")
def postgres() -> Iterator[Postgres]:
    with running_postgres() as server:
        yield server


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_writes_and_reads_a_row(postgres: Postgres) -> None:
    assert postgres.url == f"postgresql://gm@127.0.0.1:{postgres.port}/gm_test"
    with psycopg.connect(postgres.url) as conn:
        conn.execute("CREATE TABLE readings (id serial PRIMARY KEY, name text NOT NULL, grams numeric)")
        conn.execute("INSERT INTO readings (name, grams) VALUES (%s, %s)", ("café", 12.5))
        conn.commit()
    with psycopg.connect(postgres.url) as conn:
        assert conn.execute("SELECT id, name, grams::float FROM readings").fetchall() == [(1, "café", 12.5)]
        assert conn.execute("SELECT current_user, current_database()").fetchone() == ("gm", "gm_test")


def test_new_database_is_its_own(postgres: Postgres) -> None:
    with psycopg.connect(postgres.url, autocommit=True) as conn:
        conn.execute("CREATE TABLE only_in_gm_test (x int)")
    url = postgres.new_database("second one")
    assert url == f"postgresql://gm@127.0.0.1:{postgres.port}/second%20one"
    with psycopg.connect(url, autocommit=True) as conn:
        assert conn.execute("SELECT current_database()").fetchone() == ("second one",)
        assert conn.execute("SELECT to_regclass('only_in_gm_test')").fetchone() == (None,)
        conn.execute("CREATE TABLE only_in_gm_test (y text)")  # no clash: another database
    with pytest.raises(psycopg.errors.DuplicateDatabase):
        postgres.new_database("second one")


def test_the_server_stops_by_its_pid_and_its_folder_goes() -> None:
    with running_postgres() as server:
        pid, port, directory = server.pid, server.port, server.directory
        assert alive(pid)
        assert (directory / "data" / "postmaster.pid").read_text().split("\n", 1)[0] == str(pid)
        with psycopg.connect(server.url) as conn:
            assert conn.execute("SELECT pg_backend_pid() <> %s", (pid,)).fetchone() == (True,)
    assert not alive(pid)
    assert not directory.exists()
    with socket.socket() as sock, pytest.raises(ConnectionRefusedError):
        sock.connect(("127.0.0.1", port))
