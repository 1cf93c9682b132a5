"""Migrated databases for tests: one template per backend, a fresh copy per test."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.ext.asyncio import create_async_engine

from countersign.config import normalise_database_url
from countersign.db import migrations
from tests.support.postgres import PostgresServer, unique_name


@dataclass(frozen=True)
class TestDatabase:
    """A migrated database that belongs to one test."""

    __test__ = False  # not a test class, despite the name

    backend: str
    """``sqlite`` or ``postgres``."""
    url: str
    name: str


async def migrate(url: str) -> None:
    """Upgrade the database at ``url`` to head."""
    engine = create_async_engine(normalise_database_url(url))
    try:
        await migrations.upgrade(engine)
    finally:
        await engine.dispose()


class SqliteTemplates:
    """Copies of one migrated SQLite file."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.template = folder / "template.db"

    async def prepare(self) -> None:
        await migrate(f"sqlite:///{self.template}")

    def copy(self, folder: Path) -> TestDatabase:
        target = folder / "countersign.db"
        shutil.copyfile(self.template, target)
        return TestDatabase(backend="sqlite", url=f"sqlite:///{target}", name=str(target))


class PostgresTemplates:
    """Databases created from one migrated template database."""

    def __init__(self, server: PostgresServer) -> None:
        self.server = server
        self.template = unique_name("cs_template")

    async def prepare(self) -> None:
        await self.server.create_database(self.template)
        await migrate(self.server.url(self.template))

    async def copy(self) -> TestDatabase:
        name = unique_name("cs_test")
        await self.server.create_database(name, template=self.template)
        return TestDatabase(backend="postgres", url=self.server.url(name), name=name)

    async def empty(self) -> TestDatabase:
        name = unique_name("cs_empty")
        await self.server.create_database(name)
        return TestDatabase(backend="postgres", url=self.server.url(name), name=name)

    async def drop(self, database: TestDatabase) -> None:
        await self.server.drop_database(database.name)

    async def cleanup(self) -> None:
        await self.server.drop_database(self.template)
