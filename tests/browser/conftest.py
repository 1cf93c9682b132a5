"""Browser tests: a real Chromium, driven by Playwright, against a real ``countersign serve``.

The browser is Playwright's own Chromium when it was downloaded (``playwright install
chromium``), else the system's (``apt-get install -y chromium``: ``/usr/bin/chromium``). Where
neither exists the tests skip with a sentence saying how to get one, except under CI (the
``CI`` variable set), where they fail: ``.ci/run`` installs the browser first.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support.databases import TestDatabase
from tests.support.server import ServerProcess, ServerProcesses, server_env

playwright_api = pytest.importorskip(
    "playwright.async_api", reason="pip install playwright (the test extra) for browser tests"
)

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
"""Flags for a closed network: without the background-networking ones Chromium keeps trying
to reach Google's hosts."""
SYSTEM_CHROMIUM = ("/usr/bin/chromium", "/usr/bin/chromium-browser")


def chromium_path(playwright: Any) -> str | None:
    """Playwright's own Chromium when downloaded, else the system's; None when neither."""
    own = Path(playwright.chromium.executable_path)
    if own.exists():
        return str(own)
    for candidate in SYSTEM_CHROMIUM:
        if Path(candidate).exists():
            return candidate
    found = shutil.which("chromium")
    return found


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    """A headless Chromium for this test."""
    async with playwright_api.async_playwright() as playwright:
        path = chromium_path(playwright)
        if path is None:
            message = (
                "no Chromium for the browser tests: `apt-get install -y chromium` "
                "(or `playwright install chromium`)"
            )
            if os.environ.get("CI"):
                pytest.fail(message)
            pytest.skip(message)
        launched = await playwright.chromium.launch(executable_path=path, args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            await launched.close()


@dataclass
class Console:
    """A running server for the page, and how to start it again on the same database."""

    servers: ServerProcesses
    env: dict[str, str]
    server: ServerProcess
    workspace: Path

    @property
    def url(self) -> str:
        return self.server.base_url + "/"

    def restart(self) -> None:
        """Stop the server (SIGTERM) and start another on the same database."""
        self.server.stop()
        self.server = self.servers.start("console-again", env=self.env)


@pytest.fixture
def console_settings() -> dict[str, str]:
    """Extra server settings a test may set before ``console`` starts the server."""
    return {}


@pytest.fixture
def console(
    database: TestDatabase, tmp_path: Path, console_settings: dict[str, str]
) -> Iterator[Console]:
    """``countersign serve`` on this test's database, on 127.0.0.1, stopped at the end."""
    workspace = tmp_path / "workspaces"
    env = server_env(database.url, workspace_root=str(workspace), **console_settings)
    with ServerProcesses(tmp_path) as servers:
        server = servers.start("console", env=env)
        yield Console(servers, env, server, workspace)
