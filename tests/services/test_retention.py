"""Retention on both databases: deleting a session deletes its workspace folder; pruning
removes the text deltas of runs that ended before the cutoff and keeps everything else, and a
replay of a pruned run gives its message.completed without the deltas."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path

from countersign.services.retention import prune, prune_older_than
from tests.api.test_runs import events, messages_of, new_session, send
from tests.services.test_runs import running_app
from tests.support.databases import TestDatabase

API = "/api/v1"


async def test_deleting_a_session_deletes_its_workspace_folder(
    database: TestDatabase, tmp_path: Path
) -> None:
    async with running_app(database, tmp_path) as harness:
        client, account = harness.client, harness.account
        kept = await new_session(client, account)
        gone = await new_session(client, account)
        for session_id in (kept, gone):
            started = await send(client, account, session_id, '/tool list_files {"path": "."}')
            ran = await events(client, account, session_id, started["run"]["id"])
            assert ran[-1].event == "run.finished"
        root = harness.settings.workspace_root
        (root / gone / "notes").mkdir(parents=True)
        (root / gone / "notes" / "a.txt").write_text("x")
        (root / kept / "b.txt").write_text("y")

        deleted = await client.delete(f"{API}/sessions/{gone}", headers=account.headers)
        assert deleted.status_code == 204, deleted.text
        assert not (root / gone).exists()
        assert (root / kept / "b.txt").read_text() == "y"
        # A session that never had a workspace is deleted all the same.
        empty = await new_session(client, account)
        deleted = await client.delete(f"{API}/sessions/{empty}", headers=account.headers)
        assert deleted.status_code == 204


async def test_prune_removes_the_deltas_of_finished_runs_and_keeps_everything_else(
    database: TestDatabase, tmp_path: Path
) -> None:
    async with running_app(database, tmp_path) as harness:
        client, account, services = harness.client, harness.account, harness.app.state.services
        session_id = await new_session(client, account)
        old = (await send(client, account, session_id, "one two three four"))["run"]["id"]
        old_log = await events(client, account, session_id, old)
        tool = await send(client, account, session_id, '/tool list_files {"path": "."}')
        tool_log = await events(client, account, session_id, tool["run"]["id"])
        cutoff = services.clock.now()
        new = (await send(client, account, session_id, "five six"))["run"]["id"]
        new_log = await events(client, account, session_id, new)
        assert [e.event for e in old_log].count("text.delta") == 6  # "You said: one two three four"
        before = await messages_of(client, account, session_id)

        report = await prune(services, before=cutoff)

        assert report.runs == 2
        assert report.deltas == 6 + [e.event for e in tool_log].count("text.delta")
        assert report.events_after == report.events_before - report.deltas
        if report.bytes_before is not None:
            assert report.bytes_after is not None
        # The reply is still whole: in the messages, and as message.completed in the replay.
        assert await messages_of(client, account, session_id) == before
        replayed = await events(client, account, session_id, old)
        assert [e.event for e in replayed] == ["run.started", "message.completed", "run.finished"]
        assert replayed[1].data == next(e for e in old_log if e.event == "message.completed").data
        assert [e.id for e in replayed] == [e.id for e in old_log if e.event != "text.delta"]
        # Tool calls and results stay; a run that ended after the cutoff keeps its deltas.
        tool_replayed = await events(client, account, session_id, tool["run"]["id"])
        assert [e.event for e in tool_replayed if e.event.startswith("tool.")] == [
            "tool.call",
            "tool.result",
        ]
        assert await events(client, account, session_id, new) == new_log
        # Resuming in the middle of the pruned deltas goes on with what is kept.
        middle = old_log[2].id
        resumed = await events(client, account, session_id, old, after=middle)
        assert [e.event for e in resumed] == ["message.completed", "run.finished"]

        again = await prune_older_than(services, timedelta(0))
        assert again.deltas == [e.event for e in new_log].count("text.delta")
        assert (await prune_older_than(services, timedelta(0))).deltas == 0


async def test_the_server_prunes_at_start_when_set_to(
    database: TestDatabase, tmp_path: Path
) -> None:
    async with running_app(database, tmp_path) as harness:
        client, account = harness.client, harness.account
        session_id = await new_session(client, account)
        run_id = (await send(client, account, session_id, "one two three"))["run"]["id"]
        assert "text.delta" in [e.event for e in await events(client, account, session_id, run_id)]

    async with running_app(database, tmp_path, prune_older_than="0s") as later:
        assert later.settings.prune_older_than == timedelta(0)

        async def pruned() -> bool:
            log = await events(later.client, account, session_id, run_id)
            return "text.delta" not in [e.event for e in log]

        deadline = asyncio.get_running_loop().time() + 20
        while not await pruned():
            assert asyncio.get_running_loop().time() < deadline, "the start-up prune never ran"
            await asyncio.sleep(0.1)
