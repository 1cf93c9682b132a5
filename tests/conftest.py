"""Fixtures shared by every test: real databases (SQLite files and PostgreSQL), the app, users.

``database`` is parametrised over ``sqlite`` and ``postgres``; each test gets a fresh migrated
database of its own, copied from a template that is migrated once per run.
"""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager
from fastapi import FastAPI

from countersign.agent.tools import install_mcp, install_plugins
from countersign.app import create_app
from countersign.config import Settings
from countersign.db.tables import Base
from countersign.domain.models import User
from countersign.services import ServiceDeps
from countersign.services.accounts import create_api_key, create_user
from tests.support import postgres
from tests.support.databases import PostgresTemplates, SqliteTemplates, TestDatabase

BACKENDS = ["sqlite", "postgres"]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--backend",
        action="append",
        choices=BACKENDS,
        help="Run database tests on this backend only (repeatable; default: both).",
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "backend" in metafunc.fixturenames:
        chosen = metafunc.config.getoption("--backend") or BACKENDS
        only = metafunc.definition.get_closest_marker("backends")
        if only is not None:
            chosen = [name for name in chosen if name in only.args]
        metafunc.parametrize("backend", chosen, scope="session")


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[postgres.PostgresServer]:
    """The PostgreSQL server of this test run (COUNTERSIGN_TEST_DATABASE_URL or a throwaway)."""
    server = postgres.from_environment() or postgres.start_throwaway()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def own_postgres(tmp_path: Path) -> Iterator[postgres.PostgresServer]:
    """A throwaway PostgreSQL of this test's own, so stopping it disturbs no other test."""
    server = postgres.start_throwaway(tmp_path / "pg")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def sqlite_templates(tmp_path_factory: pytest.TempPathFactory) -> SqliteTemplates:
    templates = SqliteTemplates(tmp_path_factory.mktemp("sqlite-template"))
    postgres.run(templates.prepare())
    return templates


@pytest.fixture(scope="session")
def postgres_templates(postgres_server: postgres.PostgresServer) -> Iterator[PostgresTemplates]:
    templates = PostgresTemplates(postgres_server)
    postgres.run(templates.prepare())
    try:
        yield templates
    finally:
        postgres.run(templates.cleanup())


@pytest.fixture
async def database(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[TestDatabase]:
    """A fresh, migrated database of this test's own, on the parametrised backend."""
    if backend == "sqlite":
        templates: SqliteTemplates = request.getfixturevalue("sqlite_templates")
        yield templates.copy(tmp_path)
        return
    pg_templates: PostgresTemplates = request.getfixturevalue("postgres_templates")
    db = await pg_templates.copy()
    try:
        yield db
    finally:
        await pg_templates.drop(db)


@pytest.fixture
async def empty_database(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[TestDatabase]:
    """A database with no tables at all, on the parametrised backend."""
    if backend == "sqlite":
        path = tmp_path / "empty.db"
        yield TestDatabase(backend="sqlite", url=f"sqlite:///{path}", name=str(path))
        return
    pg_templates: PostgresTemplates = request.getfixturevalue("postgres_templates")
    db = await pg_templates.empty()
    try:
        yield db
    finally:
        await pg_templates.drop(db)


def make_settings(url: str, **overrides: Any) -> Settings:
    """Settings for tests: nothing read from a .env file."""
    # No grace at shutdown: a test's app stops at once, as its tests of recovery expect.
    values: dict[str, Any] = {
        "database_url": url,
        "profile": "dev",
        "log_level": "WARNING",
        "shutdown_grace_seconds": 0,
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


@pytest.fixture
def settings(database: TestDatabase, tmp_path: Path) -> Settings:
    return make_settings(database.url, workspace_root=tmp_path / "workspaces")


@pytest.fixture
async def app(settings: Settings) -> AsyncIterator[FastAPI]:
    """The real application with its lifespan running."""
    application = create_app(settings)
    async with LifespanManager(application, startup_timeout=30, shutdown_timeout=30):
        yield application


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client talking to the app in-process (real ASGI, real database)."""
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://countersign.test") as http:
        yield http


@pytest.fixture
def services(app: FastAPI) -> ServiceDeps:
    """The app's services bundle."""
    deps: ServiceDeps = app.state.services
    return deps


@dataclass(frozen=True)
class Account:
    """A user made for one test, with an API key."""

    user: User
    key: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}


_counter = iter(range(10**9))


@pytest.fixture
def make_account(services: ServiceDeps) -> Callable[[], Awaitable[Account]]:
    """Make a new user with an API key (each call another user)."""

    async def make() -> Account:
        email = f"user{next(_counter)}-{id(services):x}@example.test"
        user = await create_user(services, email=email, password="correct horse battery")
        _key, secret = await create_api_key(services, email=email, name="test")
        return Account(user=user, key=secret)

    return make


@pytest.fixture(autouse=True)
def _no_plugins_left_over() -> Iterator[None]:
    """Plugin and MCP tools are per process: an app built with them leaves none behind it."""
    yield
    install_plugins({})
    install_mcp(None)


def alive_rows() -> list[Base]:
    """ORM row instances still alive in this process (after a full collection)."""
    gc.collect()
    return [obj for obj in gc.get_objects() if isinstance(obj, Base)]


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Print how many tests passed per backend, so CI can insist on both."""
    passed = terminalreporter.stats.get("passed", [])
    counts = {
        name: sum(1 for report in passed if report.when == "call" and f"[{name}" in report.nodeid)
        for name in BACKENDS
    }
    terminalreporter.write_line(
        "backends: " + ", ".join(f"{name}={count} passed" for name, count in counts.items())
    )
