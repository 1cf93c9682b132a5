"""A graceful stop (SIGTERM) with real processes: nothing a client saw is lost, a running tool
is not cut off within the grace, the runs still going are handed back at once and taken over,
and the process exits with status 0.

Server A carries 18 replies from a model that streams for seconds, one approved ``shell``
call that ends within the grace and one that does not, with a live SSE stream on each run.
A gets SIGTERM; its streams end cleanly after whole events; it exits 0 once the grace is
over, holding no run. Server B (the next start on SQLite; a second process on PostgreSQL
would do the same) takes the runs over: each client resumes with ``Last-Event-ID`` and gets
exactly the rest of the stored log; the short tool's result is recorded once; the long tool,
cut off at the end of the grace, is not run again by itself: its run asks a person again.
"""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from countersign.domain.events import EventType, assistant_text
from countersign.domain.models import OUTCOME_UNKNOWN
from tests.api.test_runs import Sse, parse_sse
from tests.e2e.test_crash_safety import (
    ACTIVE,
    WAIT,
    Database,
    api,
    decide,
    eventually,
    file_lines,
    new_api_key,
    new_session,
    process_alive,
    replay,
    send,
    shell_message,
    start,
)
from tests.support import fake_openai
from tests.support.databases import TestDatabase
from tests.support.fake_openai import FakeOpenAI
from tests.support.fake_openai import text as reply
from tests.support.server import ServerProcesses, server_env

GRACE = 2.0
"""COUNTERSIGN_SHUTDOWN_GRACE_SECONDS for A: shorter than a reply, longer than the short tool."""
TEXT_RUNS = 18
WORDS = 40
"""Words per reply, 0.1 s apart: a reply takes about four seconds, longer than the grace."""


async def stream_until_closed(http: httpx.AsyncClient, session_id: str, run_id: str) -> list[Sse]:
    """Read the run's live stream until the server ends it; the whole events it sent."""
    body = ""
    async with (
        asyncio.timeout(WAIT),
        http.stream("GET", f"/sessions/{session_id}/runs/{run_id}/events") as response,
    ):
        assert response.status_code == 200
        async for chunk in response.aiter_text():  # a cut chunk would raise here
            body += chunk
    events = parse_sse(body)
    # Only whole events: the body ends at an event's end (or a ping's).
    assert body.replace("\r\n", "\n").endswith("\n\n") or not body, body[-200:]
    return events


async def test_sigterm_hands_runs_back_finishes_tools_and_loses_nothing(
    database: TestDatabase,
    db: Database,
    servers: ServerProcesses,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake_openai.pace(monkeypatch, 0.1)
    words = [f" w{index}" for index in range(WORDS)]
    expected = "".join(words)
    workspaces = tmp_path / "workspaces"
    quick = "sh -c 'echo $$ > quick.pid; sleep 1.2; echo quick done'"
    slow = "sh -c 'echo $$ > slow.pid; echo run >> count.txt; sleep 30'"
    with FakeOpenAI() as model, servers:
        # Enough replies for every run twice: A's attempts are cut off, B's finish.
        model.script(*[reply(*words) for _ in range(2 * TEXT_RUNS)])
        env = server_env(
            database.url,
            default_model="openai:fake",
            openai_base_url=model.base_url,
            workspace_root=str(workspaces),
            shutdown_grace_seconds=str(GRACE),
        )
        key = await new_api_key(database.url)
        a = await start(servers, "a", env)
        async with api(a, key) as http:
            created = await http.post("/agents", json={"name": "tools", "model": "demo"})
            assert created.status_code == 201, created.text
            tool_sessions: dict[str, tuple[str, str]] = {}
            for name, command in (("quick", quick), ("slow", slow)):
                answer = await http.post("/sessions", json={"agent_id": created.json()["id"]})
                session_id = answer.json()["id"]
                run_id = await send(http, session_id, shell_message(command))
                asked = await replay(http, session_id, run_id)
                assert asked[-1].event == "approval.required", asked
                tool_sessions[name] = (session_id, run_id)
            text_runs: dict[str, str] = {}
            for _ in range(TEXT_RUNS):
                session_id = await new_session(http)
                text_runs[await send(http, session_id, "tell me")] = session_id
            streams = {
                run_id: asyncio.create_task(stream_until_closed(http, session_id, run_id))
                for run_id, session_id in text_runs.items()
            }
            for session_id, run_id in tool_sessions.values():
                pending = (await http.get(f"/sessions/{session_id}/pending-approvals")).json()
                await decide(http, session_id, pending["items"][0]["id"])
                streams[run_id] = asyncio.create_task(stream_until_closed(http, session_id, run_id))
            for name, (session_id, _run_id) in tool_sessions.items():
                await file_lines(workspaces / session_id / f"{name}.pid", 1)

            async def replies_under_way() -> bool | None:
                runs = [await db.run(run_id) for run_id in text_runs]
                return True if all(run.last_seq >= 3 for run in runs) else None

            await eventually(replies_under_way, within=WAIT, what="every reply to stream")
            stopped = await asyncio.to_thread(a.stop)
            seen = {run_id: await task for run_id, task in streams.items()}

        assert stopped.returncode == 0, a.tail()
        assert not stopped.killed, a.tail()
        assert "Traceback" not in a.stderr(), a.tail()
        # Nothing is left held by A: the runs still going were handed back, not left to their
        # leases (10 s) to run out.
        for run_id in [*text_runs, *(run for _session, run in tool_sessions.values())]:
            state = await db.run(run_id)
            assert f":{a.pid}:" not in (state.owner or ""), state
        handed_back = [run_id for run_id in text_runs if (await db.run(run_id)).status in ACTIVE]
        assert handed_back, "every reply ended within the grace: nothing was handed back"

        # The short tool finished within the grace: its result is recorded, it ran once.
        _session, quick_run = tool_sessions["quick"]
        quick_events = await db.events(quick_run)
        results = [e for e in quick_events if e.type is EventType.TOOL_RESULT]
        assert len(results) == 1, quick_events
        assert "quick done" in str(results[0].data["output"])
        assert not results[0].data.get("stopped")

        b = await start(servers, "b", env)
        began = time.monotonic()
        async with api(b, key) as http:
            for run_id, session_id in text_runs.items():
                before = seen[run_id]
                after = before[-1].id if before else None
                rest = await replay(http, session_id, run_id, after=after)
                stored = await db.events(run_id)
                # Exactly the stored log, wherever the stream was cut: no gap, no duplicate.
                assert [(e.id, e.event) for e in before + rest] == [
                    (e.seq, e.type.value) for e in stored
                ]
                assert stored[-1].type is EventType.RUN_FINISHED, (stored[-1], a.tail(), b.tail())
                assert assistant_text(stored) == expected
            takeover = time.monotonic() - began
            print(f"handed back: {len(handed_back)} runs; all finished {takeover:.2f} s after B")

            state = await db.run(quick_run)
            if state.status != "succeeded":
                final, _ = await eventually(
                    lambda: _ended(db, quick_run), within=WAIT, what="the quick tool's run"
                )
                assert final == "succeeded"
            assert lines_of_tool(await db.events(quick_run)) == 1

            # The long tool was cut off at the end of the grace: recorded as stopped, and the
            # run asks a person again instead of running it again by itself.
            slow_session, slow_run = tool_sessions["slow"]

            async def asks_again() -> dict[str, Any] | None:
                answer = await http.get(f"/sessions/{slow_session}/pending-approvals")
                items: list[dict[str, Any]] = answer.json()["items"]
                return items[0] if items else None

            again, _ = await eventually(asks_again, within=WAIT, what="the slow tool to ask")
            assert again["asked_because"] == OUTCOME_UNKNOWN
            assert again["arguments"] == {"command": slow}
            slow_events = await db.events(slow_run)
            cut = [e for e in slow_events if e.type is EventType.TOOL_RESULT]
            assert len(cut) == 1, slow_events
            assert cut[0].data.get("stopped") is True, cut
            assert (workspaces / slow_session / "count.txt").read_text().splitlines() == ["run"]
            # Cut off means stopped: the command's process group did not outlive the stop.
            assert not process_alive(int((workspaces / slow_session / "slow.pid").read_text()))
        assert "Traceback" not in b.stderr(), b.tail()


async def _ended(db: Database, run_id: str) -> str | None:
    state = await db.run(run_id)
    return None if state.status in ACTIVE else state.status


def lines_of_tool(events: list[Any]) -> int:
    """How many times the tool was started."""
    return [e.type for e in events].count(EventType.TOOL_CALL)


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "ctrl-c"])
async def test_a_second_sigterm_stops_at_once_and_leaves_the_run_recoverable(
    stop: signal.Signals,
    database: TestDatabase,
    db: Database,
    servers: ServerProcesses,
    tmp_path: Path,
) -> None:
    """With a long grace and a tool that outlasts it, a second SIGTERM ends the wait: the
    process exits 0 at once, the tool is recorded as stopped and the run is handed back.
    Ctrl+C (SIGINT) is the same stop: exit 0, and a second one still hands the run back."""
    workspaces = tmp_path / "workspaces"
    env = server_env(database.url, workspace_root=str(workspaces), shutdown_grace_seconds="60")
    key = await new_api_key(database.url)
    command = "sh -c 'echo $$ > slow.pid; sleep 60'"
    a = await start(servers, "a", env)
    async with api(a, key) as http:
        session_id = await new_session(http)
        run_id = await send(http, session_id, shell_message(command))
        asked = await replay(http, session_id, run_id)
        await decide(http, session_id, asked[-1].data["approval_id"])
    await file_lines(workspaces / session_id / "slow.pid", 1)

    a.process.send_signal(stop)
    await asyncio.sleep(1.0)
    assert a.is_running(), "the first signal did not wait for the running tool"
    assert (await db.run(run_id)).status == "running"
    began = time.monotonic()
    a.process.send_signal(stop)
    code = await asyncio.to_thread(a.process.wait, 15)
    print(f"exited {time.monotonic() - began:.2f} s after the second SIGTERM")
    assert code == 0, a.tail()
    state = await db.run(run_id)
    # Handed back: still running (a retry follows), held by nobody, claimable at once.
    assert (state.status, state.owner) == ("running", None), state
    results = [e for e in await db.events(run_id) if e.type is EventType.TOOL_RESULT]
    assert [e.data.get("stopped") for e in results] == [True]
    assert not process_alive(int((workspaces / session_id / "slow.pid").read_text()))
    assert "Traceback" not in a.stderr(), a.tail()
