"""`countersign db check` against real broken databases: one diagnosis, one sentence each.

Every case builds the broken situation for real (a closed port, a wrong password, a role
without privileges, a read-only file, a database a newer version migrated …) and runs the CLI
as a subprocess, the way an operator would. Nothing is mocked.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from countersign.config import Settings
from countersign.db import doctor, migrations
from countersign.domain.errors import StartupError
from tests.support.cli import cli_env, countersign
from tests.support.databases import SqliteTemplates, TestDatabase
from tests.support.postgres import PostgresServer, free_port, run, unique_name

NEWER_REVISION = "ffff00000002"
"""The revision a simulated newer Countersign adds on top of this version's head."""


# --- running `countersign db check` -----------------------------------------------------


@dataclass(frozen=True)
class Checked:
    """The outcome of one `countersign db check --json`."""

    code: int
    report: dict[str, Any]
    seconds: float

    @property
    def checks(self) -> dict[str, dict[str, Any]]:
        return {check["id"]: check for check in self.report["checks"]}

    @property
    def failure(self) -> dict[str, Any]:
        """The first failed check (the one an operator should fix first)."""
        return next(check for check in self.report["checks"] if check["status"] == "fail")


def db_check(url: str, cwd: Path, **extra_env: str) -> Checked:
    """`countersign db check --json` against ``url``."""
    started = time.monotonic()
    finished = countersign("db", "check", "--json", env=cli_env(url, **extra_env), cwd=cwd)
    seconds = time.monotonic() - started
    assert finished.returncode in (0, 1), finished.stderr
    return Checked(code=finished.returncode, report=json.loads(finished.stdout), seconds=seconds)


def assert_failed(
    checked: Checked, check_id: str, problem: str, *names: str, skipped: tuple[str, ...] = ()
) -> str:
    """Exit 1; the first failure is ``check_id``/``problem``, names each of ``names`` in one
    sentence, has a hint; the checks that depend on it are skipped. Returns the sentence."""
    assert checked.code == 1
    assert checked.report["ok"] is False
    failure = checked.failure
    assert (failure["id"], failure["problem"]) == (check_id, problem), failure
    message = failure["message"]
    for name in names:
        assert name in message, (name, message)
    assert message.endswith(".")
    assert "\n" not in message
    assert failure["hint"]
    for check in skipped:
        assert checked.checks[check]["status"] == "skip"
    return str(message)


# --- databases in a state of their own --------------------------------------------------


@dataclass(frozen=True)
class WeakRole:
    """An empty database, and a LOGIN role that may connect to it but not create tables."""

    url: str
    role: str
    database: str


@pytest.fixture
def weak_role(postgres_server: PostgresServer) -> Iterator[WeakRole]:
    database, role, password = unique_name("cs_weak"), unique_name("cs_role"), "weak-password"
    run(postgres_server.create_database(database))
    run(postgres_server.execute(f"CREATE ROLE {role} LOGIN PASSWORD '{password}'"))
    try:
        # PostgreSQL 15+ no longer lets PUBLIC create in schema public: the situation is real.
        may_create = run(
            postgres_server.fetchval(
                "SELECT has_schema_privilege($1, 'public', 'CREATE')", role, database=database
            )
        )
        assert may_create is False
        yield WeakRole(postgres_server.url(database, user=role, password=password), role, database)
    finally:
        run(postgres_server.drop_database(database))
        run(postgres_server.execute(f"DROP ROLE IF EXISTS {role}"))


def alembic_version_exists(postgres_server: PostgresServer, database: str) -> bool:
    found = run(
        postgres_server.fetchval("SELECT to_regclass('alembic_version')", database=database)
    )
    return found is not None


def set_revision(database: TestDatabase, revision: str, request: pytest.FixtureRequest) -> None:
    """Write ``revision`` into the database's alembic_version row, as a migration would."""
    statement = f"UPDATE alembic_version SET version_num = '{revision}'"  # noqa: S608 (test's own id)
    if database.backend == "sqlite":
        connection = sqlite3.connect(database.name)
        try:
            with connection:
                assert connection.execute(statement).rowcount == 1
        finally:
            connection.close()
    else:
        server: PostgresServer = request.getfixturevalue("postgres_server")
        run(server.execute(statement, database=database.name))


@pytest.fixture(scope="module")
def newer_countersign(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A newer Countersign: this source tree plus one more (empty) migration on top of head.

    Returned as the environment that makes ``python -m countersign`` run it. It is how a
    database gets "behind" honestly while this version has a single revision.
    """
    root = tmp_path_factory.mktemp("newer-countersign")
    package = Path(migrations.__file__).resolve().parents[2]  # …/src/countersign
    shutil.copytree(package, root / "countersign", ignore=shutil.ignore_patterns("__pycache__"))
    (root / "countersign/db/migrations/versions" / f"{NEWER_REVISION}_newer.py").write_text(
        f'"""A revision only the newer version has."""\n\n'
        f'revision = "{NEWER_REVISION}"\n'
        f'down_revision = "{migrations.head_revision()}"\n'
        "branch_labels = None\ndepends_on = None\n\n\n"
        "def upgrade() -> None:\n    pass\n\n\n"
        "def downgrade() -> None:\n    pass\n"
    )
    return {"PYTHONPATH": str(root)}


def pg_where(server: PostgresServer) -> str:
    return f"{server.host}:{server.port}"


# --- healthy ------------------------------------------------------------------------------


def test_healthy_database_passes_every_check(database: TestDatabase, tmp_path: Path) -> None:
    """A freshly migrated database: every check is ok and the exit code is 0."""
    checked = db_check(database.url, tmp_path)
    assert checked.code == 0
    assert checked.report["ok"] is True
    assert {check["status"] for check in checked.report["checks"]} == {"ok"}
    state = checked.checks["migrations.state"]["message"]
    assert f"revision {migrations.head_revision()} (head)" in state


def test_text_report_is_one_line_per_check_with_a_hint(tmp_path: Path) -> None:
    """Without --json: `[FAIL] id: sentence` then `hint:`, skipped checks marked, exit 1."""
    port = free_port()
    url = f"postgresql://countersign:secret@127.0.0.1:{port}/countersign"
    finished = countersign("db", "check", env=cli_env(url), cwd=tmp_path)
    assert finished.returncode == 1
    lines = finished.stdout.splitlines()
    assert lines[0] == (
        f"[FAIL] connect: Nothing accepts connections at 127.0.0.1:{port} (connection refused)."
    )
    assert lines[1].strip().startswith("hint: Start PostgreSQL")
    assert lines[2:] == [
        "[skip] server.version: Skipped: an earlier check failed.",
        "[skip] migrations.state: Skipped: an earlier check failed.",
        "[skip] privileges: Skipped: an earlier check failed.",
    ]
    assert "secret" not in finished.stdout + finished.stderr


# --- PostgreSQL: reaching the server ------------------------------------------------------


def test_connection_refused(tmp_path: Path) -> None:
    """A port nothing listens on: `connect`/`connection_refused`, naming host and port."""
    port = free_port()
    checked = db_check(f"postgresql://countersign:secret@127.0.0.1:{port}/countersign", tmp_path)
    assert_failed(
        checked,
        "connect",
        "connection_refused",
        f"127.0.0.1:{port}",
        skipped=("server.version", "migrations.state", "privileges"),
    )


def test_unknown_host(tmp_path: Path) -> None:
    """A host name that cannot resolve: `unknown_host`, naming the host, and quickly."""
    checked = db_check("postgresql://countersign:secret@nonexistent.invalid:5432/cs", tmp_path)
    assert_failed(checked, "connect", "unknown_host", "'nonexistent.invalid'")
    assert checked.seconds < 15, "a name that does not resolve must not wait for a timeout"


def test_wrong_password(postgres_server: PostgresServer, tmp_path: Path) -> None:
    """A wrong password: `bad_password`, naming host:port and user, never the password."""
    url = postgres_server.url("postgres", password="not-the-password")
    checked = db_check(url, tmp_path)
    message = assert_failed(
        checked, "connect", "bad_password", pg_where(postgres_server), repr(postgres_server.user)
    )
    assert "not-the-password" not in json.dumps(checked.report)
    assert message == (
        f"PostgreSQL at {pg_where(postgres_server)} rejected the password for user "
        f"{postgres_server.user!r}."
    )


def test_database_does_not_exist(postgres_server: PostgresServer, tmp_path: Path) -> None:
    """A database name the server does not have: `database_missing`, naming it and host:port."""
    name = unique_name("cs_missing")
    checked = db_check(postgres_server.url(name), tmp_path)
    assert_failed(checked, "connect", "database_missing", repr(name), pg_where(postgres_server))
    assert (
        f"createdb -h {postgres_server.host} -p {postgres_server.port}" in checked.failure["hint"]
    )


# --- PostgreSQL: privileges ---------------------------------------------------------------


def test_role_that_cannot_create_tables(weak_role: WeakRole, tmp_path: Path) -> None:
    """An unmigrated database and a role without CREATE on public: `no_create_privilege`."""
    checked = db_check(weak_role.url, tmp_path)
    assert checked.code == 1
    privileges = checked.checks["privileges"]
    assert (privileges["status"], privileges["problem"]) == ("fail", "no_create_privilege")
    for name in (repr(weak_role.role), "'public'", repr(weak_role.database)):
        assert name in privileges["message"]
    assert f"GRANT CREATE ON SCHEMA public TO {weak_role.role}" in privileges["hint"]
    assert checked.checks["migrations.state"]["problem"] == "not_migrated"


def test_upgrade_with_a_role_that_cannot_create_tables(
    weak_role: WeakRole, postgres_server: PostgresServer, tmp_path: Path
) -> None:
    """`db upgrade` as that role: exit 1 with the privilege sentence, and nothing created."""
    finished = countersign("db", "upgrade", env=cli_env(weak_role.url), cwd=tmp_path)
    assert finished.returncode == 1
    first = finished.stderr.splitlines()[0]
    assert first.startswith(f"error: Role {weak_role.role!r} may not create tables")
    assert "GRANT CREATE ON SCHEMA public" in finished.stderr
    assert not alembic_version_exists(postgres_server, weak_role.database)


async def test_dev_gate_names_the_privilege_instead_of_migrating(
    weak_role: WeakRole, postgres_server: PostgresServer
) -> None:
    """The dev start-up gate stops with the privilege sentence rather than a failed migration."""
    settings = Settings(_env_file=None, database_url=weak_role.url, profile="dev")  # type: ignore[call-arg]
    with pytest.raises(StartupError) as raised:
        await doctor.startup_gate(settings)
    assert raised.value.message.startswith(f"Role {weak_role.role!r} may not create tables")
    assert "GRANT CREATE" in raised.value.hint
    assert not await postgres_server.fetchval(
        "SELECT to_regclass('alembic_version') IS NOT NULL", database=weak_role.database
    )


# --- migration state (both databases) ----------------------------------------------------


def test_never_migrated(
    empty_database: TestDatabase, postgres_server_if_needed: PostgresServer | None, tmp_path: Path
) -> None:
    """A database with no tables: `migrations.state`/`not_migrated`, naming the database."""
    checked = db_check(empty_database.url, tmp_path)
    if postgres_server_if_needed is None:
        path = Path(empty_database.name)
        assert_failed(checked, "migrations.state", "not_migrated", str(path))
        assert not path.exists(), "db check must not create the file it reports on"
    else:
        where = pg_where(postgres_server_if_needed)
        message = assert_failed(
            checked, "migrations.state", "not_migrated", repr(empty_database.name), where
        )
        assert message == f"The database {empty_database.name!r} at {where} has not been migrated."
    assert "countersign db upgrade" in checked.failure["hint"]


def test_older_revision(
    database: TestDatabase, newer_countersign: dict[str, str], tmp_path: Path
) -> None:
    """A newer Countersign meets a database at this version's head: `behind`, naming both."""
    checked = db_check(database.url, tmp_path, **newer_countersign)
    message = assert_failed(checked, "migrations.state", "behind")
    assert (
        f"at revision {migrations.head_revision()}, older than this version's head "
        f"{NEWER_REVISION}" in message
    )
    assert database.name in message or repr(database.name) in message
    assert checked.failure["hint"] == "Run `countersign db upgrade`."


def test_revision_this_version_does_not_know(
    database: TestDatabase, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """A database stamped with a revision this code lacks: `unknown_revision`, naming it."""
    set_revision(database, "ffffffffffff", request)
    checked = db_check(database.url, tmp_path)
    message = assert_failed(checked, "migrations.state", "unknown_revision", "'ffffffffffff'")
    assert database.name in message
    assert "newer version" in message


def test_database_a_newer_version_migrated(
    database: TestDatabase, newer_countersign: dict[str, str], tmp_path: Path
) -> None:
    """The newer Countersign upgrades the database; this version then says it is unknown."""
    upgraded = countersign(
        "db", "upgrade", env=cli_env(database.url, **newer_countersign), cwd=tmp_path
    )
    assert upgraded.returncode == 0, upgraded.stderr
    assert f"to {NEWER_REVISION} (head)" in upgraded.stdout
    checked = db_check(database.url, tmp_path)
    assert_failed(checked, "migrations.state", "unknown_revision", repr(NEWER_REVISION))
    assert f"countersign db downgrade {migrations.head_revision()}" in checked.failure["hint"]


# --- SQLite files ------------------------------------------------------------------------


def test_sqlite_folder_does_not_exist(tmp_path: Path) -> None:
    """A path in a missing folder: `sqlite.directory`/`directory_missing`, naming the folder."""
    folder = tmp_path / "no" / "such" / "folder"
    checked = db_check(f"sqlite:///{folder}/countersign.db", tmp_path)
    assert_failed(
        checked,
        "sqlite.directory",
        "directory_missing",
        str(folder),
        skipped=("sqlite.writable", "migrations.state"),
    )
    assert f"mkdir -p {folder}" in checked.failure["hint"]
    assert not folder.exists()


def test_sqlite_file_is_read_only(sqlite_templates: SqliteTemplates, tmp_path: Path) -> None:
    """A migrated file nobody may write: `sqlite.writable`/`read_only`, naming the file."""
    path = Path(sqlite_templates.copy(tmp_path).name)
    # Root ignores permission bits, so as root make the file immutable instead.
    as_root = os.geteuid() == 0
    if as_root:
        subprocess.run(["chattr", "+i", str(path)], check=True, timeout=10)
    else:
        path.chmod(0o444)
    try:
        checked = db_check(f"sqlite:///{path}", tmp_path)
    finally:
        if as_root:
            subprocess.run(["chattr", "-i", str(path)], check=True, timeout=10)
        else:
            path.chmod(0o644)
    assert_failed(checked, "sqlite.writable", "read_only", str(path))
    assert checked.checks["migrations.state"]["status"] == "ok", "reading still works"


def test_sqlite_file_that_is_not_a_database(tmp_path: Path) -> None:
    """A file that is not SQLite at all: `sqlite.open`/`unreadable`, naming the file."""
    path = tmp_path / "countersign.db"
    path.write_bytes(b"this is a text file, not a database\n" * 200)
    checked = db_check(f"sqlite:///{path}", tmp_path)
    assert_failed(checked, "sqlite.open", "unreadable", str(path))


# --- fixtures local to this module -------------------------------------------------------


@pytest.fixture
def postgres_server_if_needed(
    backend: str, request: pytest.FixtureRequest
) -> PostgresServer | None:
    """The PostgreSQL server on the postgres backend; None on SQLite."""
    if backend != "postgres":
        return None
    server: PostgresServer = request.getfixturevalue("postgres_server")
    return server
