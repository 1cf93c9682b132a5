"""Schemathesis against a live ``countersign serve``, on each database.

Every operation of the OpenAPI is called with generated requests (examples, boundary values,
fuzzed values, and stateful sequences that follow the links between operations), with every
check on: no 5xx, every status documented, every response (SSE events too) as its schema
says, schema-invalid requests refused (413 counts as a refusal: a body over 1 MiB is refused
before its fields are read), schema-valid requests accepted except where
``schemathesis.toml`` says why a rule the schema cannot express may refuse them. The seed is
fixed; the generator's version still changes what is generated.

``GET /api/v1/me/events`` is left out: it is a feed that never ends, so each call would wait
for the request timeout; its events are checked in tests/api/test_console_api.py.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.test_crash_safety import new_api_key
from tests.support.databases import TestDatabase
from tests.support.server import ServerProcesses, server_env

pytestmark = pytest.mark.slow

CONFIG = Path(__file__).with_name("schemathesis.toml")
RUN_TIMEOUT = 300


async def test_the_openapi_holds_under_generated_requests(
    database: TestDatabase, tmp_path: Path
) -> None:
    env = server_env(database.url, workspace_root=str(tmp_path / "workspaces"))
    key = await new_api_key(database.url)
    with ServerProcesses(tmp_path) as servers:
        server = await asyncio.to_thread(servers.start, "fuzzed", env=env)
        command = [
            sys.executable,
            "-m",
            "schemathesis.cli",
            "--config-file",
            str(CONFIG),
            "run",
            f"{server.base_url}/openapi.json",
            "--header",
            f"Authorization: Bearer {key}",
            "--checks",
            "all",
            "--exclude-path",
            "/api/v1/me/events",
            "--max-examples",
            "10",
            "--seed",
            "1",
            "--request-timeout",
            "10",
            "--suppress-health-check",
            "all",
            "--no-color",
        ]
        done = await asyncio.to_thread(
            subprocess.run,
            command,
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT,
            check=False,
            cwd=tmp_path,
        )
        # Generated bodies can be megabytes on one line: every line cut short, head and tail.
        lines = [line[:400] for line in (done.stdout + done.stderr).splitlines()]
        report = "\n".join(lines)
        assert done.returncode == 0, "\n".join([*lines[:150], "…", *lines[-150:]])
        assert "passed" in report, report[-5_000:]
        # A request that made the server fail is a 5xx the checks above report; the server's
        # own output must not hold a traceback either.
        assert "Traceback" not in server.stderr(), server.tail(80)
