"""Event streams over a real socket: a quiet run's stream says it is alive.

A real ``countersign serve`` process and a fake model provider that streams one word and then
goes quiet; the stream must carry SSE comment lines (heartbeats) while nothing happens, so
that proxies and clients do not take it for dead, and they must not look like events.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.api.test_runs import parse_sse
from tests.e2e.test_crash_safety import (
    WAIT,
    api,
    new_api_key,
    new_session,
    no_traceback,
    send,
    start,
)
from tests.support.databases import TestDatabase
from tests.support.fake_openai import FakeOpenAI, hang
from tests.support.server import ServerProcesses, server_env

pytestmark = pytest.mark.slow

HEARTBEAT = 0.2
"""Seconds between heartbeats on the server under test (the default is 15)."""


async def test_a_quiet_stream_sends_heartbeat_comments_until_the_run_moves_on(
    database: TestDatabase, servers: ServerProcesses, tmp_path: Path
) -> None:
    with FakeOpenAI() as model, servers:
        model.script(hang("Thinking"))
        env = server_env(
            database.url,
            default_model="openai:fake",
            openai_base_url=model.base_url,
            workspace_root=str(tmp_path / "workspaces"),
            model_timeout_seconds="60",
            sse_heartbeat_seconds=str(HEARTBEAT),
        )
        key = await new_api_key(database.url)
        server = await start(servers, "a", env)
        async with api(server, key) as http:
            session_id = await new_session(http)
            run_id = await send(http, session_id, "think hard")
            raw = ""
            async with (
                asyncio.timeout(WAIT),
                http.stream("GET", f"/sessions/{session_id}/runs/{run_id}/events") as response,
            ):
                assert response.status_code == 200
                async for chunk in response.aiter_text():
                    raw += chunk.replace("\r\n", "\n")
                    quiet_part = raw.partition("event: text.delta")[2]
                    if quiet_part.count("\n: ping") >= 3:
                        break

            # The comments came while the model was quiet, and parsers see no extra event.
            assert [event.event for event in parse_sse(raw)] == ["run.started", "text.delta"]
            assert parse_sse(raw)[1].data["text"] == "Thinking"
            heartbeats = [line for line in raw.split("\n") if line.startswith(":")]
            assert len(heartbeats) >= 3
            assert all(line.startswith(": ping") for line in heartbeats), heartbeats

            cancelled = await http.post(f"/sessions/{session_id}/runs/{run_id}/cancel")
            assert cancelled.status_code == 200, cancelled.text
            assert cancelled.json()["status"] == "cancelled"
        no_traceback(server)
