"""Fixtures of the end-to-end tests."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.e2e.test_crash_safety import Database
from tests.support.databases import TestDatabase
from tests.support.server import ServerProcesses


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[ServerProcesses]:
    """This test's server processes; whatever still runs at the end is stopped."""
    with ServerProcesses(tmp_path) as started:
        yield started


@pytest.fixture
async def db(database: TestDatabase) -> AsyncIterator[Database]:
    """Read-only queries on the servers' database."""
    reader = Database(database.url)
    try:
        yield reader
    finally:
        await reader.engine.dispose()
