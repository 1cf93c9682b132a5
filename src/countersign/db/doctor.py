"""The database doctor: ordered checks behind ``countersign db check`` and the start-up gate.

Each check has a stable id; a failed check says what is wrong in one sentence and what to do
in a hint, and carries a stable ``problem`` code for machines. Checks after a failed one that
they depend on are skipped. Driver errors are recognised by type (never by a traceback).
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import asyncpg  # type: ignore[import-untyped]
from alembic.runtime.migration import MigrationContext
from alembic.util import CommandError
from sqlalchemy import text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from countersign.config import Profile, Settings
from countersign.db import migrations
from countersign.db.tables import Base
from countersign.domain.errors import StartupError

MIN_POSTGRES_VERSION = 13
RUNTIME_PRIVILEGES = ("SELECT", "INSERT", "UPDATE", "DELETE")
READINESS_TIMEOUT = 3.0
"""Seconds /health/ready waits for the database."""
MIGRATABLE_PROBLEMS = frozenset({"not_migrated", "behind"})
"""Problems that ``db upgrade`` (and the dev profile's start-up) fix."""


class Status(StrEnum):
    """The outcome of one check."""

    OK = "ok"
    FAIL = "fail"
    SKIP = "skip"


@dataclass(frozen=True, slots=True)
class CheckResult:
    """One line of the doctor's report."""

    id: str
    status: Status
    message: str
    hint: str = ""
    problem: str | None = None
    """A stable code for a failure, e.g. ``connection_refused`` or ``not_migrated``."""


@dataclass(slots=True)
class Report:
    """Every check in order; healthy when none failed."""

    results: list[CheckResult] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when no check failed."""
        return all(result.status is not Status.FAIL for result in self.results)

    @property
    def first_failure(self) -> CheckResult | None:
        """The first failed check, or None."""
        return next((r for r in self.results if r.status is Status.FAIL), None)

    def get(self, check_id: str) -> CheckResult | None:
        """The result of the check with this id, or None if it did not run."""
        return next((r for r in self.results if r.id == check_id), None)

    def as_json(self) -> dict[str, Any]:
        """The report as plain JSON values."""
        return {"ok": self.ok, "checks": [asdict(result) for result in self.results]}

    def add(self, result: CheckResult) -> CheckResult:
        """Append a result and return it."""
        self.results.append(result)
        return result


async def diagnose(settings: Settings) -> Report:
    """Run every check against the configured database and return the report."""
    url = make_url(settings.database_url)
    report = Report()
    if url.get_backend_name() == "sqlite":
        await _diagnose_sqlite(url, settings, report)
    else:
        await _diagnose_postgres(url, settings, report)
    return report


async def startup_gate(settings: Settings) -> Report:
    """Reach a correct, migrated database or raise StartupError (SPEC invariant 7).

    ``dev`` migrates a database that is behind (or new); ``prod`` never migrates by itself.
    """
    report = await diagnose(settings)
    failure = report.first_failure
    if (
        failure is not None
        and settings.profile is Profile.DEV
        and failure.problem in MIGRATABLE_PROBLEMS
    ):
        # Migrating only helps when the migration state is the sole problem: a role that may
        # not create tables, say, would only turn one clear sentence into a failed migration.
        other = next(
            (r for r in report.results if r.status is Status.FAIL and r is not failure), None
        )
        if other is not None:
            raise StartupError(other.message, hint=other.hint)
        await _apply(settings, migrations.upgrade, "head", verb="upgrade")
        report = await diagnose(settings)
        failure = report.first_failure
    if failure is not None:
        raise StartupError(failure.message, hint=failure.hint)
    return report


@dataclass(frozen=True, slots=True)
class Migration:
    """What ``db upgrade`` or ``db downgrade`` did: the revision before and after."""

    before: str | None
    after: str | None


async def upgrade(settings: Settings, revision: str = "head") -> Migration:
    """Upgrade the database to ``revision``, or raise StartupError saying why it cannot."""
    report = await diagnose(settings)
    _raise_if_unusable(report, ignore=("migrations.state", "privileges"))
    _raise_if_failed(report, "migrations.state", problems=("unknown_revision",))
    _raise_if_failed(report, "privileges", problems=("no_create_privilege", "no_schema"))
    return await _apply(settings, migrations.upgrade, revision, verb="upgrade")


async def downgrade(settings: Settings, revision: str) -> Migration:
    """Downgrade the database to ``revision``, or raise StartupError saying why it cannot."""
    report = await diagnose(settings)
    _raise_if_unusable(report, ignore=("migrations.state", "privileges"))
    _raise_if_failed(report, "migrations.state", problems=("unknown_revision",))
    return await _apply(settings, migrations.downgrade, revision, verb="downgrade")


async def current_revision(settings: Settings) -> str | None:
    """The database's revision (None if never migrated), or StartupError if it is unreachable."""
    report = await diagnose(settings)
    _raise_if_unusable(report, ignore=("migrations.state", "privileges", "sqlite.writable"))
    url = make_url(settings.database_url)
    if url.get_backend_name() == "sqlite" and not _sqlite_path(url).exists():
        return None  # do not create an empty file just to say that it is empty
    engine = create_check_engine(settings)
    try:
        return await migrations.current_revision(engine)
    except (SQLAlchemyError, OSError) as exc:
        raise StartupError(
            f"Reading the revision of {_label(url)} failed: {_first_line(exc)}.",
            hint="Run `countersign db check` to see what is wrong.",
        ) from None
    finally:
        await engine.dispose()


async def _apply(
    settings: Settings,
    step: Callable[[AsyncEngine, str], Awaitable[None]],
    revision: str,
    *,
    verb: str,
) -> Migration:
    """Run one Alembic step; every failure becomes one sentence."""
    url = make_url(settings.database_url)
    engine = create_check_engine(settings)
    try:
        before = await migrations.current_revision(engine)
        try:
            await step(engine, revision)
        except CommandError as exc:
            raise StartupError(
                f"Cannot {verb} {_label(url)} to {revision!r}: {_first_line(exc)}.",
                hint=f"Known revisions: {', '.join(sorted(migrations.known_revisions()))} "
                "(also head, base, or a step such as -1); see `countersign db current`.",
            ) from None
        except (SQLAlchemyError, OSError) as exc:
            raise StartupError(
                f"The {verb} of {_label(url)} to {revision!r} failed: {_first_line(exc)}.",
                hint="Run `countersign db check` to see what is wrong.",
            ) from None
        after = await migrations.current_revision(engine)
    except (SQLAlchemyError, OSError) as exc:
        raise StartupError(
            f"Reading the revision of {_label(url)} failed: {_first_line(exc)}.",
            hint="Run `countersign db check` to see what is wrong.",
        ) from None
    finally:
        await engine.dispose()
    return Migration(before=before, after=after)


def _raise_if_unusable(report: Report, *, ignore: tuple[str, ...]) -> None:
    """Raise the first failure outside ``ignore``: the database cannot be used at all."""
    for result in report.results:
        if result.status is Status.FAIL and result.id not in ignore:
            raise StartupError(result.message, hint=result.hint)


def _raise_if_failed(report: Report, check_id: str, *, problems: tuple[str, ...]) -> None:
    result = report.get(check_id)
    if result is not None and result.status is Status.FAIL and result.problem in problems:
        raise StartupError(result.message, hint=result.hint)


def _label(url: URL) -> str:
    """How messages name the database: the SQLite file, or database, host and port."""
    if url.get_backend_name() == "sqlite":
        return f"the SQLite database {_sqlite_path(url)}"
    return f"the database {url.database or url.username or 'postgres'!r} at {_where(url)}"


def _where(url: URL) -> str:
    return f"{url.host or 'localhost'}:{url.port or 5432}"


def create_check_engine(settings: Settings) -> AsyncEngine:
    """A pool-less engine for one-off checks and migrations."""
    url = make_url(settings.database_url)
    if url.get_backend_name() == "sqlite":
        return create_async_engine(url, poolclass=NullPool)
    return create_async_engine(
        url, poolclass=NullPool, connect_args={"timeout": settings.db_connect_timeout}
    )


# --- SQLite -----------------------------------------------------------------------------


async def _diagnose_sqlite(url: URL, settings: Settings, report: Report) -> None:
    path = _sqlite_path(url)
    if not _sqlite_file_checks(path, report):
        return
    engine = create_check_engine(settings)
    try:
        async with engine.connect() as connection:
            writable = await _sqlite_writable(connection)
            if not writable:
                report.add(
                    CheckResult(
                        "sqlite.writable",
                        Status.FAIL,
                        f"The SQLite file {path} is read-only.",
                        hint=(
                            f"Give the server's user write access to {path} and to its folder "
                            f"{path.parent} (see ls -l, and lsattr for the immutable flag)."
                        ),
                        problem="read_only",
                    )
                )
            else:
                report.add(
                    CheckResult("sqlite.writable", Status.OK, f"{path} is readable and writable.")
                )
            report.add(await _migration_state(connection, _label(url)))
    except SQLAlchemyError as exc:
        report.add(
            CheckResult(
                "sqlite.open",
                Status.FAIL,
                f"The SQLite file {path} cannot be opened: {_first_line(exc)}.",
                hint="Check that it is a Countersign database and that it is not damaged.",
                problem="unreadable",
            )
        )
    finally:
        await engine.dispose()


def _sqlite_path(url: URL) -> Path:
    return Path(url.database or "").expanduser().resolve()


def _sqlite_file_checks(path: Path, report: Report) -> bool:
    """Folder and file checks; True when the file exists and is worth opening."""
    folder = path.parent
    if not folder.is_dir():
        report.add(
            CheckResult(
                "sqlite.directory",
                Status.FAIL,
                f"The folder {folder} for the SQLite database does not exist.",
                hint=f"Create it (mkdir -p {folder}) or point COUNTERSIGN_DATABASE_URL elsewhere.",
                problem="directory_missing",
            )
        )
        _skip_rest(report, "sqlite.writable", "migrations.state")
        return False
    report.add(CheckResult("sqlite.directory", Status.OK, f"The folder {folder} exists."))
    if path.exists():
        return True
    if not os.access(folder, os.W_OK):
        report.add(
            CheckResult(
                "sqlite.writable",
                Status.FAIL,
                f"The folder {folder} is not writable, so the SQLite file cannot be made.",
                hint=f"Give the server's user write access to {folder}.",
                problem="read_only",
            )
        )
        _skip_rest(report, "migrations.state")
        return False
    report.add(CheckResult("sqlite.writable", Status.OK, f"{folder} is writable."))
    report.add(
        CheckResult(
            "migrations.state",
            Status.FAIL,
            f"The SQLite file {path} does not exist yet, so it is not migrated.",
            hint="Run `countersign db upgrade` (the dev profile does this on start).",
            problem="not_migrated",
        )
    )
    return False


async def _sqlite_writable(connection: AsyncConnection) -> bool:
    """Write the header's user_version back unchanged and roll back: an honest writability test.

    ``BEGIN IMMEDIATE`` alone is no test: SQLite grants it on a file it opened read-only.
    """
    version = int(await connection.scalar(text("PRAGMA user_version")) or 0)
    try:
        await connection.exec_driver_sql("BEGIN IMMEDIATE")
        try:
            await connection.exec_driver_sql(f"PRAGMA user_version = {version}")
        finally:
            await connection.exec_driver_sql("ROLLBACK")
    except SQLAlchemyError as exc:
        if "readonly" in str(exc).lower().replace("-", "").replace(" ", ""):
            return False
        raise
    return True


# --- PostgreSQL -------------------------------------------------------------------------


async def _diagnose_postgres(url: URL, settings: Settings, report: Report) -> None:
    where = _where(url)
    engine = create_check_engine(settings)
    try:
        try:
            async with asyncio.timeout(settings.db_connect_timeout + 2):
                connection_cm = engine.connect()
                connection = await connection_cm.__aenter__()
        except (SQLAlchemyError, OSError, TimeoutError, asyncpg.PostgresError) as exc:
            report.add(_connection_failure(exc, url, where, settings))
            _skip_rest(report, "server.version", "migrations.state", "privileges")
            return
        try:
            version_num = int(await connection.scalar(text("SHOW server_version_num")) or 0)
            report.add(
                CheckResult(
                    "connect", Status.OK, f"Connected to PostgreSQL at {where} as {url.username}."
                )
            )
            major = version_num // 10000
            if major < MIN_POSTGRES_VERSION:
                report.add(
                    CheckResult(
                        "server.version",
                        Status.FAIL,
                        f"PostgreSQL {major} is too old; Countersign needs "
                        f"{MIN_POSTGRES_VERSION} or newer.",
                        hint="Upgrade the PostgreSQL server.",
                        problem="server_too_old",
                    )
                )
            else:
                report.add(CheckResult("server.version", Status.OK, f"PostgreSQL {major}."))
            state = report.add(await _migration_state(connection, _label(url)))
            report.add(
                await _postgres_privileges(
                    connection,
                    database=url.database or url.username or "postgres",
                    migrated=state.status is Status.OK,
                )
            )
        finally:
            await connection_cm.__aexit__(None, None, None)
    finally:
        await engine.dispose()


def _connection_failure(
    exc: BaseException, url: URL, where: str, settings: Settings
) -> CheckResult:
    user = url.username or "postgres"
    database = url.database or user
    for error in _causes(exc):
        if isinstance(error, asyncpg.InvalidPasswordError):
            return _fail_connect(
                f"PostgreSQL at {where} rejected the password for user {user!r}.",
                "Check the user name and password in COUNTERSIGN_DATABASE_URL.",
                "bad_password",
            )
        if isinstance(error, asyncpg.InvalidCatalogNameError):
            return _fail_connect(
                f"The database {database!r} does not exist on the PostgreSQL server at {where}.",
                f"Create it (createdb -h {url.host} -p {url.port or 5432} -U {user} {database}) "
                "or fix the database name in COUNTERSIGN_DATABASE_URL.",
                "database_missing",
            )
        if isinstance(error, asyncpg.InvalidAuthorizationSpecificationError):
            return _fail_connect(
                f"PostgreSQL at {where} refused user {user!r}: {_first_line(error)}.",
                "Check that the role exists and that pg_hba.conf lets it connect.",
                "access_denied",
            )
        if isinstance(error, asyncpg.InsufficientPrivilegeError):
            return _fail_connect(
                f"User {user!r} may not connect to database {database!r} at {where}.",
                f"GRANT CONNECT ON DATABASE {database} TO {user}.",
                "access_denied",
            )
        if isinstance(error, socket.gaierror):
            return _fail_connect(
                f"The database host {url.host!r} cannot be resolved.",
                "Check the host name in COUNTERSIGN_DATABASE_URL.",
                "unknown_host",
            )
        if isinstance(error, ConnectionRefusedError):
            return _fail_connect(
                f"Nothing accepts connections at {where} (connection refused).",
                "Start PostgreSQL, or fix the host and port in COUNTERSIGN_DATABASE_URL.",
                "connection_refused",
            )
        if isinstance(error, ssl.SSLError) or "ssl" in str(error).lower():
            return _fail_connect(
                f"The TLS handshake with PostgreSQL at {where} failed: {_first_line(error)}.",
                "Check the ssl setting in COUNTERSIGN_DATABASE_URL and the server's TLS setup.",
                "tls",
            )
        if isinstance(error, TimeoutError):
            return _fail_connect(
                f"Connecting to PostgreSQL at {where} timed out after "
                f"{settings.db_connect_timeout:g} s.",
                "Check that the host and port are right and that no firewall drops the traffic.",
                "timeout",
            )
    return _fail_connect(
        f"Cannot connect to PostgreSQL at {where}: {_first_line(exc)}.",
        "Check COUNTERSIGN_DATABASE_URL and that the server is running.",
        "connection_failed",
    )


def _fail_connect(message: str, hint: str, problem: str) -> CheckResult:
    return CheckResult("connect", Status.FAIL, message, hint=hint, problem=problem)


async def _postgres_privileges(
    connection: AsyncConnection, *, database: str, migrated: bool
) -> CheckResult:
    role = await connection.scalar(text("SELECT current_user"))
    schema = await connection.scalar(text("SELECT current_schema()"))
    if schema is None:
        return CheckResult(
            "privileges",
            Status.FAIL,
            f"Role {role!r} has no usable schema on its search_path.",
            hint=f"Create a schema the role may use, or GRANT USAGE ON SCHEMA public TO {role}.",
            problem="no_schema",
        )
    if not migrated:
        may_create = await connection.scalar(
            text("SELECT has_schema_privilege(current_user, current_schema(), 'CREATE')")
        )
        if not may_create:
            return CheckResult(
                "privileges",
                Status.FAIL,
                f"Role {role!r} may not create tables in schema {schema!r} of database "
                f"{database!r}, so it cannot run the migrations.",
                hint=(
                    "Run `countersign db upgrade` as the database owner, or "
                    f"GRANT CREATE ON SCHEMA {schema} TO {role}."
                ),
                problem="no_create_privilege",
            )
        return CheckResult(
            "privileges",
            Status.OK,
            f"Role {role!r} may create tables in schema {schema!r} of database {database!r}.",
        )
    for table in Base.metadata.sorted_tables:
        for privilege in RUNTIME_PRIVILEGES:
            allowed = await connection.scalar(
                text("SELECT has_table_privilege(current_user, :table, :privilege)"),
                {"table": f"{schema}.{table.name}", "privilege": privilege},
            )
            if not allowed:
                return CheckResult(
                    "privileges",
                    Status.FAIL,
                    f"Role {role!r} lacks {privilege} on table {table.name!r} of database "
                    f"{database!r}.",
                    hint=(
                        "GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA "
                        f"{schema} TO {role}."
                    ),
                    problem="no_table_privilege",
                )
    return CheckResult(
        "privileges", Status.OK, f"Role {role!r} may read and write every Countersign table."
    )


# --- Both -------------------------------------------------------------------------------


async def _migration_state(connection: AsyncConnection, label: str) -> CheckResult:
    current = await connection.run_sync(_current_revision)
    head = migrations.head_revision()
    if current is None:
        return CheckResult(
            "migrations.state",
            Status.FAIL,
            f"{_capital(label)} has not been migrated.",
            hint="Run `countersign db upgrade` (the dev profile does this on start).",
            problem="not_migrated",
        )
    if current == head:
        return CheckResult(
            "migrations.state", Status.OK, f"{_capital(label)} is at revision {head} (head)."
        )
    if current not in migrations.known_revisions():
        return CheckResult(
            "migrations.state",
            Status.FAIL,
            f"{_capital(label)} is at revision {current!r}, which this version of "
            "Countersign does not know (a newer version migrated it).",
            hint=(
                "Run the newer Countersign, or use it to run "
                f"`countersign db downgrade {head}` first."
            ),
            problem="unknown_revision",
        )
    return CheckResult(
        "migrations.state",
        Status.FAIL,
        f"{_capital(label)} is at revision {current}, older than this version's head {head}.",
        hint="Run `countersign db upgrade`.",
        problem="behind",
    )


def _capital(sentence: str) -> str:
    return sentence[:1].upper() + sentence[1:]


def _current_revision(sync_connection: Any) -> str | None:
    return MigrationContext.configure(sync_connection).get_current_revision()


def _skip_rest(report: Report, *ids: str) -> None:
    for check_id in ids:
        report.add(CheckResult(check_id, Status.SKIP, "Skipped: an earlier check failed."))


def _causes(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    stack: list[BaseException] = [exc]
    while stack:
        error = stack.pop(0)
        if id(error) in seen:
            continue
        seen.add(id(error))
        yield error
        for linked in (getattr(error, "orig", None), error.__cause__, error.__context__):
            if isinstance(linked, BaseException):
                stack.append(linked)
        if isinstance(error, BaseExceptionGroup):
            stack.extend(error.exceptions)


def _first_line(exc: BaseException) -> str:
    for error in _causes(exc):
        if not isinstance(error, SQLAlchemyError):
            text_ = str(error).strip().splitlines()
            if text_:
                return text_[0].rstrip(".")
    return type(exc).__name__


async def readiness(engine: AsyncEngine) -> str | None:
    """None when the database answers and is at head; otherwise why not, in one sentence."""
    try:
        async with asyncio.timeout(READINESS_TIMEOUT), engine.connect() as connection:
            current = await connection.run_sync(_current_revision)
    except (SQLAlchemyError, OSError, TimeoutError) as exc:
        return f"the database cannot be reached: {_first_line(exc)}"
    head = migrations.head_revision()
    if current is None:
        return "the database has not been migrated"
    if current != head:
        return f"the database is at revision {current}, not at this version's head {head}"
    return None
