"""A real PostgreSQL server for tests: Debian's `postgresql` package, started in a temporary folder
on a free loopback port and stopped by its pid.

    with running_postgres() as pg:
        psycopg.connect(pg.url)                    # postgresql://gm@127.0.0.1:PORT/gm_test
        other = pg.new_database("ledger_a")        # a fresh database on the same server

PostgreSQL refuses to run as root, which CI is: as root, `initdb` and `postgres` run as the
`postgres` user (`runuser -u postgres -- ...`) in a folder made for and owned by it; otherwise
they run as the current user. The server trusts every local connection (`--auth=trust`) as the
superuser `gm`, and runs without fsync: nothing it holds outlives the test session.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import psycopg
from psycopg import sql

INSTALL_HINT = (
    "PostgreSQL is not installed, and these tests run a real PostgreSQL server. Install it:\n"
    "    sudo apt-get install -y --no-install-recommends postgresql     # Debian, Ubuntu\n"
    "(the tests need only its binaries in /usr/lib/postgresql/VERSION/bin; they start their own server)"
)
USER = "gm"  # the superuser initdb makes; every connection is trusted
DATABASE = "gm_test"  # the database `running_postgres` makes and `Postgres.url` names
HOST = "127.0.0.1"
READY_TIMEOUT = 30.0  # seconds for the server to accept connections
STOP_TIMEOUT = 30.0  # seconds for a fast shutdown before SIGKILL
SERVER_OPTIONS = ("fsync=off", "synchronous_commit=off", "full_page_writes=off")


@dataclass(frozen=True)
class Postgres:
    """A running server: `url` is its database `gm_test`, `pid` the postmaster's process."""

    url: str
    port: int
    pid: int
    directory: Path  # the temporary folder: data/ (the cluster), postgres.log, the Unix socket

    def url_for(self, database: str) -> str:
        return f"postgresql://{USER}@{HOST}:{self.port}/{quote(database, safe='')}"

    def new_database(self, name: str) -> str:
        """Create the database `name` (empty, from template1) and return its URL."""
        with psycopg.connect(self.url_for("postgres"), autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.url_for(name)

    def log(self) -> str:
        """What the server has logged so far."""
        return _read_log(self.directory / "postgres.log")


def postgres_bin_dir() -> Path:
    """The bin folder of the newest PostgreSQL of Debian's packages (/usr/lib/postgresql/*/bin),
    else the one holding `postgres` and `initdb` on PATH. Fails with the package to install."""

    def version(bin_dir: Path) -> tuple[int, ...]:
        return tuple(int(part) for part in bin_dir.parent.name.split(".") if part.isdigit())

    installed = [p.parent for p in Path("/usr/lib/postgresql").glob("*/bin/postgres") if os.access(p, os.X_OK)]
    if installed:
        return max(installed, key=version)
    on_path = shutil.which("postgres")
    if on_path and os.access(Path(on_path).parent / "initdb", os.X_OK):
        return Path(on_path).parent
    raise AssertionError(INSTALL_HINT)


@contextlib.contextmanager
def running_postgres() -> Iterator[Postgres]:
    """Start a PostgreSQL server in a new temporary folder on a free loopback port, with the
    database `gm_test`; yield it; then stop it by its pid (SIGINT, a fast shutdown; SIGKILL if it
    outlasts STOP_TIMEOUT) and remove the folder, whatever happened in between."""
    bin_dir = postgres_bin_dir()
    as_user = _as_server_user()
    directory = _make_folder(as_user is not None)
    data = directory / "data"
    try:
        initdb = [str(bin_dir / "initdb"), "-D", str(data), "-U", USER, "--auth=trust", "-E", "UTF8", "--locale=C"]
        _run([*(as_user or ()), *initdb, "--no-sync"], directory, "initdb")
        for attempt in range(3):
            port = _free_port()
            command = [
                *(as_user or ()),
                str(bin_dir / "postgres"),
                *("-D", str(data), "-p", str(port), "-h", HOST, "-k", str(directory)),
                *(arg for option in SERVER_OPTIONS for arg in ("-c", option)),
            ]
            with _server(command, directory, data, as_user is not None) as (proc, pid):
                if pid is None:  # exited early: a port taken between _free_port and bind is retried
                    log = _read_log(directory / "postgres.log")
                    if "could not bind" in log and attempt < 2:
                        continue
                    raise AssertionError(f"PostgreSQL exited with {proc.returncode} on port {port}:\n{log}")
                postgres = Postgres(f"postgresql://{USER}@{HOST}:{port}/{DATABASE}", port, pid, directory)
                postgres.new_database(DATABASE)
                yield postgres
                return
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@contextlib.contextmanager
def _server(
    command: list[str], directory: Path, data: Path, via_runuser: bool
) -> Iterator[tuple[subprocess.Popen[bytes], int | None]]:
    """Popen `command` (postgres, perhaps under runuser); yield it and the postmaster's pid once
    it accepts connections, or None if it exited first; stop it by that pid on the way out."""
    log_path = directory / "postgres.log"
    pid: int | None = None
    with log_path.open("wb") as log:  # afresh: a retry reads only its own attempt's log
        # Its own session: a ^C at the terminal reaches pytest, which then stops the server in order.
        proc = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=directory,
            start_new_session=True,
        )
    try:
        port = int(command[command.index("-p") + 1])
        deadline = time.monotonic() + READY_TIMEOUT
        while proc.poll() is None:
            try:
                with psycopg.connect(host=HOST, port=port, user=USER, dbname="postgres", connect_timeout=5):
                    pass
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise AssertionError(
                        f"PostgreSQL did not accept connections on {HOST}:{port} within {READY_TIMEOUT:.0f} s:\n"
                        + _read_log(log_path)
                    ) from None
                time.sleep(0.05)
                continue
            # Under runuser, proc is runuser (which ignores SIGINT): the postmaster is its child.
            pid = _postmaster_pid(data) if via_runuser else proc.pid
            break
        yield proc, pid
    finally:
        _stop(proc, pid if pid is not None else _postmaster_pid(data) if via_runuser else proc.pid)


def _stop(proc: subprocess.Popen[bytes], pid: int | None) -> None:
    """A fast shutdown (SIGINT) of the postmaster `pid`, then SIGKILL if it outlasts STOP_TIMEOUT.
    `proc` (the postmaster, or runuser around it) is waited for, so no process is left behind."""
    if proc.poll() is None:
        if pid is not None:
            _signal(pid, signal.SIGINT)
        else:  # runuser before the postmaster wrote its pid: runuser passes SIGTERM on
            proc.terminate()
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            if pid is not None:
                _signal(pid, signal.SIGKILL)
            proc.kill()
            proc.wait(STOP_TIMEOUT)


def _signal(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)


def _postmaster_pid(data: Path) -> int | None:
    """The postmaster's pid, from the first line of data/postmaster.pid (None if not there)."""
    try:
        return int((data / "postmaster.pid").read_text().split("\n", 1)[0])
    except (OSError, ValueError):
        return None


def _as_server_user() -> list[str] | None:
    """The prefix that runs a command as the `postgres` user when we are root; None otherwise."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        raise AssertionError(
            "Running as root, the tests start PostgreSQL as the `postgres` user, and there is none.\n" + INSTALL_HINT
        ) from None
    runuser = shutil.which("runuser", path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"]))
    assert runuser, "Running as root, the tests start PostgreSQL with runuser (util-linux), and there is none."
    return [runuser, "-u", "postgres", "--"]


def _make_folder(for_postgres_user: bool) -> Path:
    """A new temporary folder for the cluster; given to the `postgres` user under a base every
    user can traverse when `for_postgres_user`. Short, for the Unix socket's path (107 bytes)."""
    base = Path(tempfile.gettempdir())
    if for_postgres_user and not all(p.stat().st_mode & stat.S_IXOTH for p in [base, *base.parents]):
        base = Path("/tmp")
    directory = Path(tempfile.mkdtemp(prefix="gm-postgres-", dir=base))
    if for_postgres_user:
        entry = pwd.getpwnam("postgres")
        os.chown(directory, entry.pw_uid, entry.pw_gid)
        directory.chmod(0o755)
    return directory


def _run(command: list[str], cwd: Path, what: str) -> None:
    done = subprocess.run(command, cwd=cwd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise AssertionError(f"{what} failed ({done.returncode}): {' '.join(command)}\n{done.stdout}{done.stderr}")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def _read_log(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return "(no log)"
