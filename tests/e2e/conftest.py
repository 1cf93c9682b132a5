"""Fixtures of the end-to-end tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.server import ServerProcesses


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[ServerProcesses]:
    """This test's server processes; whatever still runs at the end is stopped."""
    with ServerProcesses(tmp_path) as started:
        yield started
